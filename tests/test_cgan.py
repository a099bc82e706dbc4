import math

import pytest
import torch
from PIL import Image

import cgan
from tests import helpers


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(cgan, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])
    assert state["num_classes"] == 10


def test_dry_run_conv(tmp_path):
    out, summary, state = helpers.dry_run(cgan, tmp_path, "--arch", "conv")
    assert state["args"]["arch"] == "conv" and state["args"]["lr"] == 2e-4


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(cgan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_resume_is_exact_conv(tmp_path, monkeypatch):
    helpers.assert_resume_exact(cgan, tmp_path, monkeypatch, ["--arch", "conv"], n=2,
                                state_keys=("models", "optimizers"))


def test_sample_has_one_row_per_class(tmp_path):
    out, _, state = helpers.dry_run(cgan, tmp_path)
    written = helpers.sample_from(cgan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}
    side = state["data_shape"][1]
    for path in written.values():  # make_grid: 2-pixel padding around every image
        width, height = Image.open(path).size
        assert (width, height) == (10 * (side + 2) + 2, state["num_classes"] * (side + 2) + 2)


def test_help(capsys):
    text = helpers.help_text(cgan, capsys)
    assert "--arch" in text and "--lr-decay" in text


def test_paper_mlp_sizes():
    args = cgan.parse_args([])
    G, D = cgan.build(args, (1, 28, 28), 10)
    assert G.z_path[0].weight.shape == (200, 100) and G.y_path[0].weight.shape == (1000, 10)
    assert G.joint[0].weight.shape == (1200, 1200) and G.joint[3].weight.shape == (784, 1200)
    assert D.x_path[2].linear.weight.shape == (240 * 5, 784)
    assert D.y_path[0].linear.weight.shape == (50 * 5, 10)
    assert D.joint[0].linear.weight.shape == (240 * 4, 290)
    assert args.lr == 0.1 and args.lr_decay == 1.00004 and args.batch_size == 100


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 28, 28)), ("conv", (3, 32, 32))])
def test_changing_only_y_changes_g_output(arch, shape):
    torch.manual_seed(0)
    args = cgan.parse_args(["--arch", arch, "--width", "8", "--g-units", "64", "--g-y-units", "32"])
    G, _ = cgan.build(args, shape, 10)
    G.eval()
    z = cgan.sample_noise(6, args.z_dim, args.noise, "cpu")
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        a, b, c = G(z, y), G(z, (y + 1) % 10), G(z, y)
    assert a.shape == (6, *shape)
    assert torch.equal(a, c)  # same z and y: same image
    assert ((a - b).flatten(1).abs().amax(1) > 1e-4).all()  # every image changes with its label


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 28, 28)), ("conv", (3, 32, 32))])
def test_d_output_depends_on_y(arch, shape):
    torch.manual_seed(0)
    args = cgan.parse_args(["--arch", arch, "--width", "8", "--d-x-units", "32", "--d-units", "32"])
    _, D = cgan.build(args, shape, 10)
    for m in D.modules():  # the paper's init (U(±0.005)) makes every logit ~1e-5: use larger weights
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0.0, 0.1)
    D.eval()
    x = torch.rand(5, *shape)
    y = torch.tensor([0, 2, 4, 6, 8])
    with torch.no_grad():
        a, b = D(x, y), D(x, y + 1)
    assert a.shape == (5,)
    assert ((a - b).abs() > 1e-6).all()
    # and the label reaches D's output through the gradient
    emb = D.y_path[0].linear.weight if arch == "mlp" else D.embed.weight
    D.zero_grad()
    D(x, y).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_losses_match_value_function():
    """With D = sigmoid(l): D loss = −½ V (Eq. 2), G loss = −E log D(G(z|y)|y)."""
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    value = torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(cgan.d_loss(real, fake), -0.5 * value)
    assert torch.allclose(cgan.g_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_schedule():
    args = cgan.parse_args([])
    assert cgan.schedule(0, args, 50_000) == (0.1, 0.5)
    lr, m = cgan.schedule(10_000, args, 50_000)
    assert math.isclose(lr, 0.1 / 1.00004 ** 10_000) and 0.5 < m < 0.7
    assert math.isclose(cgan.schedule(250 * 500, args, 50_000)[1], 0.7)  # epoch 250 at batch 100
    steps_to_floor = math.log(0.1 / 1e-6) / math.log(1.00004)
    assert cgan.schedule(int(steps_to_floor) - 10, args, 50_000)[0] > 1e-6
    assert cgan.schedule(int(steps_to_floor) + 10, args, 50_000)[0] == 1e-6


def test_noise():
    z = cgan.sample_noise(10_000, 100, "hypercube", "cpu")  # the unit hypercube of Sec. 4.1
    assert z.min() >= 0 and z.max() <= 1 and abs(z.mean().item() - 0.5) < 0.01
    z = cgan.sample_noise(10_000, 100, "sqrt3", "cpu")  # zero mean, unit variance
    assert z.abs().max() <= math.sqrt(3) and abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(cgan, ["--dataset", "ring8", "--out", str(tmp_path / "a")], capsys, "label")
    helpers.expect_usage_error(cgan, ["--arch", "conv", "--image-size", "28", "--out", str(tmp_path / "b")],
                               capsys, "power-of-two")
    helpers.expect_usage_error(cgan, ["--dataset", "nope", "--out", str(tmp_path / "c")], capsys, "unknown dataset")
    assert not any((tmp_path / d).exists() for d in "abc")
