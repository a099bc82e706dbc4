import json
import copy
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
from tests import helpers, wiring


def test_dry_run_grows_through_two_resolutions(tmp_path):
    """The dry run (6 steps of 8 images; stabilisation phases of 8 images, fade-in phases of 16) goes 4x4 → 8x8 →
    fading into 16x16."""
    out, summary, state = helpers.dry_run(progan, tmp_path)
    assert summary["resolution"] == 16 and summary["alpha"] == 0.5
    assert state["schedule"]["lod"] == 0.5 and state["schedule"]["nimg"] == 48
    assert {p.name.split("-")[0] for p in (out / "samples").glob("*.png")} >= {"samples", "res4", "res8"}


def test_resume_is_exact_in_a_fade_in(tmp_path, monkeypatch):
    """Interrupted after step 3 (fading 4 → 8, α = 0.5), resumed: the same weights, Adam state and schedule."""
    a, b = helpers.assert_resume_exact(progan, tmp_path, monkeypatch, [],
                                       state_keys=("models", "optimizers", "schedule"))
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


def test_defaults_are_the_cifar10_configuration():
    """Table 3's run as the Theano config.py sets it: 4 → 32, fmap 4096/128, latent 128, 400k + 400k images per
    resolution, minibatch 16, 20M images, WGAN-GP γ = 750 with λ 10 and ε_drift 0.001, G EMA 0.999."""
    a = progan.parse_args([])
    assert (a.dataset, a.image_size, a.initial_resolution, a.z_dim) == ("cifar10", 32, 4, 128)
    assert (a.fmap_base, a.fmap_max, a.stable_kimg, a.fade_kimg) == (4096, 128, 400, 400)
    assert (a.batch_size, a.steps * a.batch_size, a.flip) == (16, 20_000_000, False)
    assert (a.gp_target, a.gp_lambda, a.eps_drift, a.ema) == (750, 10, 0.001, 0.999)
    assert (a.lr, a.beta1, a.beta2, a.adam_eps) == (1e-3, 0, 0.99, 1e-8)


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


def layer_shapes(net):
    """(in, out, kind) of every layer, sorted: "1x1" / "3x3" convolutions and "dense" layers (in = fan-in)."""
    return sorted((m.weight.shape[1], m.weight.shape[0],
                   f"{m.weight.shape[-1]}x{m.weight.shape[-1]}" if m.weight.dim() == 4 else "dense")
                  for m in net.modules() if isinstance(m, (progan.EqualizedConv2d, progan.EqualizedLinear)))


