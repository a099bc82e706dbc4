"""Training throughput of every script at its paper's batch and image size on synthetic data (nothing is
downloaded), in each mode: fp32, --amp (bfloat16 autocast) and --compile. One table of it/s, in each
script's own step unit (see its --steps help), and images/s (it/s x the batch of real images per step).

    python benchmarks/throughput.py --cuda                       # all 18 scripts x fp32, amp, compile
    python benchmarks/throughput.py dcgan pix2pix --cuda --modes fp32 amp
    python benchmarks/throughput.py --steps 6                    # the CPU, fp32 (slow at the paper's sizes)
    python benchmarks/throughput.py --dry-run                    # the tiny --dry-run configurations
    python benchmarks/throughput.py dcgan pix2pix --steps 8 --threads 1 2 --reps 3   # what --threads 1 costs

it/s is measured from the end of the first step to the end of the last (summary.json), so start-up and the
first step (warm-up, compilation) are left out. With --compile every compiled configuration is first run
for a few steps in parallel processes (--jobs; Inductor caches the compiled code on disk), then every
measurement runs alone, one after the other, on a warm cache. Measured this way the whole table for the
18 scripts fits in about 10 minutes on one GPU (see the README for the figures).
"""
import argparse
import concurrent.futures
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# script -> (images per step at the paper's setting, flags: synthetic data of the default dataset's shape and
# the paper's batch; no evaluation, no Inception metrics; the growing nets at their final resolution)
PAPER = {
    "gan": (100, ["--dataset", "fake:1", "--image-size", "28"]),
    "dcgan": (128, ["--dataset", "fake", "--image-size", "64", "--metrics", "none"]),
    "improved_gan": (100, ["--dataset", "fake:1", "--image-size", "28", "--test-size", "100", "--labels", "100"]),
    "wgan": (64, ["--dataset", "fake", "--image-size", "64", "--metrics", "none"]),
    "wgan_gp": (64, ["--dataset", "fake", "--image-size", "32", "--metrics", "none"]),
    "sngan": (64, ["--dataset", "fake", "--image-size", "32", "--metrics", "none"]),
    "sagan": (256, ["--dataset", "fake", "--image-size", "32", "--metrics", "none"]),
    "progan": (16, ["--dataset", "fake", "--image-size", "32", "--initial-resolution", "32", "--metrics", "none"]),
    "stylegan": (32, ["--dataset", "fake", "--image-size", "64", "--initial-resolution", "64",
                      "--batch-size", "32", "--batch-schedule", "64:32", "--metrics", "none"]),
    "cgan": (100, ["--dataset", "fake:1", "--image-size", "28"]),
    "pix2pix": (1, ["--dataset", "fake", "--image-size", "256", "--metrics", "none"]),
    "cyclegan": (1, ["--dataset", "fake", "--image-size", "256", "--metrics", "none"]),
    "infogan": (128, ["--dataset", "fake:1", "--image-size", "28"]),
    "bigbigan": (2048, ["--dataset", "fake", "--image-size", "32", "--metrics", "none"]),
    "gmmn": (1000, ["--dataset", "fake:1", "--image-size", "28"]),
    "imle": (64, ["--dataset", "fake:1", "--image-size", "28"]),
    "gail": (0, []),   # CartPole: steps are TRPO iterations of 5000 state-action pairs; no images, no amp/compile
    # stage 1 with D on from the start; LPIPS off: its VGG16 weights are a download
    "vqgan": (3, ["--dataset", "fake", "--image-size", "256", "--metrics", "none", "--disc-start", "0",
                  "--perceptual-weight", "0"]),
}
MODES = {"fp32": [], "amp": ["--amp"], "compile": ["--compile"]}
NO_IMAGES = {"gail"}   # no --amp or --compile


def command(script, mode, steps, out, cuda, dry_run, threads=None):
    cmd = [sys.executable, str(ROOT / f"{script}.py"), "--out", str(out), "--steps", str(steps),
           "--log-every", str(steps), "--sample-every", "0", "--ckpt-every", "0", "--eval-every", "0"]
    cmd += ["--dry-run"] if dry_run else PAPER[script][1]
    cmd += ["--threads", str(threads)] if threads else []
    return cmd + (["--cuda"] if cuda else []) + MODES[mode]


