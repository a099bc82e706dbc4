"""Time per training iteration and start-up time of pix2pix.py, cyclegan.py and dcgan.py against the code a
user would otherwise pick (the anchors), same architecture and batch, on synthetic data, alternating runs.

    theirs (A)                                              ours (B)
    junyanz pix2pix: unet_256, basic 70x70 PatchGAN, batch  pix2pix.py --dataset fake --metrics none
      norm, vanilla GAN, batch 1, 256 px, Adam 2e-4/0.5       (its defaults: 256 px, batch 1, ...)
    junyanz cycle_gan: resnet_9blocks, basic D, instance    cyclegan.py --dataset fake --metrics none
      norm, LSGAN, pools of 50, lambda 10/10/0.5, 128 px      --image-size 128 --load-size 143 --n-blocks 9
    pytorch/examples dcgan/main.py --dataset fake           dcgan.py --dataset fake --metrics none --image-size 64
      (64x64 nets, ngf = ndf = 64, batch 64)                  --batch-size 64 --g-width 64 --d-width 64
                                                              --kernel-size 4 --weight-decay 0

The anchors are public code, not part of this repository; fetch them at the commits measured:

    git clone --filter=blob:none https://github.com/junyanz/pytorch-CycleGAN-and-pix2pix anchors/junyanz
    git -C anchors/junyanz checkout 2a7afba2895d52556dd5dfe07e8555ef657ced6f
    git clone https://github.com/pytorch/examples anchors/examples
    git -C anchors/examples checkout 77f55b912142e11fcfdf5b530231fb9c52f181e8

and run from the root of this repository (or give --repo):

    python benchmarks/anchors.py --junyanz anchors/junyanz --examples-dcgan anchors/examples/dcgan/main.py
    python benchmarks/anchors.py pix2pix --threads 1 --junyanz anchors/junyanz    # both sides on one thread
    python benchmarks/anchors.py dcgan --threads 2 --reps 7 --examples-dcgan anchors/examples/dcgan/main.py

The same networks on both sides (the parameter counts are printed and equal), except dcgan's G: ours
"projects and reshapes" z with Linear(100, 8192) + BatchNorm1d(8192) (per-unit batch norm, as the
official DCGAN code), theirs with ConvTranspose2d(100, 512, 4) + BatchNorm2d(512), the same 819,200
weights and 15,360 more batch-norm parameters in ours. The dcgan iterations also differ in work: ours
draws fresh noise for G's step as Algorithm 1 of the GAN paper and the official DCGAN code do (a second
forward pass of G), theirs reuses the D step's fake batch.

Each run is a fresh process (A, B, A, B, ...). A run records the wall-clock end of each training iteration;
per run it reports the median and the mean of the iteration times after --warmup iterations, and the
start-up = process start -> end of the first iteration. The summary gives, over the repetitions, the
median of each, and the ratio ours / theirs (B / A; below 1 means ours is faster).

What one iteration is:
- junyanz: the body of its train.py on a synthetic batch: set_input(rand in [-1, 1]) + optimize_parameters(),
  get_current_losses() every print_freq (100) iterations; options from its own TrainOptions parser (its
  defaults, --model pix2pix|cycle_gan); its Visualizer (HTML/wandb) and DataLoader are left out (not
  importable here without wandb and dominate, and the data are synthetic).
- pytorch/examples: its main.py run unmodified (runpy) with --dataset fake, --outf in a temp dir and
  --manualSeed 0; an iteration ends at optimizerG.step(). Its FakeData has 1000 images = 16 iterations
  per epoch (the last of 40 images), and every epoch starts with a PNG grid and ends with a checkpoint,
  so its mean includes those; the median is the steady state.
- ours: the script's own loop (common.run.Run.end_step marks the end of an iteration), default
  --log-every, with --sample-every 0 --ckpt-every 0 (sample grids and checkpoints are left out on both
  sides; theirs write them every 400 / 5000 iterations or per epoch).
"""
import argparse
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path


