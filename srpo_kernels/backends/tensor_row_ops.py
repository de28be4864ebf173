"""The RowOps contract built from five vocabulary-wide passes (row_ops.VocabPasses): the chunked PyTorch backend
supplies them as tensor ops, the Triton backend as kernels. Everything else here is shared: the stats layout, top-K
selection, the small ``[C, K+1]`` support math, the target term and the rebalance."""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from . import row_ops as S
from .row_ops import VocabPasses
from .support import (GAP, GAP_LO, LS_U, LS_Z, M_U, M_Z, N_TENSOR_DISTILL_STATS, SHIFT, STUDENT_M, TAIL_M,
                      bucket_logprobs, divergence_grad, effective_topk, fill_support_stats, full_vocab_shift,
                      heavy_entries, lse_gap_pair, norm_of, rebalance_, shifted_logp, topk_ids)


class TensorRowOps:
    """row_ops.RowOps over `passes`; `temporaries` and `linear_student_stats` as RowOps declares them."""

    vocab_shard = None
    fuses_casts = False  # the chunk loop widens and narrows (tensor ops and kernels read fp32 chunks)

    def __init__(self, passes: VocabPasses, name: str, temporaries: int,
                 linear_student_stats: Optional[Callable] = None):
        self.passes, self.name, self.temporaries = passes, name, temporaries
        self.linear_student_stats = linear_student_stats

    def student_stats(self, z, targets):
        return self._student_stats(z, targets)[0]

    def _student_stats(self, z, targets):
        """The student stats and the row's (max, log s), log s in fp64."""
        m, log_s, entropy = self.passes.lse_entropy(z)
        logp = shifted_logp(z.gather(1, targets[:, None]).to(log_s.dtype), (m.to(log_s.dtype), log_s)).squeeze(1)
        # private (max, log s) at STUDENT_M
        return torch.stack([m + log_s, logp, entropy, m.to(log_s.dtype), log_s], 1).to(z.dtype), (m, log_s)

    def student_grad(self, z, targets, stats, c_logp, c_ent):
        heavy = heavy_entries(z, stats[:, S.LSE])
        self.passes.fill_student_grad(z, norm_of(stats, STUDENT_M), stats[:, S.ENTROPY], c_logp, c_ent)
        z.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(z, heavy)

    def _tail_norm(self, x, ids):
        """(max, log s) of each row without the top-K ids (exact: no 1 - sum cancellation)."""
        saved = x.gather(1, ids)
        x.scatter_(1, ids, -math.inf)
        m, log_s, _ = self.passes.lse_entropy(x)
        x.scatter_(1, ids, saved)
        return m, log_s

    def distill_stats(self, z, u, targets, alpha, topk, topk_tail):
        stats = z.new_zeros(z.shape[0], N_TENSOR_DISTILL_STATS)
        student, norm_z = self._student_stats(z, targets)
        stats[:, :S.N_STUDENT_STATS] = student[:, :S.N_STUDENT_STATS]
        stats[:, M_Z], stats[:, LS_Z] = norm_of(student, STUDENT_M)
        m_u, ls_u, ent_u = self.passes.lse_entropy(u)
        stats[:, M_U], stats[:, LS_U], stats[:, S.T_LSE] = m_u, ls_u, m_u + ls_u
        topk = effective_topk(topk, z.shape[1])
        if topk is None:
            S.set_teacher_entropy(stats, ent_u)
            stats[:, GAP], stats[:, GAP_LO] = lse_gap_pair(norm_z, (m_u, ls_u), stats.dtype)
            gap = norm_of(stats, GAP)
            stats[:, SHIFT] = full_vocab_shift(z, u, gap, alpha)
            stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = self.passes.full_divergence(
                z, u, norm_of(stats, M_Z), norm_of(stats, M_U), gap, alpha, stats[:, SHIFT])
            return stats, None
        ids = topk_ids(z, topk)
        zk, uk = z.gather(1, ids), u.gather(1, ids)
        tails = [self._tail_norm(z, ids), self._tail_norm(u, ids)] if topk_tail else None
        fill_support_stats(stats, zk, uk, alpha, (norm_z, (m_u, ls_u)), tails)
        return stats, ids

    def distill_grad(self, z, u, targets, stats, topk_ids, c_logp, c_div, alpha, topk, topk_tail):
        lse_z = stats[:, S.LSE]
        heavy = heavy_entries(z, lse_z)
        if topk_ids is None:
            self.passes.fill_distill_grad(z, u, norm_of(stats, M_Z), norm_of(stats, M_U), norm_of(stats, GAP),
                                          stats[:, S.AUX_KL], c_logp, c_div, alpha, stats[:, SHIFT])
        else:
            zk, uk = z.gather(1, topk_ids), u.gather(1, topk_ids)
            lp, lq, delta = bucket_logprobs(zk, uk, stats, topk_tail)
            g = c_div[:, None] * divergence_grad(lp, lq, delta, stats[:, S.AUX_KL], alpha)
            # The tail bucket's gradient spreads over its members in proportion p_j / p_tail (none without a tail).
            norm_z = norm_of(stats, M_Z)
            if topk_tail:
                # Spread by p_j / p_tail with the tail's own mass, not its floor (the reference's gradient too).
                self.passes.fill_tail_grad(z, norm_z, g[:, -1], norm_of(stats, TAIL_M), c_logp)
            else:  # the row's (m, log s) keep exp(z - m - log s) <= 1, so 0 * exp never meets an inf
                self.passes.fill_tail_grad(z, norm_z, torch.zeros_like(lse_z), norm_z, c_logp)
            k = topk_ids.shape[1]
            z.scatter_(1, topk_ids, g[:, :k] - c_logp[:, None] * torch.exp(shifted_logp(zk, norm_z)))
        z.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(z, heavy)
