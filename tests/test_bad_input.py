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