OURS = {
    "pix2pix": ("pix2pix", ["--dataset", "fake", "--metrics", "none"]),
    "cyclegan": ("cyclegan", ["--dataset", "fake", "--metrics", "none", "--image-size", "128", "--load-size", "143",
                              "--n-blocks", "9"]),
    "dcgan": ("dcgan", ["--dataset", "fake", "--metrics", "none", "--image-size", "64", "--batch-size", "64",
                        "--g-width", "64", "--d-width", "64", "--kernel-size", "4", "--weight-decay", "0"]),
}
THEIRS = {
    "pix2pix": ["--model", "pix2pix", "--direction", "BtoA"],
    "cyclegan": ["--model", "cycle_gan", "--load_size", "143", "--crop_size", "128"],
}


# ---------------------------------------------------------------------------------------------------------
# Child processes: one training run each, writing {"t_first", "durations", "params", "threads"} to a JSON file
# ---------------------------------------------------------------------------------------------------------

class Recorder:
    def __init__(self, iters, out_json):
        self.iters, self.out_json = iters, out_json
        self.stamps, self.params, self.t_first, self.threads = [], [], None, None

    def stamp(self):
        now = time.perf_counter()
        if not self.stamps:
            import torch
            self.t_first, self.threads = time.time(), torch.get_num_threads()
        self.stamps.append(now)
        if len(self.stamps) >= self.iters:
            durations = [b - a for a, b in zip(self.stamps, self.stamps[1:])]
            Path(self.out_json).write_text(json.dumps({"t_first": self.t_first, "durations": durations,
                                                       "params": self.params, "threads": self.threads}))
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(0)   # stop here: no final samples, evaluation or checkpoint


def child_ours(pair, threads, iters, out_json, repo, tmp):
    sys.path.insert(0, str(repo))
    import importlib
    from common import run as runlib
    rec = Recorder(iters, out_json)
    name, flags = OURS[pair]
    script = importlib.import_module(name)
    prepare, end_step = runlib.Run.prepare, runlib.Run.end_step

    def counting_prepare(self, model, *a, **k):
        rec.params.append([type(model).__name__, sum(p.numel() for p in model.parameters())])
        return prepare(self, model, *a, **k)

    def timed_end_step(self, step, *a, **k):
        stop = end_step(self, step, *a, **k)
        rec.stamp()
        return stop
    runlib.Run.prepare, runlib.Run.end_step = counting_prepare, timed_end_step
    argv = [*flags, "--steps", "1000000", "--sample-every", "0", "--ckpt-every", "0", "--out", f"{tmp}/run"]
    if threads:
        argv += ["--threads", str(threads)]
    script.main(argv)
    raise SystemExit(f"{name} stopped before {iters} iterations")


def child_junyanz(pair, threads, iters, out_json, tmp, junyanz):
    sys.path.insert(0, junyanz)
    import torch
    if threads:
        torch.set_num_threads(threads)
    rec = Recorder(iters, out_json)
    sys.argv = ["train.py", "--dataroot", tmp, "--name", "compare", "--checkpoints_dir", tmp, *THEIRS[pair]]
    from options.train_options import TrainOptions
    from models import create_model
    from util.util import init_ddp
    opt = TrainOptions().parse()
    opt.device = init_ddp()
    model = create_model(opt)
    model.setup(opt)
    nets = ["G", "D"] if pair == "pix2pix" else ["G_A", "G_B", "D_A", "D_B"]
    rec.params = [[n, sum(p.numel() for p in getattr(model, "net" + n).parameters())] for n in nets]
    total, size = 0, opt.crop_size
    while True:   # the body of its train.py, on a synthetic batch in [-1, 1]
        data = {"A": torch.rand(opt.batch_size, opt.input_nc, size, size) * 2 - 1,
                "B": torch.rand(opt.batch_size, opt.output_nc, size, size) * 2 - 1,
                "A_paths": ["a.png"] * opt.batch_size, "B_paths": ["b.png"] * opt.batch_size}
        total += opt.batch_size
        model.set_input(data)
        model.optimize_parameters()
        if total % opt.print_freq == 0:
            model.get_current_losses()
        rec.stamp()


