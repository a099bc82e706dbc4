"""Plumbing overhead: each script's own training step against a bare loop of the same modules, losses and
optimizers written out in benchmarks/bare/<script>.py (no logging, samples, checkpoints or evaluation), at
a size a CPU user trains at, on the same threads, alternating script and bare loop, median of --reps.

    python benchmarks/overhead.py                         # every script with a bare loop
    python benchmarks/overhead.py gan dcgan --reps 7 --threads 2

For each script it prints the mean time of a plain step (no log line) of each, over the same step numbers
on both sides (so that periodic work, e.g. imle's nearest-neighbour search, weighs the same), the median
over the repetitions, their ratio, and the ratio at the script's default --log-every, where the extra
time of a log step over the bare loop's same step (reading the losses, the console line, TensorBoard) is
spread over the steps between log lines. The target is 1.03 or less.

A bare loop is `run(args, steps) -> [seconds per step]`, given the script's own parsed arguments (the
configuration in its CONFIG), building what train() builds from the script's classes and functions.
"""
import argparse
import importlib
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import run as runlib  # noqa: E402

LOG_EVERY = 5      # log steps while timing, to measure their cost; spread over the default interval after
WARMUP = 2         # steps left out of every mean


def bare_loops():
    """{script: its bare-loop module} for every benchmarks/bare/<script>.py."""
    return {p.stem: importlib.import_module(f"bare.{p.stem}") for p in sorted((ROOT / "benchmarks" / "bare").glob("*.py"))
            if not p.stem.startswith("_")}


def time_script(script, flags, steps, threads):
    """{step: (seconds, whether it was a log step)} for the steps of script.main's own loop, each timed from
    the end_step of the step before to its own (the first and the last step have no such time)."""
    stamps, original = [], runlib.Run.end_step

    def end_step(self, step, *a, **k):
        stop = original(self, step, *a, **k)
        stamps.append((step, time.perf_counter(), self.is_log_step(step)))
        return stop
    runlib.Run.end_step = end_step
    try:
        with tempfile.TemporaryDirectory() as tmp:
            args = [*flags, "--steps", str(steps), "--log-every", str(LOG_EVERY), "--sample-every", "0",
                    "--ckpt-every", "0", "--eval-every", "0", "--threads", str(threads), "--out", f"{tmp}/run"]
            script.main(args)
    finally:
        runlib.Run.end_step = original
    # the last step also writes the final samples, checkpoint and evaluation: not a step of the loop
    return {step: (t1 - t0, log) for (_, t0, _), (step, t1, log) in zip(stamps[:-1], stamps[1:-1])}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scripts", nargs="*", help="scripts to measure (default: all with a bare loop)")
    p.add_argument("--reps", type=int, default=5, help="alternating repetitions of script and bare loop")
    p.add_argument("--steps", type=int, default=None, help="steps per repetition (default: each CONFIG's)")
    p.add_argument("--threads", type=int, default=runlib.available_cores())
    args = p.parse_args(argv)
    loops = bare_loops()
    names = args.scripts or list(loops)
    missing = sorted(set(names) - set(loops))
    if missing:
        p.error(f"no bare loop for {missing} (benchmarks/bare/<script>.py)")
    print(f"{'script':<13} {'script s/it':>11} {'bare s/it':>10} {'ratio':>6} {'at --log-every':>15}   "
          f"({args.threads} threads, median of {args.reps})", flush=True)
    for name in names:
        bare, script = loops[name], importlib.import_module(name)
        steps = args.steps or bare.STEPS
        torch.set_num_threads(args.threads)
        plain, logged, base = [], [], []
        for _ in range(args.reps):   # alternate, so that a slow spell of the machine hits both
            timed = time_script(script, bare.CONFIG, steps, args.threads)
            torch.set_num_threads(args.threads)
            bare_times = bare.run(script.parse_args([*bare.CONFIG, "--threads", str(args.threads)]), steps)
            # both means over the same steps (after 2 of warm-up), so that periodic work (imle's search, a
            # new level of detail) weighs the same in each; log steps are timed apart
            same = [k for k, (_, log) in timed.items() if k > WARMUP and not log]
            plain.append(statistics.mean(timed[k][0] for k in same))
            base.append(statistics.mean(bare_times[k - 1] for k in same))
            logs = [k for k, (_, log) in timed.items() if k > WARMUP and log]
            logged.append(statistics.mean(timed[k][0] - bare_times[k - 1] for k in logs) + base[-1] if logs
                          else plain[-1])
        s, b, log = statistics.median(plain), statistics.median(base), statistics.median(logged)
        default_every = script.parse_args([]).log_every
        amortised = s + max(log - s, 0.0) / max(default_every, 1)
        print(f"{name:<13} {s:>11.4g} {b:>10.4g} {s / b:>6.3f} {amortised / b:>15.3f}", flush=True)


if __name__ == "__main__":
    main()
