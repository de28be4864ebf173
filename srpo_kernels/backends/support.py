"""Row math shared by the backends built from tensor ops (chunked PyTorch, Triton's glue, vocabulary-parallel) and
the reference: top-K selection and its tie rule, the support's log-probs, divergences and their gradients, the
rebalance of sharp rows, and the private stats columns those backends share."""
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


def xlogy_diff(p, a, b):
    """``p * (a - b)`` with ``0 * anything = 0`` (empty tail buckets)."""
    return torch.where(p > 0, p * (a - b), torch.zeros_like(p))


def entropy_of(log_p):
    """-sum p log p over the last dim, at least 0 (a rounded log-prob just above 0 must not make it negative)."""
    return (-xlogy_diff(log_p.exp(), log_p, 0.0).sum(-1)).clamp_min(0.0)


def log_s_entropy(r, t):
    """(log s, entropy) of softmax rows in fp64 from their shifted sums r = sum e^(x - m) without the max's own term
    (s = 1 + r: log1p keeps r where fp32 cannot hold 1 + r) and t = sum e^(x - m) (x - m): fp32 would round each of
    log s and H at its own size, and the teacher's H is what exp(-beta H_T) amplifies (row_ops.T_ENTROPY_LO)."""
    r, t = r.double(), t.double()
    log_s = torch.log1p(r)
    return log_s, (log_s - t / (1 + r)).clamp_min(0.0)


def jsd_terms(delta, alpha):
    """``d = log(p / m)`` and ``e = log(q / m)`` (m = (1-a) p + a q) from ``delta = log q - log p``.

    With ``s = delta + log(a / (1-a))`` and ``L = log((1-a) + a e^delta) = -d``: ``L = log a + delta +
    log1p(e^-s)`` where s > 0, else ``log(1-a) + log1p(e^s)``. Neither loses digits where p and q are far apart
    (d -> 0 as q/p -> 0, where the gradient ``(1-a) p (d - sum p d)`` of sharp, disagreeing distributions lives),
    and delta never passes through s, whose log(a / (1-a)) (18 at a = 1 - 1e-8) would round away the digits of a
    delta near 0: there the gradient is a difference of nearly equal d's.
    """
    log_a, log_1ma = math.log(alpha), math.log1p(-alpha)
    s = delta + (log_a - log_1ma)
    soft = torch.log1p(torch.exp(-s.abs()))
    pos = s > 0
    d = torch.where(pos, -(delta + (log_a + soft)), -(log_1ma + soft))
    e = torch.where(pos, -(log_a + soft), delta - (log_1ma + soft))
    return d, e


# |g| below this takes phi(g) = g + exp(-g) - 1 from its series; above it p g + (q - p) cancels by at most ~16x
# (phi(0.25) = 0.029 from terms of ~0.25), ~1e-6 relative in fp32. Terms to g^7 leave 1e-8 relative at the edge, below
# fp32's rounding; fp64 takes them to g^13 (1e-18), or its divergences kept only ~1e-11.
PHI_SERIES = 0.25
_PHI_COEFFS = {torch.float32: [(-1) ** k / math.factorial(k) for k in range(2, 8)],
               torch.float64: [(-1) ** k / math.factorial(k) for k in range(2, 14)]}


