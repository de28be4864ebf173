"""Chunk buffers kept between calls on the CPU.

torch's CPU allocator caches nothing, and glibc maps a freed block of 32 MiB or more fresh for the next allocation
or reuses it, depending on the process's history: the first touch of each fresh page is a page fault that also
zeroes the page. For the chunk loop's ``[C, V]`` buffers a call paid 16 000 faults (small benchmark shape, bf16,
half or all SDPO) to 43 000 (SmolLM2-like) of them, about a tenth of its time (see the README). So a stream gives its
buffers back here as it ends and the next call takes them up, already mapped. CUDA's caching allocator does this
already: buffers on other devices are plain allocations.

One buffer is kept per (dtype, device), the largest given back, up to ``MAX_KEPT_BYTES`` each. A buffer is out of the
pool while in use, so concurrent calls (threads) never share one: the second allocates its own.
``release_workspace()`` frees what is kept (e.g. before a phase that needs the memory).
"""
from __future__ import annotations

import threading

import torch

MAX_KEPT_BYTES = 256 << 20  # the largest buffer of the default sizing: [2C, V] fp32 within 2 x chunk_loop.CHUNK_BYTES

_kept: dict = {}
_lock = threading.Lock()


def take(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A flat, uninitialised buffer of at least `numel` elements."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    with _lock:
        buf = _kept.pop((dtype, device), None)
    if buf is not None and buf.numel() >= numel:
        return buf
    del buf  # too small: free it before allocating the larger one
    # A normal tensor even under torch.inference_mode(): an inference tensor kept here could not be written by a
    # later call outside that mode.
    with torch.inference_mode(False):
        return torch.empty(numel, dtype=dtype, device=device)


def give_back(buf: torch.Tensor) -> None:
    """Return a buffer from `take` once nothing refers to its contents."""
    if buf.device.type != "cpu" or buf.numel() * buf.element_size() > MAX_KEPT_BYTES:
        return
    key = (buf.dtype, buf.device)
    with _lock:
        kept = _kept.get(key)
        if kept is None or kept.numel() < buf.numel():
            _kept[key] = buf


def release_workspace() -> None:
    """Free the chunk buffers kept between calls (the CPU's; see the module's docstring)."""
    with _lock:
        _kept.clear()


def kept_bytes() -> int:
    """Bytes held between calls."""
    with _lock:
        return sum(b.numel() * b.element_size() for b in _kept.values())
