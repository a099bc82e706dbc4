from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrize

import sagan
from common import metrics
from common import data as datasets_module
from tests import helpers, wiring


@pytest.fixture(autouse=True)
def one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, 3 * f[:, :10]


def test_dry_run_sample_and_inception_metrics(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    monkeypatch.setattr(metrics, "preprocess", lambda x, mode="legacy": (x.float() - 128) / 128)   # no 299 px resize
    out, summary, state = helpers.dry_run(sagan, tmp_path, "--metrics", "fid,is", "--data-root", str(tmp_path / "data"))
    assert state["num_classes"] == 10 and state["data_shape"] == [3, 32, 32]
    assert "train/gamma_G" in summary["losses"] and {"metric/fid", "metric/is"} <= set(summary["metrics"])
    assert any(k.endswith("attn.gamma") for k in state["models"]["G"])
    # --sample: a class grid and the attention maps (and IS / FID with --eval)
    written = helpers.sample_from(sagan, out / "ckpt.pt", tmp_path, "--eval", "--eval-samples", "20")
    assert {"samples", "attention", "metric/fid", "metric/is"} <= set(written)


def test_resume_is_exact_with_ema(tmp_path, monkeypatch):
    a, b = helpers.assert_resume_exact(sagan, tmp_path, monkeypatch, ["--ema-decay", "0.9"], n=2,
                                       state_keys=("models", "optimizers", "ema"))
    assert any(k.endswith("_u") for k in a["models"]["G"]) and any(k.endswith("_u") for k in a["models"]["D"])


def test_unconditional_without_attention(tmp_path):
    out, _, state = helpers.dry_run(sagan, tmp_path, "--no-labels", "--attn-res", "0", "--steps", "2")
    assert state["num_classes"] == 0
    assert not any("attn" in k or "embed" in k for k in state["models"]["D"])
    written = helpers.sample_from(sagan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples"}


def test_help(capsys):
    text = helpers.help_text(sagan, capsys)
    assert "--attn-res" in text and "--no-labels" in text and "--g-lr" in text


def test_bad_input(tmp_path, capsys):
    x = str(tmp_path / "x")
    helpers.expect_usage_error(sagan, ["--dataset", "nope", "--out", x], capsys, "unknown dataset")
    helpers.expect_usage_error(sagan, ["--dry-run", "--image-size", "48", "--out", x], capsys, "32x32, 64x64 or 128x128")
    helpers.expect_usage_error(sagan, ["--dry-run", "--attn-res", "32", "--out", x], capsys, "--attn-res 32")
    helpers.expect_usage_error(sagan, ["--dry-run", "--g-width", "3", "--out", x], capsys, "multiple of 8")
    helpers.expect_usage_error(sagan, ["--dry-run", "--dataset", "ring8", "--out", x], capsys, "not an image dataset")
    folder = tmp_path / "flat"   # a folder of images without class subfolders: no labels
    folder.mkdir()
    from PIL import Image
    Image.new("RGB", (40, 40)).save(folder / "a.png")
    helpers.expect_usage_error(sagan, ["--dry-run", "--dataset", str(folder), "--out", x], capsys, "--no-labels")
    assert not (tmp_path / "x").exists()


def test_paper_defaults_and_architecture():
    args = sagan.parse_args([])
    assert (args.g_lr, args.d_lr, args.beta1, args.beta2, args.batch_size, args.z_dim) == (1e-4, 4e-4, 0.0, 0.9, 256, 128)
    assert (args.image_size, args.attn_res, args.labels, args.ema_decay) == (32, 16, True, 0.0)
    assert sagan.parse_args(["--image-size", "128"]).attn_res == 32          # feat32 (Table 1)
    # the official 128x128 nets: G 1024 → 1024, 512, 256 (+attention), 128, 64; D 64, 128 (+attention), ..., 1024
    arch, g_at, d_at = sagan.architecture(128, 32)
    assert [m * 64 for m in arch["g"]] == [1024, 1024, 512, 256, 128, 64] and g_at == 2
    assert [m * 64 for m in arch["d"]] == [64, 128, 256, 512, 1024, 1024] and d_at == 1
    G = sagan.Generator(8, 3, 32, 2, num_classes=5, attn_res=16)
    D = sagan.Discriminator(3, 32, 4, num_classes=5, attn_res=8)
    y = torch.tensor([0, 4])
    x = G(torch.randn(2, 8), y)
    assert x.shape == (2, 3, 32, 32) and x.abs().max() <= 1 and D(x, y).shape == (2,)
    assert G.attn.v.out_channels == 8 and D.attn.f.out_channels == 1


def test_attention_is_identity_at_init_and_rows_sum_to_one():
    torch.manual_seed(0)
    block = sagan.SelfAttention(16)
    x = torch.randn(3, 16, 8, 8)
    assert torch.equal(block(x), x)                          # γ = 0: y = x exactly
    beta = block.attention(x)
    assert beta.shape == (3, 64, 16)                         # N queries over N/4 pooled keys
    assert torch.allclose(beta.sum(-1), torch.ones(3, 64), atol=1e-6) and (beta > 0).all()
    assert (block.f.out_channels, block.g.out_channels, block.h.out_channels, block.v.out_channels) == (2, 2, 8, 16)


def test_attention_reaches_every_position():
    """Change one input position: with γ ≠ 0 every output position changes, even the farthest one
    (two 3x3 convolutions could only reach a 5x5 neighbourhood)."""
    torch.manual_seed(0)
    block = sagan.SelfAttention(16).eval()
    with torch.no_grad():
        block.gamma.fill_(1.0)
    x = torch.randn(1, 16, 16, 16)
    x2 = x.clone()
    x2[0, :, 0, 0] += 3.0
    diff = (block(x2) - block(x)).abs().sum(1)[0]
    diff[0, 0] = diff[0, 1] = diff[1, 0] = diff[1, 1] = 1   # the changed position's own pooling window
    assert (diff > 1e-7).all() and diff[15, 15] > 1e-7
    conv = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.Conv2d(16, 16, 3, padding=1))
    assert torch.equal(conv(x2)[0, :, 15, 15], conv(x)[0, :, 15, 15])


def test_attention_output_by_hand():
    """o_j = v(Σ_i β_j,i h(x_i)) with β the softmax of g(x_j)ᵀ f(x_i) over 2x2 max-pooled keys."""
    torch.manual_seed(1)
    block = sagan.SelfAttention(8).eval()
    with torch.no_grad():
        block.gamma.fill_(0.5)
    x = torch.randn(1, 8, 4, 4)
    wf, wg, wh, wv = (m.weight.flatten(1) for m in (block.f, block.g, block.h, block.v))
    xs = x[0].flatten(1)                                                   # (C, N)
    keys = F.max_pool2d((wf @ xs).view(1, 4, 4), 2).flatten(1)             # (1, 4)
    values = F.max_pool2d((wh @ xs).view(4, 4, 4), 2).flatten(1)           # (4, 4)
    out = torch.empty(8, 16)
    for j in range(16):
        beta = torch.softmax((wg @ xs[:, j]) @ keys, 0)                    # over the 4 keys
        out[:, j] = wv @ (values @ beta)
    assert torch.allclose(block(x)[0].flatten(1), xs + 0.5 * out, atol=1e-5)


def normalised(net):
    return [m for m in net.modules() if isinstance(m, (nn.Conv2d, nn.Linear, nn.Embedding))
            and parametrize.is_parametrized(m, "weight")]


def test_spectral_norm_on_every_layer_of_g_and_d():
    torch.manual_seed(0)
    G, D = sagan.build(sagan.parse_args(["--dry-run"]), (3, 32, 32), 10)
    for net in (G, D):
        layers = normalised(net)
        # every conv and dense layer (and D's class embedding) is normalised; G's CBN tables are not
        assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in net.modules()) + (net is D)
        for _ in range(30):   # power iterations (each training-mode read of the weight makes one)
            for m in layers:
                m.weight
        sigma = torch.stack([torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2) for m in layers])
        assert torch.allclose(sigma, torch.ones(1), atol=0.03), sigma


