import math

import torch
from PIL import Image

import infogan
from tests import helpers

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
