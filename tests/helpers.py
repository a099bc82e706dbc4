"""Checks every script must pass: a dry run, exact resume after an interruption, --sample, --help."""
import json
import os
import signal

import numpy as np
import pytest
import torch

from common import checkpoint as ckpt_io
from common import run as runlib


def dry_run(script, tmp_path, *extra, ckpt_name="ckpt.pt"):
    """Train a few steps; check the run directory and that the logged losses are finite. `ckpt_name`: the
    run's checkpoint file (with its args and summary files, common.run.run_file)."""
    out = tmp_path / "dry"
    summary = script.main(["--dry-run", "--out", str(out), *extra])
    for name in (runlib.run_file("args", ckpt_name), ckpt_name, runlib.run_file("summary", ckpt_name)):
        assert (out / name).is_file(), f"{name} missing"
    assert list(out.glob("events.out.tfevents.*")), "no TensorBoard events"
    assert list((out / "samples").glob("*.png")), "no sample grid"
    saved = json.loads((out / runlib.run_file("summary", ckpt_name)).read_text())
    assert saved["step"] == summary["step"] > 0
    losses = summary["losses"]
    assert losses and all(torch.isfinite(torch.tensor(v)) for v in losses.values()), losses
    state = ckpt_io.load(out / ckpt_name, script.SCRIPT)
    assert state["step"] == summary["step"]
    return out, summary, state


def _interrupt_at(monkeypatch, n):
    """Send ourselves SIGINT right after step n is logged, as a user pressing Ctrl-C would."""
    original = runlib.Run.log

    def log(self, step, scalars, force=False):
        original(self, step, scalars, force)
        if step == n and not force and not self.stop_requested:
            os.kill(os.getpid(), signal.SIGINT)
    monkeypatch.setattr(runlib.Run, "log", log)


def assert_resume_exact(script, tmp_path, monkeypatch, args, n=3, state_keys=("models",), ckpt_name="ckpt.pt"):
    """2n steps in one go == n steps, Ctrl-C, --resume auto, n more steps (CPU, one thread: bit-exact)."""
    args = ["--dry-run", "--steps", str(2 * n), "--ckpt-every", "1000", "--eval-every", "0", "--threads", "1", *args]
    full = script.main([*args, "--out", str(tmp_path / "full")])
    assert full["step"] == 2 * n and not full["interrupted"]
    with monkeypatch.context() as m:
        _interrupt_at(m, n)
        half = script.main([*args, "--out", str(tmp_path / "split")])
    assert half["interrupted"] and half["step"] == n
    assert ckpt_io.load(tmp_path / "split" / ckpt_name, script.SCRIPT)["step"] == n
    resumed = script.main([*args, "--out", str(tmp_path / "split"), "--resume", "auto"])
    assert resumed["step"] == 2 * n
    a = ckpt_io.load(tmp_path / "full" / ckpt_name, script.SCRIPT)
    b = ckpt_io.load(tmp_path / "split" / ckpt_name, script.SCRIPT)
    for key in state_keys:
        assert_same(a[key], b[key], key)
    return a, b


def assert_same(a, b, where=""):
    if isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{where}[{i}]")
    elif torch.is_tensor(a):
        assert torch.equal(a, b), f"{where} differs after resume"
    else:
        assert a == b, where


def sample_from(script, ckpt, tmp_path, *extra):
    """--sample CKPT writes PNGs; an image generator's --num-samples N also writes N samples as an .npz."""
    out = tmp_path / "sampled"
    written = script.main(["--sample", str(ckpt), "--out", str(out), *extra])
    pngs = list(out.glob("*.png"))
    assert pngs, "no PNG written"
    for p in pngs:
        assert p.stat().st_size > 100
    state = ckpt_io.load(ckpt, script.SCRIPT)
    generates_images = len(state.get("data_shape", (3,))) > 1 and state.get("stage") != 1   # (a VQGAN stage 1 only reconstructs)
    if not extra and "num_samples" in vars(script.parse_args(["--dry-run"])) and generates_images:
        exported = script.main(["--sample", str(ckpt), "--out", str(out), "--num-samples", "6"])["export"]
        with np.load(exported) as f:
            x = f["arr_0"]
        assert x.dtype == np.uint8 and x.ndim == 4 and x.shape[0] == 6 and x.shape[-1] in (1, 3), x.shape
        assert x.std() > 0, "blank samples"
    return written


def help_text(script, capsys):
    with pytest.raises(SystemExit) as e:
        script.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--steps", "--resume", "--sample", "--dry-run", "--cuda"):
        assert flag in text
    return text


def expect_usage_error(script, argv, capsys, match):
    """Bad input: exit code 2, one line on stderr naming the problem, no traceback."""
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err
    return err


def assert_mode_metrics(metrics, num_modes, num_samples=None):
    """The toy metrics (PacGAN protocol) of an evaluation: a whole number of modes, captured only
    through high-quality samples, and HQ a fraction of the samples drawn."""
    modes, hq = metrics["metric/modes"], metrics["metric/hq"]
    assert modes == int(modes) and 0 <= modes <= num_modes, modes
    assert (modes > 0) == (hq > 0), (modes, hq)   # a mode counts only if a high-quality sample is on it
    if num_samples:
        assert abs(hq * num_samples - round(hq * num_samples)) < 1e-6, hq
