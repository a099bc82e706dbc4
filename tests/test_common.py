"""common/: metrics math, data sources, checkpoints, run set-up and failure modes."""
import argparse
import gzip
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import gan
from common import checkpoint as ckpt_io
from common import data as datasets
from common import metrics
from common import run as runlib
from tests import helpers
from tests.conftest import ROOT


# -- Fréchet distance ---------------------------------------------------------------------------

def _random_cov(d, gen):
    a = torch.randn(d, 2 * d, generator=gen, dtype=torch.float64)
    return (a @ a.T / (2 * d)).numpy()


def test_frechet_equal_covariances_is_mean_distance():
    gen = torch.Generator().manual_seed(0)
    mu1, mu2 = (torch.randn(6, generator=gen, dtype=torch.float64).numpy() for _ in range(2))
    cov = _random_cov(6, gen)
    assert math.isclose(metrics.frechet_distance(mu1, cov, mu2, cov), float(((mu1 - mu2) ** 2).sum()),
                        rel_tol=1e-9, abs_tol=1e-9)


def test_frechet_commuting_covariances_closed_form():
    gen = torch.Generator().manual_seed(1)
    q, _ = torch.linalg.qr(torch.randn(5, 5, generator=gen, dtype=torch.float64))
    a, b = torch.rand(5, generator=gen, dtype=torch.float64) + 0.1, torch.rand(5, generator=gen, dtype=torch.float64) + 0.1
    s1, s2 = (q * a) @ q.T, (q * b) @ q.T           # same eigenvectors: they commute
    mu1, mu2 = torch.zeros(5), torch.ones(5)
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert math.isclose(metrics.frechet_distance(mu1, s1, mu2, s2), expected, rel_tol=1e-9)


def test_frechet_is_symmetric_and_zero_on_identical_stats():
    gen = torch.Generator().manual_seed(2)
    f1, f2 = torch.randn(200, 8, generator=gen), torch.randn(200, 8, generator=gen) * 2 + 1
    (m1, s1), (m2, s2) = metrics.gaussian_stats(f1), metrics.gaussian_stats(f2)
    assert math.isclose(metrics.frechet_distance(m1, s1, m2, s2), metrics.frechet_distance(m2, s2, m1, s1), rel_tol=1e-10)
    assert abs(metrics.frechet_distance(m1, s1, m1, s1)) < 1e-10
    assert metrics.frechet_distance(m1, s1, m2, s2) > 1


# -- mode coverage --------------------------------------------------------------------------------

def test_mode_coverage_all_one_none():
    centers, std = datasets.toy_mixture("ring8")
    all_modes = centers.repeat(10, 1) + 0.5 * std * torch.randn(80, 2)
    r = metrics.mode_coverage(all_modes, centers, std)
    assert r["modes"] == 8 and r["hq"] == 1.0
    one_mode = centers[3] + 0.5 * std * torch.randn(100, 2)
    r = metrics.mode_coverage(one_mode, centers, std)
    assert r["modes"] == 1 and r["hq"] == 1.0 and r["counts"][3] == 100
    r = metrics.mode_coverage(torch.zeros(50, 2), centers, std)   # the centre of the ring: far from all modes
    assert r["modes"] == 0 and r["hq"] == 0.0


def test_mode_coverage_grid_half_quality():
    centers, std = datasets.toy_mixture("grid25")
    assert centers.shape == (25, 2) and std == 0.05
    near, far = centers.clone(), centers + 10 * std
    r = metrics.mode_coverage(torch.cat([near, far]), centers, std)
    assert r["modes"] == 25 and math.isclose(r["hq"], 0.5)


# -- Parzen window ---------------------------------------------------------------------------------

def test_parzen_single_sample_is_a_gaussian_density():
    s, x, sigma = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[0.0, 0.0, 0.0], [1.0, 1.0, 1.0]]), 0.7
    expected = torch.distributions.Normal(s, sigma).log_prob(x).sum(1).double()
    assert torch.allclose(metrics.parzen_log_likelihood(s, x, sigma), expected)


