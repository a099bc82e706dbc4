import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import gmmn
from common import checkpoint as ckpt_io
from common import data as datasets
from tests import helpers, wiring


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(gmmn, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])
    assert "AE" not in state["models"]


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(gmmn, tmp_path, "--dataset", "ring8")
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples


def test_dry_run_autoencoder_then_gmmn(tmp_path):
    """--mode ae: 3 autoencoder phases of --ae-steps, then --steps GMMN updates, in one command."""
    out, summary, state = helpers.dry_run(gmmn, tmp_path, "--mode", "ae", "--ae-steps", "2", "--steps", "3")
    assert summary["step"] == 3 * 2 + 3
    assert {"G", "AE"} <= set(state["models"]) and "AE" not in state["optimizers"]
    assert state["models"]["G"]["net.8.weight"].shape[0] == 4  # G makes codes (dry-run code size 4)
    assert {"loss/AE_phase1", "loss/AE_phase2", "loss/AE_phase3", "loss/G"} <= set(summary["losses"])
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(gmmn, tmp_path, monkeypatch, [], state_keys=("models", "optimizers"))


AE_ARGS = ["--dry-run", "--mode", "ae", "--ae-steps", "2", "--steps", "4", "--ckpt-every", "1000"]


@pytest.fixture(scope="module")
def ae_full_run(tmp_path_factory):
    """10 uninterrupted steps of --mode ae: 3 x 2 autoencoder updates, then 4 GMMN updates."""
    out = tmp_path_factory.mktemp("ae_full")
    summary = gmmn.main([*AE_ARGS, "--out", str(out)])
    assert summary["step"] == 10 and not summary["interrupted"]
    return ckpt_io.load(out / "ckpt.pt", "gmmn")


@pytest.mark.parametrize("stop", [3, 6, 8])  # in autoencoder phase 2, at its very end, in the GMMN stage
def test_resume_is_exact_across_stages(tmp_path, monkeypatch, ae_full_run, stop):
    """--mode ae: an interruption anywhere (autoencoder phases or GMMN stage) resumes exactly."""
    with monkeypatch.context() as m:
        helpers._interrupt_at(m, stop)
        half = gmmn.main([*AE_ARGS, "--out", str(tmp_path)])
    assert half["interrupted"] and half["step"] == stop
    resumed = gmmn.main([*AE_ARGS, "--out", str(tmp_path), "--resume", "auto"])
    assert resumed["step"] == 10
    b = ckpt_io.load(tmp_path / "ckpt.pt", "gmmn")
    helpers.assert_same(ae_full_run["models"], b["models"], "models")
    helpers.assert_same(ae_full_run["optimizers"], b["optimizers"], "optimizers")


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(gmmn, tmp_path)
    assert set(helpers.sample_from(gmmn, out / "ckpt.pt", tmp_path)) == {"samples", "interpolation"}


def test_sample_autoencoder_mode(tmp_path):
    out, _, _ = helpers.dry_run(gmmn, tmp_path, "--mode", "ae")
    assert set(helpers.sample_from(gmmn, out / "ckpt.pt", tmp_path)) == {"samples", "interpolation"}


def test_sample_toy(tmp_path):
    out, _, _ = helpers.dry_run(gmmn, tmp_path, "--dataset", "grid25")
    assert set(helpers.sample_from(gmmn, out / "ckpt.pt", tmp_path)) == {"samples"}


def test_help(capsys):
    text = helpers.help_text(gmmn, capsys)
    assert "--mode" in text and "--bandwidth-set" in text and "--sqrt" in text


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(gmmn, ["--dry-run", "--dataset", "ring8", "--mode", "ae", "--out", str(tmp_path / "x")],
                               capsys, "--mode ae needs image data")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(gmmn, ["--dry-run", "--bandwidths", "2", "-1"], capsys, "--bandwidths")
    helpers.expect_usage_error(gmmn, ["--dataset", "nope"], capsys, "unknown dataset")


# ---- the paper's math ------------------------------------------------------------------------------

BANDS = [2.0, 5.0, 10.0]


def test_kernel_sum_equals_direct_computation():
    x, y = torch.randn(5, 3), torch.randn(4, 3)
    k = gmmn.kernel_sum(gmmn.sq_distances(x, y), BANDS)
    for i in range(5):
        for j in range(4):
            d2 = float(((x[i] - y[j]) ** 2).sum())
            direct = sum(math.exp(-d2 / (2 * s)) for s in BANDS)
            assert math.isclose(float(k[i, j]), direct, rel_tol=1e-5)


