import math

import pytest
import torch
import torch.nn as nn

import stylegan
from tests import helpers


def test_dry_run_grows_through_two_resolutions(tmp_path):
    out, summary, state = helpers.dry_run(stylegan, tmp_path)
    assert summary["resolution"] == 16 and summary["alpha"] == 0.5
    assert state["phase"]["lod"] == 0.5
    assert state["models"]["Gs"]["w_avg"].abs().sum() > 0       # w̄ is tracked (and copied into the EMA)


def test_resume_is_exact_in_a_fade_in(tmp_path, monkeypatch):
    """Interrupted after step 3 (fading 4 → 8, α = 0.5): mixing draws, noise, w̄, Adam, phase all continue."""
    helpers.assert_resume_exact(stylegan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers", "phase"))


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


def test_figure_claims_on_a_stand_in_classifier():
    """ψ = 0 makes one image (std 0); a classifier that only sees the image's mean gives each image's class; the
    shares are of pairs with different classes, so keeps_A + takes_B <= 1; the noise changes pixels."""
    from common import digits
    torch.manual_seed(0)
    G = stylegan.Generator(8, 8, 16, 1, mapping_layers=2, fmap_base=32, fmap_max=8)
    G.w_avg.normal_()
    for layer in G.synthesis.modules():   # the noise inputs' scales start at 0: give them some effect
        if hasattr(layer, "noise_strength"):
            nn.init.constant_(layer.noise_strength, 0.5)
    clf = digits.DigitNet().eval()
    claims = stylegan.figure_claims(G, clf, 2, 1.0, 8, "cpu", torch.Generator().manual_seed(0), n=60, draws=4)
    assert claims["metric/psi0_std"] < 1e-6 < claims["metric/latent_std"]
    assert claims["metric/noise_std"] > 0 and 0 <= claims["metric/noise_keeps_class"] <= 1
    for name in ("coarse", "middle"):
        assert claims[f"metric/mix_{name}_keeps_A"] + claims[f"metric/mix_{name}_takes_B"] <= 1 + 1e-9


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
    for layer in G.synthesis.layers:
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
