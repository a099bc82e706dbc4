import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import dcgan
from common import metrics
from tests.wiring import watch, replica, record_batches, who_steps, setting, grads, assert_same_gradients, assert_update, assert_same
from tests import helpers, wiring


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(dcgan, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/nnd"])
    assert state["data_shape"] == [3, 16, 16]


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(dcgan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(dcgan, tmp_path)
    written = helpers.sample_from(dcgan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


class StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, 3 * f[:, :10]


def test_inception_metrics_are_logged_and_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    out, summary, _ = helpers.dry_run(dcgan, tmp_path, "--metrics", "fid,is", "--data-root", str(tmp_path / "data"))
    assert {"metric/fid", "metric/is", "metric/nnd"} <= set(summary["metrics"])
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    written = helpers.sample_from(dcgan, out / "ckpt.pt", tmp_path, "--eval", "--eval-samples", "40")
    assert written["metric/fid"] > 0 and written["metric/is"] >= 1


def test_help(capsys):
    text = helpers.help_text(dcgan, capsys)
    assert "--kernel-size" in text and "--g-width" in text
    assert "(default: None)" not in " ".join(text.split("run (shared by every script)")[0].split())


@pytest.mark.parametrize("size", [32, 64])
@pytest.mark.parametrize("kernel", [4, 5])
def test_shapes_and_ranges(size, kernel):
    """G: z → (N, C, size, size) in [−1, 1] starting from 4x4 with width·2^(n−1) channels; D: one logit per image."""
    G = dcgan.Generator(100, 8, (3, size, size), kernel)
    D = dcgan.Discriminator(8, (3, size, size), kernel)
    n = int(math.log2(size)) - 2
    assert G.start == (8 * 2 ** (n - 1), 4, 4)
    x = G(dcgan.sample_noise(5, 100, "cpu"))
    assert x.shape == (5, 3, size, size)
    assert x.min() >= -1 and x.max() <= 1
    assert D(x).shape == (5,)


def test_paper_architecture_at_64():
    """Fig. 1: 4x4x1024 → 8x8x512 → 16x16x256 → 32x32x128 → 64x64x3; D mirrors it; BN everywhere but
    G's output and D's input layer; no pooling; no biases."""
    G, D = dcgan.Generator(100, 128, (3, 64, 64)), dcgan.Discriminator(128, (3, 64, 64))
    g_convs = [m for m in G.net if isinstance(m, nn.ConvTranspose2d)]
    assert [m.out_channels for m in g_convs] == [512, 256, 128, 3]
    assert G.project[0].out_features == 4 * 4 * 1024
    d_convs = [m for m in D.net if isinstance(m, nn.Conv2d)]
    assert [m.out_channels for m in d_convs] == [128, 256, 512, 1024]
    assert all(m.stride == (2, 2) for m in g_convs + d_convs)
    assert not isinstance(G.net[-2], nn.BatchNorm2d)  # the output layer: convT then tanh
    assert isinstance(D.net[1], nn.LeakyReLU) and D.net[1].negative_slope == 0.2
    assert sum(isinstance(m, nn.BatchNorm2d) for m in D.modules()) == 3
    assert not any(isinstance(m, (nn.MaxPool2d, nn.AvgPool2d)) for m in list(G.modules()) + list(D.modules()))
    assert all(getattr(m, "bias", None) is None for m in list(G.modules()) + list(D.modules())
               if isinstance(m, (nn.Conv2d, nn.ConvTranspose2d, nn.Linear)))


def test_init_follows_paper():
    torch.manual_seed(0)
    G = dcgan.Generator(100, 64, (3, 32, 32))
    w = torch.cat([m.weight.flatten() for m in G.modules() if isinstance(m, (nn.ConvTranspose2d, nn.Linear))])
    assert abs(w.std().item() - 0.02) < 1e-3 and abs(w.mean().item()) < 1e-3
    gamma = torch.cat([m.weight for m in G.modules() if isinstance(m, (nn.BatchNorm1d, nn.BatchNorm2d))])
    assert abs(gamma.mean().item() - 1) < 2e-3 and abs(gamma.std().item() - 0.02) < 2e-3


def test_noise_is_uniform_in_unit_cube():
    z = dcgan.sample_noise(20000, 100, "cpu")
    assert z.min() >= -1 and z.max() <= 1
    assert abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1 / 3) < 0.01


def test_losses_are_binary_cross_entropy():
    """D: −E log σ(l_real) − E log(1 − σ(l_fake)); G (non-saturating): −E log σ(l_fake)."""
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    expected_d = -torch.log(torch.sigmoid(real)).mean() - torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(dcgan.d_loss(real, fake), expected_d)
    assert torch.allclose(dcgan.g_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_nearest_neighbour_distance():
    real = torch.tensor([[0.0, 0.0], [3.0, 4.0]])
    fake = torch.tensor([[0.0, 1.0], [3.0, 4.0], [10.0, 10.0]])
    assert torch.isclose(dcgan.nearest_neighbour_distance(real, fake), torch.tensor(0.5))


def test_training_step_lowers_d_loss():
    """A few D updates on fixed data and fixed samples make D separate them."""
    torch.manual_seed(0)
    shape = (1, 16, 16)
    G, D = dcgan.Generator(16, 8, shape), dcgan.Discriminator(8, shape)
    x = torch.rand(32, *shape) * 2 - 1
    with torch.no_grad():
        fake = G(dcgan.sample_noise(32, 16, "cpu"))
    opt = torch.optim.Adam(D.parameters(), lr=2e-4, betas=(0.5, 0.999))
    first = None
    for _ in range(20):
        loss = dcgan.d_loss(D(x), D(fake))
        first = loss.item() if first is None else first
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first - 0.3


@pytest.mark.parametrize("size", ["24", "8", "48"])
def test_bad_image_size(tmp_path, capsys, size):
    out = tmp_path / "x"
    helpers.expect_usage_error(dcgan, ["--dry-run", "--image-size", size, "--out", str(out)], capsys, "power of two")
    assert not out.exists()


def test_toy_data_is_refused(tmp_path, capsys):
    helpers.expect_usage_error(dcgan, ["--dry-run", "--dataset", "ring8", "--out", str(tmp_path / "x")],
                               capsys, "images")
    assert not (tmp_path / "x").exists()


# ------------------------------------------------------------------------------------------------
# The training loop, watched from outside: the nets record what they are fed (and their state at each
# call), every optimizer step records its settings, gradients and parameters before and after, and the
# data iterator records its batches. A replay of the docstring's losses on the same inputs must then give
# the gradients the loop stepped with.
# ------------------------------------------------------------------------------------------------


def watch_build(monkeypatch):
    """The (G, D) that train() builds, watched."""
    nets, original = {}, dcgan.build

    def build(*args, **kwargs):
        G, D = original(*args, **kwargs)
        nets["G"], nets["D"] = watch(G), watch(D)
        return G, D
    monkeypatch.setattr(dcgan, "build", build)
    return nets


def test_one_step_follows_the_equations(tmp_path, monkeypatch, updates):
    """One step: D descends −E log D(x) − E log(1 − D(G(z))) with x the data batch (real and generated
    batches normalised separately, in training mode), then G descends −E log D(G(z)) on fresh noise against
    the updated D; each with Adam lr 2e-4, betas (0.5, 0.999), weight decay 1e-5, moving only its own net."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(dcgan, tmp_path, 1)
    G, D = nets["G"], nets["D"]
    assert who_steps(updates, G=G, D=D) == ["D", "G"]
    d_step, g_step = updates
    G0, D0 = replica(G, G.calls[0][0]), replica(D, D.calls[0][0])
    x, (z,) = batches[0][0], G.calls[0][1]
    with torch.no_grad():
        fake = G0(z)
    loss_d = F.softplus(-D0(x)).mean() + F.softplus(D0(fake)).mean()   # −log σ(l) = softplus(−l)
    assert_same_gradients(d_step["grads"], grads(loss_d, D0), "D's gradient")

    assert_same(g_step["before"], list(G0.parameters()), "G moved during D's step")
    (z,) = G.calls[1][1]
    D1 = replica(D, D.calls[0][0], d_step["after"])
    assert_same_gradients(g_step["grads"], grads(F.softplus(-D1(G0(z))).mean(), G0), "G's gradient")

    for s, net in ((d_step, D), (g_step, G)):
        assert type(s["opt"]) is torch.optim.Adam
        assert (setting(s, "lr"), setting(s, "betas"), setting(s, "weight_decay")) == (2e-4, (0.5, 0.999), 1e-5)
        # Adam's first step with L2 weight decay: −lr · sign(g + wd·θ)
        assert_update(s, [wiring.adam_first_update(2e-4, g + 1e-5 * p) for g, p in zip(s["grads"], s["before"])],
                      "Adam's first update")
        assert_same(list(net.parameters()), s["after"], "a net moved after its own step")