def test_parzen_of_gaussian_samples_matches_closed_form():
    """A KDE of N(0, t²I) samples with bandwidth σ tends to N(0, (t² + σ²)I); the expected test
    log-likelihood under it is −d/2 log(2π(t² + σ²)) − d t² / (2(t² + σ²))."""
    gen = torch.Generator().manual_seed(0)
    d, t, sigma = 2, 1.0, 0.5
    samples = t * torch.randn(20000, d, generator=gen)
    test = t * torch.randn(4000, d, generator=gen)
    v = t ** 2 + sigma ** 2
    expected = -d / 2 * math.log(2 * math.pi * v) - d * t ** 2 / (2 * v)
    ll = metrics.parzen_log_likelihood(samples, test, sigma, batch=1000)
    assert abs(float(ll.mean()) - expected) < 0.05


def test_parzen_evaluate_picks_sigma_on_validation():
    gen = torch.Generator().manual_seed(0)
    samples, valid, test = (0.3 * torch.randn(n, 2, generator=gen) for n in (3000, 500, 500))
    r = metrics.parzen_evaluate(samples, valid, test, sigmas=[0.01, 0.1, 10.0])
    assert r["sigma"] == 0.1 and r["se"] > 0
    assert r["ll"] > float(metrics.parzen_log_likelihood(samples, test, 10.0).mean())


# -- data -----------------------------------------------------------------------------------------

def _args(**kw):
    base = dict(dataset="fake", data_root="/nonexistent", image_size=16, download=False, seed=0)
    return type("Args", (), {**base, **kw})()


def test_fake_is_deterministic_and_iterates_in_range():
    a, b = datasets.load(_args()), datasets.load(_args())
    assert torch.equal(a.images, b.images) and a.shape == (3, 16, 16) and a.num_classes == 10
    x, y = next(datasets.iterate(a, 5, "cpu"))
    assert x.shape == (5, 3, 16, 16) and x.min() >= -1 and x.max() <= 1 and y.shape == (5,)
    x, _ = next(datasets.iterate(a, 5, "cpu", value_range=(0, 1)))
    assert x.min() >= 0 and x.max() <= 1


def test_toy_batches_come_from_the_mixture():
    data = datasets.load(_args(dataset="grid25"))
    x, y = next(datasets.iterate(data, 4000, "cpu"))
    assert x.shape == (4000, 2)
    # a 2D Gaussian puts 1 − exp(−9/2) ≈ 98.9% of its mass within 3σ of its mean
    assert abs(metrics.mode_coverage(x, data.centers, data.std)["hq"] - (1 - math.exp(-4.5))) < 0.01
    assert torch.allclose((x - data.centers[y]).std(), torch.tensor(0.05), atol=0.005)


def test_shards_are_disjoint_under_torchrun():
    data = datasets.load(_args())
    data.images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 3, 16, 16).contiguous()
    seen = [set(next(datasets.iterate(data, 200, "cpu", value_range=(0, 255), rank=r, world_size=2))[0][:, 0, 0, 0].int().tolist())
            for r in (0, 1)]
    assert seen[0] == {0, 2, 4, 6, 8} and seen[1] == {1, 3, 5, 7, 9}


def _write_idx(path, array):
    header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(np.uint8).tobytes())


def test_idx_folder_loads_like_mnist(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (20, 28, 28))
    _write_idx(tmp_path / "t10k-images-idx3-ubyte.gz", images)
    _write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.arange(20) % 10)
    data = datasets.load(_args(dataset=str(tmp_path), image_size=28))
    assert data.images.shape == (20, 1, 28, 28) and data.num_classes == 10
    assert torch.equal(data.images[:, 0], torch.from_numpy(images).to(torch.uint8))
    assert datasets.load(_args(dataset=str(tmp_path), image_size=32)).shape == (1, 32, 32)


def test_flat_image_folder(tmp_path):
    from PIL import Image
    for i in range(3):
        Image.new("RGB", (40, 30), (i * 80, 0, 0)).save(tmp_path / f"{i}.png")
    data = datasets.load(_args(dataset=str(tmp_path), image_size=16))
    x, _ = next(datasets.iterate(data, 2, "cpu", workers=0))
    assert x.shape == (2, 3, 16, 16) and x.min() >= -1 and x.max() <= 1


