"""Public entry points: argument checks, backend dispatch, and reshaping of the outputs."""
from __future__ import annotations

from typing import Optional

import torch

from .backends import BACKENDS, get_row_ops
from .backends.vocab_parallel import vocab_parallel_ops
from .config import SRPOLossConfig, flag, positive_int
from .function import LogprobParams, LogprobsFunction, SRPOLossFunction, SRPOParams
from .gemm import math_dtype
from .inputs import check_projection, flatten_inputs, FlatInputs, follow_autocast
from .output import SRPOLossOutput, summarize


def fused_srpo_loss(hidden, weight, token_ids, advantages, route=None, teacher_hidden=None, *, old_logprobs=None,
                    ref_logprobs=None, loss_mask=None, is_weights=None, bias=None, temperature=1.0, eps_low=0.2,
                    eps_high=0.28, dual_clip: Optional[float] = 3.0, alpha=0.5, topk=None, topk_tail=True,
                    is_clip=2.0, entropy_beta=1.0, ref_beta=0.0, normalizer=None, weight_normalizer=None,
                    reduction="mean", backend="auto", chunk_size=None, vocab_parallel_group=None) -> SRPOLossOutput:
    """SRPO loss (SPEC §1) from hidden states and the lm_head weight, without materialising ``[N, V]`` logits.

    Args:
        hidden: student hidden states ``[..., H]`` (fp32/bf16/fp16).
        weight: lm_head weight ``[V, H]``, same dtype; ``requires_grad=False`` skips its gradient GEMM.
        token_ids: sampled tokens ``[...]``; every per-token tensor below has this shape.
        advantages: per-token advantages (``[B, 1]`` per-sequence broadcasts; one number applies to all).
        route: bool, True routes the token to the SDPO (self-distillation) branch; None = all GRPO.
        teacher_hidden: ``[M, H]`` teacher hidden states, one row per route-True token in order (no gradient;
            cast to hidden's dtype).
        old_logprobs: behaviour-policy log-probs; None = on-policy (ratio 1, gradient of logp).
        ref_logprobs: reference log-probs for the ``ref_beta * k3`` penalty.
        loss_mask: bool, False drops a token from the loss and the metrics.
        is_weights: per-token importance weight multiplying every token's loss (before the k3 penalty).
            advantages, old_logprobs, ref_logprobs and is_weights are constants of the loss: one that requires grad
            is refused (detach it), as no gradient would reach it.
        normalizer: the token count ``D`` of ``reduction="mean"`` (default: valid tokens here); only with "mean".
        weight_normalizer: mean of ``exp(-entropy_beta * H_T)`` to divide by, in ``[V^-entropy_beta, 1]`` (default:
            over valid SDPO tokens here).
        reduction: "mean" (sum / D), "sum", or "none" (per-token losses, 0 where masked).
        backend: "auto" | "cpu" | "torch" | "triton". chunk_size: rows per chunk (default from V).
        vocab_parallel_group: a process group over which the lm_head is sharded by vocabulary (tensor
            parallelism): ``weight``/``bias`` hold this rank's contiguous block of rows, blocks in rank order (sizes
            may differ), ``token_ids`` are global and every rank passes the same tokens, per-token inputs and
            options (a difference is an error on every rank). Outputs, the loss and ``dh`` are the unsharded call's
            on every rank; ``dW``/``db`` are this block's. Runs the tensor-op row passes (``backend`` "auto" or
            "torch"), with a few small collectives per chunk. An argument error on one rank (its own block's dtype,
            shape) is raised on every rank.
        The other options are the fields of :class:`SRPOLossConfig`.
    """
    cfg = SRPOLossConfig(temperature=temperature, eps_low=eps_low, eps_high=eps_high, dual_clip=dual_clip,
                         alpha=alpha, topk=topk, topk_tail=topk_tail, is_clip=is_clip, entropy_beta=entropy_beta,
                         ref_beta=ref_beta, reduction=reduction)
    chunk_size = positive_int("chunk_size", chunk_size)
    hidden, weight, bias, teacher_hidden = follow_autocast(hidden, weight, bias, teacher_hidden)
    shard_ops = vocab_parallel_ops(vocab_parallel_group, weight, hidden, token_ids, backend, (cfg, chunk_size))
    flat_hidden, x = flatten_inputs(hidden, weight, token_ids, advantages, route, teacher_hidden,
                                    old_logprobs=old_logprobs, ref_logprobs=ref_logprobs, loss_mask=loss_mask,
                                    is_weights=is_weights, bias=bias, normalizer=normalizer,
                                    weight_normalizer=weight_normalizer, cfg=cfg,
                                    shard=None if shard_ops is None else shard_ops.vocab_shard)
    ops = shard_ops or get_row_ops(backend, flat_hidden.device, flat_hidden.dtype, weight.shape[0])
    params = SRPOParams(inputs=x, config=cfg, ops=ops, chunk_size=chunk_size)
    if not torch.is_grad_enabled():
        # Under no_grad / inference_mode (evaluation, metrics) nothing will call backward, but needs_input_grad still
        # follows requires_grad: detached, the forward skips the dh/dW GEMMs and the V x H fp32 accumulator.
        flat_hidden, weight, bias = (None if t is None else t.detach() for t in (flat_hidden, weight, bias))
    loss, *per_token = SRPOLossFunction.apply(flat_hidden, weight, bias, params)
    # Detached here too: under torch.compile mark_non_differentiable is not kept, and the diagnostics came back
    # requiring grad (their gradient would be dropped).
    per_token = [t.detach() for t in per_token]
    logp, ent, t_ent, div, w, clipped = per_token
    metrics = summarize(logp, ent, t_ent, div, w, clipped, x.route, x.valid)
    shaped = [t.reshape(x.token_shape) for t in per_token]
    if reduction == "none":
        loss = loss.reshape(x.token_shape)
    return SRPOLossOutput(loss, *shaped, metrics=metrics)


