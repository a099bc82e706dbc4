import math

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

import cgan
from tests.wiring import watch, replica, record_batches, who_steps, setting, grads, assert_same_gradients, assert_update, assert_same
from tests import helpers, wiring


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(cgan, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])
    assert state["num_classes"] == 10


def test_dry_run_conv(tmp_path):
    out, summary, state = helpers.dry_run(cgan, tmp_path, "--arch", "conv")
    assert state["args"]["arch"] == "conv" and state["args"]["lr"] == 2e-4


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(cgan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


def test_resume_is_exact_conv(tmp_path, monkeypatch):
    helpers.assert_resume_exact(cgan, tmp_path, monkeypatch, ["--arch", "conv"], n=2,
                                state_keys=("models", "optimizers"))


def test_sample_has_one_row_per_class(tmp_path):
    out, _, state = helpers.dry_run(cgan, tmp_path)
    written = helpers.sample_from(cgan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}
    side = state["data_shape"][1]
    for path in written.values():  # make_grid: 2-pixel padding around every image
        width, height = Image.open(path).size
        assert (width, height) == (10 * (side + 2) + 2, state["num_classes"] * (side + 2) + 2)


def test_help(capsys):
    text = helpers.help_text(cgan, capsys)
    assert "--arch" in text and "--lr-decay" in text
    own = " ".join(text.split("run (shared by every script)")[0].split())   # this script's flags, unwrapped
    assert "(default: None)" not in own and "None:" not in own


def test_paper_mlp_sizes():
    args = cgan.parse_args([])
    G, D = cgan.build(args, (1, 28, 28), 10)
    assert G.z_path[0].weight.shape == (200, 100) and G.y_path[0].weight.shape == (1000, 10)
    assert G.joint[0].weight.shape == (1200, 1200) and G.joint[3].weight.shape == (784, 1200)
    assert D.x_path[2].linear.weight.shape == (240 * 5, 784)
    assert D.y_path[0].linear.weight.shape == (50 * 5, 10)
    assert D.joint[0].linear.weight.shape == (240 * 4, 290)
    assert args.lr == 0.1 and args.lr_decay == 1.00004 and args.batch_size == 100


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 28, 28)), ("conv", (3, 32, 32))])
def test_changing_only_y_changes_g_output(arch, shape):
    torch.manual_seed(0)
    args = cgan.parse_args(["--arch", arch, "--width", "8", "--g-units", "64", "--g-y-units", "32"])
    G, _ = cgan.build(args, shape, 10)
    G.eval()
    z = cgan.sample_noise(6, args.z_dim, args.noise, "cpu")
    y = torch.tensor([0, 1, 2, 3, 4, 5])
    with torch.no_grad():
        a, b, c = G(z, y), G(z, (y + 1) % 10), G(z, y)
    assert a.shape == (6, *shape)
    assert torch.equal(a, c)  # same z and y: same image
    assert ((a - b).flatten(1).abs().amax(1) > 1e-4).all()  # every image changes with its label


@pytest.mark.parametrize("arch,shape", [("mlp", (1, 28, 28)), ("conv", (3, 32, 32))])
def test_d_output_depends_on_y(arch, shape):
    torch.manual_seed(0)
    args = cgan.parse_args(["--arch", arch, "--width", "8", "--d-x-units", "32", "--d-units", "32"])
    _, D = cgan.build(args, shape, 10)
    for m in D.modules():  # the paper's init (U(±0.005)) makes every logit ~1e-5: use larger weights
        if isinstance(m, torch.nn.Linear):
            torch.nn.init.normal_(m.weight, 0.0, 0.1)
    D.eval()
    x = torch.rand(5, *shape)
    y = torch.tensor([0, 2, 4, 6, 8])
    with torch.no_grad():
        a, b = D(x, y), D(x, y + 1)
    assert a.shape == (5,)
    assert ((a - b).abs() > 1e-6).all()
    # and the label reaches D's output through the gradient
    emb = D.y_path[0].linear.weight if arch == "mlp" else D.embed.weight
    D.zero_grad()
    D(x, y).sum().backward()
    assert emb.grad is not None and emb.grad.abs().sum() > 0


def test_losses_match_value_function():
    """With D = sigmoid(l): D loss = −½ V (Eq. 2), G loss = −E log D(G(z|y)|y)."""
    real, fake = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([-3.0, 0.0, 1.5])
    value = torch.log(torch.sigmoid(real)).mean() + torch.log(1 - torch.sigmoid(fake)).mean()
    assert torch.allclose(cgan.d_loss(real, fake), -0.5 * value)
    assert torch.allclose(cgan.g_loss(fake), -torch.log(torch.sigmoid(fake)).mean())


def test_schedule():
    args = cgan.parse_args([])
    assert cgan.schedule(0, args, 50_000) == (0.1, 0.5)
    lr, m = cgan.schedule(10_000, args, 50_000)
    assert math.isclose(lr, 0.1 / 1.00004 ** 10_000) and 0.5 < m < 0.7
    assert math.isclose(cgan.schedule(250 * 500, args, 50_000)[1], 0.7)  # epoch 250 at batch 100
    steps_to_floor = math.log(0.1 / 1e-6) / math.log(1.00004)
    assert cgan.schedule(int(steps_to_floor) - 10, args, 50_000)[0] > 1e-6
    assert cgan.schedule(int(steps_to_floor) + 10, args, 50_000)[0] == 1e-6