def table2_layers(c, z):
    """Table 2's layers for channels c[r] at resolution r and latent size z, with a toRGB / fromRGB per
    resolution (Sec. 3): G = the 4x4 conv on the latent (a dense layer), conv3, then two conv3 per doubling;
    D = per halving conv3 c[r] → c[r], conv3 c[r] → c[r/2], then minibatch stddev (+1 channel), conv3, the 4x4
    conv (a dense layer) and dense 1."""
    up = [r for r in c if r > 4]
    g = [(z, c[4] * 16, "dense"), (c[4], c[4], "3x3")] + [(c[r // 2], c[r], "3x3") for r in up]
    g += [(c[r], c[r], "3x3") for r in up] + [(c[r], 3, "1x1") for r in c]
    d = [(3, c[r], "1x1") for r in c] + [(c[r], c[r], "3x3") for r in up] + [(c[r], c[r // 2], "3x3") for r in up]
    d += [(c[4] + 1, c[4], "3x3"), (c[4] * 16, c[4], "dense"), (c[4], 1, "dense")]
    return sorted(g), sorted(d)


def test_architecture_is_table_2():
    """The CelebA-HQ nets of Table 2 (fmap_base 8192, fmap_max 512, latent 512): 512 channels up to 32x32, then
    256, 128, 64, 32, 16 at 1024x1024, 23.1M parameters in G and in D. The CIFAR-10 configuration (fmap_base
    4096, fmap_max 128, latent 128) is 128 channels wide at every resolution."""
    G, D = progan.Generator(512, 1024, 3, 8192, 512), progan.Discriminator(1024, 3, 8192, 512)
    g, d = table2_layers({4: 512, 8: 512, 16: 512, 32: 512, 64: 256, 128: 128, 256: 64, 512: 32, 1024: 16}, 512)
    assert layer_shapes(G) == g and layer_shapes(D) == d
    assert round(sum(p.numel() for p in G.parameters()) / 1e6, 1) == 23.1
    assert round(sum(p.numel() for p in D.parameters()) / 1e6, 1) == 23.1
    g, d = table2_layers({4: 128, 8: 128, 16: 128, 32: 128}, 128)
    assert layer_shapes(progan.Generator(128, 32, 3, 4096, 128)) == g
    assert layer_shapes(progan.Discriminator(32, 3, 4096, 128)) == d


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
    assert progan.nets_at(2.5, 32) == (1, 8, 0.5)
    assert progan.nets_at(3.0, 32) == (0, 4, 1.0)
    assert progan.nets_at(0.0, 32) == (3, 32, 1.0)


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
    assert len(state["rng"]["ranks"]) == 2 and state["schedule"]["resolution"] == 16


# ---- the training loop: a short dry run watched from outside ----

DRY_SCHEDULE = [(0, 4, 1.0), (0, 4, 1.0), (1, 8, 0.5), (1, 8, 1.0), (1, 8, 1.0), (2, 16, 0.5)]   # (level, r, α)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Six steps of the dry run (stabilisation phases of 8 images, fade-in phases of 16, minibatch 8, 16x16
    target) with the CIFAR-10 configuration's GP target γ = 750 and a learning rate of its own at 8x8, watched."""
    return wiring.watch_training(progan, tmp_path_factory.mktemp("loop"), 6, "--gp-target", "750", "--lr-schedule", "8:0.002")


def reals_by_hand(x, r, alpha):
    """Box-filter to r x r; in a fade-in (1 − α)·nearest-upsampled(box-filtered to r/2) + α·(that)."""
    x = F.avg_pool2d(x, x.shape[-1] // r)
    return x if alpha == 1 else (1 - alpha) * F.interpolate(F.avg_pool2d(x, 2), scale_factor=2) + alpha * x


def grads_by_hand(net, state, loss_of):
    """∇ of loss_of(copy of net with parameters `state`) by parameter name."""
    net = copy.deepcopy(net)
    net.load_state_dict(state)
    names, params = zip(*net.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss_of(net), params, allow_unused=True)))


def applied(step_record, net):
    """The gradients an optimizer step applied, by parameter name of `net`."""
    return {n: step_record.grads.get(id(p)) for n, p in net.named_parameters()}


def test_loop_schedule_reaches_the_nets(loop):
    """Every training call of G and D runs at the level and α of the schedule (stable 4x4, fade to 8x8, ...)."""
    assert len(loop.steps) == 6
    for s, (level, r, alpha) in zip(loop.steps, DRY_SCHEDULE):
        for call in s.d_calls + s.g_calls:
            assert (call.level, call.alpha) == (level, alpha), call.net
        assert all(c.x.shape[-1] == r for c in s.d_calls + s.g_calls if c.net == "D")


def test_loop_d_step_is_wgan_gp_with_drift(loop):
    """D's step applies ∇ of E D(G(z)) − E D(x) + λ/γ² E (‖∇D(x̂)‖·r/R − γ)² + ε_drift E D(x)² (λ 10, γ 750,
    ε_drift 0.001, r/R the nets' resolution over the target's), with x the drawn batch at the nets' resolution
    (cross-faded as G's output), G(z) this step's G output, x̂ on the segment between them."""
    D = loop.nets.D
    for k, (s, (level, r, alpha)) in enumerate(zip(loop.steps, DRY_SCHEDULE)):
        real = reals_by_hand(loop.batches[k], r, alpha)
        (fake,) = [c.out for c in s.d_calls if c.net == "G"]
        (mixed,) = [c.x for c in s.d_calls if c.net == "D" and c.x.requires_grad and c.x.grad_fn is None]
        u = ((mixed - real).flatten(1) * (fake - real).flatten(1)).sum(1) / (fake - real).flatten(1).pow(2).sum(1)
        assert torch.allclose(mixed, real + u.view(-1, 1, 1, 1) * (fake - real), atol=1e-5)
        assert (0 <= u).all() and (u <= 1).all()

        def loss(net):
            x = mixed.detach().requires_grad_(True)
            (g,) = torch.autograd.grad(net(x, level, alpha).sum(), x, create_graph=True)
            norm = g.flatten(1).norm(dim=1) * r / 16
            d_real = net(real, level, alpha)
            return (net(fake, level, alpha).mean() - d_real.mean() + 10 / 750 ** 2 * (norm - 750).pow(2).mean()
                    + 0.001 * d_real.pow(2).mean())
        hand = grads_by_hand(D, s.d_step.before["D"], loss)
        got = applied(s.d_step, D)
        for name in hand:
            if hand[name] is None:
                assert got[name] is None, name
            else:
                assert torch.allclose(got[name], hand[name], rtol=1e-4, atol=1e-7), (k + 1, name)


def test_loop_g_step_is_minus_d_of_g(loop):
    """G's step feeds its own output to D (updated by this step's D step) and applies ∇ of −E D(G(z))."""
    for k, (s, (level, r, alpha)) in enumerate(zip(loop.steps, DRY_SCHEDULE)):
        (g_call,) = [c for c in s.g_calls if c.net == "G"]
        (d_call,) = [c for c in s.g_calls if c.net == "D"]
        assert d_call.x is g_call.out
        D = copy.deepcopy(loop.nets.D)
        D.load_state_dict(s.d_step.after["D"])
        fake = g_call.out.detach().requires_grad_(True)
        (hand,) = torch.autograd.grad(-D(fake, level, alpha).mean(), fake)
        assert torch.allclose(d_call.grad, hand, rtol=1e-4, atol=1e-9), k + 1


def test_loop_each_step_changes_only_its_net(loop):
    """D's step moves only D and G's step only G, each exactly the parameters that got a gradient (at 4x4
    only the 4x4 layers), and nothing moves either net between the steps."""
    def moved(a, b):
        return {n for n in a if not torch.equal(a[n], b[n])}
    previous = loop.steps[0].d_step.before
    for k, s in enumerate(loop.steps, 1):
        for step, mine, other in ((s.d_step, "D", "G"), (s.g_step, "G", "D")):
            net = getattr(loop.nets, mine)
            assert moved(previous["G"], step.before["G"]) == moved(previous["D"], step.before["D"]) == set(), k
            assert moved(step.before[other], step.after[other]) == set(), (k, mine)
            with_grad = {n for n, g in applied(step, net).items() if g is not None and g.any()}
            assert moved(step.before[mine], step.after[mine]) == with_grad, (k, mine)
            if k == 1:
                assert with_grad and not any(".1." in n for n in with_grad), with_grad
            previous = step.after


def test_loop_optimizers_are_the_papers_adam(loop):
    """Adam(lr 1e-3 or the --lr-schedule value at the nets' resolution, β = (0, 0.99), ε = 1e-8) for G and for
    D, built afresh at each new level of detail (steps 1, 3, 4 and 6 here); each update is Adam's on the
    applied gradients (first and second steps by hand)."""
    wiring.assert_growing_adam(loop, DRY_SCHEDULE, applied, lr_at={4: 1e-3, 8: 0.002, 16: 1e-3},
                               new_optimizers_at=(1, 3, 4, 6))


def test_loop_ema_of_g_with_decay_0999(loop):
    """Gs (the checkpoint's sampling and evaluation net) starts as G and follows Gs ← 0.999 Gs + 0.001 G after
    every G step."""
    avg = dict(loop.steps[0].d_step.before["G"])
    for s in loop.steps:
        avg = {n: torch.lerp(avg[n], s.g_step.after["G"][n], 1 - 0.999) for n in avg}
    saved = loop.ckpt["models"]["Gs"]
    assert saved.keys() == avg.keys()
    for n in avg:
        assert torch.allclose(saved[n], avg[n], rtol=0, atol=1e-7), n


def test_flip_is_on_for_celeba_only():
    """Mirroring follows the official configs: CelebA(-HQ) mirrored, CIFAR-10 not; an explicit flag wins."""
    flip = lambda *argv: progan.parse_args(list(argv)).flip
    assert flip("--dataset", "celeba") and not flip() and not flip("--dataset", "mnist")
    assert flip("--flip") and not flip("--dataset", "celeba", "--no-flip")


def test_loop_flip_mirrors_about_half_of_the_real_images(tmp_path):
    """With --flip, D's real batch holds each drawn image mirrored or not (both occur); the fakes are G's output."""
    rec = wiring.watch_training(progan, tmp_path, 2, "--flip")
    mirrored = []
    for k, s in enumerate(rec.steps):
        (fake,) = [c.out for c in s.d_calls if c.net == "G"]
        assert any(c.x is fake for c in s.d_calls if c.net == "D")
        (real,) = [c.x for c in s.d_calls if c.net == "D" and c.x is not fake and not c.x.requires_grad]
        plain, flipped = reals_by_hand(rec.batches[k], 4, 1.0), reals_by_hand(rec.batches[k].flip(3), 4, 1.0)
        for i in range(len(real)):
            same, mirror = torch.allclose(real[i], plain[i], atol=1e-6), torch.allclose(real[i], flipped[i], atol=1e-6)
            assert same != mirror, (k, i)
            mirrored.append(mirror)
    assert 0 < sum(mirrored) < len(mirrored)


def test_an_image_folder_is_not_grown_past_its_images(tmp_path, capsys):
    """A folder of 32x32 PNGs: --image-size 64 is refused at start-up (it would only learn upsampled images), as for
    the named datasets; 32 passes the start-up checks."""
    from PIL import Image
    folder = tmp_path / "pngs"
    folder.mkdir()
    for i in range(12):
        Image.fromarray(torch.randint(0, 256, (32, 32, 3), dtype=torch.uint8).numpy()).save(folder / f"{i}.png")
    out = tmp_path / "x"
    argv = ["--dry-run", "--dataset", str(folder), "--image-size", "64", "--out", str(out)]
    err = helpers.expect_usage_error(progan, argv, capsys, "32 pixels")
    assert "--image-size 32" in err and not out.exists()
    progan.check(progan.parse_args(["--dry-run", "--dataset", str(folder), "--image-size", "32"]))
