"""Plain PyTorch SRPO loss that materialises ``[N, V]`` logits: the ground truth of the tests and the baseline of
the benchmarks. Gradients come from autograd, so it shares no gradient code with the fused kernels.

Like a typical trainer it runs the lm_head GEMM in the input dtype and the rest in fp32 (fp64 stays fp64), which
makes ``srpo_loss`` on bf16 inputs the "naive bf16" baseline of the precision tests.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from .config import SRPOLossConfig, flag
from .backends.support import topk_ids
from .gemm import math_dtype
from .inputs import check_projection, flatten_inputs, follow_autocast
from .output import SRPOLossOutput, summarize

LOG_TINY = math.log(torch.finfo(torch.float32).tiny)  # floor of a tail bucket's log-probability


def _plogdiff(p, a, b):
    """``p * (a - b)`` summed over the last dim, 0 where p = 0: masked vocabulary (-inf logits) gives -inf - -inf."""
    return (p * torch.where(p > 0, a - b, torch.zeros_like(a))).sum(-1)


def _entropy(log_p):
    return -_plogdiff(log_p.exp(), log_p, 0.0)


def _logits(hidden, weight, bias, temperature, dtype):
    z = hidden @ weight.T
    if bias is not None:
        z = z + bias
    return z.to(dtype) / temperature


def logprobs(hidden, weight, token_ids, bias=None, temperature=1.0, with_entropy=False):
    """Per-token log-probs (and entropies) from materialised logits; differentiable."""
    temperature = SRPOLossConfig(temperature=temperature).temperature
    with_entropy = flag("with_entropy", with_entropy)
    hidden, weight, bias = follow_autocast(hidden, weight, bias)
    flat_h, flat_ids, shape, _ = check_projection(hidden, weight, token_ids, bias, temperature=temperature)
    dtype = math_dtype(flat_h.dtype)
    log_p = _logits(flat_h, weight, bias, temperature, dtype).log_softmax(-1)
    lp = log_p.gather(-1, flat_ids[:, None]).squeeze(-1).reshape(shape)
    if not with_entropy:
        return lp
    return lp, _entropy(log_p).reshape(shape)


def support_logprobs(log_p, log_q, student_logits, cfg: SRPOLossConfig):
    """Student/teacher log-probs over the divergence support: full vocab, or top-K (student) + tail / renormalised."""
    if cfg.topk is None:
        return log_p, log_q
    k = min(cfg.topk, log_p.shape[-1])
    idx = topk_ids(student_logits.detach(), k)
    lp, lq = log_p.gather(-1, idx), log_q.gather(-1, idx)
    if not cfg.topk_tail or k == log_p.shape[-1]:  # an empty tail is the renormalised support
        return lp - lp.logsumexp(-1, keepdim=True), lq - lq.logsumexp(-1, keepdim=True)
    in_topk = torch.zeros_like(log_p, dtype=torch.bool).scatter(-1, idx, True)
    tail_p = _floored(_tail_logsumexp(log_p, in_topk))
    tail_q = _tail_logsumexp(log_q, in_topk).clamp_min(LOG_TINY)  # the teacher's: no gradient
    return torch.cat([lp, tail_p], -1), torch.cat([lq, tail_q], -1)


def _tail_logsumexp(log_p, in_topk):
    """log of the mass outside the top-K, -inf for an empty tail (every entry outside it -inf) with a zero, not NaN,
    gradient there: logsumexp's backward over a row of -inf is NaN."""
    tail = log_p.masked_fill(in_topk, -math.inf)
    empty = ~torch.isfinite(tail).any(-1, keepdim=True)
    lse = torch.where(empty, torch.zeros_like(tail), tail).logsumexp(-1, keepdim=True)
    return torch.where(empty, torch.full_like(lse, -math.inf), lse)


def _floored(log_tail):
    """The tail's log-prob floored at LOG_TINY in value, its gradient the unfloored one's: a student whose tail holds
    e^-300 of the mass where the teacher puts almost all must still be pulled (a plain clamp makes that gradient 0,
    exactly where the student is most wrong). An empty tail (-inf) takes the floor and no gradient."""
    floored = log_tail.clamp_min(LOG_TINY)
    finite = torch.isfinite(log_tail)
    through = torch.where(finite, log_tail, torch.zeros_like(log_tail))
    return torch.where(finite, through + (floored - through).detach(), floored)


