"""The benchmarks run: every script's paper configuration is one its parser accepts, and the throughput
table prints a rate for each script and mode (the --dry-run sizes, on the CPU)."""
import importlib
from pathlib import Path
import re
import sys

import pytest

from tests.conftest import ROOT
from tests.test_bad_input import SCRIPTS

sys.path.insert(0, str(ROOT / "benchmarks"))
import throughput  # noqa: E402


def test_every_script_has_a_paper_configuration_its_parser_accepts():
    assert sorted(throughput.PAPER) == SCRIPTS
    for name, (images, flags) in throughput.PAPER.items():
        args = importlib.import_module(name).parse_args(flags)
        if images:   # images/s counts the batch the flags give
            assert getattr(args, "batch_size") == images or "--batch-schedule" in flags, name


def test_throughput_table_on_the_cpu(capsys):
    throughput.main(["gan", "gail", "--dry-run", "--modes", "fp32", "amp", "--steps", "3"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(("gan ", "gail "))]
    assert [r[:3] for r in rows] == [["gan", "fp32", "default"], ["gan", "amp", "default"], ["gail", "fp32", "default"]]
    assert all(re.fullmatch(r"[0-9.e+-]+", r[3]) and float(r[3]) > 0 for r in rows), rows   # gail: no amp


def test_throughput_compares_thread_counts(capsys):
    throughput.main(["gan", "--dry-run", "--steps", "3", "--threads", "1", "2"])
    rows = [line.split() for line in capsys.readouterr().out.splitlines() if line.startswith("gan ")]
    assert [r[:3] for r in rows] == [["gan", "fp32", "1"], ["gan", "fp32", "2"]], rows
    assert all(float(r[3]) > 0 for r in rows), rows


def test_unknown_script_is_a_usage_error(capsys):
    with pytest.raises(SystemExit):
        throughput.main(["nosuchgan"])
    assert "unknown scripts" in capsys.readouterr().err


def test_gallery_has_a_run_for_every_script_with_flags_it_accepts(tmp_path):
    import shlex

    import gallery
    assert sorted(gallery.RUNS) == SCRIPTS
    for name, cmd in gallery.training_commands(tmp_path / "runs", str(tmp_path / "digits"), str(tmp_path / "tasks")):
        script = importlib.import_module(Path(cmd[1]).stem)
        flags = cmd[2:]
        script.parse_args(flags)
        assert flags[flags.index("--out") + 1] == str(tmp_path / "runs" / name)
    assert "--threads" in shlex.join(cmd)
