"""Triton backend: the vocabulary-wide passes of the chunked PyTorch backend as Triton kernels (one per file).

It subclasses ``TorchRowOps``, so top-K selection (``torch.topk``), the small ``[C, K+1]`` support math, the target
term and the rebalance stay shared. Runs on CUDA tensors, or on CPU tensors under ``TRITON_INTERPRET=1`` (tests).
"""
from ..torch_chunked import TorchRowOps
from .distill_grad import fill_distill_grad
from .divergence import full_divergence
from .lse_entropy import lse_entropy
from .student_grad import fill_student_grad
from .tail_grad import fill_tail_grad


class TritonRowOps(TorchRowOps):
    name = "triton"
    temporaries = 0  # the kernels work in place; only the top-K path's [C, K+1] tensors are extra

    def lse_entropy(self, x):
        return lse_entropy(x)

    def full_divergence(self, z, u, lse_z, lse_u, alpha):
        return full_divergence(z, u, lse_z, lse_u, alpha)

    def fill_student_grad(self, z, lse, entropy, c_logp, c_ent):
        fill_student_grad(z, lse, entropy, c_logp, c_ent)

    def fill_distill_grad(self, z, u, lse_z, lse_u, aux, c_logp, c_div, alpha):
        fill_distill_grad(z, u, lse_z, lse_u, aux, c_logp, c_div, alpha)

    def fill_tail_grad(self, z, lse_z, g_tail, shift, c_logp):
        fill_tail_grad(z, lse_z, g_tail, shift, c_logp)