def divergence(lp, lq, alpha: float):
    """``D_alpha(p, q)`` over the last dim from log-probs: 0 forward KL(q||p), 1 reverse KL(p||q), else gen. JSD.

    The JSD in fp64 (the ground truth the kernels are judged by) takes its log-ratios from ``delta = lq - lp``:
    as lq - lm they round at |lm|, far above log(q/m) ~ (1-a)(1 - p/q) near a = 1, and the JSD of nearly uniform
    rows at a = 1 - 1e-8 came out 2.5e-4 off mpmath (now 1e-7). In fp32 and below it stays the naive loss a user
    would write, log m by logsumexp: the baseline the kernels' precision is measured against."""
    p, q = lp.exp(), lq.exp()
    if alpha == 0.0:
        return _plogdiff(q, lq, lp)
    if alpha == 1.0:
        return _plogdiff(p, lp, lq)
    if lp.dtype != torch.float64:
        dead = (p == 0) & (q == 0)  # masked vocabulary: log m would be -inf, and its gradient NaN
        lm = torch.logsumexp(torch.stack([lp.masked_fill(dead, 0.0) + math.log(1 - alpha),
                                          lq.masked_fill(dead, 0.0) + math.log(alpha)]), 0)
        return (1 - alpha) * _plogdiff(p, lp, lm) + alpha * _plogdiff(q, lq, lm)
    # log(m/p) = log((1-a) + a q/p) and log(q/m) = delta - log(m/p); where one side is 0 (masked vocabulary, an
    # empty top-K tail) the other's log-ratio is -log of its share of m.
    both = (p > 0) & (q > 0)
    delta = torch.where(both, lq - lp, torch.zeros_like(lp))
    log_m_over_p = torch.logaddexp(torch.full_like(delta, math.log1p(-alpha)), delta + math.log(alpha))
    log_p_over_m = torch.where(both, -log_m_over_p, torch.full_like(delta, -math.log1p(-alpha)))
    log_q_over_m = torch.where(both, delta - log_m_over_p, torch.full_like(delta, -math.log(alpha)))
    return (1 - alpha) * _plogdiff(p, log_p_over_m, 0.0) + alpha * _plogdiff(q, log_q_over_m, 0.0)


