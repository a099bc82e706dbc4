import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import improved_gan as ig
from common import data as datasets
from tests import helpers


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
