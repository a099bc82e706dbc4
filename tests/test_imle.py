import copy
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import imle
from common import checkpoint as ckpt_io
from tests import helpers, wiring


def brute_force_nearest(data, samples):
    d = ((data[:, None, :] - samples[None, :, :]) ** 2).sum(-1)
    return d.min(1)


def test_nearest_samples_equals_brute_force():
    torch.manual_seed(0)
    data, samples = torch.randn(37, 5, dtype=torch.float64), torch.randn(101, 5, dtype=torch.float64)
    d2, idx = brute_force_nearest(data, samples)
    for chunk in (1000, 101, 37, 16, 7, 1):  # one block; blocks splitting the samples, the data, both
        dist, found = imle.nearest_samples(data, samples, chunk)
        assert torch.equal(found, idx), chunk
        assert torch.allclose(dist ** 2, d2), chunk


def test_nearest_samples_picks_the_lower_index_on_ties():
    data = torch.tensor([[0.0, 0.0]])
    samples = torch.tensor([[5.0, 5.0], [1.0, 0.0], [0.0, 1.0], [1.0, 0.0]])
    for chunk in (4, 2, 1):
        dist, idx = imle.nearest_samples(data, samples, chunk)
        assert int(idx) == 1 and float(dist) == 1.0


class Recorder(nn.Module):
    """A fixed 'generator' x = 2 z that remembers every z it was given."""

    def __init__(self, z_dim):
        super().__init__()
        self.z_dim, self.seen = z_dim, []

    def forward(self, z):
        self.seen.append(z.clone())
        return 2 * z


def test_match_gives_every_point_the_z_of_its_nearest_sample():
    torch.manual_seed(0)
    data = torch.randn(23, 3) * 2
    for chunk in (10_000, 24, 5):  # all samples in one block, or streamed in blocks
        G = Recorder(3)
        z, dist = imle.match(G, data, m=96, batch=8, chunk=chunk, jitter=0.0)
        drawn = torch.cat(G.seen)
        assert len(drawn) == 96 and all(len(s) == 8 for s in G.seen)
        d2, idx = brute_force_nearest(data, 2 * drawn)
        assert torch.equal(z, drawn[idx]), chunk
        assert torch.allclose(dist ** 2, d2, atol=1e-4), chunk
    jittered, _ = imle.match(Recorder(3), data, m=96, batch=8, chunk=24, jitter=0.01)
    assert jittered.shape == (23, 3)


def test_training_pulls_matched_samples_to_the_data():
    """Algorithm 1 on a 2D toy: after some inner steps, data points are nearer to their nearest samples."""
    torch.manual_seed(0)
    data = torch.tensor([[2.0, 2.0], [-2.0, 2.0], [2.0, -2.0], [-2.0, -2.0]]).repeat(16, 1) + 0.05 * torch.randn(64, 2)
    G = imle.MLPGenerator(8, [32, 32])
    opt = torch.optim.Adam(G.parameters(), lr=1e-2, betas=(0.5, 0.999))
    z, before = imle.match(G, data, m=640, batch=64, chunk=256, jitter=0.01)
    for epoch in range(30):
        if epoch % 5 == 0:
            z, _ = imle.match(G, data, m=640, batch=64, chunk=256, jitter=0.01)
        for idx in torch.randperm(64).split(16):
            opt.zero_grad()
            imle.imle_loss(G(z[idx]), data[idx]).backward()
            opt.step()
    _, after = imle.match(G, data, m=640, batch=64, chunk=256, jitter=0.0)
    assert float(after.mean()) < 0.3 * float(before.mean())


def test_reference_generator_makes_28x28_images():
    G = imle.ConvGenerator(64, [1024, 128, 64], 1)
    with torch.no_grad():
        x = G(torch.randn(3, 64))
    assert x.shape == (3, 1, 28, 28) and float(x.min()) >= 0 and float(x.max()) <= 1
    assert not any(m.bias is not None for m in G.modules() if isinstance(m, nn.ConvTranspose2d))


def test_defaults_follow_reference_setup():
    args = imle.parse_args([])
    assert (args.batch_size, args.staleness, args.factor, args.jitter) == (64, 5, 10, 0.01)
    assert (args.beta1, args.beta2, args.weight_decay) == (0.5, 0.999, 1e-5)
    assert args.z_dim is None and args.lr is None  # 64 and 1e-3 for images, chosen once the data is known


