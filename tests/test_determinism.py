"""Same seed, same weights: with --threads 1 a CPU run's final checkpoint must not depend on the machine's
load or on the thread settings it inherits (OMP_NUM_THREADS or MKL_NUM_THREADS from a job runner, a
caller's torch.set_num_threads). The thread count decides how oneDNN's convolution weight gradients and
the ATen/MKL reductions split their sums, so different counts change the last bits; at more than one
thread, same-count runs agree in practice but are not promised to (see runlib.set_threads)."""
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
# four copies at once on a small machine is the load; the first has the thread settings of a bare shell,
# the others those of job runners that say otherwise
COPIES = [{}, {"OMP_NUM_THREADS": "2"}, {"MKL_NUM_THREADS": "2"}, {"OMP_NUM_THREADS": "3", "MKL_NUM_THREADS": "3"}]


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
    """The same dry run with --threads 1 four times at once, under different inherited thread settings:
    the final checkpoints (models, optimizers, RNG states, ...) are equal bit for bit."""
    base = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")}
    procs = []
    for i, extra in enumerate(COPIES):
        cmd = [sys.executable, str(ROOT / f"{name}.py"), "--dry-run", "--seed", "11", "--threads", "1",
               "--out", str(tmp_path / str(i))]
        procs.append(subprocess.Popen(cmd, cwd=ROOT, env={**base, **extra}, stdout=subprocess.DEVNULL,
                                      stderr=subprocess.PIPE, text=True))
    errors = [p.communicate(timeout=600)[1] for p in procs]
    for i, p in enumerate(procs):
        assert p.returncode == 0, f"{name} copy {i} failed:\n{errors[i][-2000:]}"
    first = final_state(name, tmp_path / "0" / "ckpt.pt")
    for i in range(1, len(COPIES)):
        diff = differences(first, final_state(name, tmp_path / str(i) / "ckpt.pt"))
        assert not diff, f"{name}: the copy run with {COPIES[i]} differs from the one with the shell's settings " \
                         f"in {len(diff)} tensors/values, e.g. {diff[:4]}"


def test_setup_applies_threads(tmp_path):
    """--threads N sets N, whatever the caller had; without it, the cores this process may use."""
    import gan
    before = torch.get_num_threads()
    try:
        for argv, expected in ((["--threads", "1"], 1), (["--threads", "3"], 3), ([], runlib.available_cores())):
            torch.set_num_threads(2)
            out = tmp_path / f"run{len(argv)}{expected}"
            r = runlib.setup(gan.parse_args(["--dry-run", "--out", str(out), *argv]), gan.SCRIPT)
            r.writer.close()
            assert torch.get_num_threads() == expected, argv
            assert r.args.threads == expected
    finally:
        torch.set_num_threads(before)


def test_inherited_thread_count_does_not_change_the_weights(tmp_path):
    """Two threads or one set before the run starts: with the same --threads, the same checkpoint (dcgan's
    convolutions are the case that differs in the last bits when the thread count differs)."""
    import dcgan
    before = torch.get_num_threads()
    states = []
    try:
        for threads in (2, 1):
            torch.set_num_threads(threads)
            out = tmp_path / f"t{threads}"
            dcgan.main(["--dry-run", "--steps", "1", "--threads", "1", "--out", str(out)])
            states.append(final_state(dcgan.SCRIPT, out / "ckpt.pt"))
    finally:
        torch.set_num_threads(before)
    diff = differences(*states)
    assert not diff, f"1 vs 2 inherited threads: {len(diff)} tensors differ, e.g. {diff[:4]}"


def test_deterministic_flag_sets_the_cuda_settings(monkeypatch):
    """--deterministic (CUDA only): deterministic cuDNN without autotuning, no TF32, deterministic
    algorithms, cuBLAS's fixed workspace; without it the fast settings. Checked on the flags themselves
    (they can be set without a GPU), and --deterministic on the CPU is a start-up error."""
    import argparse

    import gan
    saved = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
             torch.backends.cudnn.allow_tf32, torch.are_deterministic_algorithms_enabled())
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    try:
        runlib.set_cuda_flags(argparse.Namespace(deterministic=True))
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (False, True)
        assert not torch.backends.cuda.matmul.allow_tf32 and not torch.backends.cudnn.allow_tf32
        assert torch.are_deterministic_algorithms_enabled() and os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"
        runlib.set_cuda_flags(argparse.Namespace(deterministic=False))
        assert (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic) == (True, False)
        assert torch.backends.cuda.matmul.allow_tf32 and not torch.are_deterministic_algorithms_enabled()
    finally:
        (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic, torch.backends.cuda.matmul.allow_tf32,
         torch.backends.cudnn.allow_tf32) = saved[:4]
        torch.use_deterministic_algorithms(saved[4])
    with pytest.raises(runlib.UsageError, match="--deterministic is for --cuda runs"):
        gan.parse_args(["--dry-run", "--deterministic"])
