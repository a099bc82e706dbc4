"""common.metrics: FID / IS / KID / precision-recall math, the FID Inception network and its input pipeline,
the scripts' evaluate(), the command line (evaluate.py), and (with the real weights and CIFAR-10) published numbers."""
import math
import os
import re
import subprocess
import sys
from argparse import Namespace
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from common import data as datasets
from common import metrics
import evaluate
from tests.conftest import ROOT


def _stats(n, d, seed, scale=1.0, shift=0.0):
    g = torch.Generator().manual_seed(seed)
    f = torch.randn(n, d, generator=g, dtype=torch.float64) @ torch.randn(d, d, generator=g, dtype=torch.float64)
    return metrics.gaussian_stats(f * scale + shift)


def random_state_dict(net, seed=0):
    """Random weights that keep activations O(1) through the 94 conv layers (He init, BatchNorm near identity)."""
    g = torch.Generator().manual_seed(seed)
    state = {}
    for k, v in net.state_dict().items():
        if not v.is_floating_point():  # num_batches_tracked
            state[k] = v.clone()
            continue
        r = torch.randn(v.shape, generator=g)
        if k.endswith("conv.weight"):
            state[k] = r * (2 / v[0].numel()) ** 0.5
        elif k.endswith(("bn.weight", "running_var")):
            state[k] = 1 + 0.1 * r.abs()
        elif k == "fc.weight":
            state[k] = r / 2048 ** 0.5
        else:  # BatchNorm bias and running mean, fc bias
            state[k] = 0.1 * r
    return state


@pytest.fixture(scope="module")
def fid_net():
    net = metrics.fid_inception_net()
    net.load_state_dict(random_state_dict(net))
    return net


class TinyFeatures(torch.nn.Module):
    """Stands in for the Inception network where only the plumbing is tested: (pool3-like, logits) of its input."""

    def __init__(self):
        super().__init__()
        self.fc = torch.nn.Linear(48, 10)
        with torch.no_grad():
            self.fc.weight.copy_(torch.randn(10, 48, generator=torch.Generator().manual_seed(0)) * 10)

    def forward(self, x):
        assert x.shape[1:] == (3, 299, 299) and x.dtype == torch.float32 and -1.01 < float(x.min())
        f = F.adaptive_avg_pool2d(x, 4).flatten(1)
        return f, self.fc(f)


# -- Fréchet distance ---------------------------------------------------------------------------

