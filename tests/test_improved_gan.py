import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import improved_gan as ig
from common import data as datasets
from tests import helpers, wiring


# ------------------------------------------------------------------------------------------------
# Runs
# ------------------------------------------------------------------------------------------------

def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(ig, tmp_path)
    assert state["args"]["arch"] == "conv" and state["args"]["g_objective"] == "feature-matching"
    assert 0 <= summary["metrics"]["metric/test_error"] <= 100
    assert summary["test_images"] == 64 and summary["train_images"] == 512 - 64


def test_dry_run_mlp_generate_with_every_technique(tmp_path):
    out, summary, state = helpers.dry_run(
        ig, tmp_path, "--arch", "mlp", "--mode", "generate", "--g-norm", "virtual", "--hist-avg", "0.1",
        "--real-target", "0.9")
    args = state["args"]
    assert args["minibatch_disc"] and args["g_objective"] == "minimax" and args["g_steps"] == 3
    assert set(state["hist_avg"]) == {"G", "D"} and state["hist_avg"]["G"]["count"] == 1 + 3 * summary["step"]
    assert any(k.endswith("ref_z") for k in state["models"]["G"])


def test_no_gan_baseline(tmp_path):
    summary = ig.main(["--dry-run", "--no-gan", "--arch", "mlp", "--out", str(tmp_path / "b")])
    assert "loss/G" not in summary["losses"] and "loss/D_unsup" not in summary["losses"]
    assert 0 <= summary["metrics"]["metric/test_error"] <= 100


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(ig, tmp_path, monkeypatch,
                                ["--arch", "mlp", "--mode", "generate", "--g-norm", "virtual", "--hist-avg", "0.1"],
                                state_keys=("models", "optimizers", "ema", "hist_avg"))


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(ig, tmp_path, "--arch", "mlp")
    written = helpers.sample_from(ig, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


def test_help(capsys):
    text = helpers.help_text(ig, capsys)
    for flag in ("--mode", "--labels", "--minibatch-disc", "--hist-avg", "--real-target", "--g-norm", "--polyak",
                 "--no-gan", "--test-size"):
        assert flag in text


def test_bad_input(tmp_path, capsys):
    bad = [(["--dry-run", "--image-size", "20"], "divisible by 8"),
           (["--dry-run", "--labels", "0"], "need labelled examples"),
           (["--dry-run", "--labels", "15"], "multiple of 10"),
           (["--dry-run", "--test-size", "512"], "--test-size"),
           (["--dry-run", "--dataset", "ring8"], "image dataset"),
           (["--dry-run", "--real-target", "1.5"], "--real-target")]
    for i, (argv, match) in enumerate(bad):
        helpers.expect_usage_error(ig, [*argv, "--out", str(tmp_path / str(i))], capsys, match)
        assert not (tmp_path / str(i)).exists()


# ------------------------------------------------------------------------------------------------
# Minibatch discrimination (Sec. 3.2)
# ------------------------------------------------------------------------------------------------

def test_minibatch_discrimination_equals_double_loop():
    torch.manual_seed(0)
    A, B, C, n = 6, 4, 3, 5
    layer = ig.MinibatchDiscrimination(A, B, C)
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(n, A)
    T = layer.T.weight.T.reshape(A, B, C)           # the (weight-normalised) tensor T
    M = torch.einsum("na,abc->nbc", x, T)
    expected = torch.zeros(n, B)
    for i in range(n):
        for j in range(n):
            if j != i:
                expected[i] += torch.exp(-(M[i] - M[j]).abs().sum(1))
    out = layer(x)
    assert out.shape == (n, A + B)
    assert torch.equal(out[:, :A], x)
    assert torch.allclose(out[:, A:] - layer.bias, expected, atol=1e-6)


def test_minibatch_discrimination_excludes_self():
    layer = ig.MinibatchDiscrimination(4, 3, 2)
    x = torch.randn(1, 4)
    assert torch.equal(layer.closeness(x), torch.zeros(1, 3))       # alone: nothing to compare with
    twins = torch.cat([x, x])                                         # distance 0 to the twin: c = 1 each
    assert torch.allclose(layer.closeness(twins), torch.ones(2, 3))   # 2 if the self term counted


# ------------------------------------------------------------------------------------------------
# The K+1 classifier's losses (Sec. 5)
# ------------------------------------------------------------------------------------------------

def test_unsupervised_loss_matches_formula():
    real = torch.tensor([[2.0, -1.0, 0.5], [-3.0, -2.0, -4.0]])
    fake = torch.tensor([[0.0, 1.0, -1.0], [-5.0, -6.0, -5.5]])

    def D(logits):  # Z/(Z+1) directly, and as 1 - p(y=K+1|x) of a softmax with l_{K+1} = 0
        z = logits.exp().sum(1)
        d = z / (z + 1)
        with_zero = torch.cat([logits, torch.zeros(len(logits), 1)], 1)
        assert torch.allclose(d, 1 - F.softmax(with_zero, 1)[:, -1])
        return d

    expected = -torch.log(D(real)).mean() - torch.log(1 - D(fake)).mean()
    assert torch.allclose(ig.unsupervised_loss(real, fake), expected)
    smoothed = -(0.9 * torch.log(D(real)) + 0.1 * torch.log(1 - D(real))).mean() - torch.log(1 - D(fake)).mean()
    assert torch.allclose(ig.unsupervised_loss(real, fake, real_target=0.9), smoothed)
    assert torch.allclose(ig.g_minimax_loss(fake), torch.log(1 - D(fake)).mean())


def test_one_logit_is_an_ordinary_gan():
    real, fake = torch.tensor([[1.5], [-0.5]]), torch.tensor([[0.3], [-2.0]])
    expected = -F.logsigmoid(real).mean() - F.logsigmoid(-fake).mean()
    assert torch.allclose(ig.unsupervised_loss(real, fake), expected)


def test_feature_matching_loss():
    f = torch.randn(8, 5)
    shuffled = f[torch.randperm(8)]
    assert ig.feature_matching_loss(f, shuffled) < 1e-12       # only the means are matched
    g = torch.randn(6, 5)
    diff = f.mean(0) - g.mean(0)
    assert torch.allclose(ig.feature_matching_loss(f, g, "l2"), (diff ** 2).mean())
    assert torch.allclose(ig.feature_matching_loss(f, g, "l1"), diff.abs().mean())


# ------------------------------------------------------------------------------------------------
# Historical averaging (Sec. 3.3)
# ------------------------------------------------------------------------------------------------

def test_historical_average_penalty():
    p = nn.Parameter(torch.tensor([1.0, -2.0]))
    q = nn.Parameter(torch.tensor([[0.5]]))
    hist = ig.HistoricalAverage([p, q])
    history = [(p.detach().clone(), q.detach().clone())]
    for _ in range(3):
        with torch.no_grad():
            p.add_(torch.randn(2))
            q.add_(torch.randn(1, 1))
        hist.update()
        history.append((p.detach().clone(), q.detach().clone()))
    mean_p = torch.stack([h[0] for h in history]).mean(0)
    mean_q = torch.stack([h[1] for h in history]).mean(0)
    assert torch.allclose(hist.mean[0], mean_p) and torch.allclose(hist.mean[1], mean_q)
    with torch.no_grad():
        p.copy_(mean_p)
        q.copy_(mean_q)
    assert hist.penalty() < 1e-10                               # 0 at the running mean
    last = 0.0
    for scale in (0.1, 0.5, 2.0):                               # grows with the distance: |d|^2 scale^2
        with torch.no_grad():
            p.copy_(mean_p + scale)
        penalty = float(hist.penalty().detach())
        assert penalty > last and math.isclose(penalty, 2 * scale ** 2, rel_tol=1e-5)
        last = penalty


# ------------------------------------------------------------------------------------------------
# Virtual batch norm (Sec. 3.5)
# ------------------------------------------------------------------------------------------------

def test_virtual_batch_norm_makes_each_output_independent_of_its_batch():
    torch.manual_seed(0)
    for arch, shape, width in (("mlp", (1, 8, 8), 16), ("conv", (3, 16, 16), 16)):
        z = torch.rand(6, 10)
        G = ig.Generator(arch, 10, shape, width, norm="virtual", ref_size=4)
        alone = torch.cat([G(z[i:i + 1]) for i in range(6)])
        assert torch.allclose(G(z), alone, atol=1e-5)
        other = torch.cat([z[:1], torch.rand(3, 10)])                 # same first sample, other companions
        assert torch.allclose(G(other)[0], G(z)[0], atol=1e-5)
        bn = ig.Generator(arch, 10, shape, width, norm="batch")        # batch norm: outputs do depend on the batch
        assert not torch.allclose(bn(other)[0], bn(z)[0], atol=1e-3)


def test_virtual_batch_norm_uses_reference_statistics():
    norm = ig.GeneratorNorm(3, "virtual", ref_size=4)
    h = torch.randn(7, 3) * 3 + 1
    out = norm(h)
    ref = h[:4]
    assert torch.allclose(out[:4], (ref - ref.mean(0)) / (ref.var(0, correction=0) + 1e-6).sqrt(), atol=1e-5)
    x = h[4]
    mean = (4 * ref.mean(0) + x) / 5
    sq = (4 * ref.square().mean(0) + x ** 2) / 5
    assert torch.allclose(out[4], (x - mean) / (sq - mean ** 2 + 1e-6).sqrt(), atol=1e-5)


# ------------------------------------------------------------------------------------------------
# Weight normalisation's data-dependent initialisation, data splits
# ------------------------------------------------------------------------------------------------

def test_data_dependent_init_standardises_pre_activations():
    torch.manual_seed(0)
    first, last = ig.wn(nn.Linear(5, 7)), ig.wn(nn.Linear(7, 3), init_scale=0.1, train_g=True)
    net = nn.Sequential(first, nn.ReLU(), last)
    x = torch.randn(200, 5) * 4 + 2
    ig.data_dependent_init(net, x)
    with torch.no_grad():
        h = first(x)
        y = net(x)
    assert torch.allclose(h.mean(0), torch.zeros(7), atol=1e-5)
    assert torch.allclose(h.std(0, correction=0), torch.ones(7), atol=1e-4)
    assert torch.allclose(y.std(0, correction=0), torch.full((3,), 0.1), atol=1e-5)
    assert not first.parametrizations.weight.original0.requires_grad       # hidden g fixed, as the code
    assert last.parametrizations.weight.original0.requires_grad


def test_labelled_examples_are_balanced_and_test_set_held_out():
    args = ig.parse_args(["--dry-run"])
    data = datasets.load(args)
    ig.resolve(args, data)
    train, test_x, test_y = ig.split_test(args, data)
    assert len(train) + len(test_x) == len(data) and len(test_x) == args.test_size
    idx = ig.select_labelled(args, train)
    assert len(idx) == args.labels == 20 and len(set(idx.tolist())) == 20
    assert torch.bincount(train.labels[idx], minlength=10).tolist() == [2] * 10


class _StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, 3 * f[:, :10]


def test_generate_mode_logs_the_inception_score(tmp_path, monkeypatch):
    from common import metrics
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": _StubInception())
    _, summary, _ = helpers.dry_run(ig, tmp_path, "--mode", "generate", "--arch", "mlp", "--metrics", "is",
                                    "--eval-samples", "30", "--data-root", str(tmp_path / "data"))
    assert 1 <= summary["metrics"]["metric/is"] <= 10 and math.isfinite(summary["metrics"]["metric/is_std"])


# ------------------------------------------------------------------------------------------------
# The training loop: what D and G are fed, the loss terms and weights, the optimizers, Polyak averaging
# ------------------------------------------------------------------------------------------------


class StandInD(nn.Module):
    """D's interface (features = the feature-matching layer, forward = K logits) without its noise and
    dropout, so one step can be recomputed by hand. Same weights for every instance; remembers its inputs
    as (method, input, grad enabled)."""

    def __init__(self, shape, classes, width=6):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.body, self.head = nn.Linear(math.prod(shape), width), nn.Linear(width, classes)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.seen = []

    def _features(self, x):
        return torch.tanh(self.body(x.flatten(1)))

    def features(self, x):
        self.seen.append(("features", x.detach().clone(), torch.is_grad_enabled()))
        return self._features(x)

    def forward(self, x):
        self.seen.append(("forward", x.detach().clone(), torch.is_grad_enabled()))
        return self.head(self._features(x))


class StandInG(nn.Module):
    """A deterministic G, z → tanh(W z + b) as an image; same weights for every instance; remembers
    (z, output, grad enabled) of every call."""

    def __init__(self, z_dim, shape):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.shape, self.fc = tuple(shape), nn.Linear(z_dim, math.prod(shape))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.seen = []

    def forward(self, z):
        x = torch.tanh(self.fc(z)).view(-1, *self.shape)
        self.seen.append((z.detach().clone(), x.detach().clone(), torch.is_grad_enabled()))
        return x


@pytest.fixture
def wired(monkeypatch):
    """train() with stand-in nets and known unlabelled batches; returns a namespace that fills in as it
    runs: D, G, the unlabelled batches served, the training split and its labelled indices."""
    w = SimpleNamespace(D=[], G=[], served=[])

    def build_discriminator(args, shape, classes):
        w.D.append(StandInD(shape, classes))
        return w.D[-1]

    def build_generator(args, shape):
        w.G.append(StandInG(args.z_dim, shape))
        return w.G[-1]
    monkeypatch.setattr(ig, "build_discriminator", build_discriminator)
    monkeypatch.setattr(ig, "build_generator", build_generator)

    def iterate(data, batch_size, device, value_range=(-1, 1), **kwargs):
        g = torch.Generator().manual_seed(3)
        lo, hi = value_range
        while True:
            w.served.append(lo + (hi - lo) * torch.rand(batch_size, *data.shape, generator=g))
            yield w.served[-1], torch.full((batch_size,), -1)
    monkeypatch.setattr(datasets, "iterate", iterate)
    w.split = wiring.record_calls(monkeypatch, ig, "split_test")
    w.labelled = wiring.record_calls(monkeypatch, ig, "select_labelled")
    return w


def distances(batch, pool):
    return torch.cdist(batch.flatten(1), pool.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")


def rows_of(batch, pool):
    """Index in `pool` of each row of `batch` (every row must be one of pool's)."""
    d = distances(batch, pool)
    assert (d.min(1).values == 0).all(), "a row that is not in the pool"
    return d.argmin(1)


def same_batch(a, b):
    return a.shape == b.shape and torch.equal(a, b)


def test_d_step_sees_labelled_unlabelled_and_generated_batches_with_their_losses(tmp_path, wired, steps):
    """One D step against the hand-computed gradient of L_supervised + ½ L_unsupervised (the default
    weight), on the labelled batch, the unlabelled batch and G's batch that D was fed; Adam's first step
    is then −lr g / (|g| + ε) with the conv nets' lr 3e-4 and ε 1e-4."""
    wiring.train_steps(ig, tmp_path, 1)
    (D,), (G,) = wired.D, wired.G
    train = wired.split[0][2][0]
    lab_x = datasets.to_range(train.images[wired.labelled[0][2]], (-1, 1), True)
    lab_y = train.labels[wired.labelled[0][2]]
    fed = [x for method, x, grad in D.seen if method == "forward" and grad]
    assert len(fed) == 3, "D's step should see a labelled, an unlabelled and a generated batch"
    generated = [x for z, x, grad in G.seen if not grad]
    lab = [x for x in fed if (distances(x, lab_x).min(1).values == 0).all()]
    unl = [x for x in fed if same_batch(x, wired.served[0])]
    fake = [x for x in fed if any(same_batch(x, g) for g in generated)]
    assert len(lab) == len(unl) == len(fake) == 1, "D's inputs are not one labelled, one unlabelled, one generated"
    y = lab_y[rows_of(lab[0], lab_x)]

    D0 = StandInD(train.shape, 10)
    s_real, s_fake = torch.logsumexp(D0(unl[0]), 1), torch.logsumexp(D0(fake[0]), 1)
    unsup = (F.softplus(s_real) - s_real).mean() + F.softplus(s_fake).mean()   # −log D(x) − log(1 − D(G(z)))
    loss = F.cross_entropy(D0(lab[0]), y) + 0.5 * unsup
    expected = torch.autograd.grad(loss, list(D0.parameters()))
    (d_step,) = [s for s in steps if s.owns(D)]
    for p, p0, g in zip(D.parameters(), D0.parameters(), expected):
        assert torch.allclose(d_step.grads[id(p)], g, atol=1e-6), "D's gradient is not L_sup + ½ L_unsup"
        assert torch.allclose(p.detach() - p0.detach(), wiring.adam_first_update(3e-4, g, eps=1e-4), atol=3e-7)


def test_g_step_matches_d_features_of_a_fresh_unlabelled_batch(tmp_path, wired, steps):
    """G's step: the gradient of the feature-matching loss (mean |E f(x) − E f(G(z))|, the conv nets' L1)
    on D's intermediate features f after D's update, for a fresh unlabelled batch and the z that G got;
    D is not changed by it and G is not changed by D's step."""
    wiring.train_steps(ig, tmp_path, 1)
    (D,), (G,) = wired.D, wired.G
    shape = wired.split[0][2][0].shape
    (z, _, _), = [(z, x, grad) for z, x, grad in G.seen if grad]
    z_d = next(z for z, x, grad in G.seen[1:] if not grad)   # G.seen[0]: the data-dependent initialisation
    for noise in (z, z_d):   # z ~ U[0, 1)^100, a fresh draw for G's step
        assert noise.shape == (8, 100) and 0 <= noise.min() and noise.max() < 1 and abs(noise.mean() - 0.5) < 0.05
    assert not torch.equal(z, z_d)
    real = [x for method, x, grad in D.seen if method == "features" and not grad]
    assert len(real) == 1 and same_batch(real[0], wired.served[1]), "feature matching needs a fresh unlabelled batch"
    D1 = StandInD(shape, 10)
    D1.load_state_dict(D.state_dict())   # D after its step (the G step must not change it)
    G0 = StandInG(z.shape[1], shape)
    loss = (D1._features(wired.served[1]).mean(0) - D1._features(G0(z)).mean(0)).abs().mean()
    expected = torch.autograd.grad(loss, list(G0.parameters()))
    d_step, g_step = steps
    assert d_step.owns(D) and not any(id(p) in d_step.after for p in G.parameters())
    assert g_step.owns(G) and not any(id(p) in g_step.after for p in D.parameters())
    for p, p0, g in zip(G.parameters(), G0.parameters(), expected):
        assert torch.allclose(g_step.grads[id(p)], g, atol=1e-7), "G's loss is not feature matching on D's features"
        assert torch.allclose(p.detach() - p0.detach(), wiring.adam_first_update(3e-4, g, eps=1e-4), atol=3e-7)
    for p in D.parameters():   # D's value after the whole iteration is the one its own step left
        assert torch.equal(p.detach(), d_step.after[id(p)])


def test_generate_mode_g_minimises_log_one_minus_d_three_times_per_d_step(tmp_path, wired, steps):
    """--mode generate: per iteration one D step then 3 G steps, and G's first gradient is that of
    E log(1 − D(G(z))) = −E softplus(logsumexp l(G(z))) on D's output."""
    wiring.train_steps(ig, tmp_path, 2, "--mode", "generate")
    (D,), (G,) = wired.D, wired.G
    assert [s.owns(D) for s in steps] == [True, False, False, False] * 2
    assert all(s.owns(G) for s in steps if not s.owns(D))
    z = next(z for z, x, grad in G.seen if grad)
    D1 = StandInD(wired.split[0][2][0].shape, 10)
    D1.load_state_dict({k: steps[0].after[id(p)] for k, p in D.named_parameters()})
    G0 = StandInG(z.shape[1], G.shape)
    loss = -F.softplus(torch.logsumexp(D1(G0(z)), 1)).mean()
    for p, g in zip(G.parameters(), torch.autograd.grad(loss, list(G0.parameters()))):
        assert torch.allclose(steps[1].grads[id(p)], g, atol=1e-7), "G's loss is not E log(1 − D(G(z)))"


def test_optimizers_and_linear_lr_decay(tmp_path, wired, steps):
    """Adam for G and for D, each over its own net, β (0.5, 0.999), ε 1e-4, the conv nets' lr 3e-4 (mlp:
    3e-3); the lr of both decays linearly to 0 over the last --decay-epochs (here 3 of 4 steps)."""
    steps_per_epoch = (512 - 64) / 8   # the dry run's fake training images / batch size
    wiring.train_steps(ig, tmp_path, 4, "--decay-epochs", str(3 / steps_per_epoch))
    (D,), (G,) = wired.D, wired.G
    assert len({id(s.opt) for s in steps}) == 2
    for net in (G, D):
        taken = [s for s in steps if s.owns(net)]
        assert len(taken) == 4 and all(type(s.opt) is torch.optim.Adam for s in taken)
        assert len(taken[0].after) == len(list(net.parameters()))   # its own net's parameters only
        assert all((s.settings[0]["betas"], s.settings[0]["eps"]) == ((0.5, 0.999), 1e-4) for s in taken)
        lrs = [s.settings[0]["lr"] for s in taken]
        assert lrs == pytest.approx([3e-4, 3e-4, 2e-4, 1e-4]), lrs
    steps.clear()
    wiring.train_steps(ig, tmp_path, 1, "--arch", "mlp", name="mlp")
    assert [s.settings[0]["lr"] for s in steps] == [3e-3, 3e-3]


def test_polyak_average_of_d_is_the_one_scored(tmp_path, wired, steps, monkeypatch):
    """--polyak 0.75: the average follows D's weights after each of its steps, a ← 0.75 a + 0.25 θ_D (the
    first step sets a to θ_D), and metric/test_error is the averaged D's."""
    averaged = wiring.record_calls(monkeypatch, ig, "AveragedModel")
    scored = wiring.record_calls(monkeypatch, ig, "test_error")
    summary = wiring.train_steps(ig, tmp_path, 3, "--polyak", "0.75")
    (D,), (avg,) = wired.D, [result for _, _, result in averaged]
    trajectory = [s.after for s in steps if s.owns(D)]
    assert len(trajectory) == 3
    for name, p in D.named_parameters():
        a = trajectory[0][id(p)]
        for after in trajectory[1:]:
            a = 0.75 * a + 0.25 * after[id(p)]
        assert torch.allclose(avg.module.get_parameter(name), a, atol=1e-7), name
    errors = {id(args[0]): result for args, _, result in scored}
    assert summary["metrics"]["metric/test_error"] == errors[id(avg.module)]
    assert summary["metrics"]["metric/test_error_raw"] == errors[id(D)]
