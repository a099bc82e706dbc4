import math

import torch

import gan
from tests import helpers


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(gan, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(gan, tmp_path, "--dataset", "ring8")
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(gan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(gan, tmp_path)
    written = helpers.sample_from(gan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


def test_help(capsys):
    assert "--g-loss" in helpers.help_text(gan, capsys)


def test_losses_match_value_function():
    """With D = sigmoid(l): D loss = -(1/2) V, non-saturating G loss = -E log D(G(z)),
    minimax G loss = E log(1 - D(G(z)))."""
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    value = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()
    assert torch.allclose(gan.d_loss(real, fake), -0.5 * value)
    assert torch.allclose(gan.g_loss_nonsaturating(fake), -torch.log(d_fake).mean())
    assert torch.allclose(gan.g_loss_minimax(fake), torch.log(1 - d_fake).mean())


def test_nonsaturating_loss_has_strong_gradient_when_d_rejects_samples():
    """Sec. 3: early on D(G(z)) ~ 0, where log(1 - D) saturates but -log D does not."""
    fake = torch.tensor([-8.0], requires_grad=True)
    (g_ns,) = torch.autograd.grad(gan.g_loss_nonsaturating(fake), fake)
    (g_mm,) = torch.autograd.grad(gan.g_loss_minimax(fake), fake)
    assert g_ns.abs() > 0.99 and g_mm.abs() < 1e-3


def test_maxout_takes_the_max_over_pieces():
    layer = gan.Maxout(3, 2, 4)
    x = torch.randn(5, 3)
    pre = layer.linear(x).view(5, 2, 4)
    assert torch.equal(layer(x), pre.max(2).values)


def test_schedule_follows_official_config():
    args = gan.parse_args([])
    lr0, m0 = gan.schedule(0, args, 50_000)
    assert lr0 == 0.1 and m0 == 0.5
    lr, m = gan.schedule(250 * 500, args, 50_000)  # epoch 250 at batch 100
    assert math.isclose(lr, 0.1 / 1.000004 ** 125_000) and math.isclose(m, 0.7)
    assert gan.schedule(10**8, args, 50_000)[0] == 1e-6


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(gan, ["--dataset", "nope", "--out", str(tmp_path / "x")], capsys, "unknown dataset")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(gan, ["--dry-run", "--steps", "0"], capsys, "--steps")


def test_dry_run_alternating_updates(tmp_path):
    """Algorithm 1 as printed (k D steps per G step) alongside the official code's simultaneous updates."""
    _, summary, _ = helpers.dry_run(gan, tmp_path, "--update", "alternating", "--k", "2")
    assert summary["step"] == 4
