"""Chunked PyTorch backend: the row passes as tensor ops on one ``[C, V]`` chunk (runs on any device)."""
from __future__ import annotations

import math
from typing import Optional

import torch

from . import row_ops as S

LOG_TINY = math.log(torch.finfo(torch.float32).tiny)


def effective_topk(topk: Optional[int], vocab: int) -> Optional[int]:
    """Top-K over the whole vocabulary is the full support."""
    return None if topk is None or topk >= vocab else topk


def topk_ids(x: torch.Tensor, k: int) -> torch.Tensor:
    """Ids ``[C, k]`` of each row's k largest entries; among equal values at the boundary the lowest ids win.

    One tie rule for every backend and the reference (torch.topk leaves it unspecified; the C++ kernel's heap takes
    the lowest ids): with tied logits (e.g. duplicated vocabulary rows) the gradient lands on the same twin
    everywhere. Rows without a tie at the k-th value cost one topk of k + 1."""
    if k >= x.shape[1]:
        return x.topk(k, dim=1).indices
    top = x.topk(k + 1, dim=1)
    kth = top.values[:, k - 1:k]
    if not bool((kth == top.values[:, k:]).any()):
        return top.indices[:, :k]
    above = x > kth
    need = k - above.sum(1, keepdim=True)
    tied = x == kth
    chosen = above | (tied & (tied.cumsum(1) <= need))
    return chosen.nonzero()[:, 1].view(x.shape[0], k)


def _xlogy_diff(p, a, b):
    """``p * (a - b)`` with ``0 * anything = 0`` (empty tail buckets)."""
    return torch.where(p > 0, p * (a - b), torch.zeros_like(p))


def entropy_of(log_p):
    """-sum p log p over the last dim, at least 0 (a rounded log-prob just above 0 must not make it negative)."""
    return (-_xlogy_diff(log_p.exp(), log_p, 0.0).sum(-1)).clamp_min(0.0)


def _jsd_terms(lp, lq, alpha):
    """``d = log p - log m + log(1-a)`` and ``e = log q - log m + log a`` via softplus of ``s = log(a q / ((1-a) p))``.

    Written this way neither loses digits where p and q are far apart (d -> 0 as q/p -> 0), which is where the
    gradient ``(1-a) p (d - sum p d)`` of sharp, disagreeing distributions lives.
    """
    s = lq - lp + math.log(alpha / (1 - alpha))
    soft = torch.log1p(torch.exp(-s.abs()))
    return -(s.clamp_min(0) + soft), -((-s).clamp_min(0) + soft)


def divergence_and_aux(lp, lq, alpha):
    """D_alpha over the last dim and the sum its gradient needs (KL(p||q) for alpha=1, sum p d for the JSD)."""
    p, q = lp.exp(), lq.exp()
    if alpha == 0.0:
        d = _xlogy_diff(q, lq, lp).sum(-1)
        return d, torch.zeros_like(d)
    if alpha == 1.0:
        d = _xlogy_diff(p, lp, lq).sum(-1)
        return d, d
    d, e = _jsd_terms(lp, lq, alpha)
    kl_pm = _xlogy_diff(p, d, math.log1p(-alpha)).sum(-1)
    kl_qm = _xlogy_diff(q, e, math.log(alpha)).sum(-1)
    return (1 - alpha) * kl_pm + alpha * kl_qm, _xlogy_diff(p, d, 0.0).sum(-1)


def divergence_grad(lp, lq, aux, alpha):
    """dD/d(logits) of the support distribution (p = softmax of the support's logits)."""
    p = lp.exp()
    if alpha == 0.0:
        return p - lq.exp()
    if alpha == 1.0:
        return _xlogy_diff(p, lp, lq + aux[..., None])
    d, _ = _jsd_terms(lp, lq, alpha)
    return (1 - alpha) * _xlogy_diff(p, d, aux[..., None])


