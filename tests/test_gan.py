import math

import pytest
import torch
import torch.nn.functional as F

import gan
from tests.wiring import watch, replica, record_batches, who_steps, setting, grads, assert_same_gradients, assert_update, assert_same
from tests import helpers, wiring


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(gan, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(gan, tmp_path, "--dataset", "ring8")
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(gan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(gan, tmp_path)
    written = helpers.sample_from(gan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


def test_help(capsys):
    text = helpers.help_text(gan, capsys)
    assert "--g-loss" in text
    own = " ".join(text.split("run (shared by every script)")[0].split())   # this script's flags, unwrapped
    assert "(default: None)" not in own
    assert "(default: sgd)" in own and "adam" in own


def test_losses_match_value_function():
    """With D = sigmoid(l): D loss = -(1/2) V, non-saturating G loss = -E log D(G(z)),
    minimax G loss = E log(1 - D(G(z)))."""
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    d_real, d_fake = torch.sigmoid(real), torch.sigmoid(fake)
    value = torch.log(d_real).mean() + torch.log(1 - d_fake).mean()
    assert torch.allclose(gan.d_loss(real, fake), -0.5 * value)
    assert torch.allclose(gan.g_loss_nonsaturating(fake), -torch.log(d_fake).mean())
    assert torch.allclose(gan.g_loss_minimax(fake), torch.log(1 - d_fake).mean())


def test_nonsaturating_loss_has_strong_gradient_when_d_rejects_samples():
    """Sec. 3: early on D(G(z)) ~ 0, where log(1 - D) saturates but -log D does not."""
    fake = torch.tensor([-8.0], requires_grad=True)
    (g_ns,) = torch.autograd.grad(gan.g_loss_nonsaturating(fake), fake)
    (g_mm,) = torch.autograd.grad(gan.g_loss_minimax(fake), fake)
    assert g_ns.abs() > 0.99 and g_mm.abs() < 1e-3


def test_maxout_takes_the_max_over_pieces():
    layer = gan.Maxout(3, 2, 4)
    x = torch.randn(5, 3)
    pre = layer.linear(x).view(5, 2, 4)
    assert torch.equal(layer(x), pre.max(2).values)


def test_schedule_follows_official_config():
    args = gan.parse_args([])
    lr0, m0 = gan.schedule(0, args, 50_000)
    assert lr0 == 0.1 and m0 == 0.5
    lr, m = gan.schedule(250 * 500, args, 50_000)  # epoch 250 at batch 100
    assert math.isclose(lr, 0.1 / 1.000004 ** 125_000) and math.isclose(m, 0.7)
    assert gan.schedule(10**8, args, 50_000)[0] == 1e-6


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(gan, ["--dataset", "nope", "--out", str(tmp_path / "x")], capsys, "unknown dataset")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(gan, ["--dry-run", "--steps", "0"], capsys, "--steps")


def test_dry_run_alternating_updates(tmp_path):
    """Algorithm 1 as printed (k D steps per G step) alongside the official code's simultaneous updates."""
    _, summary, _ = helpers.dry_run(gan, tmp_path, "--update", "alternating", "--k", "2")
    assert summary["step"] == 4


# ------------------------------------------------------------------------------------------------
# The training loop, watched from outside: the nets record what they are fed (and their state at each
# call), every optimizer step records its settings, gradients and parameters before and after, and the
# data iterator records its batches. A replay of the docstring's losses on the same inputs must then give
# the gradients the loop stepped with.
# ------------------------------------------------------------------------------------------------


def watch_build(monkeypatch):
    """The (G, D) that train() builds, watched. D's output bias starts at 1.5 instead of 0: at D = ½ the two G
    losses have the same gradient, and they should be told apart."""
    nets, original = {}, gan.build

    def build(*args, **kwargs):
        G, D = original(*args, **kwargs)
        torch.nn.init.constant_(D.net[-1].bias, 1.5)
        nets["G"], nets["D"] = watch(G), watch(D)
        return G, D
    monkeypatch.setattr(gan, "build", build)
    return nets


NO_DROPOUT = ("--d-input-dropout", "0", "--d-hidden-dropout", "0")   # dropout masks cannot be replayed


def log_d(logits):        # log D(x) = −softplus(−l), D = sigmoid(l)
    return -F.softplus(-logits)


def log_1m_d(logits):     # log(1 − D(x)) = −softplus(l)
    return -F.softplus(logits)


@pytest.mark.parametrize("g_loss", ["nonsaturating", "minimax"])
def test_simultaneous_update_follows_the_equations(tmp_path, monkeypatch, updates, g_loss):
    """The official code's update: D's gradient is that of ½ (−E log D(x) − E log(1 − D(G(z)))) with x the data
    batch; G's is that of −E log D(G(z)) (Sec. 3; minimax: E log(1 − D(G(z))), Eq. 1) on the same samples and the
    same D, before either net moves. Each takes one SGD step at lr 0.1, momentum 0.5 (a first step is −lr·g),
    and neither step touches the other net."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(gan, tmp_path, 1, *NO_DROPOUT, "--g-loss", g_loss)
    G, D = nets["G"], nets["D"]
    assert who_steps(updates, G=G, D=D) == ["D", "G"]
    d_step, g_step = updates
    (g_state, (z,)), (d_state, _) = G.calls[0], D.calls[0]
    G0, D0 = replica(G, g_state), replica(D, d_state)
    x, fake = batches[0][0], G0(z)
    loss_d = 0.5 * (-log_d(D0(x)).mean() - log_1m_d(D0(fake.detach())).mean())
    assert_same_gradients(d_step["grads"], grads(loss_d, D0), "D's gradient")
    loss_g = -log_d(D0(fake)).mean() if g_loss == "nonsaturating" else log_1m_d(D0(fake)).mean()
    assert_same_gradients(g_step["grads"], grads(loss_g, G0), "G's gradient")
    for s, net0, net in ((d_step, D0, D), (g_step, G0, G)):
        assert type(s["opt"]) is torch.optim.SGD
        assert (setting(s, "lr"), setting(s, "momentum"), setting(s, "weight_decay")) == (0.1, 0.5, 0)
        assert_same(s["before"], list(net0.parameters()), "a net moved before its own step")
        assert_update(s, [-0.1 * g for g in s["grads"]], "the first SGD update")
        assert_same(list(net.parameters()), s["after"], "a net moved after its own step")


def test_alternating_update_takes_k_d_steps_then_one_g_step(tmp_path, monkeypatch, updates):
    """Algorithm 1 (--update alternating --k 3): three D updates, each on a fresh data batch and fresh samples of
    the current G, then one G step against the updated D; twice."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(gan, tmp_path, 2, *NO_DROPOUT, "--update", "alternating", "--k", "3")
    G, D = nets["G"], nets["D"]
    assert who_steps(updates, G=G, D=D) == ["D", "D", "D", "G"] * 2
    g_params, d_params = list(replica(G, G.calls[0][0]).parameters()), list(replica(D, D.calls[0][0]).parameters())
    for it in range(2):
        for j in range(3):
            s = updates[4 * it + j]
            assert_same(s["before"], d_params, "D's step starts where the last one ended")
            _, (z,) = G.calls[4 * it + j]
            Gi, Dj = replica(G, G.calls[0][0], g_params), replica(D, D.calls[0][0], d_params)
            x = batches[3 * it + j][0]
            fake = Gi(z).detach()
            loss_d = 0.5 * (-log_d(Dj(x)).mean() - log_1m_d(Dj(fake)).mean())
            assert_same_gradients(s["grads"], grads(loss_d, Dj), f"iteration {it + 1}, D step {j + 1}")
            d_params = s["after"]
        s = updates[4 * it + 3]
        assert_same(s["before"], g_params, "G moved during D's steps")
        _, (z,) = G.calls[4 * it + 3]
        Gi, Dk = replica(G, G.calls[0][0], g_params), replica(D, D.calls[0][0], d_params)
        assert_same_gradients(s["grads"], grads(-log_d(Dk(Gi(z))).mean(), Gi), f"iteration {it + 1}, G step")
        g_params = s["after"]


def test_sgd_learning_rate_decay_and_momentum_ramp(tmp_path, monkeypatch, updates):
    """Both nets' SGD (mnist.yaml): lr divided by --lr-decay at every update down to --min-lr; momentum linear
    from --momentum at epoch 1 to --final-momentum at --momentum-epochs; every update is momentum SGD
    (v ← m v + g, θ ← θ − lr v) with the values of its step."""
    nets = watch_build(monkeypatch)
    wiring.train_steps(gan, tmp_path, 5, "--batch-size", "240", "--lr-decay", "2", "--min-lr", "0.02",
                       "--momentum-epochs", "2")
    # 480 training images (the 512 fake ones less 32 held out) in batches of 240: update t starts at epoch (t − 1)/2
    lrs, momenta = [0.1, 0.05, 0.025, 0.02, 0.02], [0.5, 0.5, 0.5, 0.6, 0.7]
    who = who_steps(updates, G=nets["G"], D=nets["D"])
    assert who == ["D", "G"] * 5
    for name in "DG":
        mine = [s for s, w in zip(updates, who) if w == name]
        assert [setting(s, "lr") for s in mine] == pytest.approx(lrs, rel=1e-12), name
        assert [setting(s, "momentum") for s in mine] == pytest.approx(momenta, rel=1e-12), name
        velocity = None
        for t, (s, lr, m) in enumerate(zip(mine, lrs, momenta)):
            velocity = s["grads"] if velocity is None else [m * v + g for v, g in zip(velocity, s["grads"])]
            assert_update(s, [-lr * v for v in velocity], f"{name}'s update {t + 1}")


def test_toys_train_with_adam(tmp_path, monkeypatch, updates):
    """On the 2D toys both nets use Adam with lr 1e-4, betas (0.8, 0.999) and no schedule."""
    nets = watch_build(monkeypatch)
    wiring.train_steps(gan, tmp_path, 2, "--dataset", "ring8")
    assert who_steps(updates, G=nets["G"], D=nets["D"]) == ["D", "G"] * 2
    for s in updates:
        assert type(s["opt"]) is torch.optim.Adam
        assert (setting(s, "lr"), setting(s, "betas"), setting(s, "weight_decay")) == (1e-4, (0.8, 0.999), 0)
    for s in updates[:2]:   # Adam's first step: −lr · sign(g)
        assert_update(s, [wiring.adam_first_update(1e-4, g) for g in s["grads"]], "Adam's first update")
