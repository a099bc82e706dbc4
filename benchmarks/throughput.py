"""Training throughput of every script at its default model size, on synthetic data of the default
dataset's shape (so nothing is downloaded). Reports it/s in each script's own step unit (see its --steps
help), measured between the first and the last log line, so start-up and the first step are excluded.

    python benchmarks/throughput.py                  # CPU, every script present
    python benchmarks/throughput.py --cuda gan wgan_gp
    python benchmarks/throughput.py --dry-run        # the tiny --dry-run configuration instead
"""
import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# script -> (synthetic dataset with the default data's channels, default image size, flags that keep the
# measurement offline: no Inception metrics, a held-out split that fits the synthetic set)
DEFAULT_SHAPES = {
    "gan": ("fake:1", 28, []), "cgan": ("fake:1", 28, []), "infogan": ("fake:1", 28, []),
    "improved_gan": ("fake:1", 28, ["--test-size", "100"]), "gmmn": ("fake:1", 28, []), "imle": ("fake:1", 28, []),
    "dcgan": ("fake", 64, ["--metrics", "none"]), "wgan": ("fake", 64, ["--metrics", "none"]),
    "wgan_gp": ("fake", 32, ["--metrics", "none"]), "sngan": ("fake", 32, ["--metrics", "none"]),
}


def measure(script, steps, extra, dry_run):
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, str(ROOT / f"{script}.py"), "--out", tmp, "--steps", str(steps),
               "--log-every", str(max(steps // 4, 1)), "--sample-every", "0", "--ckpt-every", "0", "--eval-every", "0"]
        if dry_run:
            cmd.append("--dry-run")
        else:
            dataset, size, offline = DEFAULT_SHAPES.get(script, ("fake", 32, []))
            cmd += ["--dataset", dataset, "--image-size", str(size), *offline]
        proc = subprocess.run(cmd + extra, capture_output=True, text=True, cwd=ROOT)
        if proc.returncode != 0:
            return None, proc.stderr.strip().splitlines()[-1:]
        return json.loads((Path(tmp) / "summary.json").read_text())["it_per_s"], None


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("scripts", nargs="*", help="scripts to measure (default: all present)")
    p.add_argument("--steps", type=int, default=40, help="steps per measurement")
    p.add_argument("--cuda", action="store_true")
    p.add_argument("--amp", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="measure the --dry-run configuration")
    args = p.parse_args()
    scripts = args.scripts or [s for s in DEFAULT_SHAPES if (ROOT / f"{s}.py").exists()]
    extra = [flag for flag, on in (("--cuda", args.cuda), ("--amp", args.amp)) if on]
    print(f"{'script':<14} {'it/s':>8}   ({'cuda' if args.cuda else 'cpu'}{', dry run' if args.dry_run else ''})")
    for script in scripts:
        it_s, err = measure(script, args.steps, extra, args.dry_run)
        print(f"{script:<14} {it_s:>8.2f}" if err is None else f"{script:<14} {'failed':>8}   {err}", flush=True)


if __name__ == "__main__":
    main()