# Private columns of this backend's stats: the row max and log-sum of shifted exps (lse = m + log s) after the student
# stats; in the distill stats, both sides' and the student's tail log-prob before its floor at LOG_TINY (the tail
# gradient spreads by p_j / p_tail).
_STUDENT_M = S.N_STUDENT_STATS
_M_Z, _LS_Z, _M_U, _LS_U, _TAIL_Z = range(S.N_DISTILL_STATS, S.N_DISTILL_STATS + 5)


def _norm(stats, m_col):
    return stats[:, m_col], stats[:, m_col + 1]


def _shifted_logp(x, norm):
    """log softmax entries as (x - m) - log s, rounded like log_softmax (see TorchRowOps.lse_entropy)."""
    m, log_s = norm
    return (x - m[:, None]) - log_s[:, None]


def bucket_logprobs(zk, uk, stats, tail: bool):
    """Support log-probs ``[C, K(+1)]`` from the top-K logits and the stored normalisers."""
    if tail:
        lp = torch.cat([_shifted_logp(zk, _norm(stats, _M_Z)), stats[:, S.P_NORM, None]], -1)
        lq = torch.cat([_shifted_logp(uk, _norm(stats, _M_U)), stats[:, S.Q_NORM, None]], -1)
        return lp, lq
    return zk.log_softmax(-1), uk.log_softmax(-1)


SHARP_LOG_PROB = math.log(0.5)


def argmax_and_sharp(z, lse):
    """Each row's argmax ``[C, 1]`` and whether it holds more than half the probability (see rebalance_)."""
    top = z.argmax(1, keepdim=True)
    return top, (z.gather(1, top) - lse[:, None]) > SHARP_LOG_PROB


def rebalance_(grad, top, sharp):
    """On sharp rows, set entry `top` (the argmax logit, ``[C, 1]``) to minus the sum of the row's other entries.

    dL/dz sums to zero over a row (the loss is invariant to shifting the logits). Where one token holds almost all
    the probability, its entry is a difference of nearly equal terms, e.g. ``p (log p - log m - KL)``, and loses
    every digit in fp32; the other entries carry no such cancellation, so their sum restores it. On a flat row that
    sum of V similar terms is the less accurate of the two, so those rows keep their own entry.
    """
    own = grad.gather(1, top)
    grad.scatter_(1, top, 0.0)
    grad.scatter_(1, top, torch.where(sharp, -grad.sum(1, keepdim=True), own))