def test_noise():
    z = cgan.sample_noise(10_000, 100, "hypercube", "cpu")  # the unit hypercube of Sec. 4.1
    assert z.min() >= 0 and z.max() <= 1 and abs(z.mean().item() - 0.5) < 0.01
    z = cgan.sample_noise(10_000, 100, "sqrt3", "cpu")  # zero mean, unit variance
    assert z.abs().max() <= math.sqrt(3) and abs(z.mean().item()) < 0.01 and abs(z.var().item() - 1) < 0.01


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(cgan, ["--dataset", "ring8", "--out", str(tmp_path / "a")], capsys, "label")
    helpers.expect_usage_error(cgan, ["--arch", "conv", "--image-size", "28", "--out", str(tmp_path / "b")],
                               capsys, "power-of-two")
    helpers.expect_usage_error(cgan, ["--dataset", "nope", "--out", str(tmp_path / "c")], capsys, "unknown dataset")
    assert not any((tmp_path / d).exists() for d in "abc")


# ------------------------------------------------------------------------------------------------
# The training loop, watched from outside: the nets record what they are fed (and their state at each
# call), every optimizer step records its settings, gradients and parameters before and after, and the
# data iterator records its batches. A replay of the docstring's losses on the same inputs must then give
# the gradients the loop stepped with.
# ------------------------------------------------------------------------------------------------


def watch_build(monkeypatch):
    """The (G, D) that train() builds, watched. The MLP D's output bias starts at 1.5 instead of 0: at D = ½
    the non-saturating and the minimax G losses have the same gradient, and they should be told apart."""
    nets, original = {}, cgan.build

    def build(*args, **kwargs):
        G, D = original(*args, **kwargs)
        if isinstance(D, cgan.MLPDiscriminator):
            torch.nn.init.constant_(D.joint[-1].bias, 1.5)
        nets["G"], nets["D"] = watch(G), watch(D)
        return G, D
    monkeypatch.setattr(cgan, "build", build)
    return nets


# the MLP's dropout masks cannot be replayed: D without dropout (G has none by default)
ARCHS = {"mlp": ("--d-dropout", "0", "--d-input-dropout", "0"), "conv": ("--arch", "conv")}
OPTIMIZERS = {"mlp": (torch.optim.SGD, {"lr": 0.1, "momentum": 0.5, "weight_decay": 0}),
              "conv": (torch.optim.Adam, {"lr": 2e-4, "betas": (0.5, 0.999), "weight_decay": 0})}


@pytest.mark.parametrize("arch", ["mlp", "conv"])
def test_one_step_follows_the_equations_with_paired_labels(tmp_path, monkeypatch, updates, arch):
    """One step (Eq. 2): D sees the data batch with its own labels and G's samples with the labels G was given,
    and descends ½ (−E log D(x|y) − E log(1 − D(G(z|y')|y'))); then G, on fresh noise and labels y'', descends
    −E log D(G(z|y'')|y'') against the updated D. MLP: SGD lr 0.1, momentum 0.5 (a first step is −lr·g);
    conv: Adam lr 2e-4, betas (0.5, 0.999) (a first step is −lr·sign(g)). Each step moves only its own net."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(cgan, tmp_path, 1, *ARCHS[arch])
    G, D = nets["G"], nets["D"]
    assert who_steps(updates, G=G, D=D) == ["D", "G"]
    d_step, g_step = updates
    G0, D0 = replica(G, G.calls[0][0]), replica(D, D.calls[0][0])
    x, y = batches[0]
    z, y_fake = G.calls[0][1]
    with torch.no_grad():
        fake = G0(z, y_fake)
    # D's two inputs of its step: (data, its labels) and (samples, the labels G made them for)
    seen = [inputs for _, inputs in D.calls[:2]]
    real_seen = [s for s in seen if torch.equal(s[0], x)]
    fake_seen = [s for s in seen if torch.allclose(s[0], fake, atol=1e-6)]
    assert len(real_seen) == 1 and len(fake_seen) == 1, "D's step must see the data batch once and G's samples once"
    assert torch.equal(real_seen[0][1], y), "the data batch reaches D with other labels than its own"
    assert torch.equal(fake_seen[0][1], y_fake), "G's samples reach D with other labels than G was given"
    assert not torch.equal(y_fake, y)
    loss_d = 0.5 * (F.softplus(-D0(x, y)).mean() + F.softplus(D0(fake, y_fake)).mean())   # −log σ(l) = softplus(−l)
    assert_same_gradients(d_step["grads"], grads(loss_d, D0), "D's gradient")

    assert_same(g_step["before"], list(G0.parameters()), "G moved during D's step")
    z, y_g = G.calls[1][1]
    assert torch.equal(D.calls[2][1][1], y_g), "G's samples reach D with other labels than G was given"
    D1 = replica(D, D.calls[0][0], d_step["after"])
    assert_same_gradients(g_step["grads"], grads(F.softplus(-D1(G0(z, y_g), y_g)).mean(), G0), "G's gradient")

    kind, settings = OPTIMIZERS[arch]
    for s, net in ((d_step, D), (g_step, G)):
        assert type(s["opt"]) is kind
        assert {k: setting(s, k) for k in settings} == settings
        lr = settings["lr"]
        first = [-lr * g for g in s["grads"]] if arch == "mlp" else [wiring.adam_first_update(lr, g) for g in s["grads"]]
        assert_update(s, first, "the first update")
        assert_same(list(net.parameters()), s["after"], "a net moved after its own step")


def test_sgd_learning_rate_decay_and_momentum_ramp(tmp_path, monkeypatch, updates):
    """Both nets' SGD (Sec. 4.1): lr divided by --lr-decay at every update down to --min-lr; momentum linear from
    --momentum at epoch 1 to --final-momentum at --momentum-epochs; every update is momentum SGD
    (v ← m v + g, θ ← θ − lr v) with the values of its step."""
    nets = watch_build(monkeypatch)
    wiring.train_steps(cgan, tmp_path, 5, "--batch-size", "240", "--lr-decay", "2", "--min-lr", "0.02",
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
