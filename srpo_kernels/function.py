"""The autograd Functions. Each takes the differentiable tensors plus one params object and returns a fixed tuple.

Scalar reductions ("mean"/"sum") compute the gradients during the forward pass (the chunk's logits are on hand,
so backward costs no second student GEMM) and backward only scales them. ``reduction="none"`` cannot know the
per-token upstream gradient in forward, so its backward re-runs the chunk loop with it.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Optional

import torch

from . import token_math
from .backends import row_ops as S
from .backends.row_ops import RowOps
from .chunk_loop import ChunkRunner, Grads, RowStats, log_weight_normalizer, normalizer_known_upfront
from .config import SRPOLossConfig
from .gemm import returned_grad
from .inputs import FlatInputs


def _exact_dtypes(method):
    """Run a forward/backward with torch.autocast off: its GEMMs follow gemm.py's policy for the dtypes they are
    given (the entry points cast the operands to autocast's dtype first), and an autocast region around the call, or
    around ``backward()``, would otherwise turn the fp32 GEMMs of the widened policy into bf16 ones. The first
    tensor argument (hidden in forward, the upstream gradient in backward) names the device."""
    @functools.wraps(method)
    def run(ctx, first, *rest):
        with torch.autocast(first.device.type, enabled=False):
            return method(ctx, first, *rest)
    return run


@dataclass
class SRPOParams:
    inputs: FlatInputs
    config: SRPOLossConfig
    ops: RowOps
    chunk_size: Optional[int] = None


def _opt(t: Optional[torch.Tensor], rows):
    return None if t is None else t[rows]


class _Coefficients:
    """Per-row gradient coefficients of one run: ``row_scale`` is dL/d(per-token loss), 0 on masked tokens."""

    def __init__(self, x: FlatInputs, cfg: SRPOLossConfig, row_scale: torch.Tensor, log_mu: float):
        self.x, self.cfg, self.log_mu = x, cfg, log_mu
        self.scale = row_scale / cfg.temperature  # chain rule through z = raw_logits / T
        self.running: Optional[_RunningNormalizer] = None

    def _ref_term(self, logp, rows):
        if self.cfg.ref_beta == 0:
            return torch.zeros_like(logp)
        return self.cfg.ref_beta * token_math.k3_penalty(logp, self.x.ref_logprobs[rows])[1]

    def _isw(self, rows):
        return 1.0 if self.x.is_weights is None else self.x.is_weights[rows]

    def _scaled(self, rows, coefficient, constant=None):
        """row_scale * coefficient, exactly 0 on masked rows and on `constant` ones (whose loss does not depend on
        the logits): such a token contributes nothing, even where its own terms overflow (a k3 penalty
        exp(ref - logp) of a token deep in the tail is inf in fp32) or its upstream gradient is NaN/inf."""
        scale = self.scale[rows]
        live = scale != 0 if constant is None else (scale != 0) & ~constant
        return torch.where(live, scale * coefficient, torch.zeros_like(scale))

    def grpo(self, rows, st):
        logp = st[:, S.LOGP]
        terms = token_math.grpo_surrogate(logp, _opt(self.x.old_logprobs, rows), self.x.advantages[rows], self.cfg)
        coefficient = self._isw(rows) * terms.dloss_dlogp + self._ref_term(logp, rows)
        return self._scaled(rows, coefficient, _constant_loss(terms, self.cfg)), None

    def distill(self, rows, st):
        logp = st[:, S.LOGP]
        is_w = token_math.sdpo_is_weight(logp, _opt(self.x.old_logprobs, rows), self.cfg)
        teacher_entropy = S.teacher_entropy(st)
        if self.running is not None:
            self.log_mu = self.running.update(rows, teacher_entropy)
        weight = token_math.distill_weight(teacher_entropy, self.cfg, self.log_mu, st.dtype)
        return (self._scaled(rows, self._ref_term(logp, rows)),
                self._scaled(rows, self._isw(rows) * weight * is_w))


def _constant_loss(terms: token_math.GRPOTerms, cfg: SRPOLossConfig) -> Optional[torch.Tensor]:
    """GRPO tokens whose loss does not depend on the logits: their surrogate is constant (terms.constant) and no k3
    penalty is on, which depends on logp at every token (None then). is_weights = 0 is no such token: it passes a
    NaN on, as a product does."""
    return terms.constant if cfg.ref_beta == 0 else None


class _RunningNormalizer:
    """The entropy-weight normaliser over the valid SDPO rows seen so far, for when it is not known up front.

    Each chunk's gradient is weighted by the running mean, and the gradients accumulated before it are rescaled
    whenever the mean changes (as an online softmax rescales its running sum), so the weights in the accumulators
    are always normalised: none under- or overflows fp32, however large beta * H_T."""

    def __init__(self, x: FlatInputs, cfg: SRPOLossConfig, grads: Grads, sd_rows: torch.Tensor):
        self.x, self.cfg, self.grads, self.sd_rows = x, cfg, grads, sd_rows
        self.log_total, self.count, self.log_mu = -math.inf, 0, 0.0

    def rescale_to(self, log_mu: float) -> None:
        if self.count and log_mu != self.log_mu:  # only SDPO rows have contributed so far
            self.grads.scale_(math.exp(self.log_mu - log_mu), self.sd_rows)
        self.log_mu = log_mu

    def update(self, rows, teacher_entropy) -> float:
        valid = self.x.valid[rows]
        n = int(valid.sum())
        if n:
            chunk = token_math.log_weight_sum(teacher_entropy[valid], self.cfg)
            top = max(self.log_total, chunk)
            self.log_total = top + math.log1p(math.exp(-abs(self.log_total - chunk)))
            new = self.log_total - math.log(self.count + n)
            self.rescale_to(new)
            self.count += n
        return self.log_mu


def _run(runner: ChunkRunner, row_scale: Optional[torch.Tensor], log_mu: Optional[float],
         grads: Optional[Grads]):
    """One pass over all rows; returns (stats, log_mu). With the normaliser unknown, SDPO gradients follow a running
    one (see _RunningNormalizer) and are rescaled to the final one."""
    x, cfg = runner.x, runner.cfg
    stats = runner.empty_stats()
    if grads is not None and log_mu is None and cfg.ref_beta > 0:
        # The k3 part of an SDPO row's gradient does not scale with 1/mu: learn mu first (extra teacher pass).
        runner.distill_stream(stats, None, None)
        log_mu = log_weight_normalizer(x, cfg, stats.teacher_entropy)
    coef = None if grads is None else _Coefficients(x, cfg, row_scale, log_mu if log_mu is not None else 0.0)
    if coef is not None and log_mu is None:
        coef.running = _RunningNormalizer(x, cfg, grads, runner.sd_rows)
    runner.distill_stream(stats, None if coef is None else coef.distill, grads)
    if log_mu is None:
        log_mu = log_weight_normalizer(x, cfg, stats.teacher_entropy)
        if coef is not None:
            coef.running.rescale_to(log_mu)
    runner.student_stream(stats, None if coef is None else coef.grpo, grads)
    if grads is not None:
        runner.finish_grads(grads)
    return stats, log_mu


def per_token_loss(x: FlatInputs, cfg: SRPOLossConfig, stats: RowStats, log_mu: float):
    """Per-token loss (0 where masked), the normalised distillation weight, the clipped flag, and which tokens'
    loss depends on the logits (valid ones, less the GRPO tokens of _constant_loss; a NaN/inf scalar upstream
    gradient reaches only them, see _returned)."""
    route = x.route
    grpo = token_math.grpo_surrogate(stats.logp, x.old_logprobs, x.advantages, cfg)
    is_w = token_math.sdpo_is_weight(stats.logp, x.old_logprobs, cfg)
    zero = torch.zeros_like(stats.logp)
    # 0 at masked tokens, as their loss: their weight is normalised by tokens they are not among, and overflows fp32
    # for a large entropy_beta (exp(300 * 0.8) at a masked token whose teacher entropy is below the batch's).
    weight = torch.where(route & x.valid, token_math.distill_weight(stats.teacher_entropy, cfg, log_mu, zero.dtype),
                         zero)
    loss = torch.where(route, weight * is_w * stats.divergence, grpo.loss)
    if x.is_weights is not None:
        loss = loss * x.is_weights
    if cfg.ref_beta > 0:
        loss = loss + cfg.ref_beta * token_math.k3_penalty(stats.logp, x.ref_logprobs)[0]
    constant = _constant_loss(grpo, cfg)
    contributes = x.valid if constant is None else x.valid & ~(constant & ~route)
    return torch.where(x.valid, loss, zero), weight, grpo.clipped & ~route, contributes


def _scalar_row_scale(x: FlatInputs, dtype, reduction: str, denom: float) -> torch.Tensor:
    """dL/d(per-token loss) of a "mean"/"sum" loss for an upstream gradient of 1."""
    return x.valid.to(dtype) / (denom if reduction == "mean" else 1.0)


def _refuse_double_backward():
    # Autograd runs backward with grad mode on only under create_graph=True.
    if torch.is_grad_enabled():
        raise RuntimeError("srpo_kernels: the fused loss and log-probs are not twice differentiable (their gradients "
                           "come from the kernels, not from autograd); create_graph=True is not supported")


def _returned(grads: Grads, dtypes, grad_loss=None, contributes=None) -> tuple:
    """backward's fixed tuple (dh, dW, db, None for the params) from our accumulators, in the inputs' dtypes, times
    the scalar upstream gradient `grad_loss` of a "mean"/"sum" loss (None: a per-token one, already applied)."""
    scale = None if grad_loss is None or bool(grad_loss == 1) else grad_loss
    if scale is not None and not bool(torch.isfinite(scale)):
        # NaN/inf reaches what autograd's dz^T h and dz W spread it to from the `contributes` tokens (see
        # per_token_loss): their rows of dh, and all of dW and db; a masked token, or one a clip holds, gets nothing.
        if grads.hidden is not None:
            grads.hidden.copy_(torch.where(contributes[:, None], grads.hidden * scale, 0.0))
        reached = bool(contributes.any())
        for acc in (grads.weight, grads.bias):
            if acc is not None and reached:
                acc.mul_(scale)
            elif acc is not None:
                acc.zero_()
        scale = None
    dh, dw, db = (returned_grad(g, d, scale) for g, d in zip((grads.hidden, grads.weight, grads.bias), dtypes))
    return dh, dw, db, None


class SRPOLossFunction(torch.autograd.Function):
    """(hidden [N,H], weight [V,H], bias [V]|None, params) -> (loss, logprobs, entropy, teacher_entropy,
    divergence, distill_weight, clipped); only ``loss`` is differentiable."""

    @staticmethod
    @_exact_dtypes
    def forward(ctx, hidden, weight, bias, params: SRPOParams):
        cfg = params.config
        x = params.inputs
        runner = ChunkRunner(hidden, weight, bias, x, cfg, params.ops, params.chunk_size)
        needs = ctx.needs_input_grad[:3]
        in_forward = cfg.reduction != "none" and any(needs)
        n_valid = int(x.valid.sum())
        denom = x.normalizer if x.normalizer is not None else max(n_valid, 1)
        row_scale = grads = None
        if in_forward:
            row_scale = _scalar_row_scale(x, runner.dtype, cfg.reduction, denom)
            grads = runner.new_grads(*needs)
        mu_upfront = log_weight_normalizer(x, cfg, None) if normalizer_known_upfront(x, cfg) else None
        stats, log_mu = _run(runner, row_scale, mu_upfront, grads)
        loss_tok, weight_tok, clipped, contributes = per_token_loss(x, cfg, stats, log_mu)
        loss = loss_tok if cfg.reduction == "none" else loss_tok.sum() / (denom if cfg.reduction == "mean" else 1.0)
        # Saved for a recompute: always for "none"; for "mean"/"sum" only a second backward through a retained
        # graph needs it (the first one hands over the gradients computed here).
        ctx.save_for_backward(hidden, weight, bias)
        ctx.params, ctx.log_mu, ctx.grads = params, log_mu, grads
        ctx.versions = x.versions()
        ctx.mu_upfront, ctx.denom = mu_upfront, denom
        ctx.reduction = cfg.reduction
        ctx.contributes = contributes
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        outs = (stats.logp, stats.entropy, stats.teacher_entropy.to(stats.logp.dtype), stats.divergence, weight_tok,
                clipped)
        ctx.mark_non_differentiable(*outs)
        return (loss,) + outs

    @staticmethod
    @_exact_dtypes
    def backward(ctx, grad_loss, *_unused):
        _refuse_double_backward()
        if ctx.grads is not None:
            # Computed in forward. Dropping ctx's reference lets autograd adopt the tensors as .grad instead of
            # copying them (a copy of dW would add V x H x 4 bytes to the peak).
            g, ctx.grads = ctx.grads, None
            return _returned(g, ctx.dtypes, grad_loss, ctx.contributes)
        hidden, weight, bias = ctx.saved_tensors
        params = ctx.params
        x = params.inputs
        x.check_unchanged(ctx.versions)
        runner = ChunkRunner(hidden, weight, bias, x, params.config, params.ops, params.chunk_size)
        grads = runner.new_grads(*ctx.needs_input_grad[:3])
        if ctx.reduction == "none":
            # A masked token contributes nothing, even under a NaN/inf upstream gradient (e.g. nansum over padding).
            upstream = grad_loss.reshape(-1).to(runner.dtype)
            _run(runner, torch.where(x.valid, upstream, torch.zeros_like(upstream)), ctx.log_mu, grads)
            return _returned(grads, ctx.dtypes)
        # A second backward through a retained graph: the forward's computation again, bit for bit.
        _run(runner, _scalar_row_scale(x, runner.dtype, ctx.reduction, ctx.denom), ctx.mu_upfront, grads)
        return _returned(grads, ctx.dtypes, grad_loss, ctx.contributes)


@dataclass
class LogprobParams:
    inputs: FlatInputs  # all rows valid and GRPO-routed
    temperature: float
    ops: RowOps
    chunk_size: Optional[int] = None


class LogprobsFunction(torch.autograd.Function):
    """(hidden [N,H], weight [V,H], bias|None, params) -> (logprobs [N], entropy [N]); both differentiable.
    Backward recomputes each chunk's logits (the upstream gradients are per token)."""

    @staticmethod
    @_exact_dtypes
    def forward(ctx, hidden, weight, bias, params: LogprobParams):
        runner = _logprob_runner(hidden, weight, bias, params)
        stats = runner.empty_stats()
        runner.student_stream(stats, None, None)
        ctx.save_for_backward(hidden, weight, bias)
        ctx.params, ctx.versions = params, params.inputs.versions()
        return stats.logp, stats.entropy

    @staticmethod
    @_exact_dtypes
    def backward(ctx, grad_logp, grad_entropy):
        _refuse_double_backward()
        hidden, weight, bias = ctx.saved_tensors
        ctx.params.inputs.check_unchanged(ctx.versions)
        runner = _logprob_runner(hidden, weight, bias, ctx.params)
        grads = runner.new_grads(*ctx.needs_input_grad[:3])
        inv_t = 1.0 / ctx.params.temperature
        g_lp = grad_logp.to(runner.dtype) * inv_t
        g_ent = None if grad_entropy is None else grad_entropy.to(runner.dtype) * inv_t

        def coef(rows, _stats):
            return g_lp[rows], None if g_ent is None else g_ent[rows]

        runner.student_stream(runner.empty_stats(), coef, grads)
        runner.finish_grads(grads)
        return _returned(grads, (hidden.dtype, weight.dtype, None if bias is None else bias.dtype))


def _logprob_runner(hidden, weight, bias, params: LogprobParams) -> ChunkRunner:
    return ChunkRunner(hidden, weight, bias, params.inputs, SRPOLossConfig(temperature=params.temperature),
                       params.ops, params.chunk_size)
