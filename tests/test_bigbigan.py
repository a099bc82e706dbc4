import importlib.util
import math
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from torch.nn.utils import parametrize

import bigbigan
from common import metrics
from common import data as datasets_module
from tests import helpers, wiring

spec = importlib.util.spec_from_file_location(
    "bigbigan_probe", Path(__file__).resolve().parents[1] / "benchmarks" / "bigbigan_probe.py")
bigbigan_probe = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bigbigan_probe)


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dry_run_logs_the_linear_probe(tmp_path):
    out, summary, state = helpers.dry_run(bigbigan, tmp_path)
    assert set(state["models"]) == {"G", "E", "D"} and set(state["optimizers"]) == {"G", "E", "D"}
    # the logged probes are those of the final E, fitted on the probe's training images and scored on the held-out
    # ones (a fixed 20% of `fake`, which has no test split); benchmarks/bigbigan_probe.py recomputes them
    result = bigbigan_probe.probes(out / "ckpt.pt", random_seeds=[], pixels=False)
    assert result["probe_images"] == {"train": 512 - 102, "held_out": 102}
    assert (result["checkpoint"]["mu"], result["checkpoint"]["pool"]) == \
        (summary["metrics"]["metric/linear_probe"], summary["metrics"]["metric/linear_probe_pool"])
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


class PixelEncoder(nn.Module):
    """Stands in for E: features = the image's first 6 pixels, μ and σ̂ a fixed linear map of them."""

    def __init__(self):
        super().__init__()
        self.head = nn.Linear(6, 8)

    def features(self, x):
        return x.flatten(1)[:, :6]


def test_linear_probe_reads_the_class_from_the_encoder():
    """Through encode() and both feature sets: images whose first pixels carry the class are probed at high
    accuracy, images independent of the class at chance (3 classes)."""
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    E = PixelEncoder()
    y = torch.randint(3, (900,), generator=g)
    noise = torch.randn(900, 1, 8, 8, generator=g)
    carrying = noise.clone()
    carrying.view(900, -1)[:, :6] += 4 * torch.randn(3, 6, generator=g)[y]
    for images, low, high in ((carrying, 0.95, 1.0), (noise, 0.2, 0.45)):
        probe = ((images[:600], y[:600]), (images[600:], y[600:]))
        scores = bigbigan.linear_probe(E, probe, 3)
        assert all(low <= v <= high for v in scores.values()), scores


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


# ------------------------------------------------------------------------------------------------
# The training loop: D steps and the E/G step of train(), watched from outside
# ------------------------------------------------------------------------------------------------

class ScoringJointD(nn.Module):
    """Stands in for the joint D with three scores of simple features, each (3 + w_k)·feature_k + c_k with
    trainable w, c (0 at first): s_x of mean(x), s_z of mean(z), s_xz of mean(x) + mean(z); only s_xz when
    unary is off. Records each call's inputs, mode and scores, and the gradient of the loss reaching each score."""

    def __init__(self, unary=True):
        super().__init__()
        self.unary = unary
        self.w, self.c = nn.Parameter(torch.zeros(3)), nn.Parameter(torch.zeros(3))
        self.calls = []

    def features(self, x, z):
        mx, mz = x.mean((1, 2, 3)), z.mean(1)
        return torch.stack([mx, mz, mx + mz])

    def forward(self, x, z):
        f = self.features(x, z)
        scores = [(3 + self.w[k]) * f[k] + self.c[k] for k in range(3)]
        scores = scores if self.unary else scores[2:]
        call = {"x": x.detach().clone(), "z": z.detach().clone(), "training": self.training,
                "features": f.detach().clone(), "scores": [s.detach().clone() for s in scores],
                "grads": [None] * len(scores)}
        self.calls.append(call)
        for k, s in enumerate(scores):
            if s.requires_grad:
                s.register_hook(lambda g, k=k: call["grads"].__setitem__(k, g.clone()))
        return tuple(scores)


def known_batches(n, batch_size, channels, size):
    """n different data batches of constant images (image i of batch k has the value −0.9 + 1.8 i / (B − 1) + 0.01 k)."""
    values = torch.linspace(-0.9, 0.9, batch_size)
    return [((values + 0.01 * k)[:, None, None, None].expand(batch_size, channels, size, size).clone(),
             torch.arange(batch_size) % 10) for k in range(n)]