def test_conditional_batchnorm_uses_the_class_scale_and_shift():
    cbn = sagan.ConditionalBatchNorm(3, num_classes=4).eval()
    with torch.no_grad():
        cbn.scale.weight[2] = torch.tensor([2.0, 3.0, 4.0])
        cbn.shift.weight[2] = torch.tensor([1.0, -1.0, 0.5])
    x = torch.randn(2, 3, 5, 5)
    normed = x / (1 + 1e-5) ** 0.5                     # fresh running stats: mean 0, variance 1
    out = cbn(x, torch.tensor([2, 0]))
    assert torch.allclose(out[0], normed[0] * torch.tensor([2.0, 3.0, 4.0])[:, None, None]
                          + torch.tensor([1.0, -1.0, 0.5])[:, None, None], atol=1e-6)
    assert torch.allclose(out[1], normed[1], atol=1e-6)   # class 0 keeps the initial scale 1, shift 0


def test_projection_discriminator_class_term():
    torch.manual_seed(0)
    D = sagan.Discriminator(3, 32, 4, num_classes=5, attn_res=16).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 3, 4])
    phi = D.features(x)
    expected = D.psi(phi).squeeze(1) + (D.embed.weight[y] * phi).sum(1)   # ψ(φ(x)) + ⟨embed(y), φ(x)⟩
    assert torch.allclose(D(x, y), expected, atol=1e-5)
    assert not torch.allclose(D(x, y), D(x, torch.tensor([1, 2, 4, 0])))   # the label matters


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])    # margins 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.3, 1.5])    # margins 0, 1.3, 2.5
    assert torch.isclose(sagan.d_loss_hinge(real, fake), torch.tensor(2.5 / 3 + 3.8 / 3))
    assert torch.isclose(sagan.g_loss_hinge(fake), torch.tensor(0.2 / 3))   # −mean(−2, 0.3, 1.5)
    real, fake = torch.tensor([1.5, 3.0], requires_grad=True), torch.tensor([-1.0, -4.0], requires_grad=True)
    loss = sagan.d_loss_hinge(real, fake)
    assert loss == 0 and all((g == 0).all() for g in torch.autograd.grad(loss, (real, fake)))


