"""benchmarks/digit_translation.py: the digit tasks behind the README's pix2pix/CycleGAN numbers, and their scoring."""
import argparse
import gzip
import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import cyclegan
import pix2pix
from common import data as datasets
from common import digits
from tests import helpers

spec = importlib.util.spec_from_file_location(
    "digit_translation", Path(__file__).resolve().parents[1] / "benchmarks" / "digit_translation.py")
dt = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dt)


def idx_folder(folder, n):
    """n random 28x28 'digits' with labels i % 10, as MNIST idx files."""
    x = torch.randint(0, 256, (n, 28, 28), generator=torch.Generator().manual_seed(0)).to(torch.uint8).numpy()
    y = (np.arange(n) % 10).astype(np.uint8)
    folder.mkdir()
    for name, array in (("t10k-images-idx3-ubyte.gz", x), ("t10k-labels-idx1-ubyte.gz", y)):
        header = bytes([0, 0, 8, array.ndim]) + b"".join(int(s).to_bytes(4, "big") for s in array.shape)
        with gzip.open(folder / name, "wb") as f:
            f.write(header + array.tobytes())
    return x, y


@pytest.fixture
def tasks(tmp_path, monkeypatch):
    monkeypatch.setattr(dt, "N_TRAIN", 40)
    monkeypatch.setattr(dt, "N_TEST", 20)
    x, y = idx_folder(tmp_path / "idx", 60)
    dt.make(str(tmp_path / "idx"), tmp_path / "tasks")
    return tmp_path / "tasks", x, y


def png(path):
    with Image.open(path) as img:
        return np.asarray(img.convert("L"))


def labels_of(folder):
    return dict(line.split() for line in (folder / "labels.txt").read_text().splitlines())


def test_masked_task_pairs_a_half_blanked_digit_with_the_whole_one(tasks):
    root, x, y = tasks
    train, test = sorted((root / "masked" / "train").glob("*.png")), sorted((root / "masked" / "test").glob("*.png"))
    assert len(train) == 40 and len(test) == 20 and train[-1].name == "00039.png" and test[0].name == "00040.png"
    pair = png(test[3])                                    # image 43: masked input | whole digit, 32x32 each
    assert pair.shape == (32, 64)
    inp, target = pair[:, :32], pair[:, 32:]
    assert np.array_equal(target[2:30, 2:30], x[43]) and target[:2].max() == 0    # the digit, zero-padded
    assert np.array_equal(inp[:16], target[:16]) and inp[16:].max() == 0          # its lower half blanked
    assert labels_of(root / "masked" / "test")["00043.png"] == str(y[43])


def test_outline_task_is_unpaired_outlines_of_other_digits(tasks):
    root, x, y = tasks
    names = {s: sorted(p.name for p in (root / "outline" / s).glob("*.png")) for s in ("trainA", "trainB", "testA", "testB")}
    assert [len(v) for v in names.values()] == [20, 20, 10, 10]
    assert not set(names["trainA"]) & set(names["trainB"]) and not set(names["testA"]) & set(names["testB"])
    assert np.array_equal(png(root / "outline" / "testA" / "00041.png")[2:30, 2:30], x[41])
    d = torch.from_numpy(np.pad(x[55], 2)).float()[None, None] / 255
    dilation, erosion = torch.nn.functional.max_pool2d(d, 3, 1, 1), -torch.nn.functional.max_pool2d(-d, 3, 1, 1)
    outline = dilation - erosion
    got = torch.from_numpy(png(root / "outline" / "testB" / "00055.png").copy()).float() / 255
    assert torch.allclose(got, outline[0, 0], atol=1 / 255)                     # dilation minus erosion
    assert labels_of(root / "outline" / "testB")["00055.png"] == str(y[55])
    unpaired = datasets.load_translation(argparse.Namespace(dataset=str(root / "outline"), download=False), "train", paired=False, size=32)
    assert unpaired.a.shape == unpaired.b.shape == (20, 1, 32, 32)


@pytest.mark.parametrize("script", [pix2pix, cyclegan])
def test_scores_a_checkpoint_of_either_script(tasks, tmp_path, monkeypatch, script):
    root, _, _ = tasks
    folder = root / ("masked" if script is pix2pix else "outline")
    out, _, _ = helpers.dry_run(script, tmp_path, "--dataset", str(folder), "--image-size", "32", "--load-size", "36")
    stand_in = digits.DigitNet().eval().requires_grad_(False)   # the real classifier needs 4,000+ digits
    monkeypatch.setattr(digits, "classifier", lambda *a, **k: stand_in)
    scores = dt.main(["score", str(out / "ckpt.pt"), "--tasks", str(root), "--classifier", "unused"])
    assert scores["step"] == 4
    agree = [v for k, v in scores.items() if k.startswith("agree")]
    assert agree and all(0 <= v <= 1 for v in agree)
    # the same numbers from the script's own loader and the checkpoint's weights (so the tool reads the right
    # split, halves and weights)
    state = torch.load(out / "ckpt.pt", weights_only=True)
    test = datasets.load_translation(argparse.Namespace(dataset=str(folder), download=False), "test",
                                     paired=script is pix2pix, size=32)
    a, b = (datasets.to_range(t, (-1, 1), True) for t in (test.a, test.b))
    if script is pix2pix:
        G = pix2pix.UNet(1, 1, 32, state["args"]["g_width"], dropout=state["args"]["dropout"])
        G.load_state_dict(state["models"]["G"])
        expected = float((pix2pix.translate(G, a, noise=False) - b).abs().mean())
        assert scores["l1 (G in eval mode)"] == pytest.approx(expected, rel=1e-5)
        assert scores["cfid"] > 0 and scores["psnr"] > 0
    else:
        G, F_ = (cyclegan.Generator(1, 1, state["args"]["g_width"], state["args"]["n_blocks"]).eval() for _ in "GF")
        G.load_state_dict(state["models"]["G"])
        F_.load_state_dict(state["models"]["F"])
        with torch.no_grad():
            expected = float((cyclegan.translate(F_, cyclegan.translate(G, a)) - a).abs().mean())
        assert scores["cycle L1 A->B->A"] == pytest.approx(expected, rel=1e-5)


def test_refuses_another_scripts_checkpoint_and_missing_tasks(tasks, tmp_path, capsys):
    import gan
    root, _, _ = tasks
    out, _, _ = helpers.dry_run(gan, tmp_path)
    with pytest.raises(SystemExit):
        dt.main(["score", str(out / "ckpt.pt"), "--tasks", str(root), "--classifier", "x"])
    assert "written by gan.py" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        dt.main(["make", str(tmp_path / "nowhere"), str(tmp_path / "t2")])
    assert capsys.readouterr().err.count("\n") == 1
