"""Run setup shared by every script: command line, device, seeds, torchrun, output directory,
TensorBoard, progress line, checkpoints, signals. gan.py shows the whole life of a run: parse_args,
friendly_errors, setup, resume/restore_rng, end_step after every step (scalars, samples, evaluation,
checkpoint), finish. Only rank 0 of a torchrun job writes anything.
"""
import argparse
import contextlib
import datetime
import json
import math
import os
import random
import signal
import sys
import time
from pathlib import Path

import torch
import torch.distributed as dist

from common import checkpoint as ckpt_io


class UsageError(Exception):
    """Bad input detected at start-up (unknown dataset, impossible image size, missing data...)."""


class NonFiniteLoss(Exception):
    """A loss became NaN or Inf: the run stops and points at the last good checkpoint."""


# Command line

class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help with "(default: X)" after each flag that has a default; a flag whose default depends on other
    flags (None) says what it is in its own help instead of a bare "(default: None)"."""

    def _get_help_string(self, action):
        if action.default is None or action.nargs == 0:   # None, or an on/off switch: nothing to show
            return action.help
        return super()._get_help_string(action)


def add_args(parser, *, dataset, image_size, batch_size, steps, log_every=100, sample_every=1000,
             ckpt_every=1000, eval_every=0, eval_samples=10000, metrics=None, streamed=True, inception=True,
             digits=False, images=True, export=True, image_size_help=None):
    """Add the flags every script shares, with the script's paper defaults. `metrics` (e.g. "fid,is") adds
    --metrics, --inception-weights and --eval; digits=True offers the digit metrics, inception=False drops the
    Inception ones; streamed=False drops --workers; images=False (gail.py) drops the image flags; export=False
    (image-to-image scripts) drops --num-samples and --format."""
    parser.formatter_class = HelpFormatter
    g = parser.add_argument_group("run (shared by every script)")
    if images:
        g.add_argument("--dataset", default=dataset,
                       help="mnist, fashion-mnist, stacked-mnist (three random digits as RGB: 1000 modes), "
                            "stacked:PATH (the same from a folder of MNIST idx files), cifar10, cifar100, svhn, stl10, "
                            "celeba, lsun:<category>[,..], fake[:channels], ring8, grid25, or a path (image folder, "
                            "or a folder of MNIST idx files) (default: %(default)s)")
    g.add_argument("--data-root", default=os.environ.get("GAN_DATA_ROOT", "data"),
                   help="where datasets are stored / downloaded; $GAN_DATA_ROOT sets the default (default: %(default)s)")
    if images:
        g.add_argument("--download", action=argparse.BooleanOptionalAction, default=True,
                       help="download missing torchvision datasets (default: %(default)s)")
        g.add_argument("--image-size", type=int, default=image_size,
                       help="image side in pixels (default: " + (image_size_help or "%(default)s") + ")")
    g.add_argument("--batch-size", type=int, default=batch_size,
                   help="global batch size, split over torchrun processes (default: %(default)s)")
    g.add_argument("--steps", type=int, default=steps, help="training steps, see the docstring (default: %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    g.add_argument("--cuda", action="store_true", help="train on the GPU (an error if CUDA is unavailable)")
    g.add_argument("--threads", type=int, default=None, metavar="N",
                   help="CPU threads; runs with the same seed and N are bit-identical on one machine, and N = 1 "
                        "gives the same weights on any machine (default: the cores this process may use)")
    g.add_argument("--deterministic", action="store_true",
                   help="with --cuda: bit-identical GPU runs (deterministic cuDNN and cuBLAS, no TF32, no autotuning; slower)")
    g.add_argument("--out", default=None, help="run directory; runs/<script>/<dataset>-<timestamp> when not given")
    g.add_argument("--resume", default=None, metavar="auto|PATH",
                   help="continue from a checkpoint; 'auto' uses <out>/ckpt.pt (or the newest run of this "
                        "script and dataset when --out is not given) and starts fresh if there is none")
    g.add_argument("--log-every", type=int, default=log_every, help="console/TensorBoard scalars (default: %(default)s)")
    g.add_argument("--sample-every", type=int, default=sample_every, help="sample grids (default: %(default)s)")
    g.add_argument("--ckpt-every", type=int, default=ckpt_every, help="checkpoints (default: %(default)s)")
    g.add_argument("--eval-every", type=int, default=eval_every, help="evaluation, 0 = only at the end (default: %(default)s)")
    if images:
        g.add_argument("--eval-samples", type=int, default=eval_samples, help="samples per evaluation (default: %(default)s)")
        g.add_argument("--amp", action="store_true", help="bfloat16 autocast")
        g.add_argument("--compile", action="store_true", help="torch.compile the networks")
    if streamed and images:
        g.add_argument("--workers", type=int, default=4, help="DataLoader workers for datasets not held in memory")
    g.add_argument("--sample", default=None, metavar="CKPT",
                   help="write samples from a checkpoint and exit, into --out or the checkpoint's samples/ folder "
                        "(as <name>-<step>-sampled.png, beside the training grids)")
    g.add_argument("--dry-run", action="store_true",
                   help="a few steps on small synthetic data with small nets (explicit flags still win)")
    if metrics is not None:
        parser.metric_names = (("fid", "is", "kid", "pr") if inception else ()) + (("cfid", "agree", "modes") if digits else ())
        g.add_argument("--metrics", default=metrics, help="metrics at evaluation, comma-separated, or none: "
                       + ("Inception fid, is, kid, pr" if inception else "") + ("; " if inception and digits else "")
                       + ("on digits (MNIST family, common/digits.py) cfid (classifier FID), agree (class agreement), "
                          "modes (Stacked MNIST)" if digits else "") + " (default: %(default)s)")
        if inception:
            g.add_argument("--inception-weights", default=None, metavar="PATH",
                           help="the FID Inception weights file; $FID_INCEPTION_WEIGHTS or the torch hub cache when not given")
        g.add_argument("--eval", action="store_true",
                       help="with --sample: also score the checkpoint on --eval-samples samples (default 50000 then)")
        if export:
            g.add_argument("--num-samples", type=int, default=0, metavar="N",
                           help="with --sample: also write N individual samples, for evaluate.py or the reference "
                                "FID tools (0: none)")
            g.add_argument("--format", choices=("npz", "png"), default="npz",
                           help="how --num-samples are written: one .npz (arr_0: uint8 N x H x W x C, and labels "
                                "of a conditional model) or a folder of PNGs (default: %(default)s)")
    return parser


def parse(parser, argv, dry_run_defaults=None, defaults=None):
    """Parse argv, with defaults that depend on other flags (explicit flags always win): `dry_run_defaults`
    replaces the defaults with --dry-run; `defaults(args)` returns the defaults of one configuration (e.g.
    {"lr": 1e-4} on the 2D toys), applied until they settle. `args.explicit` lists the flags the user gave
    (vqgan's stage 2 uses it to take defaults from its VQGAN's checkpoint)."""
    args = parser.parse_args(argv)
    given = explicit_flags(parser, argv, args)
    args.explicit = sorted(given)   # the flags the user gave (defaults() may read it; kept in args.json)
    if args.dry_run:
        base = {"steps": 4, "batch_size": 8, "log_every": 2, "sample_every": 2, "ckpt_every": 2,
                "eval_every": 0, "eval_samples": 64, "workers": 0, "metrics": "none"}
        _apply(args, {**{k: v for k, v in base.items() if hasattr(args, k)}, **(dry_run_defaults or {})}, given)
    for _ in range(3):
        if defaults is None or not _apply(args, defaults(args), given):
            break
    if isinstance(getattr(args, "metrics", None), str):
        wanted = [m for m in args.metrics.split(",") if m and m != "none"]
        digit = ("cfid", "agree", "modes")   # split off: args.metrics keeps the Inception ones
        names = parser.metric_names
        if set(wanted) - set(names):
            raise UsageError(f"--metrics takes {', '.join(names)} or none, got {','.join(wanted)}")
        args.metrics, args.digit_metrics = [m for m in wanted if m not in digit], [m for m in wanted if m in digit]
        if getattr(args, "eval", False) and not args.sample:
            raise UsageError("--eval scores a checkpoint and needs --sample CKPT "
                             "(training runs evaluate every --eval-every steps)")
    if getattr(args, "num_samples", 0) and not args.sample:
        raise UsageError("--num-samples writes samples of a checkpoint and needs --sample CKPT")
    check_args(args)
    args.threads = args.threads or available_cores()
    return args


def explicit_flags(parser, argv, args):
    """The flags given on the command line: argparse fills in defaults only where nothing is set."""
    unset = object()
    marked = parser.parse_args(argv, argparse.Namespace(**{dest: unset for dest in vars(args)}))
    return {dest for dest, value in vars(marked).items() if value is not unset}


def _apply(args, values, given):
    """Set the values of flags not in `given`; True if anything changed."""
    changed = False
    for key, value in values.items():
        if not hasattr(args, key):
            raise KeyError(f"default for unknown flag {key!r}")   # a mistake in the script
        if key not in given and getattr(args, key) != value:
            setattr(args, key, value)
            changed = True
    return changed


def check_args(args):
    """Start-up checks of the shared flags (and of every learning rate), before anything is written."""
    for name, least in (("steps", 1), ("batch_size", 1), ("log_every", 0), ("sample_every", 0),
                        ("ckpt_every", 0), ("eval_every", 0), ("eval_samples", 0), ("num_samples", 0)):
        if hasattr(args, name) and getattr(args, name) < least:
            raise UsageError(f"--{name.replace('_', '-')} must be >= {least}, got {getattr(args, name)}")
    for name, value in vars(args).items():
        if (name == "lr" or name.endswith("_lr")) and value is not None and not value > 0:
            raise UsageError(f"--{name.replace('_', '-')} must be > 0, got {value}")
    if args.out and Path(args.out).exists() and not Path(args.out).is_dir():
        raise UsageError(f"--out {args.out} is an existing file; give a directory")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    if args.deterministic and not args.cuda:
        raise UsageError("--deterministic is for --cuda runs: CPU runs are already bit-identical for the same --threads")
    if getattr(args, "cuda", False) and not torch.cuda.is_available():
        raise UsageError("--cuda was given but CUDA is not available (no GPU, or a CPU-only PyTorch build)")


@contextlib.contextmanager
def as_usage_error():
    """Start-up checks of the paper code's plain ValueErrors (it copies without common) become UsageErrors."""
    try:
        yield
    except ValueError as e:
        raise UsageError(str(e)) from None


