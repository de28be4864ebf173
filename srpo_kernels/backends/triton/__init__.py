"""Triton backend: the five vocabulary-wide passes (row_ops.VocabPasses) as Triton kernels, one per file, inside the
shared tensor_row_ops.TensorRowOps (top-K selection, the small ``[C, K+1]`` support math, the target term and the
rebalance). Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
import os

from ..tensor_row_ops import TensorRowOps
from .distill_grad import fill_distill_grad
from .divergence import full_divergence
from .linear_stats import linear_student_stats
from .lse_entropy import lse_entropy
from .student_grad import fill_student_grad
from .tail_grad import fill_tail_grad


class TritonPasses:
    """row_ops.VocabPasses as kernels (each works in place on the chunk)."""

    lse_entropy = staticmethod(lse_entropy)
    full_divergence = staticmethod(full_divergence)
    fill_student_grad = staticmethod(fill_student_grad)
    fill_distill_grad = staticmethod(fill_distill_grad)
    fill_tail_grad = staticmethod(fill_tail_grad)


def triton_row_ops() -> TensorRowOps:
    # SRPO_KERNELS_TRITON_FORWARD=onchip computes the GRPO rows' stats of passes without a gradient on chip
    # (linear_stats.py): 13-98 MB extra instead of 0.5-0.8 GB, but on an H100 no faster in bf16 (0.96-1.08x the
    # chunked time) and 2x slower in fp32, so the chunked passes stay the default.
    choice = os.environ.get("SRPO_KERNELS_TRITON_FORWARD", "chunked")
    if choice not in ("onchip", "chunked"):
        raise ValueError(f"SRPO_KERNELS_TRITON_FORWARD must be onchip or chunked, got {choice!r}")
    # temporaries 0: the kernels work in place; only the top-K path's [C, K+1] tensors are extra
    return TensorRowOps(TritonPasses(), name="triton", temporaries=0,
                        linear_student_stats=linear_student_stats if choice == "onchip" else None)
