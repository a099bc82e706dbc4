import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import wgan_gp
from common import metrics
from tests.wiring import watch, replica, record_batches, who_steps, setting, grads, assert_same_gradients, assert_update, assert_same
from tests import helpers, wiring


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(wgan_gp, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/w_train"])
    assert state["data_shape"] == [3, 32, 32]


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(wgan_gp, tmp_path, "--dataset", "ring8")
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples
    assert 0 <= summary["metrics"]["metric/hq"] <= 1


def test_toy_defaults_follow_gan_toy_py():
    args = wgan_gp.parse_args(["--dataset", "grid25"])
    assert (args.gp_lambda, args.batch_size, args.lr, args.beta1, args.beta2) == (0.1, 256, 1e-4, 0.5, 0.9)
    assert (args.g_width, args.d_width, args.z_dim, args.n_critic, args.lr_decay) == (512, 512, 2, 5, "none")
    assert wgan_gp.parse_args(["--dataset", "grid25", "--gp-lambda", "10"]).gp_lambda == 10  # explicit wins
    args = wgan_gp.parse_args([])
    assert (args.gp_lambda, args.batch_size, args.g_batch_mult, args.lr, args.beta1) == (10, 64, 2, 2e-4, 0.0)
    assert (args.g_width, args.z_dim, args.steps, args.lr_decay) == (128, 128, 100_000, "linear")


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(wgan_gp, tmp_path, monkeypatch, ["--g-width", "8", "--d-width", "8"], state_keys=("models", "optimizers"))


def test_resume_is_exact_toy(tmp_path, monkeypatch):
    helpers.assert_resume_exact(wgan_gp, tmp_path, monkeypatch, ["--dataset", "grid25"],
                                state_keys=("models", "optimizers"))


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(wgan_gp, tmp_path, "--g-width", "8", "--d-width", "8")
    written = helpers.sample_from(wgan_gp, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


def test_sample_toy(tmp_path):
    out, _, _ = helpers.dry_run(wgan_gp, tmp_path, "--dataset", "ring8")
    assert set(helpers.sample_from(wgan_gp, out / "ckpt.pt", tmp_path)) == {"samples"}


class StubInception(nn.Module):
    """Stands in for the Inception network (its weights are not available offline): (features, logits)."""

    def forward(self, x):
        f = F.adaptive_avg_pool2d(x, 2).flatten(1)
        return f, 3 * f[:, :10]


def test_inception_metrics_are_logged_and_sampled(tmp_path, monkeypatch):
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    out, summary, _ = helpers.dry_run(wgan_gp, tmp_path, "--metrics", "fid,is", "--data-root", str(tmp_path / "data"))
    assert {"metric/fid", "metric/is", "metric/w_train"} <= set(summary["metrics"])
    assert all(math.isfinite(v) for v in summary["metrics"].values())
    written = helpers.sample_from(wgan_gp, out / "ckpt.pt", tmp_path, "--eval", "--eval-samples", "40")
    assert written["metric/fid"] > 0 and written["metric/is"] >= 1


def test_help(capsys):
    text = helpers.help_text(wgan_gp, capsys)
    assert "--gp-lambda" in text and "--n-critic" in text
    assert "(default: None)" not in " ".join(text.split("run (shared by every script)")[0].split())


@pytest.mark.parametrize("shape", [(5,), (3, 4, 4)])
def test_penalty_of_linear_critic(shape):
    """D(x) = w·x + b has ∇D = w everywhere, so the penalty is λ(‖w‖ − 1)² whatever ε, x and x̃ are."""
    torch.manual_seed(0)
    w, b = torch.randn(shape), torch.tensor(0.7)
    critic = lambda x: (x * w).flatten(1).sum(1) + b  # noqa: E731
    for lam in (10.0, 0.1):
        for seed in range(3):
            torch.manual_seed(seed)
            real, fake = torch.randn(16, *shape) * 3, torch.randn(16, *shape) + 2
            penalty, norms = wgan_gp.gradient_penalty(critic, real, fake, lam)
            expected = lam * (w.norm() - 1) ** 2
            assert torch.allclose(penalty, expected, rtol=1e-5)
            assert torch.allclose(norms, w.norm().expand(16), rtol=1e-5)


def test_penalty_is_zero_for_unit_gradient_critics():
    """A linear critic with ‖w‖ = 1, and the distance to a point (‖∇‖ = 1 away from it), are not penalised."""
    w = torch.randn(2)
    w = w / w.norm()
    real, fake = torch.randn(64, 2), torch.randn(64, 2) + 5
    penalty, _ = wgan_gp.gradient_penalty(lambda x: x @ w, real, fake, 10.0)
    assert penalty.abs() < 1e-10
    center = torch.tensor([100.0, -50.0])
    penalty, norms = wgan_gp.gradient_penalty(lambda x: (x - center).norm(dim=1), real, fake, 10.0)
    assert penalty < 1e-10 and torch.allclose(norms, torch.ones(64))


def test_penalty_interpolates_per_example():
    """x̂ = ε x + (1 − ε) x̃ with ε ~ U[0, 1], one ε per example, shared by all its coordinates."""
    seen = []

    def critic(x):
        seen.append(x.detach().clone())
        return x.flatten(1).sum(1)
    torch.manual_seed(0)
    real, fake = torch.ones(4000, 3, 2, 2), torch.zeros(4000, 3, 2, 2)
    wgan_gp.gradient_penalty(critic, real, fake, 1.0)
    eps = seen[0]
    assert torch.equal(eps, eps[:, :1, :1, :1].expand_as(eps))  # one ε per example
    eps = eps[:, 0, 0, 0]
    assert eps.min() >= 0 and eps.max() <= 1
    assert abs(eps.mean().item() - 0.5) < 0.02 and abs(eps.var().item() - 1 / 12) < 0.01


def test_penalty_gradient_reaches_the_critic():
    """create_graph=True: the penalty is differentiable w.r.t. the critic's weights (λ(‖w‖−1)² → 2λ(‖w‖−1) w/‖w‖)."""
    lin = nn.Linear(3, 1)
    penalty, _ = wgan_gp.gradient_penalty(lambda x: lin(x).squeeze(1), torch.randn(8, 3), torch.randn(8, 3), 10.0)
    penalty.backward()
    w = lin.weight.detach()
    assert torch.allclose(lin.weight.grad, 2 * 10.0 * (w.norm() - 1) * w / w.norm(), rtol=1e-5)


def test_losses():
    real, fake = torch.tensor([1.0, 3.0]), torch.tensor([-2.0, 0.0])
    assert wgan_gp.critic_loss(real, fake, torch.tensor(0.5)) == -1.0 - 2.0 + 0.5
    assert wgan_gp.generator_loss(fake) == 1.0


def test_learning_rate_decays_linearly_to_zero():
    args = wgan_gp.parse_args(["--steps", "1000"])
    assert wgan_gp.learning_rate(1, args) == 2e-4
    assert math.isclose(wgan_gp.learning_rate(501, args), 1e-4)
    assert math.isclose(wgan_gp.learning_rate(1000, args), 2e-4 / 1000)
    assert wgan_gp.learning_rate(777, wgan_gp.parse_args(["--dataset", "ring8"])) == 1e-4


def test_resnet_structure():
    """gan_cifar_resnet.py: G 4x4 → 3 up-blocks → 32x32 with BN; D without normalisation: first block,
    one down-block, two plain blocks, global mean pool, linear."""
    G, D = wgan_gp.ResNetGenerator(128, 16, (3, 32, 32)), wgan_gp.ResNetCritic(16, (3, 32, 32))
    assert [b.resample for b in G.blocks] == ["up"] * 3
    assert isinstance(D.blocks[0], wgan_gp.FirstCriticBlock)
    assert [b.resample for b in D.blocks[1:]] == ["down", None, None]
    assert not any(isinstance(m, (nn.BatchNorm2d, nn.LayerNorm, nn.GroupNorm)) for m in D.modules())
    z = torch.randn(6, 128)
    x = G(z)
    assert x.shape == (6, 3, 32, 32) and x.abs().max() <= 1
    assert D(x).shape == (6,)
    assert D.blocks(x).shape == (6, 16, 8, 8)


def test_critic_scores_are_per_example():
    """No batch statistics in the critic: an example's score does not depend on the rest of the batch."""
    D = wgan_gp.ResNetCritic(8, (3, 32, 32))
    x = torch.randn(4, 3, 32, 32)
    assert torch.allclose(D(x)[:2], D(x[:2]), atol=1e-5)


def test_toy_nets():
    G, D = wgan_gp.ToyGenerator(2, 512), wgan_gp.ToyCritic(512)
    assert sum(isinstance(m, nn.ReLU) for m in G.modules()) == 3 == sum(isinstance(m, nn.ReLU) for m in D.modules())
    assert G(torch.randn(7, 2)).shape == (7, 2) and D(torch.randn(7, 2)).shape == (7,)


def test_critic_learns_on_toy_data():
    """A few critic updates raise the Wasserstein estimate between two separated point clouds."""
    torch.manual_seed(0)
    D = wgan_gp.ToyCritic(64)
    opt = torch.optim.Adam(D.parameters(), lr=1e-3, betas=(0.5, 0.9))
    real, fake = torch.randn(256, 2) * 0.1 + 1, torch.randn(256, 2) * 0.1 - 1
    for i in range(50):
        gp, _ = wgan_gp.gradient_penalty(D, real, fake, 10.0)
        loss = wgan_gp.critic_loss(D(real), D(fake), gp)
        opt.zero_grad()
        loss.backward()
        opt.step()
    w = D(real).mean() - D(fake).mean()
    assert 1.0 < w < 3.5  # the clouds are 2√2 ≈ 2.83 apart; a 1-Lipschitz critic cannot exceed that much


@pytest.mark.parametrize("size", ["24", "8"])
def test_bad_image_size(tmp_path, capsys, size):
    out = tmp_path / "x"
    helpers.expect_usage_error(wgan_gp, ["--dry-run", "--image-size", size, "--out", str(out)], capsys, "power of two")
    assert not out.exists()


# ------------------------------------------------------------------------------------------------
# The training loop, watched from outside: the nets record what they are fed (and their state at each
# call), every optimizer step records its settings, gradients and parameters before and after, and the
# data iterator records its batches. A replay of the docstring's losses on the same inputs must then give
# the gradients the loop stepped with.
# ------------------------------------------------------------------------------------------------


def watch_build(monkeypatch):
    """The (G, D) that train() builds, watched."""
    nets, original = {}, wgan_gp.build

    def build(*args, **kwargs):
        G, D = original(*args, **kwargs)
        nets["G"], nets["D"] = watch(G), watch(D)
        return G, D
    monkeypatch.setattr(wgan_gp, "build", build)
    return nets


def check_iterations(G, D, steps, batches, iterations, n_critic, lam, g_batch):
    """Replay every step of `iterations` generator iterations from the docstring's equations: n_critic critic
    steps, each descending E D(x̃) − E D(x) + λ E (‖∇_x̂ D(x̂)‖₂ − 1)² on a fresh data batch x, fresh samples x̃ of
    the current G and points x̂ on the lines between them; then one G step descending −E D(G(z)) on g_batch
    fresh samples against the updated critic. Returns the number of critic forward calls per critic step."""
    assert who_steps(steps, G=G, D=D) == (["D"] * n_critic + ["G"]) * iterations
    g_state, d_state = G.calls[0][0], D.calls[0][0]
    g_params, d_params = list(replica(G, g_state).parameters()), list(replica(D, d_state).parameters())
    d_call = 0
    for it in range(iterations):
        Gi = replica(G, g_state, g_params)
        for j in range(n_critic):
            s = steps[(n_critic + 1) * it + j]
            assert_same(s["before"], d_params, "the critic's step must start where its last one ended")
            (z,) = G.calls[(n_critic + 1) * it + j][1]
            real = batches[n_critic * it + j][0]
            with torch.no_grad():
                fake = Gi(z)
            # the critic's inputs in this step: the data, the samples, and the points of the penalty
            seen = [x for _, (x,) in D.calls[d_call:d_call + 3]]
            d_call += 3
            x_hat = [x for x in seen if not torch.equal(x, real) and not torch.allclose(x, fake, atol=1e-6)]
            assert len(x_hat) == 1, "the penalty must be taken at points other than the data and the samples"
            x_hat = x_hat[0]
            diff = (real - fake).flatten(1)
            eps = ((x_hat - fake).flatten(1) * diff).sum(1) / (diff * diff).sum(1)
            on_line = fake + eps.view(-1, *[1] * (real.dim() - 1)) * (real - fake)
            assert torch.allclose(x_hat, on_line, atol=1e-5), "x̂ is not on the line between x and x̃"
            assert (eps >= -1e-5).all() and (eps <= 1 + 1e-5).all() and eps.std() > 0.05, eps

            Dj = replica(D, d_state, d_params)
            x_hat = x_hat.clone().requires_grad_(True)
            (g,) = torch.autograd.grad(Dj(x_hat).sum(), x_hat, create_graph=True)
            penalty = lam * ((g.flatten(1).norm(dim=1) - 1) ** 2).mean()
            loss = Dj(fake).mean() - Dj(real).mean() + penalty
            assert_same_gradients(s["grads"], grads(loss, Dj), f"iteration {it + 1}, critic step {j + 1}")
            d_params = s["after"]
        s = steps[(n_critic + 1) * it + n_critic]
        assert_same(s["before"], g_params, "G moved during the critic's steps")
        (z,) = G.calls[(n_critic + 1) * it + n_critic][1]
        assert len(z) == g_batch
        Dk = replica(D, d_state, d_params)
        assert_same_gradients(s["grads"], grads(-Dk(Gi(z)).mean(), Gi), f"iteration {it + 1}, G step")
        d_call += 1
        g_params = s["after"]
    assert_same(list(D.parameters()), d_params, "the critic's weights at the end")
    assert_same(list(G.parameters()), g_params, "G's weights at the end")


def test_images_critic_and_generator_steps_follow_eq_3(tmp_path, monkeypatch, updates):
    """The CIFAR-10 configuration (--n-critic 2 here), two G iterations: the critic loss of Eq. 3 with λ = 10,
    G's batch twice the critic's; Adam betas (0, 0.9) for both, lr 2e-4 decayed linearly to 0 over --steps
    (so 2e-4 in the first iteration, 1e-4 in the second); each step moves only its own net."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(wgan_gp, tmp_path, 2, "--n-critic", "2")
    check_iterations(nets["G"], nets["D"], updates, batches, iterations=2, n_critic=2, lam=10.0, g_batch=2 * 8)
    for s, lr in zip(updates, [2e-4] * 3 + [1e-4] * 3):
        assert type(s["opt"]) is torch.optim.Adam
        assert {k: setting(s, k) for k in ("lr", "betas", "eps", "weight_decay")} == \
            {"lr": lr, "betas": (0.0, 0.9), "eps": 1e-8, "weight_decay": 0}
    for s in (updates[0], updates[2]):   # each optimizer's first step: −lr · sign(g)
        assert_update(s, [wiring.adam_first_update(2e-4, g) for g in s["grads"]], "Adam's first update")


def test_toy_critic_and_generator_steps_follow_gan_toy_py(tmp_path, monkeypatch, updates):
    """gan_toy.py's settings on ring8: 5 critic updates per G step, λ = 0.1, batch 256 for both nets, Adam
    lr 1e-4 (no decay), betas (0.5, 0.9). (Narrower MLPs than gan_toy.py's 512 units, to keep the test quick.)"""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(wgan_gp, tmp_path, 2, "--dataset", "ring8", "--g-width", "64", "--d-width", "64")
    check_iterations(nets["G"], nets["D"], updates, batches, iterations=2, n_critic=5, lam=0.1, g_batch=256)
    assert len(batches[0][0]) == 256
    for s in updates:
        assert type(s["opt"]) is torch.optim.Adam
        assert {k: setting(s, k) for k in ("lr", "betas", "eps", "weight_decay")} == \
            {"lr": 1e-4, "betas": (0.5, 0.9), "eps": 1e-8, "weight_decay": 0}