@contextlib.contextmanager
def friendly_errors():
    """Turn the errors a user can cause into one line on stderr and exit code 2 (no traceback)."""
    prog = os.path.basename(sys.argv[0]) if sys.argv and sys.argv[0] else "gan"
    try:
        yield
    except (UsageError, ckpt_io.CheckpointError, NonFiniteLoss) as e:
        if int(os.environ.get("RANK", 0)) == 0:   # under torchrun every rank fails alike: say it once
            print(f"{prog}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


# Setup

class Run:
    """What a training loop needs from its surroundings. One per process."""

    def __init__(self, args, script, device, rank, world_size, out, writer, ckpt_name="ckpt.pt"):
        self.args, self.script, self.device = args, script, device
        self.ckpt_path = out / ckpt_name if out is not None else None
        self.summary_name = run_file("summary", ckpt_name)
        self.rank, self.world_size, self.distributed = rank, world_size, world_size > 1
        self.cuda = device.type == "cuda"
        self.out, self.writer, self.is_main = out, writer, rank == 0
        self.stop_requested = False   # the loop saves a checkpoint and stops when this is set
        self.signalled = False        # SIGINT/SIGTERM seen; under torchrun ranks agree at the next log step
        self.last_scalars, self.metrics = {}, {}
        self.last_good_ckpt = self.resume_state = None
        self._t0 = self._t_last = time.perf_counter()
        self._step_last = self._step_first = None
        self._start = 0               # the step the loop starts from (a resumed run's checkpoint step)
        self._it_per_s = float("nan")

    # -- devices and models -----------------------------------------------------------------
    def prepare(self, model, channels_last=False, compile=True, ddp=True):
        """The network on the device (channels_last on CUDA), in DDP under torchrun, compiled with --compile."""
        model = model.to(self.device)
        if channels_last and self.cuda:
            model = model.to(memory_format=torch.channels_last)
        if ddp and self.distributed and any(p.requires_grad for p in model.parameters()):
            from torch.nn.parallel import DistributedDataParallel
            model = DistributedDataParallel(model, device_ids=[self.device] if self.cuda else None)
        if compile and getattr(self.args, "compile", False):
            model = torch.compile(model)
        return model

    def autocast(self):
        """bfloat16 autocast when --amp is given (no GradScaler is needed for bfloat16)."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=getattr(self.args, "amp", False))

    # -- logging ------------------------------------------------------------------------------
    def every(self, step, interval):
        return interval > 0 and step % interval == 0

    def is_log_step(self, step):
        """The steps whose scalars `log` writes (a term computed only to be logged is computed only then)."""
        return self.every(step, self.args.log_every) or step == self.args.steps or step == self._start + 1

    def log(self, step, scalars, force=False):
        """Log scalars (tensors or floats) at log steps, the only place tensors are read; NaN/Inf stops the run."""
        if not (force or self.is_log_step(step)):
            return
        values = {k: float(v.detach().float().mean()) if torch.is_tensor(v) else float(v) for k, v in scalars.items()}
        if self.distributed:  # average over ranks so every rank sees the same numbers and stops together
            t = torch.tensor([*values.values(), float(self.signalled)], dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            *averaged, signalled = (t / self.world_size).tolist()
            values = dict(zip(values, averaged))
            self.stop_requested = self.stop_requested or signalled > 0
        bad = [k for k, v in values.items() if not math.isfinite(v)]
        if bad:
            where = (f"the last good checkpoint is {self.last_good_ckpt}" if self.last_good_ckpt
                     else "no checkpoint was written yet")
            raise NonFiniteLoss(f"{', '.join(bad)} became {values[bad[0]]} at step {step}; stopping ({where})")
        for k, v in values.items():
            (self.metrics if k.startswith("metric/") else self.last_scalars)[k] = v
        now = time.perf_counter()
        if not force:  # throughput between regular log steps (evaluations are not training time)
            if self._step_last is not None and step > self._step_last:
                self._it_per_s = (step - self._step_last) / max(now - self._t_last, 1e-9)
                values["perf/it_per_s"] = self._it_per_s
            if self._step_first is None or step == self._start + 1:   # the mean rate leaves out the first step
                self._step_first, self._t_first = step, now                # (start-up, warm-up, compilation)
            self._t_last, self._step_last = now, step
        if not self.is_main:
            return
        for k, v in values.items():
            self.writer.add_scalar(k, v, step)
        eta = (self.args.steps - step) / self._it_per_s if self._it_per_s > 0 else float("nan")
        eta = str(datetime.timedelta(seconds=round(eta))) if math.isfinite(eta) else "?"
        shown = " ".join(f"{k} {v:.4g}" for k, v in values.items() if k != "perf/it_per_s")
        rate = f"{self._it_per_s:.3g} it/s" if math.isfinite(self._it_per_s) else "? it/s"
        print(f"step {step}/{self.args.steps} | {rate} | eta {eta} | {shown}", flush=True)

    def images(self, tag, x, step, nrow=8, value_range=(-1, 1)):
        """Save an image grid (PNG under samples/ and TensorBoard). x: (N, C, H, W) in value_range."""
        if not self.is_main:
            return None
        path = self.out / "samples" / f"{tag.replace('/', '_')}-{step:07d}.png"
        self.writer.add_image(tag, save_grid(x, path, nrow, value_range), step)
        return path

    def scatter(self, tag, points, step, real=None, lim=None):
        """Save a 2D scatter plot of generated points (black) over real ones (red) as an image."""
        return self.images(tag, scatter_image(points, real=real, lim=lim)[None], step, 1, (0, 1))

    def side_rng(self):
        """Sampling and evaluation draw from side streams: how often they run never changes training."""
        return torch.random.fork_rng(devices=[self.device] if self.cuda else [])

    def end_step(self, step, scalars, *, samples=None, evaluate=None, state=None, count=None):
        """The end of a training step: log `scalars`; at sample steps save each {tag: images or (images, nrow
        [, value_range])} of `samples()` (no_grad, side RNG; None when it writes its own output); at evaluation
        steps log `evaluate()`'s metrics (side RNG); at checkpoint steps save `state()`. The last step does all.
        `count` (default: step) is what --sample-every and --eval-every count. True when the loop must stop."""
        self.log(step, scalars)
        count, last = step if count is None else count, step == self.args.steps
        if samples is not None and (self.every(count, self.args.sample_every) or last):
            with self.side_rng(), torch.no_grad():
                for tag, x in (samples() or {}).items():
                    x, nrow, *value_range = x if isinstance(x, tuple) else (x, 10)
                    self.images(tag, x, step, nrow, *value_range)
        if evaluate is not None and (self.every(count, self.args.eval_every) or last):
            with self.side_rng():
                scores = evaluate()
            if scores:
                self.log(step, scores, force=True)
        if state is not None and (self.every(step, self.args.ckpt_every) or self.stop_requested or last):
            self.save_checkpoint(step, state())
        return self.stop_requested

    # -- checkpoints --------------------------------------------------------------------------
    def save_checkpoint(self, step, state):
        """Write `state` (models, optimizers, ...) with the script, step, args and RNG states, atomically."""
        rng = ckpt_io.rng_state()
        if self.distributed:  # keep every rank's RNG streams (call this on every rank)
            ranks = [None] * self.world_size
            dist.all_gather_object(ranks, rng)
            rng = {"ranks": ranks}
        if not self.is_main:
            return None
        full = {"script": self.script, "step": step, "args": vars(self.args), **state, "rng": rng}
        path = self.ckpt_path
        ckpt_io.save(full, path)
        self.last_good_ckpt = f"{path} (step {step})"
        return path

    def resume(self, models, optimizers):
        """Load the resumed checkpoint into dicts of `models` and `optimizers`; its step (0 for a fresh run)."""
        if self.resume_state is None:
            return 0
        for kind, objects in (("models", models), ("optimizers", optimizers)):
            for name, obj in objects.items():
                obj.load_state_dict(self.resume_state[kind][name])
        return self.resume_state["step"]

    def restore_rng(self):
        """Call after models, optimizers and data are built, right before the loop (rates count from here)."""
        if self.resume_state is not None:
            ckpt_io.set_rng_state(self.resume_state["rng"], self.rank)
        self._start = self._step_first = self._step_last = self.resume_state["step"] if self.resume_state else 0
        self._t_first = self._t_last = time.perf_counter()

    # -- end ------------------------------------------------------------------------------------
    def finish(self, step, **extra):
        """Write summary.json, close the writer, return the summary."""
        wall = time.perf_counter() - self._t0
        mean_it_s = None   # no rate before a second log line (JSON has no NaN)
        if self._step_first is not None and self._step_last > self._step_first:
            mean_it_s = (self._step_last - self._step_first) / (self._t_last - self._t_first)
        summary = {"script": self.script, "dataset": data_name(self.args), "step": step, "steps": self.args.steps,
                   "interrupted": self.stop_requested, "it_per_s": mean_it_s, "wall_s": wall,
                   "losses": self.last_scalars, "metrics": self.metrics, **extra}
        if self.is_main:
            text = json.dumps(_finite(summary), indent=2, default=str, allow_nan=False)
            (self.out / self.summary_name).write_text(text + "\n")
            self.writer.close()
            rate = f"{mean_it_s:.3g} it/s" if mean_it_s else "? it/s"
            print(f"done: step {step}, {rate}; results in {self.out}", flush=True)
        if self.distributed:
            dist.barrier()
            dist.destroy_process_group()
        return summary


def available_cores():
    """The cores this process may run on (a container's or job's share, not the machine's)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:   # not Linux
        return os.cpu_count() or 1


def set_threads(args):
    """--threads N. N splits the convolution gradients and sums, so runs with other N differ in the last bits.
    N = 1: the same seed gives bit-identical weights on any machine of the same build (tests/test_determinism.py).
    N > 1: two same-seed runs almost always agree, but MKL does not promise it (2 of 164 dcgan dry runs did not)."""
    torch.set_num_threads(args.threads)


def set_cuda_flags(args):
    """cuDNN autotuning and TF32 on the GPU, or with --deterministic bit-identical runs (slower)."""
    deterministic = getattr(args, "deterministic", False)
    if deterministic:   # cuBLAS needs a fixed workspace for reproducible matmuls (read at its first use)
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = not deterministic
    torch.use_deterministic_algorithms(deterministic)


def setup(args, script, ckpt_name="ckpt.pt", data=None):
    """Device, threads, seeds, torchrun, the run directory (after check_start), args.json, TensorBoard, signal
    handlers and the start-up line naming `data`. `ckpt_name`: a two-stage script keeps a file per stage."""
    rank, world_size, local_rank = (int(os.environ.get(k, d)) for k, d in
                                    (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", 0)))
    device = torch.device(f"cuda:{local_rank}" if args.cuda else "cpu")
    set_threads(args)
    if args.cuda:
        torch.cuda.set_device(device)
        set_cuda_flags(args)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if args.cuda else "gloo", rank=rank, world_size=world_size)
        if args.batch_size % world_size:
            raise UsageError(f"--batch-size {args.batch_size} is not divisible by {world_size} processes")
    random.seed(args.seed + rank)
    torch.manual_seed(args.seed + rank)  # seeds CUDA too

    out = resolve_out(args, script, ckpt_name) if rank == 0 else None
    if world_size > 1:  # every rank needs the same directory (for --resume auto)
        box = [str(out) if out else None]
        dist.broadcast_object_list(box, src=0)
        out = Path(box[0])
    resume_state, resume_path = ckpt_io.check_start(args, script, out, ckpt_name)
    writer = None
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
        ckpt_io.remove_stale_temp_files(out, ckpt_name)
        (out / run_file("args", ckpt_name)).write_text(json.dumps(vars(args), indent=2) + "\n")
        from torch.utils.tensorboard import SummaryWriter
        writer = SummaryWriter(str(out))
        writer.add_text("args", "\n".join(f"    {k}: {v}" for k, v in sorted(vars(args).items())), 0)
    r = Run(args, script, device, rank, world_size, out, writer, ckpt_name)
    if resume_state is not None:
        r.resume_state = resume_state
        r.last_good_ckpt = f"{resume_path} (step {resume_state['step']})"
    if rank == 0:
        where = f"{device}, {args.threads} thread{'s' * (args.threads > 1)}" if not args.cuda else \
            f"{device}{' x ' + str(world_size) if world_size > 1 else ''}{', amp' * getattr(args, 'amp', False)}"
        steps = (f"steps {resume_state['step']} -> {args.steps} (resuming {resume_path})" if resume_state
                 else f"{args.steps} steps")
        print(f"{script}: {out} | {where} | {data if data is not None else data_name(args)} | {steps} | "
              f"tensorboard --logdir {out}", flush=True)
    _install_signal_handlers(r)
    return r


def _finite(x):
    """x with every NaN or infinite float replaced by None (strict JSON)."""
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_finite(v) for v in x]
    return None if isinstance(x, float) and not math.isfinite(x) else x


def run_file(kind, ckpt_name):
    """args.json / summary.json beside ckpt.pt; args-<name>.json / summary-<name>.json beside <name>.pt."""
    stem = Path(ckpt_name).stem
    return f"{kind}.json" if stem == "ckpt" else f"{kind}-{stem}.json"


def data_name(args):
    """What a run trains on: --dataset, or gail.py's --env."""
    return getattr(args, "dataset", None) or args.env


def resolve_out(args, script, ckpt_name="ckpt.pt"):
    if args.out:
        return Path(args.out)
    base = Path("runs") / script
    dataset = data_name(args)
    name = Path(dataset).name if os.sep in dataset else dataset.replace(":", "-").replace(",", "+")
    if args.resume == "auto":  # continue the newest run of this script on this dataset
        previous = sorted(p.parent for p in base.glob(f"{name}-*/{ckpt_name}"))
        if previous:
            return previous[-1]
    return base / f"{name}-{datetime.datetime.now():%Y%m%d-%H%M%S}"


def _install_signal_handlers(r):
    def handler(signum, frame):
        if r.signalled:  # second signal: stop now
            raise KeyboardInterrupt
        r.signalled = True
        r.stop_requested = not r.distributed   # torchrun: all ranks stop at the next log step
        if r.is_main:
            print(f"\n{signal.Signals(signum).name}: saving a checkpoint and stopping "
                  "(send again to stop without saving)", file=sys.stderr, flush=True)
    try:
        signal.signal(signal.SIGINT, handler)
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (e.g. inside some test runners): keep the defaults
        pass


def load_for_sampling(args, script):
    """For --sample CKPT: the checkpoint, its training args (device flags from the command line), the device and
    the directory to write into (--out, or next to the checkpoint); seeded by --seed (the same samples each call)."""
    state = ckpt_io.load(args.sample, script)
    if getattr(args, "num_samples", 0) and len(state.get("data_shape", (3,))) == 1:
        raise UsageError(f"--num-samples writes images, and {args.sample} models 2D points")
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    train_args = argparse.Namespace(**{**state["args"], "cuda": args.cuda, "amp": getattr(args, "amp", False),
                                       "compile": False, "threads": args.threads})
    device = torch.device("cuda" if args.cuda else "cpu")
    out = Path(args.out) if args.out else Path(args.sample).resolve().parent / "samples"
    out.mkdir(parents=True, exist_ok=True)
    return state, train_args, device, out


@contextlib.contextmanager
def eval_mode(*modules):
    """Modules in eval mode (BatchNorm running statistics, no dropout), then back to the flag each had."""
    flags = [m.training for m in modules]
    for m in modules:
        m.eval()
    try:
        yield
    finally:
        for m, flag in zip(modules, flags):
            m.train(flag)


def save_grid(x, path, nrow=8, value_range=(-1, 1)):
    """Write images (N, C, H, W) in value_range as one PNG grid; returns the grid (3, H', W') in [0, 1]."""
    import torchvision.utils as vutils
    grid = vutils.make_grid(x.detach().float().cpu(), nrow=nrow, normalize=True, value_range=value_range)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    vutils.save_image(grid, path)
    return grid


def write_samples(out, step, grids, value_range=(-1, 1), nrow=10):
    """For --sample: each {name: images} as <out>/<name>-<step>-sampled.png (beside the training grids)."""
    paths = {name: str(Path(out) / f"{name}-{step:07d}-sampled.png") for name in grids}
    for name, x in grids.items():
        save_grid(x, paths[name], nrow, value_range)
        print(f"wrote {paths[name]}")
    return paths


def latent_walks(noise, rows=8, steps=10):
    """(rows * steps, dim) codes on `rows` straight lines between pairs of codes drawn by noise(n)."""

    ends = noise(2 * rows).view(rows, 2, -1)
    t = torch.linspace(0, 1, steps)[None, :, None]
    return (ends[:, :1] * (1 - t) + ends[:, 1:] * t).flatten(0, 1)


def unwrap(model):
    """The plain module inside torch.compile and DistributedDataParallel wrappers (for state dicts)."""
    model = getattr(model, "_orig_mod", model)
    if isinstance(model, torch.nn.parallel.DistributedDataParallel):
        model = model.module
    return model


def scatter_image(points, real=None, lim=None, size=256):
    """2D points as a (3, size, size) image in [0, 1]: generated points as black 3x3 dots over the real points
    (or the mixture's centres) as red 5x5 dots, on white; the square [-lim, lim]^2."""
    import numpy as np
    from PIL import Image, ImageDraw
    points = points.detach().float().cpu()
    real = real.detach().float().cpu() if real is not None else points[:0]
    if lim is None:
        lim = float(torch.cat([points, real]).abs().quantile(0.99)) * 1.2 + 1e-6
    img = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(img)
    for p, color, r in ((real, (230, 51, 51), 2), (points, (0, 0, 0), 1)):
        for x, y in ((p / lim + 1) / 2 * (size - 1)).round().tolist():
            draw.rectangle((x - r, size - 1 - y - r, x + r, size - 1 - y + r), fill=color)
    return torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
