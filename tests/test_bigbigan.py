import math

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import bigbigan
from common import metrics
from tests import helpers


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dry_run_logs_the_linear_probe(tmp_path):
    out, summary, state = helpers.dry_run(bigbigan, tmp_path)
    assert set(state["models"]) == {"G", "E", "D"} and set(state["optimizers"]) == {"G", "E", "D"}
    assert 0 <= summary["metrics"]["metric/linear_probe"] <= 1
    assert 0 <= summary["metrics"]["metric/linear_probe_pool"] <= 1
    assert {"train/s_x_data", "train/s_z_gen", "train/s_xz_data"} <= set(summary["losses"])
    assert list((out / "samples").glob("reconstructions-*.png"))


def test_resume_is_exact(tmp_path, monkeypatch):
    a, _ = helpers.assert_resume_exact(bigbigan, tmp_path, monkeypatch, ["--n-dis", "2"], n=2,
                                       state_keys=("models", "optimizers"))
    assert any(k.endswith("_u") for k in a["models"]["D"])   # the power-iteration vectors are resumed too


class StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = nn.functional.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, 3 * f[:, :10]


def test_fid_of_samples_and_sample_command(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    monkeypatch.setattr(metrics, "preprocess", lambda x, mode="legacy": (x.float() - 128) / 128)   # no 299 px resize
    out, summary, _ = helpers.dry_run(bigbigan, tmp_path, "--steps", "1", "--metrics", "fid",
                                      "--data-root", str(tmp_path / "data"))
    assert summary["metrics"]["metric/fid"] > 0
    written = helpers.sample_from(bigbigan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "reconstructions"}


def test_no_unary_deterministic_and_high_res_encoder(tmp_path):
    _, summary, state = helpers.dry_run(bigbigan, tmp_path, "--no-unary", "--deterministic-e",
                                        "--e-image-size", "64", "--steps", "2")
    assert not any(k.startswith(("theta_x.", "theta_z.")) for k in state["models"]["D"])
    assert "train/s_x_data" not in summary["losses"] and "train/s_xz_data" in summary["losses"]
    assert state["data_shape"] == [3, 64, 64]   # E reads 64x64, G makes 32x32


def test_help(capsys):
    text = helpers.help_text(bigbigan, capsys)
    assert "--no-unary" in text and "--deterministic-e" in text and "--e-image-size" in text


def test_bad_input(tmp_path, capsys):
    x = str(tmp_path / "x")
    helpers.expect_usage_error(bigbigan, ["--dataset", "nope", "--out", x], capsys, "unknown dataset")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--image-size", "48", "--out", x], capsys, "32x32, 64x64 or 128x128")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--e-image-size", "16", "--out", x], capsys, "--e-image-size")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--z-dim", "10", "--out", x], capsys, "equal chunks")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--attn-res", "8", "--g-width", "3", "--out", x], capsys, "multiple of 8")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--attn-res", "32", "--out", x], capsys, "--attn-res 32")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--n-dis", "0", "--out", x], capsys, "--n-dis")
    helpers.expect_usage_error(bigbigan, ["--dry-run", "--dataset", "ring8", "--out", x], capsys, "not an image dataset")
    assert not (tmp_path / "x").exists()


def test_defaults_and_networks():
    args = bigbigan.parse_args([])
    assert (args.z_dim, args.g_lr, args.e_lr, args.d_lr, args.beta1, args.beta2, args.adam_eps, args.batch_size) == \
        (120, 1e-4, 1e-4, 4e-4, 0.0, 0.999, 1e-6, 2048)
    assert (args.image_size, args.e_image_size, args.g_width, args.attn_res, args.unary) == (32, 32, 64, 0, True)
    big = bigbigan.parse_args(["--image-size", "128", "--e-image-size", "256"])
    assert (big.g_width, big.d_width, big.attn_res, big.e_image_size) == (96, 96, 64, 256)
    G = bigbigan.Generator(120, 3, 32, 2)
    assert G.chunk == 30 and len(G.blocks) == 3          # hierarchical z: dense + 3 blocks, 30 dims each
    E = bigbigan.Encoder(120, 3, 64, 4, 16)
    D = bigbigan.JointDiscriminator(120, 3, 32, 2, 16)
    z = torch.randn(2, 120)
    x = G(z)
    mu, sigma = E(torch.randn(2, 3, 64, 64))
    assert x.shape == (2, 3, 32, 32) and mu.shape == sigma.shape == (2, 120) and (sigma > 0).all()
    assert [s.shape for s in D(x, z)] == [(2,)] * 3


def test_each_latent_chunk_conditions_its_own_block():
    torch.manual_seed(0)
    G = bigbigan.Generator(8, 1, 32, 2).eval()
    z = torch.randn(1, 8)
    base = G(z)
    for k in range(4):   # changing any chunk (dense or block k) changes the image
        z2 = z.clone()
        z2[0, 2 * k:2 * k + 2] += 1.0
        assert not torch.allclose(G(z2), base)