def srpo_loss(hidden, weight, token_ids, advantages, route=None, teacher_hidden=None, *, old_logprobs=None,
              ref_logprobs=None, loss_mask=None, is_weights=None, bias=None, temperature=1.0, eps_low=0.2,
              eps_high=0.28, dual_clip: Optional[float] = 3.0, alpha=0.5, topk=None, topk_tail=True, is_clip=2.0,
              entropy_beta=1.0, ref_beta=0.0, normalizer=None, weight_normalizer=None,
              reduction="mean") -> SRPOLossOutput:
    """Same arguments and output as :func:`srpo_kernels.fused_srpo_loss` (without ``backend``/``chunk_size``)."""
    cfg = SRPOLossConfig(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                         alpha=alpha, topk=topk, topk_tail=topk_tail, is_clip=is_clip, entropy_beta=entropy_beta,
                         ref_beta=ref_beta, reduction=reduction)
    hidden, weight, bias, teacher_hidden = follow_autocast(hidden, weight, bias, teacher_hidden)
    flat_hidden, x = flatten_inputs(hidden, weight, token_ids, advantages, route, teacher_hidden,
                                    old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, loss_mask=loss_mask,
                                    is_weights=is_weights, bias=bias, normalizer=normalizer,
                                    weight_normalizer=weight_normalizer, cfg=cfg)
    dtype = math_dtype(flat_hidden.dtype)
    z = _logits(flat_hidden, weight, bias, temperature, dtype)
    log_p = z.log_softmax(-1)
    logp = log_p.gather(-1, x.token_ids[:, None]).squeeze(-1)
    entropy = _entropy(log_p)
    zeros = torch.zeros_like(logp)

    # GRPO branch (every token computed; routing selects below).
    old = x.old_logprobs if x.old_logprobs is not None else logp.detach()
    adv = x.advantages

    def surrogate(ratio):
        unclipped = -adv * ratio
        clipped_loss = -adv * ratio.clamp(1 - eps_low, 1 + eps_high)
        loss = torch.maximum(unclipped, clipped_loss)
        clipped = clipped_loss > unclipped
        if dual_clip is not None:
            cap = -dual_clip * adv
            dual = (adv < 0) & (loss > cap)
            loss = torch.where(adv < 0, torch.minimum(loss, cap), loss)
            clipped = clipped | dual
        return loss, clipped

    # The loss takes a masked token at ratio 1: exp(logp - old) overflows fp32 for old < -88, and masking after it
    # would back-propagate 0 * inf = NaN into every gradient; so would logp - stopgrad(logp) = -inf - -inf at a masked
    # token whose target a -inf bias masks. The clipped diagnostic keeps every position's own ratio.
    log_ratio = torch.where(x.valid, logp - old, torch.zeros_like(logp))
    # Likewise where the clip or the dual clip holds the loss, where A = 0, and at SDPO tokens (which do not take the
    # surrogate): no gradient flows there, and an overflowed ratio gave 0 * inf = NaN in the backward (-0 * inf in the
    # loss). There the ratio is capped at twice both clip points, which leaves the loss as it is, and detached: such
    # a token contributes nothing, whatever its upstream gradient (a NaN passed 0 * NaN on only below the cap).
    _, held = surrogate(torch.exp(log_ratio.detach()))
    cap = math.log(2 * max(1 + eps_high, dual_clip or 0.0))
    no_flow = held | (adv == 0) | x.route
    loss_g, _ = surrogate(torch.exp(torch.where(no_flow, log_ratio.detach().clamp(max=cap), log_ratio)))
    _, clipped = surrogate(torch.exp(logp.detach() - old))

    # SDPO branch, teacher only on the routed rows.
    sd = x.route
    loss_sd = zeros
    t_ent, div, w = zeros, zeros, zeros
    if int(sd.sum()):
        log_q = _logits(x.teacher_hidden, weight, bias, temperature, dtype).log_softmax(-1).detach()
        lp_s, lq_s = support_logprobs(log_p[sd], log_q, z[sd], cfg)
        d = divergence(lp_s, lq_s, alpha)
        h_t = _entropy(lq_s)
        # w = exp(-beta H_T) / mean(exp(-beta H_T)), in log space: exp(-beta H_T) underflows for beta H_T > ~87.
        log_w = -entropy_beta * h_t
        valid_sd = x.valid[sd]
        if x.weight_normalizer is not None:
            log_mu = math.log(x.weight_normalizer)
        elif int(valid_sd.sum()):
            log_mu = log_w[valid_sd].logsumexp(0) - math.log(int(valid_sd.sum()))
        else:
            log_mu = 0.0
        # 0 at masked tokens before it multiplies anything: their weight is normalised by tokens they are not among
        # and may overflow (exp(300 * 0.8)), and masking the product after it would back-propagate 0 * inf = NaN;
        # their ratio likewise at 1 (as the GRPO branch's).
        w_sd = torch.where(valid_sd, torch.exp(log_w - log_mu), torch.zeros_like(log_w))
        ratio_sd = torch.exp(log_ratio[sd]).detach()
        is_sd = ratio_sd if is_clip is None else ratio_sd.clamp(max=is_clip)
        loss_sd = zeros.index_put((sd.nonzero().squeeze(1),), w_sd * is_sd * d)
        t_ent = zeros.index_put((sd.nonzero().squeeze(1),), h_t)
        div = zeros.index_put((sd.nonzero().squeeze(1),), d.detach())
        w = torch.where(x.valid, zeros.index_put((sd.nonzero().squeeze(1),), w_sd), zeros)  # 0 where masked

    per_token = torch.where(sd, loss_sd, loss_g)
    if x.is_weights is not None:
        per_token = per_token * x.is_weights
    if ref_beta > 0:
        # A masked token enters k3 at its reference point (k3 = 0): masking after exp(ref - logp) overflowed would
        # back-propagate 0 * inf = NaN, and a masked token contributes nothing.
        r = x.ref_logprobs - torch.where(x.valid, logp, x.ref_logprobs)
        per_token = per_token + ref_beta * (torch.exp(r) - r - 1)
    per_token = torch.where(x.valid, per_token, zeros)
    if reduction == "none":
        loss = per_token.reshape(x.token_shape)
    else:
        loss = per_token.sum()
        if reduction == "mean":
            loss = loss / (x.normalizer if x.normalizer is not None else max(int(x.valid.sum()), 1))
    clipped = clipped & ~sd
    shaped = [t.detach().reshape(x.token_shape) for t in (logp, entropy, t_ent, div, w)]
    metrics = summarize(logp.detach(), entropy.detach(), t_ent.detach(), div, w.detach(), clipped, sd, x.valid)
    return SRPOLossOutput(loss, *shaped, clipped.reshape(x.token_shape), metrics)
