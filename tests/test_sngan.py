
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils import parametrizations, parametrize

import sngan
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


def normalised_layers(D):
    return [m for m in D.modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and parametrize.is_parametrized(m, "weight")]


def spectral_norms(D):
    """σ of each normalised layer's effective weight, conv kernels as (out, in·kh·kw) matrices."""
    return torch.stack([torch.linalg.matrix_norm(m.weight.detach().flatten(1), ord=2) for m in normalised_layers(D)])


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(sngan, tmp_path)
    # after training, every layer of the trained D still has spectral norm ~ 1
    args = sngan.parse_args(["--dry-run"])
    D = sngan.build_discriminator(args, state["data_shape"])
    D.load_state_dict(state["models"]["D"])
    D.eval()
    assert torch.allclose(spectral_norms(D), torch.ones(1), atol=0.05)


def test_dry_run_cnn_nonsaturating(tmp_path):
    helpers.dry_run(sngan, tmp_path, "--arch", "cnn", "--loss", "nonsaturating")


def test_resume_is_exact(tmp_path, monkeypatch):
    a, b = helpers.assert_resume_exact(sngan, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))
    assert any(k.endswith("_u") for k in a["models"]["D"])   # the power-iteration vectors are resumed too


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(sngan, tmp_path, "--arch", "cnn")
    written = helpers.sample_from(sngan, out / "ckpt.pt", tmp_path)
    assert set(written) == {"samples", "interpolation"}


def test_help(capsys):
    text = helpers.help_text(sngan, capsys)
    assert "--no-sn" in text and "--n-dis" in text
    flat = " ".join(text.split())
    assert "(default: None)" not in flat.split("run (shared by every script)")[0]
    assert "--image-size IMAGE_SIZE image side in pixels (default: 32; 48 on stl10)" in flat


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(sngan, ["--dataset", "nope", "--out", str(tmp_path / "x")], capsys, "unknown dataset")
    helpers.expect_usage_error(sngan, ["--dry-run", "--image-size", "20", "--out", str(tmp_path / "x")],
                               capsys, "multiple of 8")
    helpers.expect_usage_error(sngan, ["--dry-run", "--dataset", "ring8", "--out", str(tmp_path / "x")],
                               capsys, "multiple of 8")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(sngan, ["--dry-run", "--metrics", "fid,bogus"], capsys, "--metrics")


@pytest.mark.parametrize("arch,size", [("resnet", 32), ("resnet", 48), ("cnn", 32)])
def test_spectral_norm_of_every_layer_is_one(arch, size):
    torch.manual_seed(0)
    args = sngan.parse_args(["--dry-run", "--arch", arch, "--image-size", str(size)])
    D = sngan.build_discriminator(args, (3, size, size))
    layers = normalised_layers(D)
    assert len(layers) == sum(isinstance(m, (nn.Conv2d, nn.Linear)) for m in D.modules()) > 0
    raw = torch.stack([torch.linalg.matrix_norm(m.parametrizations.weight.original.detach().flatten(1), ord=2)
                       for m in layers])
    assert not torch.allclose(raw, torch.ones(1), atol=0.1)   # the unnormalised weights are not 1-Lipschitz
    for _ in range(40):   # 40 power iterations: reading a weight in training mode runs one (as D's forward does)
        for m in layers:
            m.weight
    sigma = spectral_norms(D)
    # the power-iteration estimate never exceeds the true σ, so W/σ̂ has norm >= 1, converging to 1
    assert (sigma > 1 - 1e-4).all() and (sigma < 1.02).all(), sigma


def test_no_sn_ablation_has_no_normalisation():
    args = sngan.parse_args(["--dry-run", "--no-sn"])
    assert normalised_layers(sngan.build_discriminator(args, (3, 16, 16))) == []


def test_hinge_losses():
    real = torch.tensor([2.0, 0.5, -1.0])    # margins: 0, 0.5, 2
    fake = torch.tensor([-2.0, 0.3, 1.5])    # margins: 0, 1.3, 2.5
    assert torch.isclose(sngan.d_loss_hinge(real, fake), torch.tensor(2.5 / 3 + 3.8 / 3))
    assert torch.isclose(sngan.g_loss_hinge(fake), torch.tensor(0.2 / 3))
    # scores beyond the margins give D no loss and no gradient
    real, fake = torch.tensor([1.5, 3.0], requires_grad=True), torch.tensor([-1.0, -4.0], requires_grad=True)
    loss = sngan.d_loss_hinge(real, fake)
    assert loss == 0 and all((g == 0).all() for g in torch.autograd.grad(loss, (real, fake)))


