"""Triton backend: the vocabulary-wide passes of the chunked PyTorch backend as Triton kernels (one per file).

It subclasses ``TorchRowOps``, so top-K selection (``torch.topk``), the small ``[C, K+1]`` support math, the target
term and the rebalance stay shared. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
import os

from ..torch_chunked import TorchRowOps
from .distill_grad import fill_distill_grad
from .divergence import full_divergence
from .linear_stats import linear_student_stats
from .lse_entropy import lse_entropy
from .student_grad import fill_student_grad
from .tail_grad import fill_tail_grad


class TritonRowOps(TorchRowOps):
    name = "triton"
    temporaries = 0  # the kernels work in place; only the top-K path's [C, K+1] tensors are extra

    def __init__(self):
        # SRPO_KERNELS_TRITON_FORWARD=onchip computes the GRPO rows' stats of passes without a gradient on chip
        # (linear_stats.py): 13-98 MB extra instead of 0.5-0.8 GB, but on an H100 no faster in bf16 (0.96-1.08x the
        # chunked time) and 2x slower in fp32, so the chunked passes stay the default.
        choice = os.environ.get("SRPO_KERNELS_TRITON_FORWARD", "chunked")
        if choice not in ("onchip", "chunked"):
            raise ValueError(f"SRPO_KERNELS_TRITON_FORWARD must be onchip or chunked, got {choice!r}")
        self.linear_student_stats = linear_student_stats if choice == "onchip" else None

    def lse_entropy(self, x):
        return lse_entropy(x)

    def full_divergence(self, z, u, norm_z, norm_u, alpha):
        return full_divergence(z, u, norm_z, norm_u, alpha)

    def fill_student_grad(self, z, norm, entropy, c_logp, c_ent):
        fill_student_grad(z, norm, entropy, c_logp, c_ent)

    def fill_distill_grad(self, z, u, norm_z, norm_u, aux, c_logp, c_div, alpha):
        fill_distill_grad(z, u, norm_z, norm_u, aux, c_logp, c_div, alpha)

    def fill_tail_grad(self, z, lse_z, g_tail, shift, c_logp):
        fill_tail_grad(z, lse_z, g_tail, shift, c_logp)
