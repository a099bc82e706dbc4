"""What a run tells its user: the start-up line, the first progress line, a summary that is strict JSON,
errors that come first where they should (no GPU) and once under torchrun, --help without bare
"(default: None)", and --sample output beside, never over, the training grids."""
import importlib
import json
import re
from pathlib import Path

import pytest
import torch

import gan
from tests import helpers
from tests.test_bad_input import SCRIPTS


def _strict(text):
    def reject(constant):
        raise ValueError(f"{constant} in summary.json")
    return json.loads(text, parse_constant=reject)


def test_start_line_and_first_progress_line(tmp_path, capsys):
    out = tmp_path / "run"
    gan.main(["--dry-run", "--steps", "3", "--log-every", "100", "--threads", "1", "--out", str(out)])
    lines = capsys.readouterr().out.splitlines()
    start = next(line for line in lines if line.startswith("gan: "))
    assert start == (f"gan: {out} | cpu, 1 thread | fake:3: 480 images 3x8x8, in memory | 3 steps | "
                     f"tensorboard --logdir {out}")
    progress = [line for line in lines if line.startswith("step ")]
    assert list(dict.fromkeys(p.split(" |")[0] for p in progress)) == ["step 1/3", "step 3/3"]   # first, last
    assert re.search(r"\| [0-9.e+]+ it/s \| eta \d+:\d\d:\d\d \|", progress[0]), progress[0]
    assert lines.index(start) < lines.index(progress[0])


def test_summary_is_strict_json_when_no_rate_was_measured(tmp_path, capsys):
    out = tmp_path / "run"
    gan.main(["--dry-run", "--steps", "2", "--out", str(out)])
    _strict((out / "summary.json").read_text())
    summary = gan.main(["--dry-run", "--steps", "2", "--out", str(out), "--resume", "auto"])   # nothing left to run
    assert summary["step"] == 2 and summary["it_per_s"] is None
    assert _strict((out / "summary.json").read_text())["it_per_s"] is None
    assert "? it/s" in capsys.readouterr().out


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error raised when CUDA is absent")
def test_missing_gpu_is_reported_before_missing_inception_weights(tmp_path, capsys):
    import wgan_gp
    helpers.expect_usage_error(wgan_gp, ["--dataset", "fake", "--cuda", "--metrics", "fid", "--inception-weights",
                                         str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")],
                               capsys, "CUDA is not available")


def test_missing_inception_weights_say_how_to_train_without_them(tmp_path, capsys):
    import wgan_gp
    err = helpers.expect_usage_error(wgan_gp, ["--dry-run", "--metrics", "fid", "--inception-weights",
                                               str(tmp_path / "none.pth"), "--out", str(tmp_path / "x")],
                                     capsys, "none.pth")
    assert "--metrics none" in err and "--inception-weights PATH" in err


def test_errors_print_once_under_torchrun(tmp_path, capsys, monkeypatch):
    """Every rank fails alike at start-up; only rank 0 says so."""
    monkeypatch.setenv("RANK", "1")
    with pytest.raises(SystemExit) as e:
        gan.main(["--dry-run", "--lr", "0", "--out", str(tmp_path / "x")])
    assert e.value.code == 2 and capsys.readouterr().err == ""
    monkeypatch.setenv("RANK", "0")
    helpers.expect_usage_error(gan, ["--dry-run", "--lr", "0", "--out", str(tmp_path / "x")], capsys, "must be > 0")


@pytest.mark.parametrize("name", SCRIPTS)
def test_help_names_every_default(name, capsys):
    script = importlib.import_module(name)
    with pytest.raises(SystemExit):
        script.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: None)" not in text, re.findall(r"--[\w-]+[^-]{0,120}\(default: None\)", text)
    assert "--threads N" in text


def test_sample_writes_beside_the_training_grid(tmp_path):
    out, _, state = helpers.dry_run(gan, tmp_path)
    grid = out / "samples" / f"samples-{state['step']:07d}.png"
    before = grid.read_bytes()
    written = gan.main(["--sample", str(out / "ckpt.pt"), "--seed", "3"])
    assert grid.read_bytes() == before
    assert written["samples"] == str(out / "samples" / f"samples-{state['step']:07d}-sampled.png")


def test_samples_exported_from_a_checkpoint_score_with_evaluate_py(tmp_path, monkeypatch, capsys):
    """The evaluation path end to end: --sample CKPT --num-samples N as an .npz and as PNGs, then
    evaluate.py fid / is / cfid on them (a stand-in Inception network: its weights are not offline)."""
    import numpy as np

    import dcgan
    import evaluate
    from common import digits, metrics
    from tests.test_dcgan import StubInception
    monkeypatch.setattr(metrics, "load_fid_inception", lambda weights=None, device="cpu": StubInception())
    out, _, state = helpers.dry_run(dcgan, tmp_path)
    npz = dcgan.main(["--sample", str(out / "ckpt.pt"), "--num-samples", "40"])["export"]
    assert npz == str(out / "samples" / f"samples-{state['step']:07d}-40.npz")
    folder = dcgan.main(["--sample", str(out / "ckpt.pt"), "--num-samples", "40", "--format", "png"])["export"]
    assert len(list(Path(folder).glob("*.png"))) == 40
    with np.load(npz) as f:
        assert f["arr_0"].shape == (40, 16, 16, 3) and f["arr_0"].dtype == np.uint8
    capsys.readouterr()
    evaluate.main(["fid", npz, folder, "--device", "cpu"])
    evaluate.main(["is", npz, "--device", "cpu"])
    text = capsys.readouterr().out
    fid = float(re.search(r"FID: (\S+)", text).group(1))
    assert abs(fid) < 1e-3, text   # the same samples (same seed) as an .npz and as PNGs
    assert "IS:" in text
    monkeypatch.setattr(digits, "classifier", lambda *a, **k: digits.DigitNet().eval())   # untrained stand-in
    evaluate.main(["cfid", npz, folder, "--device", "cpu"])
    assert abs(float(re.search(r"classifier FID[^:]*: (\S+)", capsys.readouterr().out).group(1))) < 1e-3
