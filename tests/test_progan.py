import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import progan
from common import checkpoint as ckpt_io
from tests import helpers


def test_dry_run_grows_through_two_resolutions(tmp_path):
    """The dry run (6 steps of 8 images, phases of 8 + 16 images) goes 4x4 → 8x8 → fading into 16x16."""
    out, summary, state = helpers.dry_run(progan, tmp_path)
    assert summary["resolution"] == 16 and summary["alpha"] == 0.5
    assert state["phase"]["lod"] == 0.5 and state["phase"]["nimg"] == 48
    assert {p.name.split("-")[0] for p in (out / "samples").glob("*.png")} >= {"samples", "res4", "res8"}


def test_resume_is_exact_in_a_fade_in(tmp_path, monkeypatch):
    """Interrupted after step 3 (fading 4 → 8, α = 0.5), resumed: the same weights, Adam state and phase."""
    a, b = helpers.assert_resume_exact(progan, tmp_path, monkeypatch, [],
                                       state_keys=("models", "optimizers", "phase"))
    interrupted = progan.main(["--dry-run", "--steps", "3", "--out", str(tmp_path / "three")])
    assert interrupted["resolution"] == 8 and interrupted["alpha"] == 0.5


def test_adam_is_reset_at_each_new_level_of_detail(tmp_path):
    """Resets at steps 3 (fade-in starts), 4 (stabilisation starts), 6: after 5 steps Adam has taken 2."""
    progan.main(["--dry-run", "--steps", "5", "--out", str(tmp_path / "r")])
    state = ckpt_io.load(tmp_path / "r" / "ckpt.pt", "progan")
    steps = {float(s["step"]) for s in state["optimizers"]["G"]["state"].values()}
    assert steps == {2.0}


def test_sample_at_the_reached_resolution(tmp_path):
    out, _, _ = helpers.dry_run(progan, tmp_path)
    written = helpers.sample_from(progan, out / "ckpt.pt", tmp_path)
    assert written["resolution"] == 16 and written["alpha"] == 0.5
    assert {"samples", "interpolation"} <= set(written)


def test_help(capsys):
    text = helpers.help_text(progan, capsys)
    assert "--fade-kimg" in text and "--batch-schedule" in text


@pytest.mark.parametrize("argv, match", [
    (["--image-size", "24"], "power of two"),
    (["--image-size", "16", "--initial-resolution", "32"], "initial resolution"),
    (["--batch-schedule", "4-16"], "resolution:value"),
    (["--batch-size", "1024"], "fewer than one minibatch"),
    (["--batch-size", "6"], "divisible"),
    (["--dataset", "cifar10", "--image-size", "64"], "images are 32x32"),
])
def test_bad_input(tmp_path, capsys, argv, match):
    out = tmp_path / "x"
    helpers.expect_usage_error(progan, ["--dry-run", "--out", str(out), *argv], capsys, match)
    assert not out.exists()


# ---- the paper's building blocks ----

def test_equalized_lr_layers():
    """Weights stored N(0, 1); the output equals a plain layer whose weights are scaled by √2 / √fan_in."""
    torch.manual_seed(0)
    conv = progan.EqualizedConv2d(64, 32, 3)
    assert abs(conv.weight.std().item() - 1) < 0.02 and abs(conv.weight.mean().item()) < 0.02
    x = torch.randn(2, 64, 5, 5)
    ref = F.conv2d(x, conv.weight * math.sqrt(2 / (64 * 9)), conv.bias, padding=1)
    assert torch.allclose(conv(x), ref, atol=1e-5)
    lin = progan.EqualizedLinear(100, 10, gain=1)
    h = torch.randn(4, 100)
    assert torch.allclose(lin(h), h @ (lin.weight / 10).t() + lin.bias, atol=1e-5)


def test_pixel_norm_gives_unit_mean_square():
    x = torch.randn(3, 16, 4, 4) * 7 + 2
    y = progan.pixel_norm(x)
    assert torch.allclose(y.pow(2).mean(1), torch.ones(3, 4, 4), atol=1e-5)


def test_minibatch_stddev_by_hand():
    """Groups of 4 over the minibatch viewed as (4, M): samples m, m + M, m + 2M, m + 3M share one value."""
    x = torch.randn(8, 3, 2, 2)
    y = progan.minibatch_stddev(x, 4)
    assert y.shape == (8, 4, 2, 2) and torch.equal(y[:, :3], x)
    for m in range(2):
        group = x[m::2]                                         # samples m, m+2, m+4, m+6
        std = (group.var(0, unbiased=False) + 1e-8).sqrt().mean()
        for n in range(m, 8, 2):
            assert torch.allclose(y[n, 3], torch.full((2, 2), std.item()), atol=1e-6)
    assert not torch.allclose(y[0, 3], y[1, 3])


def test_channels_follow_fmap_base_and_max():
    """min(fmap_base / 2^stage, fmap_max): 8192 / 512 gives 512 up to 32x32, then halving (Table 2)."""
    nf = [min(int(8192 / 2 ** (s + 1)), 512) for s in range(9)]
    assert nf == [512, 512, 512, 512, 256, 128, 64, 32, 16]
    G = progan.Generator(16, 1024, 3, 1024, 64)     # the same rule with small numbers (1024 / 64)
    assert G.nf == [64, 64, 64, 64, 32, 16, 8, 4, 2]
    D = progan.Discriminator(1024, 3, 1024, 64)
    assert [m.weight.shape[0] for m in D.from_rgb] == G.nf
    assert D.final_dense.weight.shape[0] == 64