def test_bad_datasets_say_what_to_do(tmp_path):
    with pytest.raises(runlib.UsageError, match="unknown dataset 'cifar11'.*cifar10"):
        datasets.load(_args(dataset="cifar11"))
    with pytest.raises(runlib.UsageError, match="mnist is not under .*--download"):
        datasets.load(_args(dataset="mnist", data_root=str(tmp_path)))
    with pytest.raises(runlib.UsageError, match="does not exist"):
        datasets.load(_args(dataset=str(tmp_path / "missing") + "/"))


# -- checkpoints and failure modes ------------------------------------------------------------------

def test_checkpoint_atomic_save_and_checks(tmp_path):
    path = tmp_path / "ckpt.pt"
    ckpt_io.save({"script": "gan", "step": 3, "args": {}, "w": torch.ones(2)}, path)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt.pt"]
    assert ckpt_io.load(path, "gan")["step"] == 3
    with pytest.raises(ckpt_io.CheckpointError, match="written by gan.py, not dcgan.py"):
        ckpt_io.load(path, "dcgan")
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(ckpt_io.CheckpointError, match="truncated or corrupt"):
        ckpt_io.load(path, "gan")
    with pytest.raises(ckpt_io.CheckpointError, match="does not exist"):
        ckpt_io.load(tmp_path / "none.pt", "gan")


