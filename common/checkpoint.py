"""Checkpoints: atomic save, safe load (weights_only), a check that a file belongs to the script,
and the RNG states that make resuming exact."""
import os
import pickle
import random
import zipfile
from pathlib import Path

import torch


class CheckpointError(Exception):
    """A checkpoint is missing, unreadable, or belongs to another script."""


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
