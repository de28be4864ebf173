"""Data-parallel normalisers: when ``torch.distributed`` is initialised (world size > 1) and the caller passes none,
the token normaliser and the entropy-weight normaliser are global.

Convention (as DDP and TRL use it): each rank's ``mean`` loss is its sum over ``D_global / world_size``, so the
gradient DDP averages over ranks is exactly the full-batch gradient. Every rank must call the loss the same number
of times (the reductions are collectives).
"""
from __future__ import annotations

from typing import Tuple

import torch


def world_size() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def all_reduce_sums(*values: float, device=None) -> Tuple[float, ...]:
    """Sum each value over ranks (float64; one collective)."""
    t = torch.tensor(values, dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t)
    return tuple(t.tolist())


def all_reduce_min(value: float, device=None) -> float:
    """The minimum of `value` over ranks (float64)."""
    t = torch.tensor([value], dtype=torch.float64, device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MIN)
    return float(t)