def test_mmd_matches_the_definition():
    """MMD² (biased) = mean k(x,x') - 2 mean k(x,y) + mean k(y,y'), computed pair by pair."""
    x, y = torch.randn(6, 2, dtype=torch.float64), torch.randn(5, 2, dtype=torch.float64) + 0.7

    def k(a, b):
        return sum(math.exp(-float(((a - b) ** 2).sum()) / (2 * s)) for s in BANDS)
    kxx = sum(k(a, b) for a in x for b in x) / 36
    kyy = sum(k(a, b) for a in y for b in y) / 25
    kxy = sum(k(a, b) for a in x for b in y) / 30
    assert math.isclose(float(gmmn.mmd2(x, y, BANDS)), kxx + kyy - 2 * kxy, rel_tol=1e-4)
    ux = sum(k(x[i], x[j]) for i in range(6) for j in range(6) if i != j) / 30
    uy = sum(k(y[i], y[j]) for i in range(5) for j in range(5) if i != j) / 20
    assert math.isclose(float(gmmn.mmd2(x, y, BANDS, unbiased=True)), ux + uy - 2 * kxy, rel_tol=1e-4)


def test_mmd_of_a_set_with_itself_is_zero():
    torch.manual_seed(0)
    x = torch.rand(200, 784)
    assert abs(float(gmmn.mmd2(x, x, gmmn.BANDWIDTHS[("mnist", "pixels")]))) < 1e-5
    # unbiased: two independent samples of one distribution give ~0, far below a shifted pair
    a, b = torch.randn(500, 2), torch.randn(500, 2)
    same = float(gmmn.mmd2(a, b, [1.0], unbiased=True))
    shifted = float(gmmn.mmd2(a, b + 1.0, [1.0], unbiased=True))
    assert abs(same) < 0.01 < shifted


def test_mmd_grows_as_one_set_shifts():
    torch.manual_seed(0)
    x = torch.randn(300, 2)
    values = [float(gmmn.mmd2(x, x + shift, BANDS)) for shift in (0.0, 0.5, 1.0, 2.0, 4.0)]
    assert values[0] < 1e-6
    assert all(a < b for a, b in zip(values, values[1:])), values


def test_gradient_flows_to_generator_and_moves_samples_towards_data():
    torch.manual_seed(0)
    G = gmmn.Generator(10, [32, 32], (2,), sigmoid=False)
    real = torch.randn(256, 2) * 0.3 + 1.0
    z = gmmn.sample_noise(256, 10, "cpu")
    loss = gmmn.objective(gmmn.mmd2(G(z), real, [1.0, 4.0]))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in G.parameters())
    opt = torch.optim.SGD(G.parameters(), lr=0.1, momentum=0.9)
    for _ in range(100):
        opt.zero_grad()
        gmmn.objective(gmmn.mmd2(G(gmmn.sample_noise(256, 10, "cpu")), real, [1.0, 4.0])).backward()
        opt.step()
    with torch.no_grad():
        after = gmmn.objective(gmmn.mmd2(G(z), real, [1.0, 4.0]))
        assert float(after) < 0.2 * float(loss)
        assert torch.allclose(G(z).mean(0), real.mean(0), atol=0.15)


def test_sqrt_objective_gradient_is_scaled_mmd_gradient():
    """d sqrt(L) = dL / (2 sqrt(L)), the official loss's gradient."""
    x = torch.randn(20, 3, requires_grad=True)
    y = torch.randn(30, 3) + 0.5
    (g_sq,) = torch.autograd.grad(gmmn.objective(gmmn.mmd2(x, y, BANDS), sqrt=False), x)
    m2 = gmmn.mmd2(x, y, BANDS)
    (g_root,) = torch.autograd.grad(gmmn.objective(m2, sqrt=True), x)
    assert torch.allclose(g_root, g_sq / (2 * m2.detach().sqrt()), atol=1e-6)