def run(script, mode, steps, cuda, dry_run, timeout, threads=None):
    """(it/s, None) or (None, the last line of stderr)."""
    with tempfile.TemporaryDirectory() as tmp:
        cmd = command(script, mode, steps, Path(tmp) / "run", cuda, dry_run, threads)
        try:
            proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=timeout)
        except subprocess.TimeoutExpired:
            return None, f"timed out after {timeout} s"
        if proc.returncode != 0:
            return None, (proc.stderr.strip().splitlines() or ["failed"])[-1]
        rate = json.loads((Path(tmp) / "run" / "summary.json").read_text())["it_per_s"]
        return (rate, None) if rate else (None, "no rate (fewer than 2 steps?)")


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scripts", nargs="*", help="scripts to measure (default: all)")
    p.add_argument("--modes", nargs="+", choices=list(MODES), default=None,
                   help="default: fp32 amp compile with --cuda, fp32 on the CPU")
    p.add_argument("--steps", type=int, default=None, help="steps per measurement (default: 30 on CUDA, 4 on the CPU)")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="measure the --dry-run configurations")
    p.add_argument("--jobs", type=int, default=6, help="parallel processes that compile before the measurements")
    p.add_argument("--timeout", type=int, default=300, help="seconds per measurement")
    p.add_argument("--threads", type=int, nargs="+", default=[None],
                   help="CPU thread counts to compare, e.g. 1 2 (default: each script's default, all cores)")
    p.add_argument("--reps", type=int, default=1,
                   help="repetitions, alternating the thread counts; the median is shown (default: %(default)s)")
    args = p.parse_args(argv)
    unknown = sorted(set(args.scripts) - set(PAPER))
    if unknown:
        p.error(f"unknown scripts {unknown}; choose from {sorted(PAPER)}")
    scripts = args.scripts or list(PAPER)
    modes = args.modes or (["fp32", "amp", "compile"] if args.cuda else ["fp32"])
    steps = args.steps or (30 if args.cuda else 4)
    todo = [(s, m) for s in scripts for m in modes if m == "fp32" or s not in NO_IMAGES]
    start = time.perf_counter()
    warm = [(s, m) for s, m in todo if m == "compile"]
    if warm:   # compile every configuration once, in parallel, so that the timed runs find the code cached
        with concurrent.futures.ThreadPoolExecutor(args.jobs) as pool:
            list(pool.map(lambda sm: run(*sm, 3, args.cuda, args.dry_run, args.timeout * 2), warm))
        print(f"compiled {len(warm)} configurations in {time.perf_counter() - start:.0f} s", flush=True)
    device = "cuda" if args.cuda else "cpu"
    print(f"{'script':<13} {'mode':<8} {'threads':>7} {'it/s':>9} {'images/s':>10}   ({device}, {steps} steps"
          f"{', dry-run sizes' if args.dry_run else ', paper batch and size'}, median of {args.reps})", flush=True)
    for script, mode in todo:
        rates, err = {t: [] for t in args.threads}, None
        for _ in range(args.reps):   # alternate the thread counts, so that a slow spell hits each alike
            for t in args.threads:
                rate, err = run(script, mode, steps, args.cuda, args.dry_run, args.timeout, t)
                if err:
                    break
                rates[t].append(rate)
            if err:
                break
        images = PAPER[script][0]
        for t in args.threads:
            shown_t = f"{t or 'default':>7}"
            if err:
                print(f"{script:<13} {mode:<8} {shown_t} {'failed':>9} {'':>10}   {err}", flush=True)
                break
            rate = statistics.median(rates[t])
            shown = f"{rate * images:>10.1f}" if images and not args.dry_run else f"{'-':>10}"
            print(f"{script:<13} {mode:<8} {shown_t} {rate:>9.3g} {shown}", flush=True)
    print(f"total {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