def test_dry_run(tmp_path):
    out, summary, state = helpers.dry_run(imle, tmp_path)
    assert math.isfinite(summary["metrics"]["metric/parzen_ll"])
    assert summary["metrics"]["metric/nn_dist"] > 0
    assert state["matching"]["z"].shape == (480, 8)  # 512 fake images minus 32 held out, dry-run z_dim 8


def test_dry_run_toy(tmp_path):
    out, summary, state = helpers.dry_run(imle, tmp_path, "--dataset", "ring8")
    helpers.assert_mode_metrics(summary["metrics"], 8, 2500)   # the PacGAN protocol: 2500 samples


def test_resume_is_exact(tmp_path, monkeypatch):
    helpers.assert_resume_exact(imle, tmp_path, monkeypatch, [], state_keys=("models", "optimizers", "matching"))


def test_resume_is_exact_across_rematching(tmp_path, monkeypatch):
    """2 steps per epoch and a new search every epoch: the interruption falls mid-epoch, between searches,
    and the resumed run must carry on with the saved matched z's and data order."""
    args = ["--dataset", "grid25", "--toy-points", "16", "--batch-size", "8", "--staleness", "1"]
    a, b = helpers.assert_resume_exact(imle, tmp_path, monkeypatch, args, n=3,
                                       state_keys=("models", "optimizers", "matching"))
    assert a["matching"]["z"].shape == (16, 8)


def test_sample(tmp_path):
    out, _, _ = helpers.dry_run(imle, tmp_path)
    assert set(helpers.sample_from(imle, out / "ckpt.pt", tmp_path)) == {"samples", "interpolation"}


def test_sample_toy(tmp_path):
    out, _, _ = helpers.dry_run(imle, tmp_path, "--dataset", "grid25")
    assert set(helpers.sample_from(imle, out / "ckpt.pt", tmp_path)) == {"samples"}


def test_help(capsys):
    text = helpers.help_text(imle, capsys)
    assert "--staleness" in text and "--factor" in text and "--nn-chunk" in text


def test_bad_input(tmp_path, capsys):
    helpers.expect_usage_error(imle, ["--dry-run", "--image-size", "32", "--out", str(tmp_path / "x")], capsys, "28x28")
    assert not (tmp_path / "x").exists()
    helpers.expect_usage_error(imle, ["--dry-run", "--dataset", "ring8", "--toy-points", "4"], capsys, "smaller than --batch-size")
    helpers.expect_usage_error(imle, ["--dry-run", "--staleness", "0"], capsys, "--staleness")
    helpers.expect_usage_error(imle, ["--dataset", "nope"], capsys, "unknown dataset")
    helpers.expect_usage_error(imle, ["--sample", str(tmp_path / "missing.pt")], capsys, "does not exist")


# ------------------------------------------------------------------------------------------------
# The training loop: the matching, how often it is redone, the loss on matched pairs, the optimizer
# ------------------------------------------------------------------------------------------------


@pytest.fixture
def wired(monkeypatch):
    """train() with its G as built (G0: a copy of its initial weights), remembering (z, output, grad
    enabled) of every call of G and whether G was in training mode, and the training set {x_i} it built."""
    w = SimpleNamespace(G=None, G0=None, seen=[], training=[])
    build = imle.build

    def recording_build(args, shape, kind):
        w.G = build(args, shape, kind)
        w.G0 = copy.deepcopy(w.G)

        def hook(m, inputs, out):
            w.seen.append((inputs[0].detach().clone(), out.detach().clone(), torch.is_grad_enabled()))
            w.training.append(m.training)
        w.G.register_forward_hook(hook)
        return w.G
    monkeypatch.setattr(imle, "build", recording_build)
    w.points = wiring.record_calls(monkeypatch, imle, "training_set")
    return w


def rows_of(batch, pool):
    """Index in `pool` of each row of `batch` (every row must be one of pool's)."""
    d = torch.cdist(batch.flatten(1), pool.flatten(1), compute_mode="donot_use_mm_for_euclid_dist")
    assert (d.min(1).values == 0).all(), "a row that is not in the pool"
    return d.argmin(1)


