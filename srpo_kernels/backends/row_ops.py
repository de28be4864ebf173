"""What a backend implements: the vocabulary-wide passes over one chunk of fp32 logits rows.

Everything before (the GEMMs) and after (per-token losses, coefficients) is backend-independent and lives in
``chunk_loop.py`` / ``token_math.py``. Every method works on a chunk ``[C, V]`` of logits that are already divided
by the temperature; ``*_grad`` methods overwrite ``z`` in place with ``dL/dz``:

    dL/dz = c_logp * (onehot(y) - p) - c_ent * p * (log p + H) + c_div * dD/dz

``distill_stats`` returns a ``[C, N_DISTILL_STATS]`` tensor whose columns are named below, and the top-K ids
(``[C, K]`` int64) or None; ``distill_grad`` takes both back. A backend may append private columns after the named
ones, and ``distill_stats`` may overwrite the teacher chunk ``u`` with private per-entry data for ``distill_grad``
(the C++ backend stores there what the gradient needs of the teacher, sparing that pass an exp and a log per entry):
the caller passes ``u`` on untouched and reads nothing else from it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Protocol, Tuple

import torch

# Columns of student_stats.
LSE, LOGP, ENTROPY = 0, 1, 2
# Extra columns of distill_stats: teacher lse, teacher entropy and divergence over the support, the sum that the
# gradient needs (sum p t, t the per-entry term relative to its value at the student's argmax: see
# support.divergence_and_aux and support.full_vocab_shift; 0 for forward KL), and each side's
# normaliser of the top-K support (tail log-prob when the support has a tail bucket, else the log-sum-exp over the
# K logits), and the teacher entropy's low part: T_ENTROPY + T_ENTROPY_LO (in fp64) is the entropy without the
# rounding of its fp32 value, which the weight exp(-beta H_T) would multiply by beta (see teacher_entropy; the
# passes' per-entry fp32 roundings remain).
T_LSE, T_ENTROPY, DIVERGENCE, AUX_KL, P_NORM, Q_NORM, T_ENTROPY_LO = 3, 4, 5, 6, 7, 8, 9
N_STUDENT_STATS, N_DISTILL_STATS = 3, 10


def teacher_entropy(stats: torch.Tensor) -> torch.Tensor:
    """The teacher entropy of distill stats rows in fp64, with its low part: half an fp32 ulp of H_T ~ 5 (2.4e-7)
    becomes 1.2e-5 of a weight exp(-beta H_T) at beta = 50, where the naive loss's own rounding may be luckier."""
    return stats[:, T_ENTROPY].double() + stats[:, T_ENTROPY_LO].double()


def set_teacher_entropy(stats: torch.Tensor, entropy: torch.Tensor) -> None:
    """Store an fp64 (or fp32) teacher entropy as its rounding to the stats' dtype and the remainder."""
    high = entropy.to(stats.dtype)
    stats[:, T_ENTROPY] = high
    stats[:, T_ENTROPY_LO] = (entropy.double() - high.double()).to(stats.dtype)


class VocabPasses(Protocol):
    """The five vocabulary-wide passes of the backends built from tensor ops (tensor_row_ops.TensorRowOps builds the
    RowOps contract from them): the chunked PyTorch backend supplies them as tensor ops, the Triton backend as
    kernels. ``norm*`` are (row max, log s) pairs: log-probs are (x - max) - log s."""

    def lse_entropy(self, x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per row: (max, log sum exp(x - max), entropy of softmax(x)); rows may hold -inf. The last two in fp64,
        from the pass's own sums (support.log_s_entropy): callers round them where they store them, except the
        teacher entropy (set_teacher_entropy)."""

    def full_divergence(self, z, u, norm_z, norm_u, gap, alpha: float,
                        shift: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """Per row: D_alpha(softmax z, softmax u) over the full vocabulary, and the sum its gradient needs, taken
        relative to `shift` (support.full_vocab_shift; any per-row constant gives the same gradient). log q - log p
        as support.log_ratio takes it from `gap`, the pair (hi, lo) of lse_z - lse_u (support.lse_gap_pair)."""

    def fill_student_grad(self, z, norm, entropy, c_logp, c_ent) -> None:
        """z <- -c_logp p - c_ent p (log p + H), in place."""

    def fill_distill_grad(self, z, u, norm_z, norm_u, gap, aux, c_logp, c_div, alpha: float, shift) -> None:
        """z <- c_div dD/dz - c_logp p over the full vocabulary, in place (`gap`, `shift` as full_divergence took
        them)."""

    def fill_tail_grad(self, z, norm_z, g_tail, norm_tail, c_logp) -> None:
        """z <- g_tail exp((z - m_t) - log s_t) - c_logp exp((z - m) - log s), (m, log s) = norm_z, (m_t, log s_t)
        = norm_tail, in place (every entry as a top-K tail member: p_j / p_tail, a softmax over the tail when
        norm_tail is the tail's own max and log-sum)."""


@dataclass
class Widen:
    """A chunk's logits as a bf16 GEMM wrote them, before bias and temperature, for a backend that reads them
    itself (``RowOps.fuses_casts``): ``z = (student + bias) / T``, ``u`` likewise from ``teacher``."""

    student: torch.Tensor
    teacher: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]  # fp32
    temperature: float


class RowOps(Protocol):
    name: str
    # True: with bf16 GEMMs every pass takes ``widen=Widen(...)`` and ``z=None``: the student's rows are read
    # from ``widen.student`` (each widened while it is in cache, no fp32 [C, V] copy) and the gradient passes
    # overwrite them there with dL/dz in that dtype; the teacher's rows are widened into the fp32 chunk ``u``.
    # False: the chunk loop widens and narrows in separate passes (and never passes ``widen``), as it does for fp16
    # GEMMs with every backend (their dL/dz takes a chunk-wide scale before it is narrowed, gemm.py).
    fuses_casts: bool
    # How many [C, V] fp32 temporaries the passes allocate beside the logits buffer at their peak: the chunk loop
    # divides its chunk budget by (1 + this), so a backend of tensor ops keeps the O(C V) contract too.
    temporaries: int
    # Optional, None where a backend has none: (lse, logp, entropy) of rows straight from the GEMM operands
    # (h, W, fp32 bias or None, targets, 1/T), with no [C, V] buffer; passes without a gradient use it.
    linear_student_stats: Optional[Callable]
    # None, or this rank's block of a vocabulary-parallel lm_head (vocab_parallel.VocabShard): then the passes see
    # [C, V_rank] logits and combine their statistics across the group, and dh is summed over it.
    vocab_shard: Optional[object]

    def student_stats(self, z: torch.Tensor, targets: torch.Tensor, widen: Optional[Widen] = None) -> torch.Tensor:
        ...

    def student_grad(self, z, targets, stats, c_logp, c_ent, widen: Optional[Widen] = None) -> None: ...

    def distill_stats(self, z, u, targets, alpha: float, topk: Optional[int], topk_tail: bool,
                      widen: Optional[Widen] = None) -> Tuple[torch.Tensor, Optional[torch.Tensor]]: ...

    def distill_grad(self, z, u, targets, stats, topk_ids, c_logp, c_div, alpha: float, topk: Optional[int],
                     topk_tail: bool, widen: Optional[Widen] = None) -> None: ...
