"""Chunked PyTorch backend: the row passes as tensor ops on one ``[C, V]`` chunk (runs on any device)."""
from __future__ import annotations

import math

import torch

from . import row_ops as S
from .support import (LOG_TINY, LS_U, LS_Z, M_U, M_Z, STUDENT_M, TAIL_Z, argmax_and_sharp, bucket_logprobs,
                      divergence_and_aux, divergence_grad, effective_topk, entropy_of, norm_of, rebalance_,
                      shifted_logp, topk_ids, xlogy_diff)


class TorchRowOps:
    """Row passes as tensor ops. The vocabulary-wide passes are the five primitives at the top (a subclass such as
    the Triton backend replaces them with kernels); top-K selection, the small ``[C, K+1]`` support math, the
    target term and the rebalance are shared by every subclass."""

    name = "torch"
    # Its passes peak at ~13 [V] fp32 rows per chunk row (1.72 GB extra at N = 2048, H = 256, V = 151 936, half SDPO,
    # with 208-row chunks); 6 brings that to 290 MB there (below half the N x V logits), at the cost of small chunks.
    temporaries = 6
    linear_student_stats = None
    vocab_shard = None

    # ------------------------------------------------------------------ primitives (vocabulary-wide passes)
    def lse_entropy(self, x):
        """Per-row (max m, log s with s = sum e^(x - m), entropy) of softmax(x); entries may be -inf.

        lse = m + log s. Log-probs and entropies come from the shifted form ((x - m) - log s, as log_softmax),
        never from x - lse: that rounds every log-prob at |lse|, an error that a near-certain token's log-prob
        (-3e-5 with logits of 5) or a sharp row's entropy takes whole (50x and 6x the naive error). A row with
        no finite entry (a top-K tail with nothing in it) gets lse = -inf and entropy 0."""
        top = x.argmax(-1, keepdim=True)
        m = x.gather(-1, top)
        y = x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an empty tail row (all -inf): lse -inf
        e = y.exp().scatter_(-1, top, 0.0)  # the max's own term, exactly 1, is kept out of the sum r
        r = e.sum(-1)
        t = torch.where(e > 0, e * y, torch.zeros_like(e)).sum(-1)
        # s = 1 + r and log s = log1p(r): on a sharp row fp32 cannot hold 1 + r, so log(s) and H would lose r.
        log_s = torch.log1p(r)
        return m.squeeze(-1), log_s, (log_s - t / (1 + r)).clamp_min(0.0)

    def full_divergence(self, z, u, norm_z, norm_u, alpha):
        """(D, aux) over the full vocabulary, see divergence_and_aux; ``norm_*`` = (row max, log s) of each side."""
        return divergence_and_aux(shifted_logp(z, norm_z), shifted_logp(u, norm_u), alpha)

    def fill_student_grad(self, z, norm, entropy, c_logp, c_ent):
        """z <- -c_logp p - c_ent p (log p + H), in place; ``norm`` = (row max, log s)."""
        log_p = shifted_logp(z, norm)
        p = log_p.exp()
        grad = -c_logp[:, None] * p
        if c_ent is not None:  # p (log p + H), 0 where p = 0 (-inf logits)
            grad -= c_ent[:, None] * xlogy_diff(p, log_p, -entropy[:, None])
        z.copy_(grad)

    def fill_distill_grad(self, z, u, norm_z, norm_u, aux, c_logp, c_div, alpha):
        """z <- c_div dD/dz - c_logp p over the full vocabulary, in place (``norm_*`` as in full_divergence)."""
        log_p = shifted_logp(z, norm_z)
        grad = c_div[:, None] * divergence_grad(log_p, shifted_logp(u, norm_u), aux, alpha)
        grad -= c_logp[:, None] * log_p.exp()
        z.copy_(grad)

    def fill_tail_grad(self, z, lse_z, g_tail, shift, c_logp):
        """z <- g_tail exp(z - shift) - c_logp exp(z - lse_z), in place (every entry as a tail member)."""
        z.copy_(g_tail[:, None] * torch.exp(z - shift[:, None]) - c_logp[:, None] * torch.exp(z - lse_z[:, None]))

    # ------------------------------------------------------------------ the RowOps contract
    def student_stats(self, z, targets):
        m, log_s, entropy = self.lse_entropy(z)
        logp = shifted_logp(z.gather(1, targets[:, None]), (m, log_s)).squeeze(1)
        return torch.stack([m + log_s, logp, entropy, m, log_s], 1)  # private (max, log s) at STUDENT_M

    def student_grad(self, z, targets, stats, c_logp, c_ent):
        top, sharp = argmax_and_sharp(z, stats[:, S.LSE])
        self.fill_student_grad(z, norm_of(stats, STUDENT_M), stats[:, S.ENTROPY], c_logp, c_ent)
        z.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(z, top, sharp)

    def _tailnorm_of(self, x, ids):
        """(max, log s) of each row without the top-K ids (exact: no 1 - sum cancellation)."""
        saved = x.gather(1, ids)
        x.scatter_(1, ids, -math.inf)
        m, log_s, _ = self.lse_entropy(x)
        x.scatter_(1, ids, saved)
        return m, log_s

    def distill_stats(self, z, u, targets, alpha, topk, topk_tail):
        stats = z.new_zeros(z.shape[0], S.N_DISTILL_STATS + 5)
        student = self.student_stats(z, targets)
        stats[:, :S.N_STUDENT_STATS] = student[:, :S.N_STUDENT_STATS]
        stats[:, M_Z], stats[:, LS_Z] = norm_of(student, STUDENT_M)
        stats[:, M_U], stats[:, LS_U], ent_u = self.lse_entropy(u)
        stats[:, S.T_LSE] = stats[:, M_U] + stats[:, LS_U]
        topk = effective_topk(topk, z.shape[1])
        if topk is None:
            stats[:, S.T_ENTROPY] = ent_u
            stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = self.full_divergence(z, u, norm_of(stats, M_Z),
                                                                              norm_of(stats, M_U), alpha)
            return stats, None
        ids = topk_ids(z, topk)
        zk, uk = z.gather(1, ids), u.gather(1, ids)
        if topk_tail:
            for col, x, m_col in ((S.P_NORM, z, M_Z), (S.Q_NORM, u, M_U)):
                m_t, ls_t = self._tailnorm_of(x, ids)
                m, ls = norm_of(stats, m_col)
                tail = (m_t - m) + (ls_t - ls)  # the tail's log-prob
                stats[:, col] = tail.clamp_min(LOG_TINY)
                if col == S.P_NORM:
                    stats[:, TAIL_Z] = torch.where(torch.isfinite(tail), tail, torch.zeros_like(tail))
        else:  # the contract's normalisers; the support log-probs themselves come from log_softmax
            stats[:, S.P_NORM], stats[:, S.Q_NORM] = zk.logsumexp(-1), uk.logsumexp(-1)
        lp, lq = bucket_logprobs(zk, uk, stats, topk_tail)
        stats[:, S.T_ENTROPY] = entropy_of(lq)
        stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = divergence_and_aux(lp, lq, alpha)
        return stats, ids

    def distill_grad(self, z, u, targets, stats, topk_ids, c_logp, c_div, alpha, topk, topk_tail):
        lse_z = stats[:, S.LSE]
        top, sharp = argmax_and_sharp(z, lse_z)
        if topk_ids is None:
            self.fill_distill_grad(z, u, norm_of(stats, M_Z), norm_of(stats, M_U), stats[:, S.AUX_KL], c_logp, c_div,
                                   alpha)
        else:
            zk, uk = z.gather(1, topk_ids), u.gather(1, topk_ids)
            lp, lq = bucket_logprobs(zk, uk, stats, topk_tail)
            g = c_div[:, None] * divergence_grad(lp, lq, stats[:, S.AUX_KL], alpha)
            # The tail bucket's gradient spreads over its members in proportion p_j / p_tail (none without a tail).
            if topk_tail:
                # Spread by p_j / p_tail with the tail's own mass, not its floor (the reference's gradient too).
                self.fill_tail_grad(z, lse_z, g[:, -1], lse_z + stats[:, TAIL_Z], c_logp)
            else:  # shift = lse keeps exp(z - shift) <= 1, so 0 * exp never meets an inf
                self.fill_tail_grad(z, lse_z, torch.zeros_like(lse_z), lse_z, c_logp)
            k = topk_ids.shape[1]
            z.scatter_(1, topk_ids, g[:, :k] - c_logp[:, None] * torch.exp(zk - lse_z[:, None]))
        z.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(z, top, sharp)
