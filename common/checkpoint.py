"""Checkpoints: atomic save, safe load (weights_only), the RNG states that make resuming exact, and the checks
before a run writes anything (the checkpoint to resume belongs to the script and has the same settings; a new
run never writes over a checkpoint)."""
import os
import pickle
import random
import zipfile
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, of another script or other settings, or would be overwritten."""


def save(state, path):
    """torch.save to a temporary file in the same directory, then os.replace: a crash mid-write
    never leaves a half-written ckpt.pt behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        torch.save(state, tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def load(path, script):
    """Load a checkpoint written by `script` onto the CPU. Raises CheckpointError with a readable
    message for a missing, truncated or foreign file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError) as e:
        if "Unsupported global" in str(e):   # objects a safe load will not run (never advise loading it unsafely)
            raise CheckpointError(f"{path} is not a checkpoint of this project: it holds Python objects that a "
                                  "safe load refuses to run") from None
        if isinstance(e, pickle.UnpicklingError):   # torch's message would advise an unsafe load: leave it out
            raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?)") from None
        first = str(e).strip().splitlines()[0].split(". ")[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or corrupt?): {first}") from None
    if isinstance(state, dict) and state.get("script", script) != script:
        raise CheckpointError(f"{path} was written by {state['script']}.py, not {script}.py")
    if not isinstance(state, dict) or not {"script", "step", "args"} <= state.keys():
        raise CheckpointError(f"{path} is not a checkpoint of this project")
    return state


def rng_state():
    """Every RNG a training step may draw from: Python, torch CPU and CUDA."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state, rank=0):
    if "ranks" in state:  # written by a torchrun job
        state = state["ranks"][rank % len(state["ranks"])]
    random.setstate(_as_tuple(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuple(x):  # random.setstate wants tuples all the way down
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


# flags that may differ when a run is resumed: they change how it runs or reports, not what it trains
RUN_ONLY = {"steps", "log_every", "sample_every", "ckpt_every", "eval_every", "eval_samples", "metrics",
            "digit_metrics", "inception_weights", "out", "resume", "data_root", "download", "workers", "cuda",
            "amp", "compile", "threads", "deterministic", "sample", "eval", "num_samples", "format", "explicit"}


def check_resume(args, state, path):
    """Refuse a checkpoint trained with other settings, naming the flags; RUN_ONLY flags may change."""
    saved = state.get("args", {})
    now = vars(args)
    differ = [k for k in sorted(now) if k in saved and k not in RUN_ONLY and saved[k] != now[k]]
    if differ:
        shown = ", ".join(f"--{k.replace('_', '-')} {saved[k]} (now {now[k]})" for k in differ[:6])
        more = f" and {len(differ) - 6} more" if len(differ) > 6 else ""
        raise CheckpointError(f"{path} was trained with other settings: {shown}{more}; resume with the "
                              "checkpoint's flags (its args.json), or start a new run with another --out")
    threads = saved.get("threads", 1)   # checkpoints from before --threads trained on one thread
    if threads != getattr(args, "threads", threads) and not args.cuda and int(os.environ.get("RANK", 0)) == 0:
        print(f"note: resuming with --threads {args.threads} a run trained with --threads {threads}: the "
              "continuation is not bit-identical to an uninterrupted run", flush=True)


def remove_stale_temp_files(out, ckpt_name):
    """Remove the .<ckpt>.tmp-PID files (checkpoint.save) of processes killed while saving."""
    for tmp in out.glob(f".{ckpt_name}.tmp-*"):
        pid = tmp.name.rsplit("-", 1)[-1]
        try:
            os.kill(int(pid), 0)   # raises if no such process
        except (ValueError, ProcessLookupError):
            tmp.unlink(missing_ok=True)
        except PermissionError:    # alive, another user's
            pass


def check_start(args, script, out, ckpt_name="ckpt.pt"):
    """Before anything is written into `out`: read and compare the checkpoint to resume; refuse a new run into
    a directory that holds a checkpoint. Returns (the state to resume or None, its path or None)."""
    ckpt, resume_state, resume_path = Path(out) / ckpt_name, None, None
    if args.resume:
        resume_path = ckpt if args.resume == "auto" else Path(args.resume)
        if args.resume != "auto" or resume_path.exists():
            resume_state = load(resume_path, script)
            check_resume(args, resume_state, resume_path)
    if ckpt.exists() and (resume_state is None or not ckpt.samefile(resume_path)):
        raise CheckpointError(f"{out} already holds a checkpoint ({ckpt.name}): pass --resume auto to continue "
                              "it, or give another --out")
    return resume_state, resume_path
