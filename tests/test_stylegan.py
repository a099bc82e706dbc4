import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import stylegan
from tests import helpers, wiring


def test_dry_run_grows_through_two_resolutions(tmp_path):
    out, summary, state = helpers.dry_run(stylegan, tmp_path)
    assert summary["resolution"] == 16 and summary["alpha"] == 0.5
    assert state["schedule"]["lod"] == 0.5
    assert state["models"]["Gs"]["w_avg"].abs().sum() > 0       # w̄ is tracked (and copied into the EMA)


def test_resume_is_exact_in_a_fade_in(tmp_path, monkeypatch):
    """Interrupted after step 3 (fading 4 → 8, α = 0.5): mixing draws, noise, w̄, Adam, schedule all continue."""
    helpers.assert_resume_exact(stylegan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers", "schedule"))


def test_sample_writes_the_papers_figures(tmp_path):
    out, _, _ = helpers.dry_run(stylegan, tmp_path)
    written = helpers.sample_from(stylegan, out / "ckpt.pt", tmp_path)
    assert {"samples_psi1.0", "samples_psi0.7", "truncation", "style_mixing_coarse", "style_mixing_middle",
            "noise"} <= set(written)
    assert written["resolution"] == 16


def test_help(capsys):
    text = helpers.help_text(stylegan, capsys)
    assert "--mixing-prob" in text and "--r1-gamma" in text


@pytest.mark.parametrize("argv, match", [
    (["--image-size", "48"], "power of two"),
    (["--batch-size", "2048"], "fewer than one minibatch"),
    (["--mixing-prob", "1.5"], "mixing-prob"),
    (["--lr-schedule", "100:0.1"], "resolutions"),
    (["--dataset", "mnist", "--image-size", "64"], "images are 28x28"),
])
def test_bad_input(tmp_path, capsys, argv, match):
    out = tmp_path / "x"
    helpers.expect_usage_error(stylegan, ["--dry-run", "--out", str(out), *argv], capsys, match)
    assert not out.exists()


def test_default_steps_are_25000_kimg():
    args = stylegan.parse_args(["--metrics", "none"])
    assert stylegan.steps_for_kimg(25000, args) == args.steps
    assert args.batch_dict[64] == 32 and args.lr_dict[128] == 0.0015 and args.initial_resolution == 8


# ---- the paper's building blocks ----

def test_mapping_lr_multiplier():
    """Stored weights N(0, 1/lrmul²), used as w·lrmul·√2/√fan_in: the used weights start He-scaled and a first
    Adam step (which moves every stored value by lr) moves them by lr·lrmul·√2/√fan_in."""
    torch.manual_seed(0)
    fc = stylegan.EqualizedLinear(256, 256, lrmul=0.01).double()   # float64: the stored values are ~100
    assert abs(fc.weight.std().item() - 100) < 2
    used = lambda: fc.weight.detach() * fc.scale
    assert abs(used().std().item() - math.sqrt(2 / 256)) < 0.003
    before = fc.weight.detach().clone()
    opt = torch.optim.Adam(fc.parameters(), lr=1e-3, betas=(0.0, 0.99), eps=1e-30)
    fc(torch.randn(8, 256, dtype=torch.float64)).square().sum().backward()
    opt.step()
    used_step = ((fc.weight.detach() - before) * fc.scale).abs()  # Adam's first step moves stored values by lr
    assert torch.allclose(used_step, torch.tensor(1e-3 * 0.01 * math.sqrt(2 / 256), dtype=torch.float64), rtol=1e-4)
    assert torch.allclose(fc(torch.zeros(1, 256, dtype=torch.float64)), fc.bias.detach() * 0.01)
    G = stylegan.Generator(16, 16, 8, mapping_layers=8, mapping_lrmul=0.01, fmap_base=32, fmap_max=8)
    assert len(G.mapping.fcs) == 8 and all(m.lrmul == 0.01 for m in G.mapping.fcs)
    assert all(m.lrmul == 1 for m in G.synthesis.modules() if isinstance(m, stylegan.EqualizedLinear))


def test_adain_sets_mean_and_std_from_the_style():
    """AdaIN: per-channel mean of the output = y_b, std = 1 + y_s (the code's parametrisation)."""
    x = torch.randn(2, 3, 8, 8) * 5 + 3
    ys = torch.tensor([[0.5, -0.2, 1.0], [0.0, 2.0, -0.5]])
    yb = torch.tensor([[1.0, 0.0, -2.0], [3.0, 0.5, 0.25]])
    y = stylegan.adain(x, torch.cat([ys, yb], 1))
    assert torch.allclose(y.mean((2, 3)), yb, atol=1e-5)
    assert torch.allclose(y.std((2, 3), unbiased=False), (1 + ys).abs(), atol=1e-4)


def test_truncation():
    """ψ = 0 gives w̄ on the truncated layers; layers ≥ cutoff keep w; ψ = 1 is the identity."""
    ws, w_avg = torch.randn(5, 10, 4), torch.randn(4)
    t = stylegan.truncate(ws, w_avg, 0.0, 8)
    assert torch.allclose(t[:, :8], w_avg.expand(5, 8, 4)) and torch.equal(t[:, 8:], ws[:, 8:])
    assert torch.allclose(stylegan.truncate(ws, w_avg, 1.0, 8), ws)
    assert torch.allclose(stylegan.truncate(ws, w_avg, 0.7, 8)[:, 0], w_avg + 0.7 * (ws[:, 0] - w_avg), atol=1e-6)


def test_psi_zero_gives_one_image():
    torch.manual_seed(0)
    G = stylegan.Generator(8, 8, 16, 1, mapping_layers=2, fmap_base=32, fmap_max=8)
    G.w_avg.normal_()
    x = G(torch.randn(6, 8), 2, psi=0.0, cutoff=G.num_layers, randomize_noise=False)
    assert torch.allclose(x, x[:1].expand_as(x), atol=1e-6)
    y = G(torch.randn(6, 8), 2, randomize_noise=False)
    assert not torch.allclose(y, y[:1].expand_as(y), atol=1e-3)


class KnownG(nn.Module):
    """A stand-in for Gs whose figure claims are known: w = z, 6 layers (16x16 images); layer 0's style w[0, 0]
    sets the top-left quadrant to 0.2·w[0, 0] (the class, coarse), layer 4's the bottom-right one (middle);
    the noise (std 0.1) fills the bottom-left quadrant."""
    num_layers = 6

    def __init__(self, dim=4):
        super().__init__()
        self.mapping = nn.Identity()
        self.register_buffer("w_avg", torch.randn(dim))

    def synthesis(self, ws, level, alpha, randomize_noise=True):
        x = torch.zeros(len(ws), 1, 16, 16)
        x[:, 0, :8, :8] = 0.2 * ws[:, 0, :1, None]
        x[:, 0, 8:, 8:] = 0.2 * ws[:, 4, :1, None]
        if randomize_noise:
            x[:, 0, 8:, :8] = 0.1 * torch.randn(len(ws), 8, 8)
        return x


class TopLeftClassifier(nn.Module):
    """A stand-in digit classifier: the class is the tenth of [−1, 1] that the top-left patch's mean falls in."""

    def __init__(self):
        super().__init__()
        self.unused = nn.Parameter(torch.zeros(()))

    def forward(self, x):
        k = ((x[..., :10, :10].mean((1, 2, 3)) + 1) / 0.2).floor().clamp(0, 9).long()
        return F.one_hot(k, 10).float()


def test_figure_claims_on_a_constructed_generator():
    """On a G whose class comes from the coarse styles alone: B's coarse styles give B's class in every mix of
    different classes, B's middle styles never; noise outside the class's pixels keeps every class and has a
    per-pixel std of 0.1 on a quarter of the image; ψ = 0.7 on all layers scales the std between latents by 0.7."""
    claims = stylegan.figure_claims(KnownG(), TopLeftClassifier(), 2, 1.0, 4, "cpu", torch.Generator().manual_seed(0),
                                    n=200, draws=20, psi=0.7, cutoff=8)
    assert claims["metric/mix_coarse_takes_B"] == 1 and claims["metric/mix_coarse_keeps_A"] == 0
    assert claims["metric/mix_middle_keeps_A"] == 1 and claims["metric/mix_middle_takes_B"] == 0
    assert "metric/mix_fine_keeps_A" not in claims                  # no fine layers at 16x16
    assert claims["metric/noise_keeps_class"] == 1
    assert claims["metric/noise_std"] == pytest.approx(0.1 / 4, rel=0.05)
    assert claims["metric/latent_std"] == pytest.approx(2 * 0.2 / 4, rel=0.15)   # std of 0.2·N(0, 1) on half
    assert claims["metric/truncated_std"] == pytest.approx(0.7 * claims["metric/latent_std"], rel=1e-5)


def test_style_mixing_switches_at_the_crossover():
    ws, ws2 = torch.zeros(3, 6, 4), torch.ones(3, 6, 4)
    mixed = stylegan.style_mix(ws, ws2, 2)
    assert torch.equal(mixed[:, :2], ws[:, :2]) and torch.equal(mixed[:, 2:], ws2[:, 2:])


def test_style_mixing_in_training_uses_a_second_latent():
    """With p = 1 the images differ from the unmixed ones (same z, same noise); with p = 0 they do not."""
    torch.manual_seed(0)
    G = stylegan.Generator(8, 8, 16, 1, mapping_layers=2, fmap_base=32, fmap_max=8)
    z = torch.randn(4, 8)
    plain = G(z, 2, randomize_noise=False)
    assert torch.allclose(G(z, 2, mixing_prob=0.0, randomize_noise=False), plain)
    assert not torch.allclose(G(z, 2, mixing_prob=1.0, randomize_noise=False), plain)


def test_style_mixing_probability_and_crossover():
    """With p = 0.9 about 90% of training passes switch to a second w, at a crossover drawn from 1, ..., the
    number of layers in use − 1 (at 8x8 in a 16x16 G: 4 of its 6 layers, crossovers 1–3 about equally often)."""
    torch.manual_seed(0)
    G = stylegan.Generator(4, 4, 16, 1, mapping_layers=1, fmap_base=8, fmap_max=2)
    crossovers = []
    G.synthesis.register_forward_pre_hook(lambda m, args: crossovers.append(
        next((i for i in range(1, 6) if not torch.equal(args[0][:, i], args[0][:, 0])), None)))
    with torch.no_grad():
        for _ in range(200):
            G(torch.randn(2, 4), 1, mixing_prob=0.9)
    mixed = [c for c in crossovers if c is not None]
    assert 160 <= len(mixed) <= 196
    assert set(mixed) == {1, 2, 3} and all(35 <= mixed.count(c) <= 85 for c in (1, 2, 3))


def test_w_avg_tracking():
    torch.manual_seed(0)
    G = stylegan.Generator(8, 8, 16, 1, mapping_layers=2, fmap_base=32, fmap_max=8)
    z = torch.randn(4, 8)
    G(z, 0, w_avg_beta=0.995)
    assert torch.allclose(G.w_avg, 0.005 * G.mapping(z).mean(0), atol=1e-6)


def test_synthesis_details():
    """Constant input of ones; noise scales start at 0 (noise has no effect at init) and act once set; 4x4 has
    2 layers and each doubling 2 more; the blur keeps a constant image constant."""
    torch.manual_seed(0)
    G = stylegan.Generator(8, 8, 32, 1, mapping_layers=2, fmap_base=32, fmap_max=8)
    assert torch.equal(G.synthesis.const, torch.ones_like(G.synthesis.const)) and G.num_layers == 8
    z = torch.randn(2, 8)
    assert torch.allclose(G(z, 3), G(z, 3), atol=1e-6)
    for layer in G.synthesis.modules():
        if isinstance(layer, stylegan.StyleLayer):
            layer.noise_strength.data.fill_(1.0)
    assert not torch.allclose(G(z, 3), G(z, 3), atol=1e-4)
    assert torch.allclose(stylegan.blur(torch.full((1, 2, 6, 6), 3.0))[..., 1:-1, 1:-1], torch.full((1, 2, 4, 4), 3.0))


def test_fade_in_endpoints():
    torch.manual_seed(0)
    G = stylegan.Generator(8, 8, 32, 1, mapping_layers=2, fmap_base=32, fmap_max=8)
    D = stylegan.Discriminator(32, 1, 32, 8)
    z = torch.randn(4, 8)
    for level in (1, 2, 3):
        old = stylegan.upscale(G(z, level - 1, randomize_noise=False))
        assert torch.allclose(G(z, level, 0.0, randomize_noise=False), old, atol=1e-5)
        assert torch.allclose(G(z, level, 1.0, randomize_noise=False), G(z, level, randomize_noise=False), atol=1e-6)
        x = torch.randn(4, 1, 4 * 2 ** level, 4 * 2 ** level)
        assert torch.allclose(D(x, level, 0.0), D(stylegan.downscale(x), level - 1), atol=1e-5)


class Quadratic(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.c = c

    def forward(self, x, level=0, alpha=1.0):
        return 0.5 * (self.c * x ** 2).flatten(1).sum(1)


def test_r1_of_a_quadratic_critic():
    """D(x) = ½ Σ c x²: ∇D = c ⊙ x, so R1 = (γ/2) mean_n Σ (c x_n)²."""
    c = torch.rand(1, 1, 4, 4) + 0.5
    x = torch.randn(6, 1, 4, 4)
    penalty, scores = stylegan.r1_penalty(Quadratic(c), x, 0, 1.0, 10.0)
    assert torch.allclose(penalty, 5.0 * (c * x).pow(2).flatten(1).sum(1).mean(), rtol=1e-5)
    assert torch.allclose(scores, Quadratic(c)(x))
    scaled, _ = stylegan.r1_penalty(Quadratic(c), x, 0, 1.0, 10.0, norm_scale=0.25)
    assert torch.allclose(scaled, penalty / 16, rtol=1e-5)


def test_losses():
    real, fake = torch.tensor([2.0, -1.0]), torch.tensor([0.5, -3.0])
    expected = -torch.log(1 - torch.sigmoid(fake)).mean() - torch.log(torch.sigmoid(real)).mean() + 0.1
    assert torch.allclose(stylegan.d_loss(real, fake, torch.tensor(0.1)), expected, atol=1e-6)
    assert torch.allclose(stylegan.g_loss(fake), -torch.log(torch.sigmoid(fake)).mean(), atol=1e-6)


def test_minibatch_stddev_by_hand():
    x = torch.randn(4, 2, 1, 1)
    y = stylegan.minibatch_stddev(x, 4)
    assert torch.allclose(y[:, 2], ((x.var(0, unbiased=False) + 1e-8).sqrt().mean()).expand(4, 1, 1), atol=1e-6)


# ---- the training loop: a short dry run watched from outside ----

DRY_SCHEDULE = [(0, 4, 1.0), (0, 4, 1.0), (1, 8, 0.5), (1, 8, 1.0), (1, 8, 1.0), (2, 16, 0.5)]   # (level, r, α)


@pytest.fixture(scope="module")
def loop(tmp_path_factory):
    """Six steps of the dry run (stabilisation phases of 8 images, fade-in phases of 16, minibatch 8, 4x4 →
    16x16) with a learning rate of its own at 8x8, watched."""
    return wiring.watch_training(stylegan, tmp_path_factory.mktemp("loop"), 6, "--lr-schedule", "8:0.002")


def reals_by_hand(x, r, alpha):
    """Box-filter to r x r; in a fade-in (1 − α)·nearest-upsampled(box-filtered to r/2) + α·(that)."""
    x = F.avg_pool2d(x, x.shape[-1] // r)
    return x if alpha == 1 else (1 - alpha) * F.interpolate(F.avg_pool2d(x, 2), scale_factor=2) + alpha * x


def loaded(net, state):
    net = copy.deepcopy(net)
    net.load_state_dict(state)
    return net


def grads_by_hand(net, state, loss_of):
    """∇ of loss_of(copy of net with parameters `state`) by parameter name."""
    net = loaded(net, state)
    names, params = zip(*net.named_parameters())
    return dict(zip(names, torch.autograd.grad(loss_of(net), params, allow_unused=True)))


def applied(step_record, net):
    """The gradients an optimizer step applied, by parameter name of `net`."""
    return {n: step_record.grads.get(id(p)) for n, p in net.named_parameters()}


def test_loop_schedule_and_mixing_reach_the_nets(loop):
    """Every training pass of G and D runs at the level and α of the schedule; both of G's training passes
    (for D's step and for G's) mix styles with p = 0.9, track w̄ with β 0.995, draw noise, and do not truncate."""
    assert len(loop.steps) == 6
    for s, (level, r, alpha) in zip(loop.steps, DRY_SCHEDULE):
        for call in s.d_calls + s.g_calls:
            assert (call.level, call.alpha) == (level, alpha), call.net
        g_calls = [c for c in s.d_calls + s.g_calls if c.net == "G"]
        assert len(g_calls) == 2
        for c in g_calls:
            assert (c.mixing_prob, c.w_avg_beta, c.psi, c.randomize_noise) == (0.9, 0.995, None, True)


def test_loop_w_avg_follows_each_training_pass(loop):
    """w̄ ← 0.995 w̄ + 0.005 mean_batch f(z) at each training pass of G (the z that pass drew)."""
    w_avg = torch.zeros_like(loop.steps[0].d_step.before["G"]["w_avg"])
    state = loop.steps[0].d_step.before["G"]
    for s in loop.steps:
        for (g_call,), after in (([c for c in s.d_calls if c.net == "G"], s.d_step.before["G"]),
                                 ([c for c in s.g_calls if c.net == "G"], s.g_step.before["G"])):
            w = loaded(loop.nets.G, state).mapping(g_call.x)
            w_avg = torch.lerp(w_avg, w.mean(0), 0.005)
            assert torch.allclose(after["w_avg"], w_avg, atol=1e-7)
            state = after
        state = s.g_step.after["G"]


def test_loop_d_step_is_logistic_with_r1_on_reals(loop):
    """D's step applies ∇ of E softplus(D(G(z))) + E softplus(−D(x)) + (γ/2) E ‖∇_x D(x)‖²·(r/R)² (γ 10, r/R
    the nets' resolution over the target's), the penalty on the drawn batch x at the nets' resolution
    (cross-faded as G's output) and G(z) this step's G output."""
    D = loop.nets.D
    for k, (s, (level, r, alpha)) in enumerate(zip(loop.steps, DRY_SCHEDULE)):
        real = reals_by_hand(loop.batches[k], r, alpha)
        (fake,) = [c.out for c in s.d_calls if c.net == "G"]

        def loss(net):
            x = real.clone().requires_grad_(True)
            d_real = net(x, level, alpha)
            (g,) = torch.autograd.grad(d_real.sum(), x, create_graph=True)
            r1 = 10 / 2 * (g.flatten(1).pow(2).sum(1) * (r / 16) ** 2).mean()
            return F.softplus(net(fake, level, alpha)).mean() + F.softplus(-d_real).mean() + r1
        hand = grads_by_hand(D, s.d_step.before["D"], loss)
        got = applied(s.d_step, D)
        for name in hand:
            if hand[name] is None:
                assert got[name] is None, name
            else:
                assert torch.allclose(got[name], hand[name], rtol=1e-4, atol=1e-7), (k + 1, name)


def test_loop_g_step_is_non_saturating(loop):
    """G's step feeds its own output to D (updated by this step's D step) and applies ∇ of E softplus(−D(G(z)))."""
    for k, (s, (level, r, alpha)) in enumerate(zip(loop.steps, DRY_SCHEDULE)):
        (g_call,) = [c for c in s.g_calls if c.net == "G"]
        (d_call,) = [c for c in s.g_calls if c.net == "D"]
        assert d_call.x is g_call.out
        D = loaded(loop.nets.D, s.d_step.after["D"])
        fake = g_call.out.detach().requires_grad_(True)
        (hand,) = torch.autograd.grad(F.softplus(-D(fake, level, alpha)).mean(), fake)
        assert torch.allclose(d_call.grad, hand, rtol=1e-4, atol=1e-9), k + 1


def test_loop_each_step_changes_only_its_net(loop):
    """D's step moves only D and G's step only G, each exactly the parameters that got a gradient (at 4x4 not
    the 8x8 toRGB / fromRGB), and nothing moves either net's parameters between the steps."""
    def moved(a, b, params):
        return {n for n in params if not torch.equal(a[n], b[n])}
    names = {k: {n for n, _ in getattr(loop.nets, k).named_parameters()} for k in "GD"}
    previous = loop.steps[0].d_step.before
    for k, s in enumerate(loop.steps, 1):
        for step, mine, other in ((s.d_step, "D", "G"), (s.g_step, "G", "D")):
            net = getattr(loop.nets, mine)
            assert not any(moved(previous[n], step.before[n], names[n]) for n in "GD"), k
            assert moved(step.before[other], step.after[other], names[other]) == set(), (k, mine)
            with_grad = {n for n, g in applied(step, net).items() if g is not None and g.any()}
            assert moved(step.before[mine], step.after[mine], names[mine]) == with_grad, (k, mine)
            if k == 1:
                assert with_grad and not with_grad & {"synthesis.to_rgb.1.weight", "from_rgb.1.weight"}
            previous = step.after


def test_loop_optimizers_are_the_papers_adam(loop):
    """Adam(lr 1e-3 or the --lr-schedule value at the nets' resolution, β = (0, 0.99), ε = 1e-8) for G and for
    D, built afresh at each new level of detail (steps 1, 3, 4 and 6 here); each update is Adam's on the
    applied gradients (first and second steps by hand)."""
    wiring.assert_growing_adam(loop, DRY_SCHEDULE, applied, lr_at={4: 1e-3, 8: 0.002, 16: 1e-3},
                               new_optimizers_at=(1, 3, 4, 6))


def test_loop_mapping_learns_100_times_slower(loop):
    """The lr multiplier 0.01 of f reaches training: in G's first step each weight of f as used (the map
    h ↦ fc(h) − fc(0)) moves by lr · 0.01 · √2 / √fan_in, each weight of A (lr multiplier 1, gain 1) by lr / √fan_in."""
    step = loop.steps[0].g_step
    G = loop.nets.G
    grads = applied(step, G)
    for prefix, layer, lrmul, gain in [("mapping.fcs.0", G.mapping.fcs[0], 0.01, math.sqrt(2)),
                                       ("synthesis.blocks.0.style0.affine", G.synthesis.blocks[0].style0.affine, 1, 1)]:
        fan_in = layer.weight.shape[1]
        eye = torch.eye(fan_in)
        used = [loaded(layer, {k[len(prefix) + 1:]: v for k, v in state.items() if k.startswith(prefix + ".")})
                for state in (step.before["G"], step.after["G"])]
        delta = (used[1](eye) - used[1](0 * eye)) - (used[0](eye) - used[0](0 * eye))   # (fan_in, out) = Δ Wᵀ
        g = grads[prefix + ".weight"].t()
        big = g.abs() > 1e-5
        assert big.sum() >= 8
        expected = 1e-3 * lrmul * gain / math.sqrt(fan_in)
        assert torch.allclose(delta[big].abs(), torch.full_like(delta[big], expected), rtol=0.03), prefix   # float32


def test_loop_ema_of_g_with_a_half_life_of_10k_images(loop):
    """Gs (the checkpoint's sampling and evaluation net) starts as G and follows Gs ← β Gs + (1 − β) G after
    every G step, β = 0.5^(minibatch / 10⁴) (a half-life of 10k images); its buffers (w̄, fixed noise) are G's."""
    beta = 0.5 ** (8 / 10_000)
    params = {n for n, _ in loop.nets.G.named_parameters()}
    avg = {n: v for n, v in loop.steps[0].d_step.before["G"].items() if n in params}
    for s in loop.steps:
        avg = {n: torch.lerp(avg[n], s.g_step.after["G"][n], 1 - beta) for n in avg}
    saved = loop.ckpt["models"]["Gs"]
    for n, v in saved.items():
        expected = avg[n] if n in params else loop.steps[-1].g_step.after["G"][n]
        assert torch.allclose(v, expected, rtol=0, atol=1e-7), n


def test_flip_is_on_for_celeba_only():
    """Mirroring follows the official configs: FFHQ / CelebA-HQ (celeba stands in) mirrored, others not."""
    flip = lambda *argv: stylegan.parse_args(list(argv)).flip
    assert flip() and flip("--dataset", "celeba") and not flip("--dataset", "mnist")
    assert flip("--dataset", "mnist", "--flip") and not flip("--no-flip")


def test_loop_flip_mirrors_about_half_of_the_real_images(tmp_path):
    """With --flip, D's real batch (the one R1 is taken on) holds each drawn image mirrored or not (both occur);
    the fakes are G's output."""
    rec = wiring.watch_training(stylegan, tmp_path, 2, "--flip")
    mirrored = []
    for k, s in enumerate(rec.steps):
        (fake,) = [c.out for c in s.d_calls if c.net == "G"]
        assert any(c.x is fake for c in s.d_calls if c.net == "D")
        (real,) = [c.x for c in s.d_calls if c.net == "D" and c.x is not fake]
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
    err = helpers.expect_usage_error(stylegan, argv, capsys, "32 pixels")
    assert "--image-size 32" in err and not out.exists()
    stylegan.check(stylegan.parse_args(["--dry-run", "--dataset", str(folder), "--image-size", "32"]))