def phi_terms(p, g, q):
    """p phi(g), phi(g) = g + exp(-g) - 1 >= 0, for g = log p - log q (q = p exp(-g), the other side's
    probabilities).

    KL(p||q) = sum p phi(g) when p and q each sum to 1: a sum of non-negative terms. The usual sum p g cancels where
    p and q nearly agree (KL ~ sum p g^2 / 2 from terms of size p |g|): at |g| ~ 1e-3 the naive fp32 KL is wrong by
    tens of percent. Below |g| = PHI_SERIES phi comes from its series; above it from p g + (q - p); where p = 0 the
    term is its limit, q (the sum of p - q over the row must be 0 for the identity, also where one side underflows).
    The error a row's g shares (a rounded log-sum-exp) moves the sum only where some |g| passes PHI_SERIES, by that
    error times those entries' p, a relative error of the rounding's size there."""
    small = g.abs() < PHI_SERIES
    gs = torch.where(small, g, torch.zeros_like(g))
    coeffs = _PHI_COEFFS[torch.float64 if g.dtype == torch.float64 else torch.float32]
    poly = torch.full_like(gs, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        poly = poly * gs + c
    return torch.where(p > 0, torch.where(small, p * gs * gs * poly, p * g + (q - p)), q)


def reverse_kl(lp, q, g, t):
    """KL(p||q) over the last dim and the sum its gradient p (t - sum p t) needs, from q (see phi_terms),
    g = log p - log q and t = g - c for any c fixed per row (the gradient does not depend on c; a c near g where p
    is large keeps the digits that t - sum p t would otherwise cancel)."""
    p = lp.exp()
    return phi_terms(p, g, q).sum(-1), xlogy_diff(p, t, 0.0).sum(-1)


def _support_shift(lp, g):
    """g at the support's most probable entry: t = g - this is 0 there and on its ties (twin vocabulary rows)."""
    return g.gather(-1, lp.argmax(-1, keepdim=True))


def lse_gap(norm_z, norm_u):
    """lse_z - lse_u per row from (max, log s) pairs: log p - log q = (z - u) - this, exact where z and u nearly
    agree (the difference of two log-probs would round each at its own size, ~|log p| eps)."""
    return (norm_z[0] - norm_u[0]) + (norm_z[1] - norm_u[1])


def lse_gap_pair(norm_z, norm_u, dtype):
    """lse_gap as an unevaluated pair (hi, lo) in `dtype`, hi + lo from fp64 (the maxima's difference is exact
    there, and log s are given in fp64): log_ratio's gap."""
    wide = (norm_z[0].double() - norm_u[0].double()) + (norm_z[1].double() - norm_u[1].double())
    hi = wide.to(dtype)
    return hi, (wide - hi.double()).to(dtype)


def exact_difference(a, b):
    """a - b as (s, e) with s + e == a - b exactly: s = fl(a - b) and e its rounding error (Knuth's TwoSum); e = 0
    where s is not finite (-inf logits), whose error would be NaN."""
    s = a - b
    av = s + b
    bv = s - av
    e = torch.sub(a, av, out=av).sub_(bv.add_(b))
    return s, e.nan_to_num_(0.0, 0.0, 0.0)


def log_ratio(u, z, gap):
    """log q - log p = (u - z) + lse_gap per entry of full rows, rounded about once: u - z kept exactly
    (exact_difference) and the gap as the pair (hi, lo) of lse_gap_pair, each ``[C]``. The plain (u - z) + gap
    rounds at |u - z| and |gap|, which is exact where the rows nearly agree (there the difference of two log-probs
    would keep only the digits of a small delta) but not where one side's logits are far larger than the other's
    (a teacher 300x as sharp: dh 2e-5 from fp64, the naive 6e-7)."""
    s, e = exact_difference(u, z)
    return s.add_(gap[0][:, None]).add_(e.add_(gap[1][:, None]))


def relative_difference(z, u, shift):
    """(z - u) - shift per entry, ``shift`` ``[C]``, with z - u exact (exact_difference): rounds once, at the size of
    the result, where it is small beside z - u (the reverse KL's t near the row's argmax)."""
    s, e = exact_difference(z, u)
    return s.sub_(shift[:, None]).add_(e)


def full_vocab_shift(z, u, gap, alpha):
    """Per row, the full-vocabulary gradient's per-entry term (z - u for reverse KL, d of jsd_terms for the JSD) at
    the student's argmax, which the passes subtract from every entry: p (t - sum p t) then keeps its digits where
    tied entries share the top (twin vocabulary rows) at a large divergence, where t - sum p t of the unshifted
    terms is a difference of nearly equal large numbers. Zeros for forward KL (no such term). `gap` as in
    log_ratio."""
    if alpha == 0.0:
        return torch.zeros_like(gap[0])
    top = z.argmax(1, keepdim=True)
    zt, ut = z.gather(1, top), u.gather(1, top)
    if alpha == 1.0:
        return (zt - ut).squeeze(1)
    return jsd_terms(log_ratio(ut, zt, gap), alpha)[0].squeeze(1)


def divergence_and_aux(lp, lq, delta, alpha):
    """D_alpha over the last dim and the sum its gradient needs: sum p t, t the per-entry term (g = lp - lq for
    reverse KL, see reverse_kl; d of jsd_terms for the JSD) minus its value at p's argmax. `delta` = lq - lp, taken
    from the logits' own difference (bucket_logprobs): exact where the rows nearly agree."""
    if alpha == 0.0:  # KL(q||p) = sum q phi(log q - log p)
        d = phi_terms(lq.exp(), delta, lp.exp()).sum(-1)
        return d, torch.zeros_like(d)
    if alpha == 1.0:
        g = -delta
        return reverse_kl(lp, lq.exp(), g, g - _support_shift(lp, g))
    return jsd_value_and_aux(lp, lq, delta, alpha)


def jsd_value_and_aux(lp, lq, delta, alpha, shift=None):
    """The JSD and sum p (d - shift) (see jsd_terms) from log-probs and delta = log q - log p (given separately:
    the full vocabulary's is exact where the rows nearly agree, see torch_chunked.TorchPasses.full_divergence).
    `shift` None: d at p's argmax (_support_shift)."""
    p, q = lp.exp(), lq.exp()
    d, e = jsd_terms(delta, alpha)
    if shift is None:
        shift = _support_shift(lp, d).squeeze(-1)
    m = (1 - alpha) * p + alpha * q  # KL(p||m) = sum p phi(d), KL(q||m) = sum q phi(e): no cancellation
    kl_pm, kl_qm = phi_terms(p, d, m).sum(-1), phi_terms(q, e, m).sum(-1)
    return (1 - alpha) * kl_pm + alpha * kl_qm, xlogy_diff(p, d, shift[..., None]).sum(-1)


def divergence_grad(lp, lq, delta, aux, alpha):
    """dD/d(logits) of the support distribution (p = softmax of the support's logits); `delta` = lq - lp as in
    divergence_and_aux. Forward KL's p - q is -p expm1(delta) where |delta| < 1: where the rows nearly agree the
    difference of the two rounded probabilities keeps only the digits of |delta| (3e-5 relative in dh at |delta| ~
    1e-2, 7x naive); far apart, p expm1(delta) could overflow where p is tiny and q is not."""
    p = lp.exp()
    if alpha == 0.0:
        near = delta.abs() < 1.0
        return torch.where(near, -p * torch.expm1(torch.where(near, delta, torch.zeros_like(delta))), p - lq.exp())
    if alpha == 1.0:
        g = -delta
        return xlogy_diff(p, g - _support_shift(lp, g), aux[..., None])
    d, _ = jsd_terms(delta, alpha)
    return (1 - alpha) * xlogy_diff(p, d - _support_shift(lp, d), aux[..., None])


# Private columns of the tensor-op backends' stats: the row max and log-sum of shifted exps (lse = m + log s) after
# the student stats; in the distill stats, both sides', the student's tail log-prob before its floor at LOG_TINY
# (the tail gradient spreads by p_j / p_tail), the full vocabulary's shift (full_vocab_shift), which the
# gradient pass must take as the stats pass did, and the lse_gap from fp64 log-sums (an fp32 log s rounds at its own
# size, 2.4e-7 at log s ~ 4, which every delta of near-agreeing rows would carry): the top-K support's, or the full
# vocabulary's as the pair GAP + GAP_LO (lse_gap_pair), then the student's tail's own (max, log s): its members'
# p_j / p_tail is a softmax over the tail, which (z - m) would round at |z - m| (2e-5 relative for a tail 200 below
# the max holding the teacher's mass).
STUDENT_M = S.N_STUDENT_STATS
M_Z, LS_Z, M_U, LS_U, TAIL_Z, SHIFT, GAP, GAP_LO, TAIL_M, TAIL_LS = range(S.N_DISTILL_STATS, S.N_DISTILL_STATS + 10)
N_TENSOR_DISTILL_STATS = TAIL_LS + 1


def norm_of(stats, m_col):
    return stats[:, m_col], stats[:, m_col + 1]


def shifted_logp(x, norm):
    """log softmax entries as (x - m) - log s, rounded like log_softmax (see torch_chunked.TorchPasses.lse_entropy)."""
    m, log_s = norm
    return (x - m[:, None]) - log_s[:, None]


def _max_log_s(x):
    """Per row (max, log sum exp(x - max)) over the last dim, log s in fp64 (a -inf row: max 0, log s -inf)."""
    m = x.max(-1).values
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return m, (x.double() - m.double()[:, None]).exp().sum(-1).log()


def tail_delta(lp, lq, delta_k, delta_err):
    """log q_tail - log p_tail per row, from the support's [C, K+1] log-probs (tail last), its entries' deltas and
    their errors in units of eps (support_deltas).

    q_tail = p_tail + A with A = -sum over the support of p_k expm1(delta_k) (the sum over the whole row is
    sum q - sum p = 0), so delta_tail = log1p(A / p_tail): exact where the rows nearly agree, while the difference
    of the two tail log-probs keeps only the digits of a small delta_tail (1e-5 relative in the divergence at
    delta_tail ~ 1e-2). Where A / p_tail is the less accurate (its error ~ sum p_k (|expm1 delta_k| + e^delta_k
    err_k) / p_tail against |log q_tail| + |log p_tail|: a tail of almost nothing, or deltas of large logits), and
    where q_tail < p_tail / 2, that difference."""
    k = delta_k.shape[-1]
    live = lp[:, :k] > -math.inf
    p_k = torch.where(live, lp[:, :k].exp(), torch.zeros_like(delta_k))
    em1 = torch.where(live, torch.expm1(delta_k), torch.zeros_like(delta_k))
    p_tail, direct = lp[:, k].exp(), lq[:, k] - lp[:, k]
    ratio = -(p_k * em1).sum(-1) / p_tail
    err_support = (p_k * (em1.abs() + (1 + em1) * delta_err)).sum(-1)
    better = (err_support < p_tail * (lq[:, k].abs() + lp[:, k].abs())) & (ratio > -0.5)
    return torch.where(better, torch.log1p(ratio.clamp_min(-0.5)), direct)


def support_deltas(zk, uk, lp_k, lq_k, gap):
    """delta = lq - lp per support entry, and its error in units of eps: from the logits' own difference
    (uk - zk) + gap where that is the more accurate (error ~ |uk - zk| + |gap|, exact where the rows nearly agree),
    else the difference of the log-probs (|lp| + |lq|: logits far from 0 whose gap cancels)."""
    diff = uk - zk
    from_logits, from_logp = diff.abs() + gap.abs(), lp_k.abs() + lq_k.abs()
    use = from_logits < from_logp
    return torch.where(use, diff + gap, lq_k - lp_k), torch.where(use, from_logits, from_logp)


def bucket_logprobs(zk, uk, stats, tail: bool):
    """Support log-probs ``[C, K(+1)]`` from the top-K logits and the stored normalisers, and delta = lq - lp
    (support_deltas, tail_delta), which every divergence and its gradient take: the difference of two log-probs
    rounded at |log p| keeps only the digits of a small delta where the rows nearly agree."""
    if tail:
        lp = torch.cat([shifted_logp(zk, norm_of(stats, M_Z)), stats[:, S.P_NORM, None]], -1)
        lq = torch.cat([shifted_logp(uk, norm_of(stats, M_U)), stats[:, S.Q_NORM, None]], -1)
        k = zk.shape[-1]
        delta_k, err = support_deltas(zk, uk, lp[:, :k], lq[:, :k], stats[:, GAP, None])
        return lp, lq, torch.cat([delta_k, tail_delta(lp, lq, delta_k, err)[:, None]], -1)
    lp, lq = zk.log_softmax(-1), uk.log_softmax(-1)
    return lp, lq, support_deltas(zk, uk, lp, lq, stats[:, GAP, None])[0]


SHARP_MASS = 0.5
SHARP_LOG_PROB = math.log(SHARP_MASS)  # vocab_parallel.py: the argmax alone, across ranks
# An entry holding at least this share of the probability is "heavy": at most 1 / HEAVY_SHARE of them in a row.
HEAVY_SHARE = 1.0 / 16


def heavy_entries(z, lse):
    """Each row's heavy entries, for rebalance_: (ids ``[C, k]``, share ``[C, k]`` = p_j / (the heavy entries' mass),
    0 where an id is not heavy; sharp ``[C, 1]``: whether they hold more than half the probability)."""
    vals, ids = z.topk(min(z.shape[1], round(1 / HEAVY_SHARE)), dim=1)
    p = torch.exp(vals - lse[:, None])
    p = torch.where(p >= HEAVY_SHARE, p, torch.zeros_like(p))
    mass = p.sum(1, keepdim=True)
    return ids, p / mass.clamp_min(torch.finfo(p.dtype).tiny), mass > SHARP_MASS


def rebalance_(grad, heavy):
    """On sharp rows, restore the heavy entries' share of the zero row sum from the light entries.

    dL/dz sums to zero over a row (the loss is invariant to shifting the logits). Where a few tokens hold most of
    the probability, their entries are differences of nearly equal terms, e.g. ``p (log p - log m - KL)``, that
    lose their digits in fp32; the light entries carry no such cancellation. So each heavy entry j is moved by
    p_j / (heavy mass) of the row's sum, the heavy entries' own sum taken first (one heavy entry: minus the sum of
    the others, exactly): the projection autograd's log-softmax backward applies, on the entries where it matters
    (twin top logits need it shared). On a flat row that sum of V similar terms is the less accurate, so those rows
    keep their own entries. The C++ kernel's rebalance is the same rule."""
    ids, share, sharp = heavy
    own = grad.gather(1, ids)
    is_heavy = share > 0
    heavy_sum = torch.where(is_heavy, own, torch.zeros_like(own)).sum(1, keepdim=True)
    grad.scatter_(1, ids, torch.where(is_heavy, torch.zeros_like(own), own))
    light_sum = grad.sum(1, keepdim=True)
    moved = (own - share * heavy_sum) - share * light_sum
    grad.scatter_(1, ids, torch.where(is_heavy & sharp, moved, own))


# Where the support holds less than this share of the mass, the tail's log-prob is log1p(-support mass).
TAIL_FROM_SUPPORT = 0.5


def tail_logprob(xk, norm, m_tail, log_s_tail):
    """log p_tail per row from the support's logits `xk` ``[C, K]``, the row's (max, log s) and the tail's own, in
    the dtype of the log s given (fp64 for the teacher's entropy).

    Where the tail holds most of the mass, log1p(-sum of the support's p): (m_tail - m) + (log s_tail - log s)
    rounds at |log s| there (1e-7 on a flat row of 168, 10x the naive error, which an entropy weight exp(-beta H_T)
    multiplies by beta), while the support's p carry relative errors. Elsewhere that difference, which 1 - sum
    would cancel (a tail of e^-100)."""
    dtype = norm[1].dtype
    support = shifted_logp(xk.to(dtype), (norm[0].to(dtype), norm[1])).exp().sum(-1)
    from_tail = (m_tail.to(dtype) - norm[0].to(dtype)) + (log_s_tail.to(dtype) - norm[1])
    return torch.where(support < TAIL_FROM_SUPPORT, torch.log1p(-support.clamp_max(TAIL_FROM_SUPPORT)), from_tail)


def fill_support_stats(stats, zk, uk, alpha, norms, tails) -> None:
    """The top-K columns of the distill stats from the support's logits ``zk``, ``uk`` ``[C, K]``: normalisers,
    teacher entropy and divergence over the support. `norms`: each side's (max, log s) over the whole row; `tails`:
    each side's over the entries outside the support, for a tail bucket; None renormalises over the K entries. Their
    log s in fp64 (log_s_entropy) keep their digits in the teacher's entropy (row_ops.set_teacher_entropy) and in
    the support's lse_gap (the GAP column, which bucket_logprobs takes)."""
    if tails is not None:
        for col, (m_t, ls_t), norm, xk in zip((S.P_NORM, S.Q_NORM), tails, norms, (zk, uk)):
            tail = tail_logprob(xk, norm, m_t, ls_t)
            stats[:, col] = tail.clamp_min(LOG_TINY)
            if col == S.P_NORM:  # unfloored for the gradient, which spreads by p_j / p_tail
                stats[:, TAIL_Z] = torch.where(torch.isfinite(tail), tail, torch.zeros_like(tail))
                empty = ~torch.isfinite(m_t)  # no member to spread over: any finite normaliser
                stats[:, TAIL_M] = torch.where(empty, norm[0], m_t)
                stats[:, TAIL_LS] = torch.where(empty, norm[1], ls_t).to(stats.dtype)
            else:
                (m_u, ls_u), dtype = norm, norm[1].dtype
                lq_wide = torch.cat([shifted_logp(uk.to(dtype), (m_u.to(dtype), ls_u)),
                                     tail.clamp_min(LOG_TINY)[:, None]], -1)
        stats[:, GAP] = lse_gap(*norms)
    else:  # the contract's normalisers; the support log-probs themselves come from log_softmax
        stats[:, S.P_NORM], stats[:, S.Q_NORM] = zk.logsumexp(-1), uk.logsumexp(-1)
        stats[:, GAP] = lse_gap(_max_log_s(zk), _max_log_s(uk))
        lq_wide = uk.double().log_softmax(-1)
    lp, lq, delta = bucket_logprobs(zk, uk, stats, tails is not None)
    S.set_teacher_entropy(stats, entropy_of(lq_wide))
    stats[:, S.DIVERGENCE], stats[:, S.AUX_KL] = divergence_and_aux(lp, lq, delta, alpha)