def fused_logprobs(hidden, weight, token_ids, bias=None, temperature=1.0, with_entropy=False, backend="auto",
                   chunk_size=None, vocab_parallel_group=None):
    """Differentiable per-token log-probs ``log softmax((h W^T + b) / T)[y]`` shaped like ``token_ids``, and the
    entropies too when ``with_entropy`` (returned as ``(logprobs, entropy)``). Never materialises ``[N, V]``.
    ``vocab_parallel_group``: as in :func:`fused_srpo_loss`."""
    temperature = SRPOLossConfig(temperature=temperature).temperature
    chunk_size = positive_int("chunk_size", chunk_size)
    hidden, weight, bias = follow_autocast(hidden, weight, bias)
    with_entropy = flag("with_entropy", with_entropy)
    shard_ops = vocab_parallel_ops(vocab_parallel_group, weight, hidden, token_ids, backend,
                                   (temperature, with_entropy, chunk_size))
    flat_h, flat_ids, shape, extremes = check_projection(hidden, weight, token_ids, bias,
                                                         None if shard_ops is None else shard_ops.vocab_shard,
                                                         temperature)
    n = flat_ids.numel()
    dtype = math_dtype(flat_h.dtype)
    device = flat_h.device
    x = FlatInputs(token_ids=flat_ids,
                   advantages=torch.zeros(n, dtype=dtype, device=device),
                   route=torch.zeros(n, dtype=torch.bool, device=device),
                   valid=torch.ones(n, dtype=torch.bool, device=device), teacher_hidden=None, old_logprobs=None,
                   ref_logprobs=None, is_weights=None, normalizer=None, weight_normalizer=None, token_shape=shape,
                   absmax=extremes)
    ops = shard_ops or get_row_ops(backend, device, flat_h.dtype, weight.shape[0])
    params = LogprobParams(inputs=x, temperature=temperature, ops=ops, chunk_size=chunk_size)
    logp, ent = LogprobsFunction.apply(flat_h, weight, bias, params)
    if with_entropy:
        return logp.reshape(shape), ent.reshape(shape)
    return logp.reshape(shape)


class FusedSRPOLoss(torch.nn.Module):
    """``nn.Module`` holding the loss options: ``FusedSRPOLoss(alpha=1.0)(hidden, weight, ids, adv, route, th)``.

    Options are those of :func:`fused_srpo_loss` that are not per-batch tensors (``SRPOLossConfig`` fields plus
    ``backend`` and ``chunk_size``); they are validated at construction.
    """

    def __init__(self, backend="auto", chunk_size=None, vocab_parallel_group=None, **options):
        super().__init__()
        self.config = SRPOLossConfig(**options)
        chunk_size = positive_int("chunk_size", chunk_size)
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        self.backend, self.chunk_size, self.vocab_parallel_group = backend, chunk_size, vocab_parallel_group

    def forward(self, hidden, weight, token_ids, advantages, route=None, teacher_hidden=None,
                **tensors) -> SRPOLossOutput:
        options = {f: getattr(self.config, f) for f in self.config.__dataclass_fields__}
        held = sorted(set(tensors) & (set(options) | {"backend", "chunk_size", "vocab_parallel_group"}))
        if held:
            raise TypeError(f"FusedSRPOLoss holds {', '.join(held)} from its construction; forward takes the "
                            f"per-batch tensors (and normalizer, weight_normalizer) only")
        return fused_srpo_loss(hidden, weight, token_ids, advantages, route, teacher_hidden, **tensors, **options,
                               backend=self.backend, chunk_size=self.chunk_size,
                               vocab_parallel_group=self.vocab_parallel_group)

    def extra_repr(self):
        return f"{self.config}, backend={self.backend!r}"
