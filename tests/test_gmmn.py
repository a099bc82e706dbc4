import math

import pytest
import torch

import gmmn
from common import checkpoint as ckpt_io
from tests import helpers


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(gmmn, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])
    assert "AE" not in state["models"]


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(gmmn, tmp_path, "--dataset", "ring8")
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples


def test_dry_run_autoencoder_then_gmmn(tmp_path):
    """--mode ae: 3 autoencoder phases of --ae-steps, then --steps GMMN updates, in one command."""
    out, summary, state = helpers.dry_run(gmmn, tmp_path, "--mode", "ae", "--ae-steps", "2", "--steps", "3")
    assert summary["step"] == 3 * 2 + 3
    assert {"G", "AE"} <= set(state["models"]) and "AE" not in state["optimizers"]
    assert state["models"]["G"]["net.8.weight"].shape[0] == 4  # G makes codes (dry-run code size 4)
    assert {"loss/AE_phase1", "loss/AE_phase2", "loss/AE_phase3", "loss/G"} <= set(summary["losses"])
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(gmmn, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


AE_ARGS = ["--dry-run", "--mode", "ae", "--ae-steps", "2", "--steps", "4", "--ckpt-every", "1000"]


@pytest.fixture(scope="module")
def ae_full_run(tmp_path_factory):
    """10 uninterrupted steps of --mode ae: 3 x 2 autoencoder updates, then 4 GMMN updates."""
    out = tmp_path_factory.mktemp("ae_full")
    summary = gmmn.main([*AE_ARGS, "--out", str(out)])
    assert summary["step"] == 10 and not summary["interrupted"]
    return ckpt_io.load(out / "ckpt.pt", "gmmn")


@pytest.mark.parametrize("stop", [3, 6, 8])  # in autoencoder phase 2, at its very end, in the GMMN stage
def test_resume_is_exact_across_stages(tmp_path, monkeypatch, ae_full_run, stop):
    """--mode ae: an interruption anywhere (autoencoder phases or GMMN stage) resumes exactly."""
    with monkeypatch.context() as m:
        helpers._interrupt_at(m, stop)
        half = gmmn.main([*AE_ARGS, "--out", str(tmp_path)])
    assert half["interrupted"] and half["step"] == stop
    resumed = gmmn.main([*AE_ARGS, "--out", str(tmp_path), "--resume", "auto"])
    assert resumed["step"] == 10
    b = ckpt_io.load(tmp_path / "ckpt.pt", "gmmn")
    helpers.assert_same(ae_full_run["models"], b["models"], "models")
    helpers.assert_same(ae_full_run["optimizers"], b["optimizers"], "optimizers")


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(gmmn, tmp_path)
    assert set(helpers.sample_from(gmmn, out / "ckpt.pt", tmp_path)) == {"samples", "interpolation"}


def test_sample_autoencoder_mode(tmp_path):
    out, _, _ = helpers.dry_run(gmmn, tmp_path, "--mode", "ae")
    assert set(helpers.sample_from(gmmn, out / "ckpt.pt", tmp_path)) == {"samples", "interpolation"}


def test_sample_toy(tmp_path):
    out, _, _ = helpers.dry_run(gmmn, tmp_path, "--dataset", "grid25")
    assert set(helpers.sample_from(gmmn, out / "ckpt.pt", tmp_path)) == {"samples"}


def test_help(capsys):
    text = helpers.help_text(gmmn, capsys)
    assert "--mode" in text and "--bandwidth-set" in text and "--sqrt" in text


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(gmmn, ["--dry-run", "--dataset", "ring8", "--mode", "ae", "--out", str(tmp_path / "x")],
                               capsys, "--mode ae needs image data")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(gmmn, ["--dry-run", "--bandwidths", "2", "-1"], capsys, "--bandwidths")
    helpers.expect_usage_error(gmmn, ["--dataset", "nope"], capsys, "unknown dataset")


# ---- the paper's math ------------------------------------------------------------------------------

BANDS = [2.0, 5.0, 10.0]


def test_kernel_sum_equals_direct_computation():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    k = gmmn.kernel_sum(gmmn.sq_distances(x, y), BANDS)
    for i in range(5):
        for j in range(4):
            d2 = float(((x[i] - y[j]) ** 2).sum())
            direct = sum(math.exp(-d2 / (2 * s)) for s in BANDS)
            assert math.isclose(float(k[i, j]), direct, rel_tol=1e-5)


def test_mmd_matches_the_definition():
    """MMD² (biased) = mean k(x,x') - 2 mean k(x,y) + mean k(y,y'), computed pair by pair."""
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64) + 0.7

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s)) for s in BANDS)
    kxx = sum(k(a, b) for a in x for b in x) / 36
    kyy = sum(k(a, b) for a in y for b in y) / 25
    kxy = sum(k(a, b) for a in x for b in y) / 30
    assert math.isclose(float(gmmn.mmd2(x, y, BANDS)), kxx + kyy - 2 * kxy, rel_tol=1e-4)
    ux = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    uy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    assert math.isclose(float(gmmn.mmd2(x, y, BANDS, unbiased=True)), ux + uy - 2 * kxy, rel_tol=1e-4)