def test_attention_maps_for_query_points():
    torch.manual_seed(0)
    G = sagan.Generator(8, 1, 32, 2, num_classes=3, attn_res=16).eval()
    images, maps, pixels = sagan.attention_maps(G, torch.randn(2, 8), torch.tensor([0, 2]))
    assert images.shape == (2, 1, 32, 32) and maps.shape == (2, len(sagan.QUERIES), 32, 32)
    assert torch.allclose(maps.amax((2, 3)), torch.ones(1))
    panel = sagan.attention_panel(images, maps, pixels)
    assert panel.shape == (2 * (1 + len(sagan.QUERIES)), 3, 32, 32) and 0 <= panel.min() and panel.max() <= 1


# ------------------------------------------------------------------------------------------------
# The training loop: one D step and one G step of train(), watched from outside
# ------------------------------------------------------------------------------------------------

class ScoringD(nn.Module):
    """Stands in for the projection D: D(x, y) = (4 + w)·mean(x) + offset[y] + c with two trainable scalars
    w, c (both 0 at first) and fixed class offsets, so that some scores fall inside the hinge margins and some beyond them. Records
    each call's inputs, mode and scores, and the gradient of the loss with respect to the scores."""

    def __init__(self, num_classes):
        super().__init__()
        self.w, self.c = nn.Parameter(torch.zeros(())), nn.Parameter(torch.zeros(()))
        self.register_buffer("offset", torch.linspace(-2.5, 2.5, num_classes))
        self.attn = SimpleNamespace(gamma=torch.zeros(()))   # G's attention γ is logged next to D's
        self.calls = []

    def forward(self, x, y=None):
        scores = (4 + self.w) * x.mean((1, 2, 3)) + self.offset[y] + self.c
        call = {"x": x.detach().clone(), "y": y.clone(), "training": self.training,
                "scores": scores.detach().clone(), "grad": None}
        self.calls.append(call)
        if scores.requires_grad:
            scores.register_hook(lambda g: call.__setitem__("grad", g.clone()))
        return scores


def known_batches(batch_size, channels, size, num_classes):
    """Real batches of constant images (value v_i for image i) with known labels, the values in (−1, 1) so
    that 4·v_i + offset[y_i] lands on both sides of the margin at 1."""
    values = torch.linspace(-0.9, 0.9, batch_size)
    x = values[:, None, None, None].expand(batch_size, channels, size, size).clone()
    y = torch.arange(batch_size) % num_classes
    return x, y


def adam_steps(monkeypatch, nets):
    """Record every Adam step train() takes as (optimizer, {net: names of its parameters that step changed},
    {net: its parameters after the step}); `nets` is filled once the nets exist."""
    steps, original = [], torch.optim.Adam.step

    def step(self, *args, **kwargs):
        before = {name: wiring.snapshot(net) for name, net in nets.items()}
        result = original(self, *args, **kwargs)
        steps.append((self, {name: wiring.changed(net, before[name]) for name, net in nets.items()},
                      {name: {k: p.detach().clone() for k, p in net.named_parameters()} for name, net in nets.items()}))
        return result
    monkeypatch.setattr(torch.optim.Adam, "step", step)
    return steps