def child_examples_dcgan(threads, iters, out_json, tmp, main_py):
    import runpy
    import torch
    import torch.optim
    if threads:
        torch.set_num_threads(threads)
    rec = Recorder(iters, out_json)

    class TimedAdam(torch.optim.Adam):
        """main.py builds optimizerD, then optimizerG; an iteration ends with optimizerG.step()."""
        made = 0

        def __init__(self, params, *a, **k):
            params = list(params)
            self.index, TimedAdam.made = TimedAdam.made, TimedAdam.made + 1
            rec.params.append(["D" if self.index == 0 else "G", sum(p.numel() for p in params)])
            super().__init__(params, *a, **k)

        def step(self, *a, **k):
            out = super().step(*a, **k)
            if self.index == 1:
                rec.stamp()
            return out
    torch.optim.Adam = TimedAdam
    sys.argv = [main_py, "--dataset", "fake", "--outf", tmp, "--manualSeed", "0"]
    runpy.run_path(main_py, run_name="__main__")
    raise SystemExit(f"examples dcgan stopped before {iters} iterations")


def child(argv):
    side, pair, threads, iters, out_json, repo, anchor = argv
    threads, iters = int(threads), int(iters)
    with tempfile.TemporaryDirectory() as tmp:
        if side == "ours":
            child_ours(pair, threads, iters, out_json, repo, tmp)
        elif pair == "dcgan":
            child_examples_dcgan(threads, iters, out_json, tmp, anchor)
        else:
            child_junyanz(pair, threads, iters, out_json, tmp, anchor)


# ---------------------------------------------------------------------------------------------------------
# Parent: alternate the two sides, summarise
# ---------------------------------------------------------------------------------------------------------

def run_once(side, pair, args, log_dir, rep):
    out_json = Path(log_dir) / f"{pair}-{side}-{rep}.json"
    log = Path(log_dir) / f"{pair}-{side}-{rep}.log"
    cmd = [args.python, str(Path(__file__).resolve()), "_child", side, pair, str(args.threads or 0),
           str(args.iters), str(out_json), str(args.repo), args.examples_dcgan if pair == "dcgan" else args.junyanz]
    with open(log, "w") as f:
        t0 = time.time()
        proc = subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, cwd=args.repo, start_new_session=True)
        rc = proc.wait()
    try:   # DataLoader workers of a run stopped mid-epoch (examples dcgan): end them with their session
        os.killpg(proc.pid, signal.SIGTERM)
    except ProcessLookupError:
        pass
    if rc != 0 or not out_json.exists():
        tail = "".join(log.read_text().splitlines(keepends=True)[-25:])
        raise SystemExit(f"{side} {pair} failed (exit {rc}); last lines of {log}:\n{tail}")
    r = json.loads(out_json.read_text())
    times = r["durations"][args.warmup:] or r["durations"][-1:]
    return {"startup": r["t_first"] - t0, "median": statistics.median(times), "mean": statistics.mean(times),
            "params": r["params"], "threads": r["threads"]}


def describe_params(params):
    return ", ".join(f"{n} {c:,}" for n, c in params)


