"""The chunk loop's scratch buffers, kept between calls on the CPU.

A chunk loop needs a ``[C, V]`` logits workspace (tens to hundreds of MiB) for the length of a call. Whether glibc
hands a freed block that large back to the next call or maps fresh pages for it depends on the process's history
(its mmap threshold moves), so some processes paid every page of it again on each call: on 2 AMD EPYC cores, bf16,
(1024, 256, 32 000) half SDPO, 16 000 page faults and 200-270 ms a call in those, 0 faults and 160-190 ms where the
block was reused (``benchmarks/variants.py`` inputs, medians of 8 per process). Keeping the buffer, as torch's CUDA
caching allocator does on a GPU, makes every process the fast kind. CUDA needs nothing of this: its allocator
already reuses, so there buffers come from it.

A buffer is owned by one call from `take` until `give_back`, so concurrent calls (threads) never share one: a
call that finds the pool empty allocates its own. The pool holds at most one buffer per (device, dtype), the
largest given back, so what it keeps is bounded by one call's workspace. `release` empties it.
"""
from __future__ import annotations

import threading

import torch

_lock = threading.Lock()
_pool: dict = {}  # (device, dtype) -> flat tensor


def take(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat buffer of at least `numel` elements, uninitialised (it may hold an earlier call's values)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    with _lock:
        buf = _pool.pop((device, dtype), None)
    if buf is None or buf.numel() < numel:
        del buf  # a pooled buffer too small is dropped before the new one exists: never both at once
        buf = torch.empty(numel, dtype=dtype, device=device)
    return buf


def give_back(buf: torch.Tensor) -> None:
    """Return a buffer from `take`; the caller must hold no view of it afterwards."""
    if buf.device.type != "cpu":
        return
    key = (buf.device, buf.dtype)
    with _lock:
        kept = _pool.get(key)
        if kept is None or kept.numel() < buf.numel():
            _pool[key] = buf


def release() -> None:
    """Free every buffer kept between calls (e.g. before a phase that needs the memory)."""
    with _lock:
        _pool.clear()


def kept_bytes() -> int:
    """Bytes the pool holds now."""
    with _lock:
        return sum(t.numel() * t.element_size() for t in _pool.values())