def test_frechet_matches_scipy_sqrtm():
    linalg = pytest.importorskip("scipy.linalg")
    (m1, s1), (m2, s2) = _stats(600, 128, 0), _stats(600, 128, 1, scale=0.7, shift=0.3)
    covmean = linalg.sqrtm(s1 @ s2).real
    expected = float(((m1 - m2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))
    assert math.isclose(metrics.frechet_distance(m1, s1, m2, s2), expected, rel_tol=1e-9)


def test_frechet_closed_forms_symmetry_and_identity():
    (m1, s1), (m2, s2) = _stats(500, 96, 2), _stats(500, 96, 3, scale=1.5, shift=-0.2)
    assert math.isclose(metrics.frechet_distance(m1, s1, m2, s1), float(((m1 - m2) ** 2).sum()), rel_tol=1e-9)
    assert math.isclose(metrics.frechet_distance(m1, s1, m2, s2), metrics.frechet_distance(m2, s2, m1, s1),
                        rel_tol=1e-9)
    assert abs(metrics.frechet_distance(m1, s1, m1, s1)) < 1e-10
    g = torch.Generator().manual_seed(4)
    a, b = torch.rand(64, generator=g, dtype=torch.float64), torch.rand(64, generator=g, dtype=torch.float64)
    a[:8] = 0  # a singular covariance (fewer samples than dimensions): the eigh path instead of Cholesky
    expected = float(((m1[:64] - m2[:64]) ** 2).sum() + ((a.sqrt() - b.sqrt()) ** 2).sum())
    got = metrics.frechet_distance(m1[:64], torch.diag(a), m2[:64], torch.diag(b))
    assert math.isclose(got, expected, rel_tol=1e-9)


# -- IS, KID, precision / recall ------------------------------------------------------------------

def test_inception_score_uniform_and_one_hot():
    assert metrics.inception_score(torch.zeros(100, 1008)) == pytest.approx((1.0, 0.0), abs=1e-12)
    for k in (1, 5, 10):
        logits = torch.full((200, 1008), -1e4)
        logits[torch.arange(200), torch.arange(200) % k] = 1e4  # p(y|x) exactly one-hot: 0 log 0 must give 0
        mean, std = metrics.inception_score(logits)
        assert math.isfinite(mean) and mean == pytest.approx(k, rel=1e-12) and std == pytest.approx(0, abs=1e-9)


def _kid_loop(x, y):
    """Unbiased MMD² (the KID estimator), written out element by element."""
    m, d = len(x), x.shape[1]
    k = lambda a, b: (float(a @ b) / d + 1) ** 3  # noqa: E731
    xx = sum(k(x[i], x[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    yy = sum(k(y[i], y[j]) for i in range(m) for j in range(m) if i != j) / (m * (m - 1))
    return xx + yy - 2 * sum(k(x[i], y[j]) for i in range(m) for j in range(m)) / m ** 2


def test_kid_matches_a_direct_loop_on_the_same_subsets():
    g = torch.Generator().manual_seed(5)
    f1 = torch.randn(30, 6, generator=g, dtype=torch.float64)
    f2 = torch.randn(25, 6, generator=g, dtype=torch.float64) + 0.3
    mean, std = metrics.kid(f1, f2, subsets=3, subset_size=20, seed=7)
    sub = torch.Generator().manual_seed(7)  # the subsets kid() draws: a randperm of each set in turn
    ref = [_kid_loop(f1[torch.randperm(30, generator=sub)[:20]], f2[torch.randperm(25, generator=sub)[:20]])
           for _ in range(3)]
    ref = torch.tensor(ref, dtype=torch.float64)
    assert mean == pytest.approx(float(ref.mean()), rel=1e-10)
    assert std == pytest.approx(float(ref.std(correction=0)), rel=1e-8)
    sub = torch.Generator().manual_seed(0)  # subset_size clips to min(n1, n2) = 25; all of f2, in some order
    x, y = f1[torch.randperm(30, generator=sub)[:25]], f2[torch.randperm(25, generator=sub)]
    assert metrics.kid(f1, f2, subsets=1)[0] == pytest.approx(_kid_loop(x, y), rel=1e-10)


def test_kid_of_a_set_and_its_permutation_is_near_zero():
    g = torch.Generator().manual_seed(6)
    f = torch.rand(2000, 16, generator=g) ** 2
    same, same_std = metrics.kid(f, f[torch.randperm(2000, generator=g)], subsets=20, subset_size=200)
    shifted, _ = metrics.kid(f, f + 0.05, subsets=20, subset_size=200)
    assert abs(same) < 3 * same_std and abs(same) < 0.1 * shifted


def test_precision_recall():
    g = torch.Generator().manual_seed(8)
    wide = torch.randn(400, 8, generator=g)
    assert metrics.precision_recall(wide, wide.clone(), batch=128) == (1.0, 1.0)
    precision, recall = metrics.precision_recall(wide, 0.05 * torch.randn(400, 8, generator=g), batch=128)
    assert precision > 0.9 and recall < 0.2


# -- the network ----------------------------------------------------------------------------------

def test_network_layout_and_strict_torchvision_load():
    from torchvision.models import Inception3
    net = metrics.fid_inception_net()
    assert len(net.state_dict()) == 566 and tuple(net.fc.weight.shape) == (1008, 2048)
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False)
    assert net.load_state_dict(random_state_dict(tv), strict=True)  # torchvision's layout loads strictly
    assert not net.training and not any(p.requires_grad for p in net.parameters())


def test_feature_shapes_and_unbiased_logits(fid_net):
    x = torch.randint(0, 256, (2, 3, 32, 32), dtype=torch.uint8, generator=torch.Generator().manual_seed(9))
    pool3, logits = metrics.inception_features([x[:1], x[1:]], net=fid_net)
    assert pool3.shape == (2, 2048) and logits.shape == (2, 1008) and pool3.dtype == torch.float32
    assert bool((pool3 >= 0).all())  # after ReLU and average pooling
    torch.testing.assert_close(logits, pool3 @ fid_net.fc.weight.T)


def test_tf_pooling_differs_from_torchvision_and_the_rest_is_the_same(fid_net):
    from torchvision.models import Inception3
    tv = Inception3(num_classes=1008, aux_logits=False, init_weights=False).eval()
    tv.load_state_dict(fid_net.state_dict())
    x = torch.randn(1, 3, 139, 139, generator=torch.Generator().manual_seed(10))  # 3x3 maps in Mixed_7b/c
    with torch.no_grad():
        pool3, logits = fid_net(x)
        plain = tv(x)
        assert (logits + fid_net.fc.bias - plain).abs().max() > 1e-2  # the TF pooling matters
        blocks = [m for m in fid_net.modules() if hasattr(m, "pool")]
        assert len(blocks) == 9
        try:  # with torchvision's pooling put back, the rewritten blocks compute what torchvision's do
            for m in blocks:
                m.pool = lambda t: F.avg_pool2d(t, 3, stride=1, padding=1)
            torch.testing.assert_close(fid_net(x)[1] + fid_net.fc.bias, plain, rtol=1e-4, atol=1e-4)
        finally:
            for m in blocks:
                m.pool = metrics._TF_MAX_POOL if m is fid_net.Mixed_7c else metrics._TF_AVG_POOL


# -- input pipeline -------------------------------------------------------------------------------

def test_tf1_resize():
    out = metrics.resize_tf1(torch.tensor([[[[0.0, 10.0]]]]), 4)
    torch.testing.assert_close(out, torch.tensor([0.0, 5.0, 10.0, 10.0]).expand(1, 1, 4, 4))
    x = torch.rand(2, 3, 7, 7)
    up = metrics.resize_tf1(x, 14)  # x2: even pixels are the input's, odd ones midpoints (the last one repeats)
    torch.testing.assert_close(up[..., 0::2, 0::2], x)
    torch.testing.assert_close(up[..., 1:-1:2, 0::2], (x[..., :-1, :] + x[..., 1:, :]) / 2)
    torch.testing.assert_close(up[..., -1, 0::2], x[..., -1, :])
    assert metrics.resize_tf1(torch.rand(2, 3, 7, 5), 299).shape == (2, 3, 299, 299)
    y = torch.rand(1, 1, 12, 12)
    assert torch.equal(metrics.resize_tf1(y, 12), y)


def test_preprocess_modes():
    x = torch.randint(0, 256, (2, 3, 16, 16), dtype=torch.uint8)
    for mode in ("legacy", "clean"):
        out = metrics.preprocess(x, mode)
        assert out.shape == (2, 3, 299, 299) and out.dtype == torch.float32
        assert -1.0 <= float(out.min()) and float(out.max()) <= 127 / 128
    assert float(metrics.preprocess(torch.full((1, 3, 299, 299), 128, dtype=torch.uint8)).abs().max()) == 0
    with pytest.raises(metrics.UsageError):
        metrics.preprocess(x, "nearest")


def test_quantisation_equals_saved_pngs(tmp_path):
    from PIL import Image
    from torchvision.utils import save_image
    g = torch.Generator().manual_seed(11)
    x = torch.cat([torch.rand(3, 3, 8, 8, generator=g) * 2.4 - 1.2, torch.linspace(-1, 1, 192).view(1, 3, 8, 8)])
    q = metrics.to_uint8(x)
    for i in range(len(x)):
        save_image(x[i], tmp_path / f"{i}.png", normalize=True, value_range=(-1, 1))
        save_image((x[i] + 1) / 2, tmp_path / f"{i}b.png")
        for name in (f"{i}.png", f"{i}b.png"):
            back = torch.from_numpy(np.array(Image.open(tmp_path / name).convert("RGB"))).permute(2, 0, 1)
            assert torch.equal(back, q[i]), name


# -- evaluate(), reference statistics, command line -------------------------------------------------

def _png_folder(x, path):
    from torchvision.utils import save_image
    path.mkdir()
    for i in range(len(x)):
        save_image(x[i], path / f"{i:03d}.png", normalize=True, value_range=(-1, 1))
    return path


def test_evaluate_reference_stats_and_folders_agree(tmp_path, monkeypatch, capsys):
    stub = TinyFeatures()
    data = datasets.load(Namespace(dataset="fake", data_root=str(tmp_path), image_size=16, seed=0))
    real = metrics.reference_stats(data, tmp_path, batch_size=40, max_images=80, net=stub)
    path = metrics.stats_path(tmp_path, data.name, "train", 16, "legacy", 80)  # fid_stats/fake_3-train-16-legacy-80.npz
    assert path.is_file() and int(real["n"]) == 80 and real["features"].shape == (80, 48)
    cached = metrics.reference_stats(data, tmp_path, max_images=80, net=torch.nn.Identity())  # read, not recomputed
    assert np.array_equal(cached["sigma"], real["sigma"]) and str(cached["mode"]) == "legacy"

    fake = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(12)) * 2.2 - 1.1
    fake[:, 1:] = fake[:, :1]  # grayscale content: a 1-channel generator must score the same
    batches = iter(fake.split(10))
    scores = metrics.evaluate(lambda b: next(batches), 24, real, batch_size=10, metrics=("fid", "is", "kid", "pr"),
                              net=stub)
    assert set(scores) == {"metric/fid", "metric/is", "metric/is_std", "metric/kid", "metric/kid_std",
                           "metric/precision", "metric/recall"}
    assert all(isinstance(v, float) and math.isfinite(v) for v in scores.values()) and scores["metric/fid"] > 0
    gray = iter(fake[:, :1].split(10))
    assert metrics.evaluate(lambda b: next(gray), 24, path, batch_size=10, net=stub) == \
        {k: scores[k] for k in ("metric/fid", "metric/is", "metric/is_std")}

    # the same samples as PNG files, through the command line: the same FID and IS
    folder = _png_folder(fake, tmp_path / "samples")
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": stub)
    evaluate.main(["fid", str(folder), str(path), "--device", "cpu"])
    evaluate.main(["is", str(folder), "--device", "cpu", "--batch-size", "7"])
    out = capsys.readouterr().out
    assert float(re.search(r"FID: (\S+)", out)[1]) == pytest.approx(scores["metric/fid"], abs=2e-6)
    assert float(re.search(r"IS: (\S+)", out)[1]) == pytest.approx(scores["metric/is"], abs=2e-6)


def test_weights_missing_is_a_usage_error(tmp_path, monkeypatch):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    with pytest.raises(metrics.UsageError, match="does not exist"):
        metrics.load_fid_inception(tmp_path / "nope.pth")

    def offline(*args, **kwargs):
        raise OSError("network is unreachable")
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    with pytest.raises(metrics.UsageError) as e:
        metrics.load_fid_inception(device="cpu")
    assert str(tmp_path / "hub" / "checkpoints" / "pt_inception-2015-12-05-6726825d.pth") in str(e.value)
    assert "--inception-weights" in str(e.value) and metrics.FID_WEIGHTS_URL in str(e.value)


def test_cli_missing_folder_is_one_line_and_exit_2():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    r = subprocess.run([sys.executable, "evaluate.py", "fid", "/no/such/folder", "/no/such/stats.npz"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "/no/such/folder is neither a folder" in r.stderr


@pytest.mark.parametrize("argv, message", [
    (["is", "{tmp}", "--inception-weights", "{tmp}/missing.pth"], "missing.pth does not exist"),
    (["kid", "{tmp}"], "kid takes 2 input"),
    (["is", "{tmp}/empty"], "holds no images"),
])
def test_cli_errors(tmp_path, capsys, argv, message):
    from torchvision.utils import save_image
    save_image(torch.rand(3, 8, 8), tmp_path / "a.png")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SystemExit) as e:
        evaluate.main([a.replace("{tmp}", str(tmp_path)) for a in argv] + ["--device", "cpu"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and len(err.strip().splitlines()) == 1 and message in err, err


# -- published numbers (torch-fidelity's numerical-precision tests) --------------------------------
# torch-fidelity checks its FID against the original TF code on 5000 CIFAR-10 training images and 5000
# test images, each set drawn with numpy.random.RandomState(2020).choice(len(set), 5000, replace=False)
# (utils/util_dump_dataset_as_images.py), and asserts FID = 10.3233274; its IS test takes 100 training
# images the same way, shuffles the logits with RandomState(2020).permutation and asserts 4.51089784587268.

def _weights_file():
    hub = Path(torch.hub.get_dir()) / "checkpoints" / metrics.FID_WEIGHTS_URL.rsplit("/", 1)[1]
    path = os.environ.get("FID_INCEPTION_WEIGHTS") or hub
    return path if Path(path).is_file() else None


def _cifar10(train):
    import torchvision
    root = Path(os.environ.get("GAN_DATA_ROOT", ROOT / "data"))
    if not (root / "cifar-10-batches-py").is_dir():
        pytest.skip(f"CIFAR-10 is not in {root}/cifar-10-batches-py (set GAN_DATA_ROOT)")
    ds = torchvision.datasets.CIFAR10(str(root), train=train, download=False)
    return torch.from_numpy(ds.data).permute(0, 3, 1, 2)


def _subset(images, n):
    return images[np.sort(np.random.RandomState(2020).choice(len(images), n, replace=False))]


@pytest.mark.slow
@pytest.mark.skipif(_weights_file() is None, reason="the FID Inception weights are not in $FID_INCEPTION_WEIGHTS "
                    "or the torch hub cache (pt_inception-2015-12-05-6726825d.pth)")
@pytest.mark.parametrize("which", ["fid", "is"])
def test_golden_cifar10_matches_torch_fidelity(which):
    device = "cuda" if torch.cuda.is_available() else "cpu"
    net = metrics.load_fid_inception(_weights_file(), device)
    if which == "fid":
        f1 = metrics.inception_features(_subset(_cifar10(True), 5000).split(100), device, net=net)[0]
        f2 = metrics.inception_features(_subset(_cifar10(False), 5000).split(100), device, net=net)[0]
        assert metrics.fid_from_features(f1, f2) == pytest.approx(10.3233274, abs=1e-3)
    else:
        logits = metrics.inception_features(_subset(_cifar10(True), 100).split(50), device, net=net)[1]
        logits = logits[torch.from_numpy(np.random.RandomState(2020).permutation(100)).to(logits.device)]
        assert metrics.inception_score(logits)[0] == pytest.approx(4.51089784587268, abs=1e-3)


def _sharded_evaluate(rank, world, init_file, fake, net, out_file):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    share = -(-len(fake) // world)
    mine = iter(fake[rank * share:(rank + 1) * share].split(5))   # this rank's samples
    real = {"mu": np.zeros(48), "sigma": np.eye(48)}
    scores = metrics.evaluate(lambda b: next(mine), len(fake), real, batch_size=5, net=net)
    if rank == 0:
        torch.save(scores, out_file)
    dist.destroy_process_group()


def test_evaluate_under_torchrun_scores_each_sample_once(tmp_path):
    """Two processes score their halves of 23 samples and gather the features: the same FID and IS as
    one process scoring all 23."""
    fake = torch.rand(23, 3, 16, 16, generator=torch.Generator().manual_seed(3)) * 2 - 1
    net = TinyFeatures()   # one network (its bias is random) for all three evaluations
    torch.multiprocessing.spawn(_sharded_evaluate, args=(2, tmp_path / "init", fake, net, tmp_path / "scores.pt"),
                                nprocs=2, join=True)
    real = {"mu": np.zeros(48), "sigma": np.eye(48)}
    batches = iter(fake.split(5))
    alone = metrics.evaluate(lambda b: next(batches), 23, real, batch_size=5, net=net)
    sharded = torch.load(tmp_path / "scores.pt")
    assert sharded.keys() == alone.keys()
    for k in alone:
        assert math.isclose(sharded[k], alone[k], rel_tol=1e-5), (k, sharded[k], alone[k])