def test_training_loop_wiring(tmp_path, monkeypatch):
    """Two iterations with two D steps per E/G step: each D step scores a fresh data batch x paired with ẑ ~ E(x) as data
    (y = +1) and G(z) paired with G's z as generated (y = −1) through the hinge on every score (s_x, s_z,
    s_xz): −1/B on data scores below 1, +1/B on generated scores above −1; it changes D alone. The E/G step,
    on the next batch and D in eval mode, takes +1/B on each data score and −1/B on each generated one
    (unhinged, the unary terms included) and changes E and G alone. Adam (β = (0, 0.999), ε = 1e-6) with
    each net's own learning rate."""
    batches = known_batches(8, 8, 3, 32)
    monkeypatch.setattr(datasets_module, "iterate", lambda *a, **k: iter(batches))
    monkeypatch.setattr(bigbigan, "linear_probe", lambda *a, **k: {})   # not under test here; saves time
    nets, g_calls, e_calls = {}, [], []

    def build(args, shape):
        G, E, _ = original_build(args, shape)
        G.register_forward_hook(lambda m, inputs, out: g_calls.append((inputs[0].detach().clone(), out.detach().clone())))
        E.register_forward_hook(lambda m, inputs, out: e_calls.append((inputs[0].detach().clone(),
                                                                       *(t.detach().clone() for t in out))))
        nets.update(G=G, E=E, D=ScoringJointD(args.unary))
        return nets["G"], nets["E"], nets["D"]
    original_build = bigbigan.build
    monkeypatch.setattr(bigbigan, "build", build)
    posterior = wiring.record_calls(monkeypatch, bigbigan, "sample_posterior")
    built = wiring.record_optimizers(monkeypatch)
    steps = []
    original_step = torch.optim.Adam.step

    def adam_step(self, *args, **kwargs):   # which nets' parameters each optimizer step changes
        before = {name: wiring.snapshot(net) for name, net in nets.items()}
        result = original_step(self, *args, **kwargs)
        steps.append((self, {name: wiring.changed(net, before[name]) for name, net in nets.items()},
                      {name: {k: p.detach().clone() for k, p in net.named_parameters()} for name, net in nets.items()},
                      before))
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", adam_step)
    wiring.train_steps(bigbigan, tmp_path, 2, "--n-dis", "2", "--e-lr", "2e-4")
    G, E, D = nets["G"], nets["E"], nets["D"]
    b = len(batches[0][0])

    # the optimizers: each net its own learning rate, BigGAN's Adam settings
    opts = {name: wiring.optimizer_for(built, net) for name, net in nets.items()}
    assert {name: o.setting("lr") for name, o in opts.items()} == {"G": 1e-4, "E": 2e-4, "D": 4e-4}
    for o in opts.values():
        assert (o.setting("betas"), o.setting("eps")) == ((0.0, 0.999), 1e-6)
    # two D steps, then E's and G's: each step changes its own net's parameters and no other's
    owner = {id(o.opt): name for name, o in opts.items()}
    order = [owner[id(s[0])] for s in steps]
    assert order[:2] == order[4:6] == ["D", "D"] and sorted(order[2:4]) == sorted(order[6:]) == ["E", "G"]
    for name, (_, changed, _, _) in zip(order, steps):
        assert changed[name] and not any(changed[other] for other in nets if other != name), (name, changed)

    # the pairs D scores: data (x, ẑ ~ E(x)) first, generated (G(z), z) after, each step on its own batch
    assert [c["training"] for c in D.calls] == [True, True, False] * 2
    for k, call in enumerate(D.calls[:3]):
        x = batches[k][0]
        assert torch.equal(e_calls[k][0], x)                                  # E encodes this step's batch
        assert all(torch.equal(a, e) for a, e in zip(posterior[k][0][:2], e_calls[k][1:]))   # ẑ from E's μ, σ
        z_hat, (z, x_gen) = posterior[k][2], g_calls[k]
        assert torch.equal(call["x"][:b], x) and torch.equal(call["z"][:b], z_hat.detach())
        assert torch.equal(call["x"][b:], x_gen) and torch.equal(call["z"][b:], z)

    # D: the hinge on each of the three scores, +1 for data pairs, −1 for generated pairs (mean over B)
    for call in D.calls[:2]:
        for s, g in zip(call["scores"], call["grads"]):
            assert g is not None, "a score does not reach L_D"
            assert (s[:b] < 1).any() and (s[b:] > -1).any()
            assert torch.equal(g, torch.cat([-(s[:b] < 1).float(), (s[b:] > -1).float()]) / b)
    # E and G: every score unhinged, +1/B on data pairs, −1/B on generated pairs
    eg = D.calls[2]
    for g in eg["grads"]:
        assert g is not None, "a score does not reach L_EG"
        assert torch.allclose(g, torch.cat([torch.full((b,), 1 / b), torch.full((b,), -1 / b)]))
    # D's first Adam step: −lr_D · sign(dL_D/dw_k, dL_D/dc_k)
    call, after = D.calls[0], steps[0][2]["D"]
    grads = torch.stack(call["grads"])
    assert torch.allclose(after["c"], wiring.adam_first_update(4e-4, grads.sum(1), eps=1e-6))
    assert torch.allclose(after["w"], wiring.adam_first_update(4e-4, (grads * call["features"]).sum(1), eps=1e-6))
    # E's and G's first Adam steps: each parameter moves by lr · |g| / (|g| + ε), i.e. at most lr and about lr
    for (name, lr), (_, _, after, before) in zip([(n, {"E": 2e-4, "G": 1e-4}[n]) for n in order[2:4]], steps[2:4]):
        deltas = torch.cat([(after[name][k] - before[name][k]).abs().flatten() for k in after[name]])
        assert deltas.max() <= lr + 2.5e-7 and deltas.max() > 0.99 * lr, (name, deltas.max())


def test_attention_is_sagans_block_under_the_same_names():
    """G's and F's self-attention is SAGAN's block with the SAGAN paper's names (f keys, g queries, h values,
    v output): sagan.py's block's weights load into it by name and give the same output."""
    import sagan
    torch.manual_seed(0)
    ours, theirs = bigbigan.SelfAttention(16).eval(), sagan.SelfAttention(16).eval()
    with torch.no_grad():
        theirs.gamma.fill_(0.7)
    ours.load_state_dict(theirs.state_dict())                 # same keys: f, g, h, v, gamma
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6) and not torch.allclose(ours(x), x)