def test_bad_checkpoints_fail_at_start_and_overwrite_nothing(tmp_path, capsys):
    run_dir = tmp_path / "run"
    helpers.dry_run(gan, run_dir)
    ckpt = run_dir / "dry" / "ckpt.pt"
    before = {p: p.read_bytes() for p in (run_dir / "dry").iterdir() if p.is_file()}
    foreign = tmp_path / "foreign.pt"
    ckpt_io.save({"script": "wgan_gp", "step": 1}, foreign)
    helpers.expect_usage_error(gan, ["--dry-run", "--out", str(run_dir / "dry"), "--resume", str(foreign)],
                               capsys, "written by wgan_gp.py")
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(ckpt.read_bytes()[: ckpt.stat().st_size // 2])
    helpers.expect_usage_error(gan, ["--dry-run", "--out", str(run_dir / "dry"), "--resume", str(truncated)],
                               capsys, "truncated or corrupt")
    helpers.expect_usage_error(gan, ["--sample", str(truncated)], capsys, "truncated or corrupt")
    after = {p: p.read_bytes() for p in (run_dir / "dry").iterdir() if p.is_file()}
    assert before == after


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_cuda_without_gpu_is_a_clear_error(tmp_path, capsys):
    helpers.expect_usage_error(gan, ["--dry-run", "--cuda", "--out", str(tmp_path / "x")], capsys, "CUDA is not available")
    assert not (tmp_path / "x").exists()


def test_missing_data_with_downloads_off(tmp_path, capsys):
    helpers.expect_usage_error(gan, ["--dataset", "mnist", "--data-root", str(tmp_path), "--no-download",
                                     "--out", str(tmp_path / "x")], capsys, "mnist is not under")
    assert not (tmp_path / "x").exists()


def test_nan_loss_stops_and_names_last_good_checkpoint(tmp_path, capsys, monkeypatch):
    calls = {"n": 0}
    real_loss = gan.d_loss

    def d_loss(real, fake):
        calls["n"] += 1
        loss = real_loss(real, fake)
        return loss * float("nan") if calls["n"] >= 3 else loss
    monkeypatch.setattr(gan, "d_loss", d_loss)
    err = helpers.expect_usage_error(gan, ["--dry-run", "--steps", "6", "--log-every", "1", "--ckpt-every", "2",
                                           "--out", str(tmp_path / "r")], capsys, "became nan at step 3")
    assert "ckpt.pt (step 2)" in err
    assert ckpt_io.load(tmp_path / "r" / "ckpt.pt", "gan")["step"] == 2


def test_resume_auto_without_checkpoint_starts_fresh(tmp_path):
    summary = gan.main(["--dry-run", "--out", str(tmp_path / "r"), "--resume", "auto"])
    assert summary["step"] == 4
    args = json.loads((tmp_path / "r" / "args.json").read_text())
    assert args["steps"] == 4 and args["dataset"] == "fake"


def test_dry_run_defaults_yield_to_explicit_flags():
    args = gan.parse_args(["--dry-run", "--steps", "7", "--batch-size=3"])
    assert (args.steps, args.batch_size, args.dataset) == (7, 3, "fake")


def test_scatter_image_marks_points():
    img = runlib.scatter_image(torch.tensor([[0.0, 0.0]]), real=torch.tensor([[1.0, 1.0]]), lim=1.0, size=11)
    assert img.shape == (3, 11, 11) and img[:, 5, 5].sum() == 0 and img[:, 10, 0].sum() == 3
    assert img[0, 0, 10] > 0.5 and img[1, 0, 10] < 0.5    # red dot at the top right


class _Writer:
    """The part of a SummaryWriter that Run uses, recording the scalars."""

    def __init__(self):
        self.scalars = []

    def add_scalar(self, tag, value, step):
        self.scalars.append((tag, step))

    def add_image(self, tag, image, step):
        pass


def test_end_step_samples_evaluates_saves_and_stops(tmp_path):
    args = argparse.Namespace(steps=7, log_every=0, sample_every=3, eval_every=2, ckpt_every=5)
    writer = _Writer()
    r = runlib.Run(args, "test", torch.device("cpu"), 0, 1, tmp_path, writer)
    calls = {"samples": [], "evaluate": [], "state": []}

    def samples():
        calls["samples"].append(step)
        return {"grid": (torch.rand(4, 1, 2, 2) * 2 - 1, 2)}

    def evaluate():
        calls["evaluate"].append(step)
        x = torch.randn(10, requires_grad=True)   # an evaluation may train: gradients are on
        x.square().sum().backward()
        return {} if step == 2 else {"metric/score": float(step)}

    def state():
        calls["state"].append(step)
        return {"models": {}}

    torch.manual_seed(0)
    drawn = []
    for step in range(1, args.steps + 1):
        drawn.append(torch.rand(()).item())   # the training stream
        assert not r.end_step(step, {"loss/x": torch.tensor(1.0)}, samples=samples, evaluate=evaluate, state=state)
    assert calls == {"samples": [3, 6, 7], "evaluate": [2, 4, 6, 7], "state": [5, 7]}
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == [f"grid-000000{s}.png" for s in (3, 6, 7)]
    assert [s for tag, s in writer.scalars if tag == "metric/score"] == [4, 6, 7]   # {} at step 2 logs nothing
    assert r.metrics == {"metric/score": 7.0}
    assert ckpt_io.load(tmp_path / "ckpt.pt", "test")["step"] == 7
    # samples() and evaluate() drew random numbers on side streams: training drew what it draws alone
    torch.manual_seed(0)
    assert drawn == [torch.rand(()).item() for _ in range(args.steps)]

    r = runlib.Run(args, "test", torch.device("cpu"), 0, 1, tmp_path / "stopped", _Writer())
    step = 4
    r.stop_requested = True   # as a signal sets it
    assert r.end_step(step, {"loss/x": 1.0}, samples=samples, evaluate=evaluate, state=state)
    assert ckpt_io.load(tmp_path / "stopped" / "ckpt.pt", "test")["step"] == 4   # a checkpoint before stopping
    assert calls["evaluate"][-1] == 4 and calls["samples"][-1] == 7            # step 4 is no sample step


def test_eval_mode_restores_each_flag():
    a, b = torch.nn.Dropout(), torch.nn.Dropout().eval()
    with runlib.eval_mode(a, b):
        assert not a.training and not b.training
    assert a.training and not b.training


# -- torchrun ----------------------------------------------------------------------------------------

def test_torchrun_two_cpu_processes(tmp_path):
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(ROOT / "gan.py"), "--dry-run", "--steps", "4", "--out", str(out)]
    proc = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert len(list(out.glob("events.out.tfevents.*"))) == 1
    summary = json.loads((out / "summary.json").read_text())
    assert summary["step"] == 4 and all(math.isfinite(v) for v in summary["losses"].values())
    state = ckpt_io.load(out / "ckpt.pt", "gan")
    assert len(state["rng"]["ranks"]) == 2
    assert proc.stdout.count("done:") == 1   # only rank 0 reports