def test_fade_in_endpoints():
    """α = 0: the previous resolution's output, upsampled (G) / of the downsampled input (D); α = 1: the new block."""
    torch.manual_seed(0)
    G, D = progan.Generator(16, 32, 3, 64, 16), progan.Discriminator(32, 3, 64, 16)
    z = torch.randn(4, 16)
    for level in (1, 2, 3):
        old = progan.upscale(G(z, level - 1))
        assert torch.allclose(G(z, level, 0.0), old, atol=1e-6)
        assert torch.allclose(G(z, level, 1.0), G(z, level), atol=1e-6)
        mid = G(z, level, 0.25)
        assert torch.allclose(mid, 0.75 * old + 0.25 * G(z, level), atol=1e-5)
        x = torch.randn(4, 3, 4 * 2 ** level, 4 * 2 ** level)
        assert torch.allclose(D(x, level, 0.0), D(progan.downscale(x), level - 1), atol=1e-5)
        assert torch.allclose(D(x, level, 1.0), D(x, level), atol=1e-6)


def test_process_reals_fades_like_g():
    x = torch.randn(2, 1, 32, 32)
    x8 = F.avg_pool2d(x, 4)
    assert torch.allclose(progan.process_reals(x, 8, 1.0), x8, atol=1e-6)
    assert torch.allclose(progan.process_reals(x, 8, 0.0), progan.upscale(F.avg_pool2d(x8, 2)), atol=1e-6)
    assert torch.allclose(progan.process_reals(x, 8, 0.3),
                          0.7 * progan.upscale(F.avg_pool2d(x8, 2)) + 0.3 * x8, atol=1e-6)


def test_schedule_as_train_py():
    """32x32 from 4x4, 600k + 600k: lod 3 → 3 (stable 4x4) → 2.5 (half-way fading in 8x8) → 2 → ... → 0."""
    lod = lambda k: progan.level_of_detail(int(k * 1000), 32, 4, 600_000, 600_000)
    assert [lod(k) for k in (0, 599, 600, 900, 1200, 1800, 2100, 3600, 99999)] == [3, 3, 3, 2.5, 2, 2, 1.5, 0, 0]
    assert progan.phase_of(2.5, 32) == (1, 8, 0.5)
    assert progan.phase_of(3.0, 32) == (0, 4, 1.0)
    assert progan.phase_of(0.0, 32) == (3, 32, 1.0)


class Linear(nn.Module):
    def __init__(self, a):
        super().__init__()
        self.a = a

    def forward(self, x, level=0, alpha=1.0):
        return (x * self.a).flatten(1).sum(1)


def test_gradient_penalty_of_a_linear_critic():
    """D(x) = <a, x>: ∇D = a everywhere, so the penalty is λ/γ² (‖a‖ − γ)²."""
    a = torch.randn(1, 3, 4, 4)
    real, fake = torch.randn(5, 3, 4, 4), torch.randn(5, 3, 4, 4)
    for target in (1.0, 750.0):
        gp = progan.gradient_penalty(Linear(a), real, fake, 0, 1.0, 10.0, target)
        assert torch.allclose(gp, 10 / target ** 2 * (a.norm() - target) ** 2, rtol=1e-5)


def test_gradient_penalty_norm_is_taken_at_the_target_resolution():
    """The code feeds D nearest-upscaled 32x32 images; scaling the 8x8 norm by 8/32 gives the same penalty."""
    torch.manual_seed(0)
    D = progan.Discriminator(32, 1, 64, 16)
    real, fake = torch.randn(4, 1, 8, 8), torch.randn(4, 1, 8, 8)
    torch.manual_seed(1)
    low = progan.gradient_penalty(D, real, fake, 1, 1.0, 10.0, 1.0, norm_scale=8 / 32)
    full = lambda x, level, alpha: D(F.avg_pool2d(x, 4), level, alpha)
    torch.manual_seed(1)
    high = progan.gradient_penalty(full, progan.upscale(real, 4), progan.upscale(fake, 4), 1, 1.0, 10.0, 1.0)
    assert torch.allclose(low, high, rtol=1e-4)


def test_d_loss_has_the_drift_term():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([0.5, -0.5])
    loss = progan.d_loss(real, fake, torch.tensor(0.2), 0.001)
    assert torch.isclose(loss, torch.tensor(0.0 - 2.0 + 0.2 + 0.001 * 5.0))
    assert torch.isclose(progan.g_loss(fake), torch.tensor(0.0))


def test_ema_update():
    a, b = nn.Linear(2, 2), nn.Linear(2, 2)
    expected = 0.999 * a.weight.detach() + 0.001 * b.weight.detach()
    progan.update_average(a, b, 0.999)
    assert torch.allclose(a.weight, expected)


def test_grows_under_torchrun_two_cpu_processes(tmp_path):
    """The DDP wrap of the growing nets (unused blocks before their level): two gloo processes grow 8 → 16."""
    root = Path(progan.__file__).resolve().parent
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(root / "progan.py"), "--dry-run", "--out", str(tmp_path / "ddp")]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text())
    assert summary["losses"]["progress/resolution"] == 16 and 0 < summary["losses"]["progress/alpha"] < 1
    state = ckpt_io.load(tmp_path / "ddp" / "ckpt.pt", "progan")
    assert len(state["rng"]["ranks"]) == 2 and state["phase"]["resolution"] == 16
