"""Same seed, same weights: a CPU run's final checkpoint must not depend on the machine's load or on how
many threads the process was given (OMP_NUM_THREADS from a job runner, the cores a container allows, a
caller's torch.set_num_threads). The thread count decides how oneDNN's convolution weight gradient and
ATen/MKL reductions split their sums, so it changes the last bits; runlib.setup pins CPU runs to one
thread."""
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common import checkpoint as ckpt_io
from common import run as runlib

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted(p.stem for p in ROOT.glob("*.py") if re.search(r"^SCRIPT = ", p.read_text(), re.M))
# four copies at once on a small machine is the load; the thread settings are the ones a run meets in
# practice: a bare shell (all cores), a job runner giving one thread per job, an explicit two
THREAD_ENVS = [{}, {"OMP_NUM_THREADS": "1"}, {"OMP_NUM_THREADS": "2"}, {}]


def differences(a, b, where=""):
    """Paths at which two checkpoint trees differ, tensors compared bit for bit."""
    if isinstance(a, dict):
        if a.keys() != b.keys():
            return [f"{where} (keys)"]
        return [d for k in a for d in differences(a[k], b[k], f"{where}.{k}")]
    if isinstance(a, (list, tuple)):
        if len(a) != len(b):
            return [f"{where} (length)"]
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in differences(x, y, f"{where}[{i}]")]
    if torch.is_tensor(a):
        same = torch.is_tensor(b) and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
        return [] if same else [where]
    return [] if a == b else [where]


def final_state(script, path):
    state = ckpt_io.load(path, script)
    state.pop("args")   # holds --out, which differs between the copies
    return state


@pytest.mark.slow
@pytest.mark.parametrize("name", SCRIPTS)
def test_parallel_dry_runs_are_bit_identical(name, tmp_path):
    """The same dry run four times at once, under different thread settings: every final checkpoint
    (models, optimizers, RNG states, ...) equals the first bit for bit."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    procs = []
    for i, extra in enumerate(THREAD_ENVS):
        cmd = [sys.executable, str(ROOT / f"{name}.py"), "--dry-run", "--seed", "11", "--out", str(tmp_path / str(i))]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**base, **extra}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{name} copy {i} failed:\n{errors[i][-2000:]}"
    first = final_state(name, tmp_path / "0" / "ckpt.pt")
    for i, extra in enumerate(THREAD_ENVS[1:], start=1):
        diff = differences(first, final_state(name, tmp_path / str(i) / "ckpt.pt"))
        assert not diff, f"{name}: copy {i} ({extra or 'default threads'}) differs from copy 0 in {len(diff)} " \
                         f"tensors/values, e.g. {diff[:4]}"


def test_setup_pins_cpu_runs_to_one_thread(tmp_path):
    import gan
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        r = runlib.setup(gan.parse_args(["--dry-run", "--out", str(tmp_path / "run")]), gan.SCRIPT)
        r.writer.close()
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_thread_count_does_not_change_the_weights(tmp_path):
    """Two threads or one before the run starts: the same checkpoint (dcgan's convolutions are the case
    that differed in the last bits before setup pinned the thread count)."""
    import dcgan
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}"
            dcgan.main(["--dry-run", "--steps", "1", "--out", str(out)])
            states.append(final_state(dcgan.SCRIPT, out / "ckpt.pt"))
    finally:
        torch.set_num_threads(before)
    diff = differences(*states)
    assert not diff, f"1 vs 2 threads: {len(diff)} tensors differ, e.g. {diff[:4]}"