def test_scores_are_the_papers():
    """s_x = θ_xᵀF(x), s_z = θ_zᵀH(z), s_xz = θ_xzᵀJ([F(x), H(z)]) (Sec. 2)."""
    torch.manual_seed(0)
    D = bigbigan.JointDiscriminator(6, 3, 32, 2, 16).eval()
    x, z = torch.randn(3, 3, 32, 32), torch.randn(3, 6)
    fx, hz = D.image_features(x), D.H(z)
    s_x, s_z, s_xz = D(x, z)
    assert torch.allclose(s_x, D.theta_x(fx).squeeze(1)) and torch.allclose(s_z, D.theta_z(hz).squeeze(1))
    assert torch.allclose(s_xz, D.theta_xz(D.J(torch.cat([fx, hz], 1))).squeeze(1))
    x2 = x.clone()
    x2[0] += 1
    assert torch.equal(D(x2, z)[1], s_z)                     # s_z ignores x
    assert not torch.allclose(D(x2, z)[0][0], s_x[0])        # s_x does not
    no_unary = bigbigan.JointDiscriminator(6, 3, 32, 2, 16, unary=False).eval()
    assert len(no_unary(x, z)) == 1 and not hasattr(no_unary, "theta_x")


def test_losses_on_hand_made_scores():
    data = (torch.tensor([2.0, 0.0]), torch.tensor([0.5, 1.5]), torch.tensor([-1.0, 3.0]))   # y = +1
    gen = (torch.tensor([-2.0, 0.5]), torch.tensor([1.0, -0.5]), torch.tensor([0.0, -4.0]))  # y = −1
    # D: h(+s) on data pairs: (0 + 1)/2 + (0.5 + 0)/2 + (2 + 0)/2; h(−s) on generated: (0 + 1.5)/2 + (2 + 0.5)/2 + (1 + 0)/2
    assert math.isclose(float(bigbigan.d_loss(data, gen)), 0.5 + 0.25 + 1.0 + 0.75 + 1.25 + 0.5, rel_tol=1e-6)
    # E, G: y·(s_x + s_z + s_xz), unhinged: mean(1.5, 4.5) − mean(−1, −4) = 3 + 2.5
    assert math.isclose(float(bigbigan.eg_loss(data, gen)), 3 + 2.5, rel_tol=1e-6)
    # signs: D lowers its loss by raising data scores; E/G lower theirs by lowering them
    d = [s.clone().requires_grad_() for s in data]
    g = [s.clone().requires_grad_() for s in gen]
    grads_d = torch.autograd.grad(bigbigan.d_loss(d, g), d + g)
    grads_eg = torch.autograd.grad(bigbigan.eg_loss(d, g), d + g)
    assert all((gr <= 0).all() for gr in grads_d[:3]) and all((gr >= 0).all() for gr in grads_d[3:])
    assert all((gr > 0).all() for gr in grads_eg[:3]) and all((gr < 0).all() for gr in grads_eg[3:])
    # scores beyond the margin give D no loss; one score alone (--no-unary) is the BiGAN hinge
    assert float(bigbigan.d_loss((torch.tensor([1.0, 5.0]),), (torch.tensor([-1.0, -2.0]),))) == 0
    assert math.isclose(float(bigbigan.d_loss(data[2:], gen[2:])), 1.0 + 0.5, rel_tol=1e-6)


def test_reparameterised_sample_has_the_posterior_moments():
    torch.manual_seed(0)
    mu, sigma = torch.tensor([[1.0, -2.0, 0.5]]).repeat(200_000, 1), torch.tensor([[0.5, 2.0, 0.1]]).repeat(200_000, 1)
    mu.requires_grad_(), sigma.requires_grad_()
    z = bigbigan.sample_posterior(mu, sigma)
    assert torch.allclose(z.mean(0), mu[0], atol=0.02) and torch.allclose(z.std(0), sigma[0], rtol=0.02)
    gm, gs = torch.autograd.grad(z.sum(), (mu, sigma))      # the sample is differentiable in μ and σ
    assert torch.equal(gm, torch.ones_like(mu)) and not torch.equal(gs, torch.zeros_like(sigma))
    assert torch.equal(bigbigan.sample_posterior(mu, sigma, deterministic=True), mu)
    E = bigbigan.Encoder(4, 1, 32, 4, 8)   # σ = softplus(σ̂) > 0
    assert (E(torch.randn(5, 1, 32, 32))[1] > 0).all()


def test_spectral_norm_in_g_and_d_not_in_e():
    torch.manual_seed(0)
    G, E, D = bigbigan.build(bigbigan.parse_args(["--dry-run"]), (3, 32, 32))
    for net in (G, D):
        layers = [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
        assert all(parametrize.is_parametrized(m, "weight") for m in layers)
        for _ in range(30):
            for m in layers:
                m.weight
        sigma = torch.stack([torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2) for m in layers])
        assert torch.allclose(sigma, torch.ones(1), atol=0.03), sigma
    assert not any(parametrize.is_parametrized(m) for m in E.modules())


def test_linear_probe_separates_separable_features():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(3, (600,), generator=g)
    centres = torch.randn(3, 5, generator=g) * 4
    x = centres[y] + torch.randn(600, 5, generator=g)
    acc = bigbigan.fit_linear_probe(x[:400], y[:400], x[400:], y[400:], 3)
    assert acc > 0.95
    noise = torch.randn(600, 5, generator=g)
    assert bigbigan.fit_linear_probe(noise[:400], y[:400], noise[400:], y[400:], 3) < 0.6
    assert bigbigan.crelu(torch.tensor([[1.0, -2.0]])).tolist() == [[1.0, 0.0, 0.0, 2.0]]