def test_training_loop_wiring(tmp_path, monkeypatch):
    """D sees the data batch with its labels as real and G(z, y) with G's labels as fake, through the hinge
    loss (Eq. 4: −1/B on real scores below 1, +1/B on fake scores above −1, nothing beyond the margins); G
    minimises −E D(G(z, y), y) against D in eval mode; TTUR (D 4e-4, G 1e-4, β = (0, 0.9)), one D step then
    one G step, each changing only its own net; spectral norm on G's layers; the EMA of G with its decay."""
    batch = known_batches(8, 3, 32, 10)
    monkeypatch.setattr(datasets_module, "iterate", lambda *a, **k: iter([batch] * 100))
    nets, g_calls = {}, []

    def build(args, shape, num_classes):
        G, _ = original_build(args, shape, num_classes)
        G.register_forward_hook(lambda m, inputs, out: g_calls.append((*inputs, out.detach().clone())))
        nets.update(G=G, D=ScoringD(num_classes))
        return nets["G"], nets["D"]
    original_build = sagan.build
    monkeypatch.setattr(sagan, "build", build)
    built = wiring.record_optimizers(monkeypatch)
    steps = adam_steps(monkeypatch, nets)
    emas = wiring.record_calls(monkeypatch, sagan, "make_ema")
    wiring.train_steps(sagan, tmp_path, 2, "--ema-decay", "0.9")
    G, D = nets["G"], nets["D"]
    x, y = batch
    b = len(x)

    # the optimizers: TTUR, both with β = (0, 0.9)
    opt_d, opt_g = wiring.optimizer_for(built, D), wiring.optimizer_for(built, G)
    assert (opt_d.setting("lr"), opt_d.setting("betas")) == (4e-4, (0.0, 0.9))
    assert (opt_g.setting("lr"), opt_g.setting("betas")) == (1e-4, (0.0, 0.9))
    # one D step, then one G step; each changes only its own net's parameters
    assert [s[0] for s in steps] == [opt_d.opt, opt_g.opt] * 2
    for opt, changed, _ in steps:
        assert changed["D" if opt is opt_d.opt else "G"] and not changed["G" if opt is opt_d.opt else "D"]

    # step 1, D: one pass over [real; fake] in training mode, with the data's labels and G's labels
    d_step, g_step = D.calls[0], D.calls[1]
    (z1, y1, fake1), (z2, y2, fake2) = g_calls[0], g_calls[1]
    assert d_step["training"] and torch.equal(d_step["x"][:b], x) and torch.equal(d_step["y"][:b], y)
    assert torch.equal(d_step["x"][b:], fake1) and torch.equal(d_step["y"][b:], y1)
    real, fake = d_step["scores"][:b], d_step["scores"][b:]
    assert (real > 1).any() and (real < 1).any()                       # both sides of the margin are exercised
    expected = torch.cat([-(real < 1).float(), (fake > -1).float()]) / b
    assert torch.equal(d_step["grad"], expected)                       # hinge, real vs fake, mean over B
    # D's first Adam step moves w and c by −lr_D · sign of dL_D/dw = Σ dL_D/dD · mean(x), dL_D/dc = Σ dL_D/dD
    means = d_step["x"].mean((1, 2, 3))
    assert torch.isclose(steps[0][2]["D"]["w"], wiring.adam_first_update(4e-4, (expected * means).sum()))
    assert torch.isclose(steps[0][2]["D"]["c"], wiring.adam_first_update(4e-4, expected.sum()))
    # step 1, G: G's fresh batch goes through D in eval mode with G's own labels; dL_G/dD = −1/B
    assert not g_step["training"] and torch.equal(g_step["x"], fake2) and torch.equal(g_step["y"], y2)
    assert torch.allclose(g_step["grad"], torch.full((b,), -1 / b))
    # G's first Adam step moves each parameter by lr_G · |g| / (|g| + ε): at most, and for clear gradients, lr_G
    before, after = steps[0][2]["G"], steps[1][2]["G"]      # (the D step left G as it was built)
    deltas = torch.cat([(after[k] - before[k]).abs().flatten() for k in after])
    assert abs(deltas.max() - 1e-4) < 2.5e-7                    # (float32 rounding of parameters near 1)
    # spectral norm on every conv and dense layer of the G that trained
    layers = [m for m in G.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight") for m in layers)
    # the EMA: a copy of G after step 1, then 0.9 · EMA + 0.1 · G after step 2
    ema = emas[0][2]
    g1, g2 = steps[1][2]["G"], steps[3][2]["G"]
    for k, p in ema.module.named_parameters():
        assert torch.allclose(p, 0.9 * g1[k] + 0.1 * g2[k], atol=1e-7), k
