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


def _xlogy_diff(p, a, b):
    """``p * (a - b)`` with ``0 * anything = 0`` (empty tail buckets)."""
    return torch.where(p > 0, p * (a - b), torch.zeros_like(p))


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


def bucket_logprobs(zk, uk, stats, tail: bool):
    """Support log-probs ``[C, K(+1)]`` from the top-K logits and the stored normalisers."""
    if tail:
        lp = torch.cat([zk - stats[:, S.LSE, None], stats[:, S.P_NORM, None]], -1)
        lq = torch.cat([uk - stats[:, S.T_LSE, None], stats[:, S.Q_NORM, None]], -1)
        return lp, lq
    return zk - stats[:, S.P_NORM, None], uk - stats[:, S.Q_NORM, None]


def rebalance_(grad, z):
    """Set the argmax entry of each row to minus the sum of the others, in place.

    dL/dz sums to zero over a row (the loss is invariant to shifting the logits). Where one token holds almost all
    the probability, its entry is a difference of nearly equal terms, e.g. ``p (log p - log m - KL)``, and loses
    every digit in fp32; the other entries carry no such cancellation, so their sum restores it.
    """
    top = z.argmax(1, keepdim=True)
    grad.scatter_(1, top, 0.0)
    grad.scatter_(1, top, -grad.sum(1, keepdim=True))


def _entropy(z, lse):
    log_p = z - lse[:, None]
    return -(log_p.exp() * log_p).sum(-1)


class TorchRowOps:
    name = "torch"

    def student_stats(self, z, targets):
        lse = z.logsumexp(-1)
        logp = z.gather(1, targets[:, None]).squeeze(1) - lse
        return torch.stack([lse, logp, _entropy(z, lse)], 1)

    def student_grad(self, z, targets, stats, c_logp, c_ent):
        log_p = z - stats[:, S.LSE, None]
        p = log_p.exp()
        grad = -c_logp[:, None] * p
        if c_ent is not None:
            grad -= c_ent[:, None] * p * (log_p + stats[:, S.ENTROPY, None])
        grad.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(grad, z)
        z.copy_(grad)

    def distill_stats(self, z, u, targets, alpha, topk, topk_tail):
        stats = z.new_zeros(z.shape[0], S.N_DISTILL_STATS)
        stats[:, :S.N_STUDENT_STATS] = self.student_stats(z, targets)
        lse_u = u.logsumexp(-1)
        stats[:, S.T_LSE] = lse_u
        topk = effective_topk(topk, z.shape[1])
        log_p, log_q = z - stats[:, S.LSE, None], u - lse_u[:, None]
        ids = None
        if topk is None:
            lp, lq = log_p, log_q
        else:
            ids = z.topk(topk, dim=1).indices
            zk, uk = z.gather(1, ids), u.gather(1, ids)
            if topk_tail:
                in_topk = torch.zeros_like(z, dtype=torch.bool).scatter_(1, ids, True)
                stats[:, S.P_NORM] = log_p.masked_fill(in_topk, -math.inf).logsumexp(-1).clamp_min(LOG_TINY)
                stats[:, S.Q_NORM] = log_q.masked_fill(in_topk, -math.inf).logsumexp(-1).clamp_min(LOG_TINY)
            else:
                stats[:, S.P_NORM], stats[:, S.Q_NORM] = zk.logsumexp(-1), uk.logsumexp(-1)
            lp, lq = bucket_logprobs(zk, uk, stats, topk_tail)
        stats[:, S.T_ENTROPY] = -_xlogy_diff(lq.exp(), lq, torch.zeros_like(lq)).sum(-1)
        stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = divergence_and_aux(lp, lq, alpha)
        return stats, ids

    def distill_grad(self, z, u, targets, stats, topk_ids, c_logp, c_div, alpha, topk, topk_tail):
        log_p = z - stats[:, S.LSE, None]
        p = log_p.exp()
        if topk_ids is None:
            grad = c_div[:, None] * divergence_grad(log_p, u - stats[:, S.T_LSE, None], stats[:, S.AUX_KL], alpha)
        else:
            zk, uk = z.gather(1, topk_ids), u.gather(1, topk_ids)
            lp, lq = bucket_logprobs(zk, uk, stats, topk_tail)
            g = c_div[:, None] * divergence_grad(lp, lq, stats[:, S.AUX_KL], alpha)
            if topk_tail:  # the tail bucket's gradient spreads over its members in proportion p_j / p_tail
                grad = g[:, -1:] * torch.exp(log_p - stats[:, S.P_NORM, None])
                grad.scatter_(1, topk_ids, g[:, :-1])
            else:
                grad = torch.zeros_like(z).scatter_(1, topk_ids, g)
        grad -= c_logp[:, None] * p
        grad.scatter_add_(1, targets[:, None], c_logp[:, None])
        rebalance_(grad, z)
        z.copy_(grad)
