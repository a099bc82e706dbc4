import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

import infogan
from common import data as datasets
from tests import helpers, wiring

LN10 = math.log(10)


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(infogan, tmp_path)
    assert 0 <= summary["metrics"]["metric/c1_error"] <= 0.9
    losses = summary["losses"]
    assert math.isclose(losses["info/H_c"], LN10, rel_tol=1e-6)
    assert losses["info/L_I"] <= losses["info/H_c"]


def test_dry_run_svhn_config(tmp_path):
    out, summary, state = helpers.dry_run(infogan, tmp_path, "--config", "svhn", "--image-size", "16")
    assert state["args"]["n_cat"] == 4 and state["args"]["n_cont"] == 4 and state["args"]["noise_dim"] == 124
    assert math.isclose(summary["losses"]["info/H_c"], 4 * LN10, rel_tol=1e-6)


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(infogan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_sample_writes_one_figure_per_code(tmp_path):
    out, _, state = helpers.dry_run(infogan, tmp_path)
    written = helpers.sample_from(infogan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"c1", "c2", "c3"}
    side = state["data_shape"][1] + 2
    for path in written.values():  # 10 values of c1 (rows or columns) x 10 columns
        assert Image.open(path).size == (10 * side + 2, 10 * side + 2)


def test_help(capsys):
    text = helpers.help_text(infogan, capsys)
    assert "--lambda-cont" in text and "--config" in text


def test_paper_mnist_configuration():
    args = infogan.parse_args([])
    assert (args.noise_dim, args.n_cat, args.cat_dim, args.n_cont) == (62, 1, 10, 2)
    assert (args.d_lr, args.g_lr, args.beta1, args.batch_size, args.steps) == (2e-4, 1e-3, 0.5, 128, 5000)
    G, D = infogan.build(args, (1, 28, 28))
    assert G.fc[0].weight.shape == (1024, 74) and G.fc[3].weight.shape == (7 * 7 * 128, 1024)
    assert G(torch.zeros(2, 74)).shape == (2, 1, 28, 28)
    assert D.trunk[0].weight.shape == (64, 1, 4, 4) and D.trunk[2].weight.shape == (128, 64, 4, 4)
    assert D.trunk[6].weight.shape == (1024, 7 * 7 * 128)
    assert D.q_head[0].weight.shape == (128, 1024) and D.q_head[3].weight.shape == (12, 128)
    d, q = D(torch.rand(3, 1, 28, 28))
    assert d.shape == (3,) and q.shape == (3, 12)


def test_latent_codes_have_the_right_distribution_and_shape():
    args = infogan.parse_args([])
    n = 50_000
    noise, cat, cont = infogan.sample_latent(n, args, "cpu", torch.Generator().manual_seed(0))
    assert noise.shape == (n, 62) and cat.shape == (n, 1) and cont.shape == (n, 2)
    freq = torch.bincount(cat[:, 0], minlength=10).float() / n  # c1 ~ Cat(K = 10, p = 0.1)
    assert freq.shape == (10,) and (freq - 0.1).abs().max() < 0.01
    for u in (noise, cont):  # U(−1, 1): mean 0, variance 1/3
        assert u.min() >= -1 and u.max() <= 1
        assert abs(u.mean().item()) < 0.01 and abs(u.var().item() - 1 / 3) < 0.01
    latent = infogan.latent_vector(noise, cat, cont, args.cat_dim)
    assert latent.shape == (n, 74)
    onehot = latent[:, 62:72]
    assert torch.equal(onehot.sum(1), torch.ones(n)) and torch.equal(onehot.argmax(1), cat[:, 0])
    assert torch.equal(latent[:, 72:], cont)


def test_info_bound_is_entropy_plus_expected_log_q():
    """Eq. 4 by hand: L_I = H(c) + E_x E_c log Q(c | x), summed over the categorical codes."""
    torch.manual_seed(0)
    for n_cat in (1, 3):
        logits = torch.randn(256, n_cat, 10) * 3
        cat = torch.randint(10, (256, n_cat))
        log_q = torch.log_softmax(logits, 2).gather(2, cat[..., None]).squeeze(2)   # (256, n_cat)
        by_hand = n_cat * LN10 + log_q.sum(1).mean()
        bound = infogan.info_lower_bound(logits, cat, n_cat * LN10)
        assert math.isclose(bound.item(), by_hand.item(), rel_tol=1e-5, abs_tol=1e-5)
        assert bound < n_cat * LN10   # a Q that does not recover c stays strictly below H(c)


def test_info_bound_reaches_entropy_when_q_recovers_the_code():
    cat = torch.randint(10, (64, 1))
    exact = 100.0 * torch.nn.functional.one_hot(cat, 10).float()
    assert math.isclose(infogan.info_lower_bound(exact, cat, LN10).item(), LN10, abs_tol=1e-6)
    uniform = torch.zeros(64, 1, 10)  # Q ignores x: the bound is 0 nats
    assert abs(infogan.info_lower_bound(uniform, cat, LN10).item()) < 1e-6


def test_gaussian_term_is_the_negative_log_likelihood():
    mean, log_std, c = torch.randn(32, 2), torch.randn(32, 2) * 0.3, torch.rand(32, 2) * 2 - 1
    expected = -torch.distributions.Normal(mean, log_std.exp()).log_prob(c).sum(1).mean()
    assert torch.allclose(infogan.gaussian_nll(mean, log_std, c), expected)
    zero = torch.zeros(32, 2)  # fixed sigma = 1: ½ (c − μ)² + ½ ln 2π
    expected = (0.5 * (c - mean) ** 2 + 0.5 * math.log(2 * math.pi)).sum(1).mean()
    assert torch.allclose(infogan.gaussian_nll(mean, zero, c), expected)


def test_cluster_error_maps_each_value_to_its_majority_label():
    labels = torch.arange(10).repeat(10)
    assert infogan.cluster_error((labels + 3) % 10, labels, 10) == 0  # a relabelling is no error
    pred = labels.clone()
    pred[:5] = 9  # five images of labels 0..4 put in 9's cluster: 9 keeps its majority
    assert math.isclose(infogan.cluster_error(pred, labels, 10), 5 / 100)


def test_code_figures():
    args = infogan.parse_args([])
    g = torch.Generator().manual_seed(0)
    latent, columns = infogan.code_figure(args, 0, g)  # c1: column j has c1 = j
    assert columns == 10 and latent.shape == (100, 74)
    grid = latent.view(10, 10, 74)
    assert torch.equal(grid[:, :, 62:72].argmax(2), torch.arange(10).repeat(10, 1))
    assert torch.equal(grid[:, :, :62], grid[:, :1, :62].expand(-1, 10, -1))  # rows share noise
    latent, columns = infogan.code_figure(args, 1, g, sweep=2.0)  # c2: sweep -2..2, rows = c1 values
    grid = latent.view(10, 10, 74)
    assert torch.allclose(grid[:, :, 72], torch.linspace(-2, 2, 10).repeat(10, 1))
    assert torch.equal(grid[:, :, 62:72].argmax(2), torch.arange(10)[:, None].expand(10, 10))
    assert (grid[:, :, 73] == 0).all() and torch.equal(grid[:, :, :62], grid[:1, :1, :62].expand(10, 10, -1))


def test_maximising_the_bound_makes_the_code_recoverable():
    """Descending −L_I through G and Q (the information term of Eq. 6 alone) drives L_I from 0 towards
    H(c): G learns to write c into its images and Q to read it back."""
    torch.manual_seed(0)
    args = infogan.parse_args(["--dry-run"])
    G, D = infogan.build(args, (1, 8, 8))
    opt = torch.optim.Adam([*G.parameters(), *D.parameters()], lr=1e-2)

    def bound():
        noise, cat, cont = infogan.sample_latent(64, args, "cpu")
        _, q = D(G(infogan.latent_vector(noise, cat, cont, args.cat_dim)))
        nll_cat, nll_cont = infogan.info_losses(q, cat, cont, args)
        return LN10 - nll_cat, nll_cat + nll_cont

    assert abs(bound()[0].item()) < 0.2 * LN10
    for _ in range(60):
        _, loss = bound()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert bound()[0].item() > 0.5 * LN10


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(infogan, ["--image-size", "30", "--out", str(tmp_path / "a")], capsys, "divisible by 4")
    helpers.expect_usage_error(infogan, ["--dataset", "ring8", "--out", str(tmp_path / "b")], capsys, "images")
    helpers.expect_usage_error(infogan, ["--n-cat", "0", "--n-cont", "0"], capsys, "at least one latent code")
    helpers.expect_usage_error(infogan, ["--config", "svhn", "--image-size", "40"], capsys, "divisible by 16")
    assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ------------------------------------------------------------------------------------------------
# The training loop: real vs fake, the information term in both steps, the codes, the optimizers
# ------------------------------------------------------------------------------------------------


class StandInG(nn.Module):
    """A deterministic G (no batch norm), latent → sigmoid(W latent + b) as an image; the same weights for
    every instance; remembers (latent, output, grad enabled) of every call."""

    def __init__(self, in_dim, shape):
        super().__init__()
        g = torch.Generator().manual_seed(1)
        self.shape, self.fc = tuple(shape), nn.Linear(in_dim, math.prod(shape))
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.3)
        self.seen = []

    def forward(self, latent):
        x = torch.sigmoid(self.fc(latent)).view(-1, *self.shape)
        self.seen.append((latent.detach().clone(), x.detach().clone(), torch.is_grad_enabled()))
        return x