def main():
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        return child(sys.argv[2:])
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("pairs", nargs="*", help="pix2pix, cyclegan, dcgan (default: all three)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--threads", type=int, default=None,
                   help="intra-op threads on BOTH sides (torch.set_num_threads in theirs, --threads N in ours)")
    g.add_argument("--defaults", action="store_true",
                   help="each program's own default threads (theirs: what torch picks; ours: our default); the default")
    p.add_argument("--reps", type=int, default=5, help="repetitions of A, B (default: %(default)s)")
    p.add_argument("--iters", type=int, default=15, help="iterations per run (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=3, help="iteration times left out at the start of a run (default: %(default)s)")
    p.add_argument("--repo", default=os.getcwd(), help="root of the repository with the scripts (default: the current directory)")
    p.add_argument("--python", default=sys.executable, help="interpreter for both sides (default: this one)")
    p.add_argument("--junyanz", default=None, metavar="DIR", help="a checkout of junyanz/pytorch-CycleGAN-and-pix2pix "
                   "(pix2pix, cyclegan)")
    p.add_argument("--examples-dcgan", default=None, metavar="FILE", help="pytorch/examples' dcgan/main.py (dcgan)")
    p.add_argument("--keep", default=None, metavar="DIR", help="keep each run's log and JSON in DIR")
    args = p.parse_args()
    args.pairs = args.pairs or list(OURS)
    if set(args.pairs) - set(OURS):
        p.error(f"pairs are {', '.join(OURS)}; got {' '.join(args.pairs)}")
    args.repo = str(Path(args.repo).resolve())
    for pair in args.pairs:
        anchor = args.examples_dcgan if pair == "dcgan" else args.junyanz
        if not anchor or not Path(anchor).exists():
            p.error(f"{pair} needs " + ("--examples-dcgan FILE" if pair == "dcgan" else "--junyanz DIR")
                    + " (see the commands at the top of this file)")
    args.junyanz = str(Path(args.junyanz).resolve()) if args.junyanz else ""
    args.examples_dcgan = str(Path(args.examples_dcgan).resolve()) if args.examples_dcgan else ""
    if not (Path(args.repo) / "pix2pix.py").exists():
        p.error(f"{args.repo} has no pix2pix.py: run from the repository root or give --repo")
    if args.iters < 2:
        p.error("--iters must be at least 2 (an iteration time needs two iteration ends)")
    mode = f"--threads {args.threads} on both sides" if args.threads else "each program's default threads"
    print(f"{mode}; {args.reps} repetitions of theirs (A), ours (B), alternating; {args.iters} iterations per run, "
          f"first {args.warmup} iteration times left out; repo {args.repo}", flush=True)
    log_dir = args.keep or tempfile.mkdtemp(prefix="anchors-")
    Path(log_dir).mkdir(parents=True, exist_ok=True)
    rows = []
    for pair in args.pairs:
        res = {"theirs": [], "ours": []}
        for rep in range(args.reps):
            for side in ("theirs", "ours"):
                r = run_once(side, pair, args, log_dir, rep)
                res[side].append(r)
                print(f"  {pair:<8} rep {rep + 1} {side:<6} {r['median']:8.4f} s/it median  {r['mean']:8.4f} mean  "
                      f"start-up {r['startup']:6.2f} s  ({r['threads']} threads)", flush=True)
        a, b = res["theirs"][0], res["ours"][0]
        print(f"{pair}: parameters theirs: {describe_params(a['params'])}", flush=True)
        print(f"{pair}: parameters ours:   {describe_params(b['params'])}", flush=True)
        med = {s: {k: statistics.median(r[k] for r in res[s]) for k in ("median", "mean", "startup")} for s in res}
        rows.append((pair, med, a["threads"], b["threads"]))
    print(f"\n{'pair':<9} {'theirs s/it':>11} {'ours s/it':>10} {'ratio':>6}   {'mean: theirs':>12} {'ours':>8} "
          f"{'ratio':>6}   {'start-up theirs':>15} {'ours':>6} {'ratio':>6}   threads")
    for pair, m, ta, tb in rows:
        t, o = m["theirs"], m["ours"]
        print(f"{pair:<9} {t['median']:>11.4f} {o['median']:>10.4f} {o['median'] / t['median']:>6.3f}   "
              f"{t['mean']:>12.4f} {o['mean']:>8.4f} {o['mean'] / t['mean']:>6.3f}   "
              f"{t['startup']:>14.2f}s {o['startup']:>5.2f}s {o['startup'] / t['startup']:>6.3f}   {ta} / {tb}")
    print(f"(medians over {args.reps} repetitions; ratio = ours / theirs; logs in {log_dir})")


if __name__ == "__main__":
    main()