def test_sgd_with_lr_switch_takes_the_official_steps():
    """PyTorch SGD + set_lr_momentum == the official v <- m v - lr g; theta <- theta + v, across the switch."""
    args = gmmn.parse_args(["--switch-step", "4", "--lr", "2"])
    torch.manual_seed(0)
    target = torch.randn(5)
    theta = torch.zeros(5, requires_grad=True)
    opt = torch.optim.SGD([theta], lr=args.lr, momentum=args.momentum)
    ref, v = torch.zeros(5), torch.zeros(5)
    for t in range(1, 9):
        lr, m = gmmn.schedule(t, args)
        gmmn.set_lr_momentum(opt, lr, m)
        opt.zero_grad()
        (0.05 * ((theta - target) ** 2).sum()).backward()
        opt.step()
        v = m * v - lr * 0.1 * (ref - target)
        ref = ref + v
        assert torch.allclose(theta.detach(), ref, atol=1e-5), t


def test_schedule_follows_official_config():
    args = gmmn.parse_args(["--lr", "2"])
    assert gmmn.schedule(1, args) == (2.0, 0.9) and gmmn.schedule(9999, args) == (2.0, 0.9)
    lr, momentum = gmmn.schedule(10000, args)
    assert math.isclose(lr, 0.2) and math.isclose(momentum, 0.99)
    assert args.batch_size == 1000 and args.steps == 40000 and args.z_dim == 10
    assert [gmmn.ae_momentum(i, 3, args) for i in (1, 49, 50, 199, 200)] == [0.0, 0.0, 0.5, 0.5, 0.9]


def test_autoencoder_phases_train_the_right_layers_and_reduce_reconstruction_loss():
    torch.manual_seed(0)
    ae = gmmn.AutoEncoder((1, 4, 4), 12, 3, (0.0, 0.0))
    prototypes = (torch.rand(4, 1, 4, 4) > 0.5).float()  # 4 binary patterns: a 3-d code can tell them apart
    x = prototypes[torch.arange(64) % 4]
    for phase, trained in ((1, {"enc1", "dec2"}), (2, {"enc2", "dec1"}), (3, {"enc1", "enc2", "dec1", "dec2"})):
        ae.zero_grad(set_to_none=True)
        gmmn.ae_loss(ae, x, phase).backward()
        have = {name.split(".")[0] for name, p in ae.named_parameters() if p.grad is not None}
        assert have == trained, phase
    opt = torch.optim.SGD(ae.parameters(), lr=0.1, momentum=0.9)
    first = gmmn.ae_loss(ae, x, 3).item()
    for _ in range(400):
        opt.zero_grad()
        gmmn.ae_loss(ae, x, 3).backward()
        opt.step()
    assert gmmn.ae_loss(ae, x, 3).item() < 0.5 * first


# ---- the training loop -------------------------------------------------------------------------------


@pytest.fixture
def wired(monkeypatch):
    """train() with known data batches (one stream per iterate() call) and its nets as built (copies of
    their initial weights in G0 / AE0); G remembers (z, output, grad enabled) of every call."""
    w = SimpleNamespace(streams=[], G=None, G0=None, AE=None, AE0=None, seen=[])
    build = gmmn.build

    def recording_build(args, shape, kind):
        w.G, w.AE = build(args, shape, kind)
        w.G0, w.AE0 = copy.deepcopy(w.G), copy.deepcopy(w.AE)
        w.G.register_forward_hook(lambda m, inputs, out: w.seen.append(
            (inputs[0].detach().clone(), out.detach().clone(), torch.is_grad_enabled())))
        return w.G, w.AE
    monkeypatch.setattr(gmmn, "build", recording_build)

    def iterate(data, batch_size, device, value_range=(-1, 1), **kwargs):
        g, served = torch.Generator().manual_seed(len(w.streams)), []
        w.streams.append(served)

        def batches():
            while True:
                served.append(torch.rand(batch_size, *data.shape, generator=g))
                yield served[-1], torch.zeros(batch_size, dtype=torch.long)
        return batches()
    monkeypatch.setattr(datasets, "iterate", iterate)
    w.split = wiring.record_calls(monkeypatch, datasets, "split_held_out")
    return w


def mmd2_by_hand(x, y, sigmas):
    """Biased MMD² with k(a, b) = Σ_σ exp(−‖a − b‖² / (2σ)), pair by pair."""
    x, y = x.flatten(1), y.flatten(1)

    def k(a, b):
        d2 = ((a[:, None] - b[None]) ** 2).sum(-1)
        return sum(torch.exp(-d2 / (2 * s)) for s in sigmas)
    return k(x, x).mean() + k(y, y).mean() - 2 * k(x, y).mean()


