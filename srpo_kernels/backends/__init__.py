"""Backend registry and the ``backend="auto"`` choice.

A backend supplies the row passes of ``row_ops.RowOps``; the GEMMs around them are shared. ``"torch"`` runs
anywhere, ``"cpu"`` is the C++ kernel of ``csrc/`` (compiled on first use), ``"triton"`` runs Triton kernels on
CUDA (or on CPU tensors under ``TRITON_INTERPRET=1``, for tests).
"""
from __future__ import annotations

import warnings

import torch

from .row_ops import RowOps
from .torch_chunked import torch_row_ops

BACKENDS = ("auto", "torch", "cpu", "triton")
_warned = set()


def _warn_once(key: str, message: str):
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, RuntimeWarning, stacklevel=3)


def _triton_error(device: torch.device, dtype: torch.dtype):
    """Why the Triton backend cannot run here, or None."""
    import importlib.util
    import os

    if importlib.util.find_spec("triton") is None:
        return "triton is not installed (pip install 'srpo-kernels[triton]')"
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return f"it needs CUDA tensors (or TRITON_INTERPRET=1 for testing), got {device}"
    if dtype == torch.float64:
        return "it computes in fp32; float64 inputs need backend='torch'"
    return None


def get_row_ops(backend: str, device: torch.device, dtype: torch.dtype = torch.float32, vocab: int = 0) -> RowOps:
    """The row passes for `backend` on `device` for a vocabulary of `vocab`; "auto" picks the fastest available and
    says why if it falls back."""
    if not isinstance(backend, str) or backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "torch":
        return torch_row_ops()
    if backend == "cpu":
        if device.type != "cpu":
            raise ValueError(f"backend='cpu' needs CPU tensors, got tensors on {device}")
        if dtype == torch.float64:
            raise ValueError("backend='cpu' computes in fp32; float64 inputs need backend='torch' (or 'auto')")
        from .cpu import MAX_VOCAB, CpuRowOps, load_error

        if vocab >= MAX_VOCAB:
            raise ValueError(f"backend='cpu' supports a vocabulary below 2^24, got V = {vocab}; use backend='torch' "
                             "(or 'auto')")
        if load_error() is not None:
            raise RuntimeError(f"backend='cpu' is unavailable: {load_error()}")
        return CpuRowOps()
    if backend == "triton":
        err = _triton_error(device, dtype)
        if err:
            raise ValueError(f"backend='triton' is unavailable: {err}")
        from .triton import triton_row_ops

        return triton_row_ops()
    # auto
    if device.type == "cpu" and dtype != torch.float64:  # fp64 (gradcheck) stays exact in the torch backend
        from .cpu import MAX_VOCAB, CpuRowOps, load_error

        if vocab >= MAX_VOCAB:  # the C++ kernel stores a row's argmax as an exact float
            return torch_row_ops()
        err = load_error()
        if err is None:
            return CpuRowOps()
        _warn_once("cpu", f"srpo_kernels: the C++ CPU kernel is unavailable ({err}); using the chunked PyTorch "
                          "backend (same results, slower)")
        return torch_row_ops()
    if device.type == "cpu":
        return torch_row_ops()
    if device.type == "cuda" and not _triton_error(device, dtype):
        from .triton import triton_row_ops

        return triton_row_ops()
    _warn_once(f"auto-{device.type}", f"srpo_kernels: no fused kernel for {device.type} tensors; using the chunked "
                                      "PyTorch backend")
    return torch_row_ops()