def test_nonsaturating_losses_are_binary_cross_entropy():
    real, fake = torch.tensor([2.0, -0.5]), torch.tensor([0.3, -1.2])
    bce = nn.functional.binary_cross_entropy_with_logits
    assert torch.isclose(sngan.d_loss_nonsaturating(real, fake),
                         bce(real, torch.ones(2)) + bce(fake, torch.zeros(2)))
    assert torch.isclose(sngan.g_loss_nonsaturating(fake), bce(fake, torch.ones(2)))


def test_paper_settings_and_networks():
    args = sngan.parse_args([])
    assert (args.arch, args.loss, args.lr, args.beta1, args.beta2, args.n_dis, args.batch_size, args.steps) == \
        ("resnet", "hinge", 2e-4, 0.0, 0.9, 5, 64, 100_000)
    cnn = sngan.parse_args(["--arch", "cnn"])
    assert (cnn.lr, cnn.beta1, cnn.beta2, cnn.n_dis) == (2e-4, 0.5, 0.999, 1)   # setting C
    z = torch.randn(2, 128)
    # Table 4: G 4x4x256 and 3 up-blocks of 256; D 4 blocks of 128, sum pooling
    G, D = sngan.build_generator(args, (3, 32, 32)), sngan.build_discriminator(args, (3, 32, 32))
    assert G.start == (256, 4, 4) and G(z).shape == (2, 3, 32, 32) and D(G(z)).shape == (2,)
    assert [blk.c2.out_channels for blk in D.blocks] == [128] * 4
    # STL-10: 48x48 by default; Table 5 ResNet (G from 6x6x512, D up to 1024 channels)
    stl = sngan.parse_args(["--dataset", "stl10"])
    assert stl.image_size == 48
    G, D = sngan.build_generator(stl, (3, 48, 48)), sngan.build_discriminator(stl, (3, 48, 48))
    assert G.start == (512, 6, 6) and [blk.c2.out_channels for blk in D.blocks] == [64, 128, 256, 512, 1024]
    # Table 3 at 48x48: Mg = 6
    cnn48 = sngan.parse_args(["--arch", "cnn", "--dataset", "stl10"])
    G, D = sngan.build_generator(cnn48, (3, 48, 48)), sngan.build_discriminator(cnn48, (3, 48, 48))
    assert G.start == (512, 6, 6) and D.dense.in_features == 6 * 6 * 512
    convs = [m.out_channels for m in D.features if isinstance(m, nn.Conv2d)]
    assert convs == [64, 64, 128, 128, 256, 256, 512]
    # both 48x48 nets run end to end (narrow widths to keep this quick)
    for arch in ("resnet", "cnn"):
        small = sngan.parse_args(["--dataset", "stl10", "--arch", arch, "--g-width", "32", "--d-width", "4"])
        G, D = sngan.build_generator(small, (3, 48, 48)), sngan.build_discriminator(small, (3, 48, 48))
        assert G(z).shape == (2, 3, 48, 48) and D(G(z)).shape == (2,)


def test_one_power_iteration_per_d_update(tmp_path, monkeypatch):
    """Algorithm 1: one power iteration per layer for each update of D, none for G's updates."""
    from torch.nn.utils import parametrizations
    iterations = []
    original = parametrizations._SpectralNorm._power_method

    def counting(self, weight_mat, n):
        iterations.append(n)
        return original(self, weight_mat, n)
    monkeypatch.setattr(parametrizations._SpectralNorm, "_power_method", counting)
    D = sngan.build_discriminator(sngan.parse_args(["--dry-run"]), (3, 16, 16))
    at_build = sum(iterations)   # torch's own warm-up when a layer gets normalised
    assert at_build > 0
    iterations.clear()
    sngan.main(["--dry-run", "--steps", "2", "--n-dis", "3", "--out", str(tmp_path / "run")])
    assert sum(iterations) == at_build + len(normalised_layers(D)) * 2 * 3


# ------------------------------------------------------------------------------------------------
# The training loop, watched from outside: the nets record what they are fed (and their state at each
# call), every optimizer step records its settings, gradients and parameters before and after, and the
# data iterator records its batches. A replay of the docstring's losses on the same inputs must then give
# the gradients the loop stepped with.
# ------------------------------------------------------------------------------------------------


def watch_build(monkeypatch):
    """The G and D that train() builds, watched."""
    nets = {}
    for name, builder in (("G", "build_generator"), ("D", "build_discriminator")):
        def build(*args, _original=getattr(sngan, builder), _name=name, **kwargs):
            nets[_name] = watch(_original(*args, **kwargs))
            return nets[_name]
        monkeypatch.setattr(sngan, builder, build)
    return nets


