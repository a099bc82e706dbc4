"""Bad input, for every script: one line on stderr, exit code 2, no traceback, and nothing written
(no run directory, no args.json, no events)."""
import importlib
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if re.search(r"^SCRIPT = ", p.read_text(), re.M))
CASES = ["out-is-a-file", "zero-lr", "negative-lr", "missing-dataset-path", "empty-image-folder",
         "text-file-as-sample", "text-file-as-resume", "missing-inception-weights"]


def flags(script):
    args = script.parse_args(["--dry-run"])
    return args, {k for k in vars(args)}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("name", SCRIPTS)
def test_bad_input_fails_cleanly_and_writes_nothing(name, case, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)   # a run that wrongly starts would write runs/ here: checked below
    script = importlib.import_module(name)
    args, dests = flags(script)
    out = tmp_path / "run"
    text = tmp_path / "notes.txt"
    text.write_text("not a checkpoint\n")
    argv = ["--dry-run", "--out", str(out)]
    if case == "out-is-a-file":
        argv = ["--dry-run", "--out", str(text)]
        match = "is an existing file"
    elif case in ("zero-lr", "negative-lr"):
        lr = sorted(k for k in dests if k == "lr" or k.endswith("_lr"))
        if not lr:
            pytest.skip(f"{name}.py has no learning-rate flag")
        argv += [f"--{lr[0].replace('_', '-')}={'0' if case == 'zero-lr' else '-1e-4'}"]
        match = "must be > 0"
    elif case == "missing-dataset-path":
        if "dataset" not in dests:
            pytest.skip(f"{name}.py takes no --dataset")
        argv += ["--dataset", str(tmp_path / "no" / "such" / "folder")]
        match = "does not exist"
    elif case == "empty-image-folder":
        if "image_size" not in dests:
            pytest.skip(f"{name}.py trains on no images")
        (tmp_path / "empty").mkdir()
        argv += ["--dataset", str(tmp_path / "empty")]
        match = "no images"
    elif case == "text-file-as-sample":
        argv = ["--sample", str(text), "--out", str(out)]
        match = "not a readable checkpoint"
    elif case == "text-file-as-resume":
        argv += ["--resume", str(text)]
        match = "not a readable checkpoint"
    else:
        if "inception_weights" not in dests:
            pytest.skip(f"{name}.py has no Inception metrics")
        argv += ["--metrics", "fid", "--inception-weights", str(tmp_path / "missing.pth")]
        match = "missing.pth"
    with pytest.raises(SystemExit) as e:
        script.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert match in err, err
    assert not out.exists(), f"{name}.py wrote {sorted(p.name for p in out.iterdir())} before failing"
    assert not (tmp_path / "runs").exists(), f"{name}.py created a run directory before failing"


# -- nothing lost: a checkpoint is never replaced by an earlier one, a resume never mixes settings ------------

ARCHITECTURE = re.compile(r"(^|_)(width|units|hidden|fmap_max|embed_dim|z_dim|d_layers|g_width|d_width)$")


def _fake_checkpoint(script, out, **changed):
    """A checkpoint of `script` at step 99 in `out`, as a dry run would leave it, with `changed` args."""
    from common import checkpoint as ckpt_io
    args = vars(script.parse_args(["--dry-run", "--out", str(out)]))
    ckpt_io.save({"script": script.SCRIPT, "step": 99, "args": {**args, **changed}}, out / "ckpt.pt")
    return (out / "ckpt.pt").read_bytes()


@pytest.mark.parametrize("name", SCRIPTS)
def test_new_run_into_a_directory_with_a_checkpoint_is_refused(name, tmp_path, capsys):
    """Without --resume, a run into an --out that holds a checkpoint would overwrite it with an earlier one
    (and a Ctrl-C would do it at once): one line that says what to do, nothing written."""
    script = importlib.import_module(name)
    out = tmp_path / "run"
    before = _fake_checkpoint(script, out)
    with pytest.raises(SystemExit) as e:
        script.main(["--dry-run", "--out", str(out), "--steps", "2"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert "already holds a checkpoint" in err and "--resume auto" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"] and (out / "ckpt.pt").read_bytes() == before


@pytest.mark.parametrize("name", SCRIPTS)
def test_resume_with_other_architecture_flags_is_refused_before_writing(name, tmp_path, capsys):
    """--resume auto with a width (or, without one, the seed) unlike the checkpoint's: one line naming the
    flag and both values; args.json is not rewritten, the checkpoint stays."""
    script = importlib.import_module(name)
    args = vars(script.parse_args(["--dry-run"]))
    flag = next((k for k in sorted(args) if ARCHITECTURE.search(k) and isinstance(args[k], int)), "seed")
    out = tmp_path / "run"
    before = _fake_checkpoint(script, out, **{flag: args[flag] + 3})
    with pytest.raises(SystemExit) as e:
        script.main(["--dry-run", "--out", str(out), "--resume", "auto"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert f"--{flag.replace('_', '-')} {args[flag] + 3} (now {args[flag]})" in err, err
    assert sorted(p.name for p in out.iterdir()) == ["ckpt.pt"] and (out / "ckpt.pt").read_bytes() == before


def test_a_killed_save_leaves_nothing_behind_at_the_next_start(tmp_path):
    """A SIGKILL during checkpoint.save leaves .ckpt.pt.tmp-PID: the next start (a resume) removes the temp
    files of dead processes and keeps one a live process may still be writing."""
    import subprocess
    import sys

    gan = importlib.import_module("gan")
    out = tmp_path / "run"
    gan.main(["--dry-run", "--out", str(out), "--steps", "2"])
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    writer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    stale, live = out / f".ckpt.pt.tmp-{dead.pid}", out / f".ckpt.pt.tmp-{writer.pid}"
    stale.write_bytes(b"half a checkpoint")
    live.write_bytes(b"being written")
    try:
        gan.main(["--dry-run", "--out", str(out), "--steps", "3", "--resume", "auto"])
    finally:
        writer.kill()
    assert not stale.exists() and live.exists()
