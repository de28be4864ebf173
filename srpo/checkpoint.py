"""Atomic checkpoints (write to a temporary file, then rename) holding everything a resumed run needs to continue
exactly: model, optimiser, scheduler, EMA teacher, RNG states, task sampler state, step and metrics."""
from __future__ import annotations

import os
import pathlib
import random

import torch

NAME = "checkpoint.pt"


def rng_state():
    state = {"torch": torch.get_rng_state(), "python": random.getstate()}
    if torch.cuda.is_available():  # sampling on a GPU draws from its generators
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save(output_dir: pathlib.Path, payload: dict) -> pathlib.Path:
    path = pathlib.Path(output_dir) / NAME
    tmp = path.with_suffix(".tmp")
    torch.save(payload, tmp)
    with open(tmp, "rb") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a kill leaves the previous checkpoint or the new one, never half of one
    return path


# What every checkpoint of `srpo train` holds (later versions added optional entries).
REQUIRED = ("model", "optimizer", "rng", "task_rng", "step", "history")


def load(output_dir: pathlib.Path):
    """The checkpoint's payload, or None when there is none. A file that is not one (truncated by a full disk,
    written by another program) is an error naming it, not a traceback from deep in torch.load or a KeyError."""
    path = pathlib.Path(output_dir) / NAME
    if not path.is_file():
        return None
    try:
        state = torch.load(path, weights_only=False)
    except Exception as exc:  # torch.load raises RuntimeError, UnpicklingError, EOFError, ValueError...
        raise ValueError(f"--resume: {path} is not a readable checkpoint ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else 'no message'}); remove it to start over") from exc
    missing = [k for k in REQUIRED if not (isinstance(state, dict) and k in state)]
    if missing:
        raise ValueError(f"--resume: {path} is not a checkpoint of srpo train (it lacks {', '.join(missing)}); "
                         f"remove it to start over")
    return state
