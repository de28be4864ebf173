"""Atomic checkpoints (write to a temporary file, then rename) holding everything a resumed run needs to continue
exactly: model, optimiser, scheduler, EMA teacher, RNG states, task sampler state, step and metrics."""
from __future__ import annotations

import os
import pathlib
import random

import torch

NAME = "checkpoint.pt"


def rng_state():
    return {"torch": torch.get_rng_state(), "python": random.getstate()}


def set_rng_state(state):
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])


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