def test_mmd_of_a_set_with_itself_is_zero():
    torch.manual_seed(0)
    x = torch.rand(200, 784)
    assert abs(float(gmmn.mmd2(x, x, gmmn.BANDWIDTHS[("mnist", "pixels")]))) < 1e-5
    # unbiased: two independent samples of one distribution give ~0, far below a shifted pair
    a, b = torch.randn(500, 2), torch.randn(500, 2)
    same = float(gmmn.mmd2(a, b, [1.0], unbiased=True))
    shifted = float(gmmn.mmd2(a, b + 1.0, [1.0], unbiased=True))
    assert abs(same) < 0.01 < shifted


def test_mmd_grows_as_one_set_shifts():
    torch.manual_seed(0)
    x = torch.randn(300, 2)
    values = [float(gmmn.mmd2(x, x + shift, BANDS)) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] < 1e-6
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_gradient_flows_to_generator_and_moves_samples_towards_data():
    torch.manual_seed(0)
    G = gmmn.Generator(10, [32, 32], (2,), sigmoid=False)
    real = torch.randn(256, 2) * 0.3 + 1.0
    z = gmmn.sample_noise(256, 10, "cpu")
    loss = gmmn.objective(gmmn.mmd2(G(z), real, [1.0, 4.0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    opt = torch.optim.SGD(G.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        gmmn.objective(gmmn.mmd2(G(gmmn.sample_noise(256, 10, "cpu")), real, [1.0, 4.0])).backward()
        opt.step()
    with torch.no_grad():
        after = gmmn.objective(gmmn.mmd2(G(z), real, [1.0, 4.0]))
        assert float(after) < 0.2 * float(loss)
        assert torch.allclose(G(z).mean(0), real.mean(0), atol=0.15)


def test_sqrt_objective_gradient_is_scaled_mmd_gradient():
    """d sqrt(L) = dL / (2 sqrt(L)), the official loss's gradient."""
    x = torch.randn(20, 3, requires_grad=True)
    y = torch.randn(30, 3) + 0.5
    (g_sq,) = torch.autograd.grad(gmmn.objective(gmmn.mmd2(x, y, BANDS), sqrt=False), x)
    m2 = gmmn.mmd2(x, y, BANDS)
    (g_root,) = torch.autograd.grad(gmmn.objective(m2, sqrt=True), x)
    assert torch.allclose(g_root, g_sq / (2 * m2.detach().sqrt()), atol=1e-6)


def test_sgd_with_lr_switch_takes_the_official_steps():
    """PyTorch SGD + set_lr_momentum == the official v <- m v - lr g; theta <- theta + v, across the switch."""
    args = gmmn.parse_args(["--switch-step", "4", "--lr", "2"])
    torch.manual_seed(0)
    target = torch.randn(5)
    theta = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=args.lr, momentum=args.momentum)
    ref, v = torch.zeros(5), torch.zeros(5)
    for t in range(1, 9):
        lr, m = gmmn.schedule(t, args)
        gmmn.set_lr_momentum(opt, lr, m)
        opt.zero_grad()
        (0.05 * ((theta - target) ** 2).sum()).backward()
        opt.step()
        v = m * v - lr * 0.1 * (ref - target)
        ref = ref + v
        assert torch.allclose(theta.detach(), ref, atol=1e-5), t


def test_schedule_follows_official_config():
    args = gmmn.parse_args(["--lr", "2"])
    assert gmmn.schedule(1, args) == (2.0, 0.9) and gmmn.schedule(9999, args) == (2.0, 0.9)
    lr, momentum = gmmn.schedule(10000, args)
    assert math.isclose(lr, 0.2) and math.isclose(momentum, 0.99)
    assert args.batch_size == 1000 and args.steps == 40000 and args.z_dim == 10
    assert [gmmn.ae_momentum(i, 3, args) for i in (1, 49, 50, 199, 200)] == [0.0, 0.0, 0.5, 0.5, 0.9]


def test_autoencoder_phases_train_the_right_layers_and_reduce_reconstruction_loss():
    torch.manual_seed(0)
    ae = gmmn.AutoEncoder((1, 4, 4), 12, 3, (0.0, 0.0))
    prototypes = (torch.rand(4, 1, 4, 4) > 0.5).float()  # 4 binary patterns: a 3-d code can tell them apart
    x = prototypes[torch.arange(64) % 4]
    for phase, trained in ((1, {"enc1", "dec2"}), (2, {"enc2", "dec1"}), (3, {"enc1", "enc2", "dec1", "dec2"})):
        ae.zero_grad(set_to_none=True)
        gmmn.ae_loss(ae, x, phase).backward()
        have = {name.split(".")[0] for name, p in ae.named_parameters() if p.grad is not None}
        assert have == trained, phase
    opt = torch.optim.SGD(ae.parameters(), lr=0.1, momentum=0.9)
    first = gmmn.ae_loss(ae, x, 3).item()
    for _ in range(400):
        opt.zero_grad()
        gmmn.ae_loss(ae, x, 3).backward()
        opt.step()
    assert gmmn.ae_loss(ae, x, 3).item() < 0.5 * first