def close(a, b, rel=2e-3):
    """Two lists of tensors are equal as one vector, to `rel` of b's norm: G's float32 gradient of sqrt(MMD²)
    loses ~1% of its precision in the first layers, whose share of the whole is small."""
    a, b = torch.cat([t.flatten() for t in a]).double(), torch.cat([t.flatten() for t in b]).double()
    return (a - b).norm() <= rel * b.norm()


def test_g_step_descends_sqrt_mmd_between_its_batch_and_a_data_batch(tmp_path, wired, steps):
    """One GMMN step against the hand-computed gradient of sqrt(MMD²) between G's batch and the data
    batch, with the pixel kernels σ ∈ {2, 5, 10, 20, 40, 80}; SGD's first step is −lr g with lr 2."""
    wiring.train_steps(gmmn, tmp_path, 1)
    (real,) = wired.streams[0]
    (z,) = [z for z, x, grad in wired.seen if grad]
    assert z.shape == (8, 10) and z.abs().max() <= 1 and z.min() < -0.5 < 0.5 < z.max()   # z ~ U[−1, 1]^10
    loss = mmd2_by_hand(wired.G0(z).double(), real.double(), [2, 5, 10, 20, 40, 80]).sqrt()
    expected = torch.autograd.grad(loss, list(wired.G0.parameters()))
    (step,) = steps
    assert step.owns(wired.G) and len(step.after) == len(expected)
    params = list(wired.G.parameters())
    assert close([step.grads[id(p)] for p in params], expected), "G's gradient is not that of sqrt(MMD²)"
    update = [p.detach() - p0.detach() for p, p0 in zip(params, wired.G0.parameters())]
    assert close(update, [-2.0 * g for g in expected]), "SGD's first step is not −2 g"


def test_sgd_lr_and_momentum_switch_take_the_official_steps(tmp_path, wired, steps):
    """SGD as the official optimiser, v ← m v − lr g, θ ← θ + v: lr 2 and momentum 0.9, then from
    --switch-step (here 2) lr 0.2 and momentum 0.99; each update checked against the recorded gradients."""
    wiring.train_steps(gmmn, tmp_path, 3, "--switch-step", "2")
    assert [type(s.opt) for s in steps] == [torch.optim.SGD] * 3
    schedule = [(2.0, 0.9), (0.2, 0.99), (0.2, 0.99)]
    assert [(s.settings[0]["lr"], s.settings[0]["momentum"]) for s in steps] == schedule
    before = {id(p): p0.detach() for p, p0 in zip(wired.G.parameters(), wired.G0.parameters())}
    v = {k: torch.zeros_like(p) for k, p in before.items()}
    for s, (lr, m) in zip(steps, schedule):
        for k in before:
            v[k] = m * v[k] - lr * s.grads[k]
            assert torch.allclose(s.after[k] - before[k], v[k], rtol=1e-4, atol=1e-6)
        before = s.after


