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


def load(output_dir: pathlib.Path):
    path = pathlib.Path(output_dir) / NAME
    return torch.load(path, weights_only=False) if path.is_file() else None