HINGE = (lambda real, fake: F.relu(1 - real).mean() + F.relu(1 + fake).mean(),   # L_D
         lambda fake: -fake.mean())                                              # L_G
NONSATURATING = (lambda real, fake: F.softplus(-real).mean() + F.softplus(fake).mean(),   # −log σ(l) = softplus(−l)
                 lambda fake: F.softplus(-fake).mean())


def check_iterations(G, D, steps, batches, iterations, n_dis, losses):
    """Replay every step: n_dis D steps, each on a fresh data batch x and fresh samples of the current G, scored
    in one pass of D in training mode (one power iteration), descending L_D(D(x), D(G(z))); then one G step on
    fresh noise descending L_G(D(G(z))) against the updated D in eval mode (σ from the last D step)."""
    d_loss, g_loss = losses
    assert who_steps(steps, G=G, D=D) == (["D"] * n_dis + ["G"]) * iterations
    d_params = list(replica(D, D.calls[0][0]).parameters())
    g_params = list(replica(G, G.calls[0][0]).parameters())
    for it in range(iterations):
        Gi = replica(G, G.calls[0][0], g_params)
        for j in range(n_dis):
            k = (n_dis + 1) * it + j            # this step's index among the steps and among both nets' calls
            s = steps[k]
            assert_same(s["before"], d_params, "D's step must start where its last one ended")
            (z,) = G.calls[k][1]
            real = batches[n_dis * it + j][0]
            with torch.no_grad():
                fake = Gi(z)
            Dj = replica(D, D.calls[k][0], d_params)
            scores = Dj(torch.cat([real, fake]))
            loss = d_loss(*scores.split([len(real), len(fake)]))
            assert_same_gradients(s["grads"], grads(loss, Dj), f"iteration {it + 1}, D step {j + 1}")
            d_params = s["after"]
        k = (n_dis + 1) * it + n_dis
        s = steps[k]
        assert_same(s["before"], g_params, "G moved during D's steps")
        (z,) = G.calls[k][1]
        Dk = replica(D, D.calls[k][0], d_params).eval()
        assert_same_gradients(s["grads"], grads(g_loss(Dk(Gi(z))), Gi), f"iteration {it + 1}, G step")
        g_params = s["after"]
    assert_same(list(D.parameters()), d_params, "D's weights at the end")
    assert_same(list(G.parameters()), g_params, "G's weights at the end")


def test_resnet_steps_follow_the_hinge_loss(tmp_path, monkeypatch, updates):
    """The default ResNet run (--n-dis 2 here), two G iterations: the hinge loss on a spectrally normalised D
    (every conv and dense layer); Adam lr 2e-4, betas (0, 0.9) for both nets, constant; each step moves only
    its own net."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(sngan, tmp_path, 2, "--n-dis", "2")
    G, D = nets["G"], nets["D"]
    layers = [m for m in D.modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert layers and all(parametrize.is_parametrized(m, "weight")
                          and isinstance(m.parametrizations.weight[0], parametrizations._SpectralNorm) for m in layers)
    check_iterations(G, D, updates, batches, iterations=2, n_dis=2, losses=HINGE)
    for s in updates:
        assert type(s["opt"]) is torch.optim.Adam
        assert {k: setting(s, k) for k in ("lr", "betas", "eps", "weight_decay")} == \
            {"lr": 2e-4, "betas": (0.0, 0.9), "eps": 1e-8, "weight_decay": 0}
    for s in (updates[0], updates[2]):   # each optimizer's first step: −lr · sign(g)
        assert_update(s, [wiring.adam_first_update(2e-4, g) for g in s["grads"]], "Adam's first update")


def test_cnn_steps_follow_the_nonsaturating_loss(tmp_path, monkeypatch, updates):
    """The standard CNN with --loss nonsaturating and --lr-decay linear: setting C (one D step per G step,
    Adam betas (0.5, 0.999)), lr 2e-4 decayed linearly to 0 over --steps for both nets (1e-4 in the second of
    two iterations)."""
    nets, batches = watch_build(monkeypatch), record_batches(monkeypatch)
    wiring.train_steps(sngan, tmp_path, 2, "--arch", "cnn", "--loss", "nonsaturating", "--lr-decay", "linear")
    check_iterations(nets["G"], nets["D"], updates, batches, iterations=2, n_dis=1, losses=NONSATURATING)
    for s, lr in zip(updates, [2e-4, 2e-4, 1e-4, 1e-4]):
        assert type(s["opt"]) is torch.optim.Adam
        assert {k: setting(s, k) for k in ("lr", "betas", "eps", "weight_decay")} == \
            {"lr": lr, "betas": (0.5, 0.999), "eps": 1e-8, "weight_decay": 0}