def test_autoencoder_phases_losses_lrs_and_momentum_schedule(tmp_path, wired, steps):
    """--mode ae, stage 1: three phases of --ae-steps (here 200) SGD updates at lr 0.1, each with a fresh
    optimiser; phase 1 trains enc1/dec2 to reconstruct x, phase 2 enc2/dec1 to reconstruct the first
    layer's codes, phase 3 the whole net; the first update of each is −0.1 × the hand-computed gradient
    of its summed cross-entropy, clipped to --ae-max-grad-norm (0.5 here, so that it clips). Momentum:
    0.5 while pretraining; 0, 0.5 from update 50 and 0.9 from update 200 while fine-tuning."""
    wiring.train_steps(gmmn, tmp_path, 1, "--mode", "ae", "--ae-steps", "200", "--ae-batch-size", "4",
                       "--ae-dropout", "0", "0", "--ae-max-grad-norm", "0.5", "--log-every", "0")
    ae, ae0 = wired.AE, wired.AE0
    ae_steps = [s for s in steps if s.owns(ae)]
    assert len(ae_steps) == 600 and all(type(s.opt) is torch.optim.SGD for s in ae_steps)
    assert len({id(s.opt) for s in ae_steps}) == 3 and all(s.settings[0]["lr"] == 0.1 for s in ae_steps)
    momenta = [s.settings[0]["momentum"] for s in ae_steps]
    assert momenta == [0.5] * 400 + [0.0] * 49 + [0.5] * 150 + [0.9]
    batches = wired.streams[1]   # the autoencoder's stream: batches of --ae-batch-size
    assert batches[0].shape[0] == 4 and len(batches) == 600

    def bce(logits, target):
        return F.binary_cross_entropy_with_logits(logits, target, reduction="sum") / len(target)

    def loss(net, x, phase):
        x = x.flatten(1)
        h = torch.sigmoid(net.enc1(x))
        if phase == 1:
            return bce(net.dec2(h), x)
        if phase == 2:
            return bce(net.dec1(torch.sigmoid(net.enc2(h.detach()))), h.detach())
        return bce(net.dec2(torch.sigmoid(net.dec1(torch.sigmoid(net.enc2(h))))), x)

    names = [n for n, _ in ae.named_parameters()]
    state = {n: p.detach() for n, p in ae0.named_parameters()}
    trained = {1: {"enc1", "dec2"}, 2: {"enc2", "dec1"}, 3: {"enc1", "enc2", "dec1", "dec2"}}
    for phase in (1, 2, 3):
        first = 200 * (phase - 1)
        net = copy.deepcopy(ae0)
        net.load_state_dict(state)
        grads = torch.autograd.grad(loss(net, batches[first], phase), list(net.parameters()), allow_unused=True)
        norm = torch.cat([g.flatten() for g in grads if g is not None]).norm()
        assert norm > 0.5
        step = ae_steps[first]
        for n, p, g in zip(names, ae.parameters(), grads):
            if n.split(".")[0] not in trained[phase]:
                assert g is None and id(p) not in step.grads and torch.equal(step.after[id(p)], state[n]), n
                continue
            clipped = g * 0.5 / (norm + 1e-6)
            assert torch.allclose(step.grads[id(p)], clipped, rtol=1e-4, atol=1e-7), (phase, n)
            assert torch.allclose(step.after[id(p)] - state[n], -0.1 * clipped, rtol=1e-3, atol=1e-7), (phase, n)
        last = ae_steps[first + 199]
        state = {n: last.after[id(p)] for n, p in zip(names, ae.parameters())}
    for n, p in ae.named_parameters():   # the GMMN stage leaves the autoencoder as stage 1 left it
        assert torch.equal(p.detach(), state[n]), n


def test_gmmn_stage_learns_the_autoencoders_codes(tmp_path, wired, steps, monkeypatch):
    """--mode ae, stage 2: G's batch is compared with a batch of codes of training images under the
    trained autoencoder without dropout, with the code kernel σ = 1; G's first update is −2 × the
    gradient of sqrt(MMD²), and its lr / momentum schedule counts GMMN updates, not autoencoder ones."""
    compared = wiring.record_calls(monkeypatch, gmmn, "mmd2")
    wiring.train_steps(gmmn, tmp_path, 2, "--mode", "ae", "--ae-steps", "1", "--switch-step", "2")
    ae, G = wired.AE, wired.G
    train = wired.split[0][2][0]
    with torch.no_grad():
        codes = ae.eval().encode(train.images.float() / 255)
    g_steps = [s for s in steps if s.owns(G)]
    assert [s for s in steps if s.owns(ae)] == steps[:3] and g_steps == steps[3:]
    assert [(s.settings[0]["lr"], s.settings[0]["momentum"]) for s in g_steps] == [(2.0, 0.9), (0.2, 0.99)]
    z, x, _ = next(entry for entry in wired.seen if entry[2])   # G's first step
    assert x.shape == (8, 4)
    pair = compared[0][0][:2]   # MMD² is symmetric: G's batch may come first or second
    (real,) = [t.detach() for t in pair if not torch.equal(t.detach(), x)]
    assert len(real) == 8
    nearest_code = torch.cdist(real, codes, compute_mode="donot_use_mm_for_euclid_dist").min(1).values
    assert (nearest_code < 1e-6).all(), "the GMMN's data are not the autoencoder's codes"
    loss = mmd2_by_hand(wired.G0(z).double(), real.double(), [1.0]).sqrt()
    expected = torch.autograd.grad(loss, list(wired.G0.parameters()))
    params = list(G.parameters())
    assert close([g_steps[0].grads[id(p)] for p in params], expected), "G's gradient is not that of sqrt(MMD²)"
    assert close([g_steps[0].after[id(p)] - p0.detach() for p, p0 in zip(params, wired.G0.parameters())],
                 [-2.0 * g for g in expected])