class TorchRowOps:
    """Row passes as tensor ops. The vocabulary-wide passes are the five primitives at the top (a subclass such as
    the Triton backend replaces them with kernels); top-K selection, the small ``[C, K+1]`` support math, the
    target term and the rebalance are shared by every subclass."""

    name = "torch"
    # Its passes peak at ~13 [V] fp32 rows per chunk row (1.72 GB extra at N = 2048, H = 256, V = 151 936, half SDPO,
    # with 208-row chunks); 6 brings that to 290 MB there (below half the N x V logits), at the cost of small chunks.
    temporaries = 6
    linear_student_stats = None

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
        return divergence_and_aux(_shifted_logp(z, norm_z), _shifted_logp(u, norm_u), alpha)

    def fill_student_grad(self, z, norm, entropy, c_logp, c_ent):
        """z <- -c_logp p - c_ent p (log p + H), in place; ``norm`` = (row max, log s)."""
        log_p = _shifted_logp(z, norm)
        p = log_p.exp()
        grad = -c_logp[:, None] * p
        if c_ent is not None:  # p (log p + H), 0 where p = 0 (-inf logits)
            grad -= c_ent[:, None] * _xlogy_diff(p, log_p, -entropy[:, None])
        z.copy_(grad)

    def fill_distill_grad(self, z, u, norm_z, norm_u, aux, c_logp, c_div, alpha):
        """z <- c_div dD/dz - c_logp p over the full vocabulary, in place (``norm_*`` as in full_divergence)."""
        log_p = _shifted_logp(z, norm_z)
        grad = c_div[:, None] * divergence_grad(log_p, _shifted_logp(u, norm_u), aux, alpha)
        grad -= c_logp[:, None] * log_p.exp()
        z.copy_(grad)

    def fill_tail_grad(self, z, lse_z, g_tail, shift, c_logp):
        """z <- g_tail exp(z - shift) - c_logp exp(z - lse_z), in place (every entry as a tail member)."""
        z.copy_(g_tail[:, None] * torch.exp(z - shift[:, None]) - c_logp[:, None] * torch.exp(z - lse_z[:, None]))

    # ------------------------------------------------------------------ the RowOps contract
    def student_stats(self, z, targets):
        m, log_s, entropy = self.lse_entropy(z)
        logp = _shifted_logp(z.gather(1, targets[:, None]), (m, log_s)).squeeze(1)
        return torch.stack([m + log_s, logp, entropy, m, log_s], 1)  # private (max, log s) at _STUDENT_M

    def student_grad(self, z, targets, stats, c_logp, c_ent):
        top, sharp = argmax_and_sharp(z, stats[:, S.LSE])
        self.fill_student_grad(z, _norm(stats, _STUDENT_M), stats[:, S.ENTROPY], c_logp, c_ent)
        z.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(z, top, sharp)

    def _tail_norm(self, x, ids):
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
        stats[:, _M_Z], stats[:, _LS_Z] = _norm(student, _STUDENT_M)
        stats[:, _M_U], stats[:, _LS_U], ent_u = self.lse_entropy(u)
        stats[:, S.T_LSE] = stats[:, _M_U] + stats[:, _LS_U]
        topk = effective_topk(topk, z.shape[1])
        if topk is None:
            stats[:, S.T_ENTROPY] = ent_u
            stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = self.full_divergence(z, u, _norm(stats, _M_Z),
                                                                              _norm(stats, _M_U), alpha)
            return stats, None
        ids = topk_ids(z, topk)
        zk, uk = z.gather(1, ids), u.gather(1, ids)
        if topk_tail:
            for col, x, m_col in ((S.P_NORM, z, _M_Z), (S.Q_NORM, u, _M_U)):
                m_t, ls_t = self._tail_norm(x, ids)
                m, ls = _norm(stats, m_col)
                tail = (m_t - m) + (ls_t - ls)  # the tail's log-prob
                stats[:, col] = tail.clamp_min(LOG_TINY)
                if col == S.P_NORM:
                    stats[:, _TAIL_Z] = torch.where(torch.isfinite(tail), tail, torch.zeros_like(tail))
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
            self.fill_distill_grad(z, u, _norm(stats, _M_Z), _norm(stats, _M_U), stats[:, S.AUX_KL], c_logp, c_div,
                                   alpha)
        else:
            zk, uk = z.gather(1, topk_ids), u.gather(1, topk_ids)
            lp, lq = bucket_logprobs(zk, uk, stats, topk_tail)
            g = c_div[:, None] * divergence_grad(lp, lq, stats[:, S.AUX_KL], alpha)
            # The tail bucket's gradient spreads over its members in proportion p_j / p_tail (none without a tail).
            if topk_tail:
                # Spread by p_j / p_tail with the tail's own mass, not its floor (the reference's gradient too).
                self.fill_tail_grad(z, lse_z, g[:, -1], lse_z + stats[:, _TAIL_Z], c_logp)
            else:  # shift = lse keeps exp(z - shift) <= 1, so 0 * exp never meets an inf
                self.fill_tail_grad(z, lse_z, torch.zeros_like(lse_z), lse_z, c_logp)
            k = topk_ids.shape[1]
            z.scatter_(1, topk_ids, g[:, :k] - c_logp[:, None] * torch.exp(zk - lse_z[:, None]))
        z.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(z, top, sharp)
