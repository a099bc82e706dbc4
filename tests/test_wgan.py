import math

import pytest
import torch
import torch.nn as nn

import wgan
from tests.wiring import watch, replica, record_batches, who_steps, setting, grads, assert_same_gradients, assert_update, assert_same
from tests import helpers, wiring


@pytest.fixture(autouse=True)
def one_thread():
    """These nets are tiny: one thread is as fast as two on an idle machine, and on a busy one oneDNN's
    convolutions waiting for a descheduled second thread run 10-20x slower."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def test_dry_run_keeps_critic_weights_clipped(tmp_path):
    out, summary, state = helpers.dry_run(wgan, tmp_path)
    c = state["args"]["clip"]
    params = [v for k, v in state["models"]["D"].items() if "running" not in k and "num_batches" not in k]
    assert params and all(p.abs().max() <= c for p in params)
    assert math.isclose(summary["losses"]["loss/W_estimate"], -summary["losses"]["loss/D"], rel_tol=1e-6)


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(wgan, tmp_path, "--dataset", "ring8")
    assert state["args"]["arch"] == "mlp"
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(wgan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(wgan, tmp_path, "--arch", "mlp-g")
    written = helpers.sample_from(wgan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


def test_help(capsys):
    text = helpers.help_text(wgan, capsys)
    assert "--clip" in text and "--no-boost-critic" in text
    assert "(default: None)" not in " ".join(text.split("run (shared by every script)")[0].split())


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(wgan, ["--dataset", "nope", "--out", str(tmp_path / "x")], capsys, "unknown dataset")
    helpers.expect_usage_error(wgan, ["--dry-run", "--dataset", "ring8", "--arch", "dcgan",
                                      "--out", str(tmp_path / "x")], capsys, "--arch mlp")
    helpers.expect_usage_error(wgan, ["--dry-run", "--image-size", "48", "--out", str(tmp_path / "x")],
                               capsys, "power-of-two")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(wgan, ["--dry-run", "--clip", "0"], capsys, "--clip")


def test_critic_step_clips_every_parameter():
    """Algorithm 1, line 7: after an update every critic weight (BatchNorm's too) lies in [−c, c]."""
    torch.manual_seed(0)
    args = wgan.parse_args(["--dry-run", "--image-size", "16"])
    G, D = wgan.build_generator(args, (3, 16, 16)), wgan.build_critic(args, (3, 16, 16))
    with torch.no_grad():   # push the weights far outside the box so clipping has work to do
        for p in D.parameters():
            p.mul_(100).add_(0.5)
    opt = torch.optim.RMSprop(D.parameters(), lr=args.lr)
    c = 0.01
    wgan.critic_step(G, D, D, opt, torch.rand(8, 3, 16, 16) * 2 - 1, torch.randn(8, args.z_dim), c,
                     torch.autocast("cpu", enabled=False))
    for name, p in D.named_parameters():
        assert p.abs().max() <= c, name
    assert any((p.abs() == c).any() for p in D.parameters())


def test_critic_loss_sign_convention():
    """−L_D = E f(x) − E f(G(z)) is the W estimate: positive when the critic rates data above samples."""
    real, fake = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([0.5, -0.5])
    loss = wgan.critic_loss(real, fake)
    assert torch.isclose(-loss, torch.tensor(2.0))
    # minimising L_D pushes f(x) up and f(G(z)) down; minimising L_G pushes f(G(z)) up
    real.requires_grad_(True), fake.requires_grad_(True)
    g_real, g_fake = torch.autograd.grad(wgan.critic_loss(real, fake), (real, fake))
    assert (g_real < 0).all() and (g_fake > 0).all()
    (g_gen,) = torch.autograd.grad(wgan.generator_loss(fake), fake)
    assert torch.allclose(g_gen, torch.full((2,), -0.5))


def test_w_estimate_of_translated_gaussians():
    """For P_r = N(μ, 1) and P_θ = N(0, 1) in 1D, W = μ, attained by the 1-Lipschitz f(x) = x."""
    g = torch.Generator().manual_seed(0)
    mu = 1.5
    real, fake = torch.randn(200_000, generator=g) + mu, torch.randn(200_000, generator=g)
    assert abs(-wgan.critic_loss(real, fake).item() - mu) < 0.02


def test_boosted_critic_schedule():
    args = wgan.parse_args([])
    iters = {step: wgan.critic_iters(step, args) for step in (1, 25, 26, 27, 500, 501, 502, 1001)}
    assert iters == {1: 100, 25: 100, 26: 5, 27: 5, 500: 5, 501: 100, 502: 5, 1001: 100}
    args = wgan.parse_args(["--no-boost-critic"])
    assert all(wgan.critic_iters(step, args) == 5 for step in (1, 25, 501))


def test_paper_defaults_and_networks():
    args = wgan.parse_args([])
    assert (args.lr, args.clip, args.n_critic, args.batch_size, args.image_size, args.arch) == \
        (5e-5, 0.01, 5, 64, 64, "dcgan")
    shape = (3, 64, 64)
    G, D = wgan.build_generator(args, shape), wgan.build_critic(args, shape)
    z = torch.randn(2, args.z_dim)
    assert G(z).shape == (2, *shape) and D(G(z)).shape == (2,)
    assert G.net[0].out_channels == 512                                  # 4x4x512 start at 64x64
    assert [m.out_channels for m in D.modules() if isinstance(m, nn.Conv2d)] == [64, 128, 256, 512, 1]
    assert not any(isinstance(m, nn.Sigmoid) for m in D.modules())
    nobn = wgan.build_generator(wgan.parse_args(["--arch", "nobn"]), shape)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in nobn.modules())
    mlp = wgan.build_generator(wgan.parse_args(["--arch", "mlp-g"]), shape)
    linears = [m for m in mlp.modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 4 and [m.out_features for m in linears[:3]] == [512] * 3
    assert wgan.parse_args(["--dataset", "grid25"]).arch == "mlp"


def test_sample_toy_with_eval(tmp_path):
    out, _, _ = helpers.dry_run(wgan, tmp_path, "--dataset", "grid25")
    written = helpers.sample_from(wgan, out / "ckpt.pt", tmp_path, "--eval")
    helpers.assert_mode_metrics(written, 25)


# ------------------------------------------------------------------------------------------------
# The training loop, watched from outside: the nets record what they are fed (and their state at each
# call), every optimizer step records its settings, gradients and parameters before and after, and the
# data iterator records its batches. A replay of the docstring's losses on the same inputs must then give
# the gradients the loop stepped with.
# ------------------------------------------------------------------------------------------------


def watch_build(monkeypatch):
    """The G and critic that train() builds, watched."""
    nets = {}
    for name, builder in (("G", "build_generator"), ("D", "build_critic")):
        def build(*args, _original=getattr(wgan, builder), _name=name, **kwargs):
            nets[_name] = watch(_original(*args, **kwargs))
            return nets[_name]
        monkeypatch.setattr(wgan, builder, build)
    return nets


def rmsprop_first_update(lr, grad, alpha=0.99, eps=1e-8):
    """RMSProp's first step: v = (1 − α) g², θ ← θ − lr g / (√v + ε)."""
    return -lr * grad / (((1 - alpha) * grad ** 2).sqrt() + eps)


def test_critic_and_generator_steps_follow_algorithm_1(tmp_path, monkeypatch, updates):
    """Algorithm 1 with --n-critic 3 and c = 0.02, two G iterations: each critic step descends
    E f(G(z)) − E f(x) on a fresh data batch x and fresh samples of the current G, then every critic weight is
    clipped to [−c, c] (also at initialisation); then G descends −E f(G(z)) on fresh noise against the clipped
    critic. Both use RMSProp (lr 5e-5, α 0.99); each step moves only its own net."""
    c = 0.02
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(wgan, tmp_path, 2, "--n-critic", "3", "--clip", str(c), "--no-boost-critic")
    G, D = nets["G"], nets["D"]
    assert who_steps(updates, G=G, D=D) == (["D"] * 3 + ["G"]) * 2
    g_state, d_state = G.calls[0][0], D.calls[0][0]
    g_params, d_params = list(replica(G, g_state).parameters()), list(replica(D, d_state).parameters())
    assert max(p.abs().max() for p in d_params) <= c, "the critic starts outside [−c, c]"
    clipping_binds = False
    for it in range(2):
        Gi = replica(G, g_state, g_params)
        for j in range(3):
            s = updates[4 * it + j]
            assert_same(s["before"], d_params, "the critic's step must start from the clipped weights")
            Dj = replica(D, d_state, d_params)
            (z,) = G.calls[4 * it + j][1]
            with torch.no_grad():
                fake = Gi(z)
            loss = Dj(fake).mean() - Dj(batches[3 * it + j][0]).mean()
            assert_same_gradients(s["grads"], grads(loss, Dj), f"iteration {it + 1}, critic step {j + 1}")
            clipping_binds |= any(bool((p.abs() > c).any()) for p in s["after"])
            d_params = [p.clamp(-c, c) for p in s["after"]]
        s = updates[4 * it + 3]
        assert_same(s["before"], g_params, "G moved during the critic's steps")
        (z,) = G.calls[4 * it + 3][1]
        Dk = replica(D, d_state, d_params)
        assert_same_gradients(s["grads"], grads(-Dk(Gi(z)).mean(), Gi), f"iteration {it + 1}, G step")
        g_params = s["after"]
    assert clipping_binds, "no update left [−c, c]: the test does not exercise the clipping"
    assert_same(list(D.parameters()), d_params, "the critic's weights at the end")
    assert_same(list(G.parameters()), g_params, "G's weights at the end")

    for s in updates:
        assert type(s["opt"]) is torch.optim.RMSprop
        assert {k: setting(s, k) for k in ("lr", "alpha", "eps", "momentum", "centered", "weight_decay")} == \
            {"lr": 5e-5, "alpha": 0.99, "eps": 1e-8, "momentum": 0, "centered": False, "weight_decay": 0}
    for s in (updates[0], updates[3]):   # each optimizer's first step
        assert_update(s, [rmsprop_first_update(5e-5, g) for g in s["grads"]], "RMSProp's first update")


def test_critic_is_boosted_to_100_steps_at_the_start(tmp_path, monkeypatch, updates):
    """The official schedule: 100 critic updates (each clipped) before the first G iteration."""
    c = 0.01
    nets = watch_build(monkeypatch)
    wiring.train_steps(wgan, tmp_path, 1, "--boost-critic")
    assert who_steps(updates, G=nets["G"], D=nets["D"]) == ["D"] * 100 + ["G"]
    for previous, s in zip(updates[:99], updates[1:100]):
        assert_same(s["before"], [p.clamp(-c, c) for p in previous["after"]], "a boosted critic step went unclipped")