class StandInDQ(nn.Module):
    """D / Q's interface (a shared trunk, D's logit, Q's head) without batch norm, so one step can be
    recomputed by hand; the same weights for every instance; remembers (input, with_q, grad enabled)."""

    def __init__(self, shape, q_dim, width=6):
        super().__init__()
        g = torch.Generator().manual_seed(2)
        self.trunk = nn.Linear(math.prod(shape), width)
        self.d_head, self.q_head = nn.Linear(width, 1), nn.Linear(width, q_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        self.seen = []

    def forward(self, x, with_q=True):
        self.seen.append((x.detach().clone(), with_q, torch.is_grad_enabled()))
        h = torch.tanh(self.trunk(x.flatten(1)))
        return self.d_head(h).squeeze(1), (self.q_head(h) if with_q else None)


@pytest.fixture
def wired(monkeypatch):
    """train() with the stand-in nets and known real batches; fills in as it runs."""
    w = SimpleNamespace(nets=[], served=[])

    def build(args, shape):
        w.nets.append((StandInG(args.noise_dim + args.n_cat * args.cat_dim + args.n_cont, shape),
                       StandInDQ(shape, infogan.q_dim(args))))
        return w.nets[-1]
    monkeypatch.setattr(infogan, "build", build)

    def iterate(data, batch_size, device, value_range=(-1, 1), **kwargs):
        g = torch.Generator().manual_seed(3)
        while True:
            w.served.append(torch.rand(batch_size, *data.shape, generator=g))
            yield w.served[-1], torch.zeros(batch_size, dtype=torch.long)
    monkeypatch.setattr(datasets, "iterate", iterate)
    return w


def codes_of(latent):
    """The dry run's (MNIST config) G input split into noise (62), c1 (one-hot of 10) and c2, c3."""
    noise, onehot, cont = latent[:, :62], latent[:, 62:72], latent[:, 72:]
    assert latent.shape == (8, 74) and noise.abs().max() <= 1 and cont.abs().max() <= 1
    assert torch.equal(onehot.sum(1), torch.ones(8)) and set(onehot.unique().tolist()) == {0.0, 1.0}
    return onehot.argmax(1), cont


def info_terms(q, cat, cont):
    """−log Q(c1|x) (cross-entropy) and −log Q(c2, c3|x) up to its constant (σ = 1: ½ (c − μ)²)."""
    return F.cross_entropy(q[:, :10], cat), (0.5 * (cont - q[:, 10:12]) ** 2).sum(1).mean()


LAMBDAS = ["--lambda-cat", "2", "--lambda-cont", "0.5"]


def test_d_step_real_fake_and_q_recovers_gs_codes(tmp_path, wired, steps):
    """D / Q's step: −log D(x) on the real batch, −log(1 − D(G(z, c))) on G's batch, and λ_cat, λ_cont
    times −log Q of the codes G was fed, on that batch; Adam's first step moves D's trunk and head by
    d_lr and Q's head by q_lr times −sign(g), and leaves G alone."""
    wiring.train_steps(infogan, tmp_path, 1, *LAMBDAS, "--q-lr", "5e-4")
    ((G, D),) = wired.nets
    (g_batch,) = [x for z, x, grad in G.seen if grad]   # G's own step
    fed = [(x, with_q) for x, with_q, grad in D.seen if grad and not torch.equal(x, g_batch)]
    assert len(fed) == 2
    (real,) = [x for x, with_q in fed if torch.equal(x, wired.served[0])]
    latent, fake = next((z, x) for z, x, grad in G.seen if not grad)
    assert [with_q for x, with_q in fed if torch.equal(x, fake)] == [True], "Q must read G's batch"
    cat, cont = codes_of(latent)

    D0 = StandInDQ(G.shape, 12)
    real_logit, _ = D0(real)
    fake_logit, q = D0(fake)
    nll_cat, nll_cont = info_terms(q, cat, cont)
    loss = F.softplus(-real_logit).mean() + F.softplus(fake_logit).mean() + 2 * nll_cat + 0.5 * nll_cont
    expected = torch.autograd.grad(loss, list(D0.parameters()))
    d_step, g_step = steps
    assert d_step.owns(D) and not any(id(p) in d_step.after for p in G.parameters())
    for (name, p), p0, g in zip(D.named_parameters(), D0.parameters(), expected):
        assert torch.allclose(d_step.grads[id(p)], g, atol=1e-6), f"D / Q's gradient differs at {name}"
        lr = 5e-4 if name.startswith("q_head.") else 2e-4
        assert torch.allclose(d_step.after[id(p)] - p0.detach(), wiring.adam_first_update(lr, g), atol=1e-7), name


def test_g_step_fresh_codes_reach_g_through_d_and_q(tmp_path, wired, steps):
    """G's step: −log D(G(z, c)) + λ_cat, λ_cont times −log Q of the codes of a fresh draw, through D / Q
    after its step; Adam's first step moves G by −1e-3 sign(g) and leaves D / Q alone."""
    wiring.train_steps(infogan, tmp_path, 1, *LAMBDAS)
    ((G, D),) = wired.nets
    drawn = [z for z, x, grad in G.seen if grad]
    assert len(drawn) == 1
    latent = drawn[0]
    assert not torch.equal(latent, next(z for z, x, grad in G.seen if not grad)), "G's step needs fresh codes"
    cat, cont = codes_of(latent)
    d_step, g_step = steps
    D1 = StandInDQ(G.shape, 12)
    D1.load_state_dict({k: d_step.after[id(p)] for k, p in D.named_parameters()})
    G0 = StandInG(74, G.shape)
    logit, q = D1(G0(latent))
    nll_cat, nll_cont = info_terms(q, cat, cont)
    loss = F.softplus(-logit).mean() + 2 * nll_cat + 0.5 * nll_cont
    expected = torch.autograd.grad(loss, list(G0.parameters()))
    assert g_step.owns(G) and not any(id(p) in g_step.after for p in D.parameters())
    for p, p0, g in zip(G.parameters(), G0.parameters(), expected):
        assert torch.allclose(g_step.grads[id(p)], g, atol=1e-6), "G's gradient is not −log D + λ (−log Q)"
        assert torch.allclose(p.detach() - p0.detach(), wiring.adam_first_update(1e-3, g), atol=1e-7)
    for p in D.parameters():   # D / Q after the iteration is what its own step left
        assert torch.equal(p.detach(), d_step.after[id(p)])


def test_optimizers_follow_the_card(tmp_path, wired, steps):
    """Adam with β (0.5, 0.999): D's trunk and head at 2e-4 and Q's head at 2e-4 (one optimizer, as the
    official code), G at 1e-3; λ = 1 for both kinds of code by default."""
    wiring.train_steps(infogan, tmp_path, 1)
    ((G, D),) = wired.nets
    d_step, g_step = steps
    assert type(d_step.opt) is type(g_step.opt) is torch.optim.Adam
    assert d_step.owns(D) and g_step.owns(G) and len(g_step.after) == len(list(G.parameters()))
    assert {name: d_step.lr_of(p) for name, p in D.named_parameters()} == {
        name: 2e-4 for name, _ in D.named_parameters()}
    assert [g_step.lr_of(p) for p in G.parameters()] == [1e-3, 1e-3]
    assert all(s["betas"] == (0.5, 0.999) for step in steps for s in step.settings)
    args = infogan.parse_args([])
    assert (args.lambda_cat, args.lambda_cont, args.q_lr) == (1.0, 1.0, 2e-4)