def test_every_data_point_gets_the_z_of_its_nearest_sample(tmp_path, wired):
    """Algorithm 1's search as train() runs it: m = factor × N samples G(z), z ~ N(0, I) (480 training
    images, factor 2: 960), and each data point's matched z is the z of the sample nearest to it (the
    paper's direction: a sample for every data point), plus N(0, 0.01²) jitter."""
    wiring.train_steps(imle, tmp_path, 1)
    searched = []
    for (z, x, grad), training in zip(wired.seen, wired.training):
        if grad:
            break
        assert training, "the reference code draws its samples with G in training mode"
        searched.append((z, x))
    z = torch.cat([z for z, _ in searched])
    samples = torch.cat([x for _, x in searched]).flatten(1)
    assert z.shape == (960, 8) and abs(z.mean()) < 0.1 and abs(z.std() - 1) < 0.1
    points = wired.points[0][2].flatten(1)
    assert len(points) == 480
    nearest = torch.cdist(points.double(), samples.double()).argmin(1)
    matched = ckpt_io.load(tmp_path / "wired" / "ckpt.pt", "imle")["matching"]["z"]
    jitter = matched - z[nearest]
    assert matched.shape == (480, 8)
    assert abs(jitter.mean()) < 1e-3 and 0.0095 < jitter.std() < 0.0105, "not the nearest sample's z + jitter"


def test_g_step_descends_the_squared_error_of_matched_pairs(tmp_path, wired, steps):
    """One step against the hand-computed gradient of mean ‖x_i − G(z_σ(i))‖² over a minibatch of
    (data point, matched z) pairs; Adam (β 0.5, 0.999, weight decay 1e-5) at lr 1e-3 for images: its first
    step is −lr sign(g + 1e-5 θ)."""
    wiring.train_steps(imle, tmp_path, 1)
    matched = ckpt_io.load(tmp_path / "wired" / "ckpt.pt", "imle")["matching"]["z"]
    (z, _, _), = [entry for entry in wired.seen if entry[2]]
    i = rows_of(z, matched)
    assert len(i) == 8 and len(set(i.tolist())) == 8
    points = wired.points[0][2]
    G, G0 = wired.G, wired.G0
    loss = F.mse_loss(G0(z), points[i])
    expected = torch.autograd.grad(loss, list(G0.parameters()))
    (step,) = steps
    assert step.settings[0]["lr"] == 1e-3 and step.settings[0]["betas"] == (0.5, 0.999)
    assert step.settings[0]["weight_decay"] == 1e-5 and len(step.after) == len(expected)
    for p, p0, g in zip(G.parameters(), G0.parameters(), expected):
        assert torch.allclose(step.grads[id(p)], g, rtol=1e-4, atol=1e-9), "not the matched pairs' squared error"
        update = wiring.adam_first_update(1e-3, g + 1e-5 * p0.detach())
        assert torch.allclose(p.detach() - p0.detach(), update, atol=1e-7)


def test_matching_is_redone_every_staleness_epochs_and_each_epoch_visits_every_pair(
        tmp_path, wired, steps, monkeypatch):
    """16 toy points, batch 8 (2 steps an epoch), --staleness 2: searches before steps 1 and 5 (epochs 0
    and 2); every epoch trains on each data point's matched z exactly once, in a fresh order. The toys'
    lr is 1e-2."""
    searches = []
    match = imle.match

    def recording_match(*args, **kwargs):
        searches.append((len(steps), match(*args, **kwargs)))
        return searches[-1][1]
    monkeypatch.setattr(imle, "match", recording_match)
    wiring.train_steps(imle, tmp_path, 6, "--dataset", "ring8", "--toy-points", "16", "--batch-size", "8",
                       "--staleness", "2")
    assert [taken for taken, _ in searches] == [0, 4]
    fed = [z for z, x, grad in wired.seen if grad]
    assert len(fed) == 6 and all(s.settings[0]["lr"] == 1e-2 for s in steps)
    orders = []
    for epoch, (z_matched, _) in zip(range(3), [searches[0][1], searches[0][1], searches[1][1]]):
        orders.append(rows_of(torch.cat(fed[2 * epoch:2 * epoch + 2]), z_matched).tolist())
        assert sorted(orders[-1]) == list(range(16)), f"epoch {epoch} does not visit every pair once"
    assert orders[0] != orders[1], "a fresh order of the pairs every epoch"
