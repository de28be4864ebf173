"""Argument checks and flattening: every public entry point funnels its tensors through here.

Bad input is rejected with a ValueError/TypeError that names the argument and says what was expected, so a wrong
shape or an out-of-range token id never turns into a silently wrong number.
"""
from __future__ import annotations

import math
import numbers
import sys
import zlib
from dataclasses import dataclass, field
from typing import Optional, Tuple

import torch

from .config import SRPOLossConfig
from .distributed import all_reduce_sums, world_size
from .gemm import math_dtype, max_row_norm

_FLOATS = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


@dataclass
class FlatInputs:
    """Everything of the loss but its differentiable operands (hidden, weight, bias: those enter the autograd Function
    as its arguments, once), flattened to ``N`` tokens; per-token tensors are 1-D, floats fp32 (fp64 kept)."""

    token_ids: torch.Tensor  # [N] int64
    advantages: torch.Tensor  # [N]
    route: torch.Tensor  # [N] bool, True = SDPO branch
    valid: torch.Tensor  # [N] bool
    teacher_hidden: Optional[torch.Tensor]  # [M, H], one row per route-True token, detached
    old_logprobs: Optional[torch.Tensor]
    ref_logprobs: Optional[torch.Tensor]
    is_weights: Optional[torch.Tensor]
    normalizer: Optional[float]
    weight_normalizer: Optional[float]
    token_shape: torch.Size
    distributed: bool = False  # normalisers not supplied are reduced over the data-parallel ranks
    # The finiteness scan's largest |entry| of hidden, weight, teacher_hidden (bias: its largest entry): gemm.Gemms
    # bounds its fp16 outputs with them instead of reading W again.
    absmax: dict = field(default_factory=dict)

    # The argument each tensor field came from: they may be views of the caller's tensors.
    _ARGUMENTS = {"token_ids": "token_ids", "advantages": "advantages", "route": "route", "valid": "loss_mask",
                  "teacher_hidden": "teacher_hidden", "old_logprobs": "old_logprobs",
                  "ref_logprobs": "ref_logprobs", "is_weights": "is_weights"}

    def versions(self) -> dict:
        """The in-place version of each tensor a backward recompute reads (a view shares its base's counter;
        tensors made under inference_mode have none and cannot be changed outside it)."""
        return {f: t._version for f in self._ARGUMENTS
                if (t := getattr(self, f)) is not None and not t.is_inference()}

    def check_unchanged(self, versions: dict) -> None:
        """Refuse a recompute from tensors the caller changed in place since the forward (as autograd refuses its
        own saved tensors): it would give the gradient of a loss that was never computed."""
        for f, version in versions.items():
            if getattr(self, f)._version != version:
                name = self._ARGUMENTS[f]
                raise RuntimeError(f"srpo_kernels: {name} was modified in place after the forward pass, and backward "
                                   f"recomputes the loss from it (reduction='none', fused_logprobs, or a second "
                                   f"backward): pass a copy ({name}.clone()) or change it after backward")


def _tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.layout != torch.strided:  # sparse or MKL-DNN: torch's own errors named an op, not the argument
        raise TypeError(f"{name} must be a dense tensor, got layout {value.layout} (pass {name}.to_dense())")
    return value


def _float_tensor(name: str, value, device) -> torch.Tensor:
    t = _tensor(name, value)
    if t.dtype not in _FLOATS:
        raise TypeError(f"{name} must be a floating-point tensor (fp16/bf16/fp32/fp64), got {t.dtype}")
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like hidden, got {t.device}")
    return t


def _expand_to(name: str, t: torch.Tensor, shape: torch.Size, broadcast: bool) -> torch.Tensor:
    """`t` as `shape`: equal to it, or with `broadcast` one number (0-d) or the same ndim with 1s that expand."""
    if t.shape == shape:
        return t
    if broadcast and (t.dim() == 0 or t.dim() == len(shape) and all(a in (1, b) for a, b in zip(t.shape, shape))):
        return t.expand(shape)
    extra = " (or broadcastable with the same number of dims, e.g. [B, 1], or one number)" if broadcast else ""
    raise ValueError(f"{name} must have shape {tuple(shape)}{extra}, got {tuple(t.shape)}")


def _per_token(name: str, value, shape: torch.Size, device, dtype, *, broadcast=False) -> torch.Tensor:
    """A per-token float tensor of `shape` (or, with `broadcast`, one that expands to it), flat, finite, constant."""
    given = _expand_to(name, _float_tensor(name, value, device), shape, broadcast).reshape(-1)
    if given.requires_grad and torch.is_grad_enabled():
        # The kernels differentiate through hidden, weight and bias only: a gradient asked of this would be None
        # where plain autograd gives one (e.g. into a value head that made the advantages).
        raise ValueError(f"{name} requires grad, but the loss takes it as a constant and no gradient flows to it: "
                         f"pass {name}.detach()")
    t = given.to(dtype)
    if not torch.isfinite(t).all():
        # fp64 values past fp32's range are finite as given, inf in the loss's fp32: say which.
        beyond = f" in {dtype} (the loss's dtype; fp64 values past +-3.4e38 round to inf)" \
            if torch.isfinite(given).all() else ""
        # Masked positions too: garbage there (a -inf or NaN log-prob of padding) is still multiplied by 0.
        raise ValueError(f"{name} must be finite everywhere{beyond}, masked positions too (fill padding, e.g. "
                         f"{name}.masked_fill(~loss_mask, 0))")
    return t


def _bool_per_token(name: str, value, shape: torch.Size, device, *, broadcast=False) -> torch.Tensor:
    t = _tensor(name, value)
    if t.device != device:
        raise ValueError(f"{name} must be on {device} like hidden, got {t.device}")
    if t.dtype != torch.bool:
        if t.is_complex() or not ((t == 0) | (t == 1)).all():
            raise ValueError(f"{name} must be a bool tensor (or hold only 0 and 1), got {t.dtype} with other values")
        t = t != 0
    return _expand_to(name, t, shape, broadcast).reshape(-1)


def _positive_scalar(name: str, value) -> Optional[float]:
    if value is None:
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a number or a one-element tensor, got shape {tuple(value.shape)}")
        value = float(value.item())
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a positive number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a positive finite number, got {value}")
    return float(value)


def _require_finite(shard=None, **named) -> dict:
    """NaN or inf in any of the named tensors is an error naming it (bias may hold -inf: masked vocabulary). Returns
    each tensor's largest |entry| (bias: its largest entry, the upper end) as a float, from the same scan.

    One device sync for all of them (a sync per tensor would stall a GPU once per argument). aminmax reads each
    tensor once with no temporary and propagates NaN (isfinite(t).all() was 30x slower on the CPU: 0.76 s for a
    151 936 x 1024 fp32 weight); the loss itself reads W three times per chunk. Under a vocabulary `shard` the
    findings of every rank are gathered first (one small collective): a NaN in one rank's block of W is an error on
    every rank, where that rank alone raising left the others waiting in the chunk loop's collectives."""
    present = {k: t for k, t in named.items() if t is not None and t.numel()}
    keys = list(named) if shard is not None else list(present)  # under a shard: the same list on every rank
    if not keys:
        return {}
    flags, extremes = [], []
    for name in keys:
        if name not in present:  # only under a shard: no finding, extreme 0
            device = shard.device
            zero = torch.zeros((), dtype=torch.float64, device=device)
            flags.append(zero)
            extremes.append(zero)
            continue
        low, high = torch.aminmax(present[name].detach())
        ok = high < math.inf if name == "bias" else (low > -math.inf) & (high < math.inf)  # False for NaN
        flags.append(~ok)
        extremes.append(high if name == "bias" else torch.maximum(-low, high))
    found = torch.stack([f.double() for f in flags] + [e.double() for e in extremes])
    by_rank = None
    if shard is not None:
        by_rank = shard.gather(found)  # [world, 2 * len(keys)]
        found = by_rank.amax(0)
    values = found.tolist()
    for i, (name, is_bad) in enumerate(zip(keys, values)):
        if is_bad:
            allowed = " (-inf, masking a vocabulary entry, is allowed)" if name == "bias" else ""
            where = "" if by_rank is None else \
                f" (rank(s) {[r for r in range(len(by_rank)) if by_rank[r, i]]} of vocab_parallel_group)"
            raise ValueError(f"{name} must be finite everywhere{allowed}: it holds NaN or inf{where}"
                             f"{_padding_hint(name, 'non-finite')}")
    return dict(zip(keys, values[len(keys):]))


def _padding_hint(name: str, what: str) -> str:
    # Rows of padding can come out of attention as NaN, or hold whatever torch.empty left there; masked rows still
    # enter the GEMMs (dW = dz^T h), so they must be harmless numbers.
    if name not in ("hidden", "teacher_hidden"):
        return ""
    return f" (if only padding rows are {what}, zero them first, e.g. {name}.masked_fill(~mask[..., None], 0))"


def check_logit_range(rows_name: str, rows: torch.Tensor, weight: torch.Tensor, temperature: float,
                      extremes: dict, shard=None) -> None:
    """Finite inputs can still make logits ``(h W^T + b) / T`` beyond the math dtype's range (entries near 1e19, or
    a temperature near 1e-38): some backends then gave NaN, others a finite but wrong loss (on-policy GRPO's value
    does not depend on log p), the reference NaN. Refused by a bound that is free where it clears: H max|h| max|w|
    from the finiteness scan's `extremes`; only where it does not, the sharper max |h|_2 |w|_2 (Cauchy-Schwarz, which
    also bounds the GEMM's partial sums; one more pass over the operands, in fp64). Half the dtype's largest value
    leaves room for the GEMM's rounding. Under a vocabulary `shard`, `extremes` are the whole group's (so every rank
    takes the same branch) and so is the largest row norm of W."""
    limit = torch.finfo(math_dtype(rows.dtype)).max / 2
    shift = max(extremes.get("bias", 0.0), 0.0)  # only an upper end: -inf (or finfo.min) entries mask, legally
    if (rows.shape[-1] * extremes.get(rows_name, 0.0) * extremes.get("weight", 0.0) + shift) / temperature < limit:
        return
    w_norm = max_row_norm(weight, torch.float64)
    if shard is not None:
        w_norm = float(shard.gather(torch.tensor(w_norm, dtype=torch.float64, device=weight.device)).max())
    bound = (max_row_norm(rows, torch.float64) * w_norm + shift) / temperature
    if bound >= limit:
        raise ValueError(f"{rows_name}, weight, bias and temperature give logits (h W^T + b) / T that can reach "
                         f"{bound:.3g}, beyond {math_dtype(rows.dtype)}'s range (the loss is computed in it, and "
                         f"needs them below {limit:.3g}): scale the inputs down or raise the temperature"
                         f"{_padding_hint(rows_name, 'that large')}")


def _refuse_dtensor(weight):
    # No import: a DTensor exists only once its module is loaded (importing it costs 30+ MB and a second).
    dtensor_module = sys.modules.get("torch.distributed.tensor")
    if dtensor_module is not None:
        if isinstance(weight, dtensor_module.DTensor):
            raise TypeError("weight is a DTensor (a sharded parameter): pass weight.full_tensor() (differentiable; "
                            "FSDP2), or this rank's block of vocabulary rows with vocab_parallel_group")


def follow_autocast(*operands):
    """The GEMM operands (hidden, weight, bias, teacher_hidden; None passes) in torch.autocast's dtype when it is on
    for their device, as ``F.linear`` would take them: bf16 activations with an fp32 lm_head under autocast is the
    usual mixed-precision setup. The casts are differentiable, so fp32 master weights get their gradient in fp32;
    fp64 is left alone, as autocast leaves it."""
    first = operands[0]
    if not isinstance(first, torch.Tensor) or first.device.type == "meta":
        return operands
    device = first.device.type
    if not torch.is_autocast_enabled(device):
        return operands
    dtype = torch.get_autocast_dtype(device)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() and t.dtype != torch.float64
                 else t for t in operands)


def check_projection(hidden, weight, token_ids, bias, shard=None, temperature: float = 1.0):
    """Checks shared by the loss and the log-prob entry points; returns (hidden[N,H], token_ids[N], token_shape,
    extremes) with `extremes` those of _require_finite, for check_logit_range. `shard`: the vocab_parallel
    VocabShard when `weight` is one rank's block of a vocabulary of `shard.vocab` (token ids are global)."""
    try:
        hidden, token_ids = _check_operands(hidden, weight, token_ids, bias, shard)
    except (ValueError, TypeError) as exc:
        if shard is None:
            raise
        shard.agree(exc)  # raises it here, and an error on the other ranks
    if shard is not None:
        shard.agree(None)
    extremes = _require_finite(shard, hidden=hidden, weight=weight, bias=bias)
    if extremes.get("bias") == -math.inf:  # the scan's largest entry (over the group, under a shard)
        # softmax over nothing: the backends gave NaN or 0 entropies, the reference NaN gradients
        raise ValueError("bias masks every vocabulary entry with -inf: no token has a probability, so there is "
                         "no softmax to take")
    check_logit_range("hidden", hidden, weight, temperature, extremes, shard)
    return hidden.reshape(-1, hidden.shape[-1]), token_ids.reshape(-1).long(), token_ids.shape, extremes


def _check_operands(hidden, weight, token_ids, bias, shard):
    """check_projection's checks of each argument on its own, before any collective: under a `shard` they pass or
    fail per rank (each holds its own block of weight and bias). Returns (hidden, token_ids)."""
    hidden = _tensor("hidden", hidden)
    if hidden.dtype not in _FLOATS:
        raise TypeError(f"hidden must be a floating-point tensor (fp16/bf16/fp32/fp64), got {hidden.dtype}")
    if hidden.dim() < 1 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape [..., H] with H >= 1, got {tuple(hidden.shape)}")
    if hidden.device.type == "meta":
        raise ValueError("hidden is on the meta device: the loss needs tensors that hold data")
    _refuse_dtensor(weight)
    weight = _float_tensor("weight", weight, hidden.device)
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"weight must have shape [V, H] with H = hidden.shape[-1] = {hidden.shape[-1]}, "
                         f"got {tuple(weight.shape)}")
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype} (cast one, e.g. "
                        f"weight.to(hidden.dtype), differentiable; under torch.autocast both are cast for you)")
    rows = weight.shape[0]
    vocab = rows if shard is None else shard.vocab  # under a shard, a rank's block may be empty
    if vocab == 0:
        raise ValueError("weight must have at least one vocabulary row")
    if bias is not None:
        bias = _float_tensor("bias", bias, hidden.device)
        if bias.shape != (rows,):
            raise ValueError(f"bias must have shape [V] = ({rows},) like weight's rows, got {tuple(bias.shape)}")
    token_ids = _tensor("token_ids", token_ids)
    if token_ids.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
        raise TypeError(f"token_ids must be an integer tensor, got {token_ids.dtype}")
    if token_ids.device != hidden.device:
        raise ValueError(f"token_ids must be on {hidden.device} like hidden, got {token_ids.device}")
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"token_ids must have shape hidden.shape[:-1] = {tuple(hidden.shape[:-1])}, "
                         f"got {tuple(token_ids.shape)}")
    if token_ids.numel() and (int(token_ids.min()) < 0 or int(token_ids.max()) >= vocab):
        # Labels padded with an ignore index (-100) are the usual way here: the masked tokens' ids still index W.
        hint = (" (padding with an ignore index such as -100? masked tokens need a valid id too, e.g. "
                "token_ids.clamp_min(0), and loss_mask leaves them out)") if int(token_ids.min()) < 0 else ""
        raise ValueError(f"token_ids must lie in [0, V) = [0, {vocab}), got values in "
                         f"[{int(token_ids.min())}, {int(token_ids.max())}]{hint}")
    return hidden, token_ids


def _refuse_masked_targets(bias, token_ids, valid, shape, shard=None) -> None:
    """A token in the loss whose sampled id a -inf bias entry masks has probability 0: it cannot have been sampled
    from this policy, its log-prob is -inf, and the on-policy ratio exp(logp - stopgrad(logp)) is undefined (the
    reference gave NaN, the kernels 1). An error naming it, on every rank of a vocabulary-parallel group alike
    (`shard`: this rank holds ids [offset, offset + size) and `bias` is its block)."""
    if shard is None and (bias is None or not token_ids.numel()):
        return
    if bias is None or not bias.numel():  # under a shard, this block masks nothing (every rank joins the sum)
        bias = torch.zeros(1, device=token_ids.device)
    local = token_ids - (0 if shard is None else shard.offset)
    here = valid & (local >= 0) & (local < bias.shape[0])
    masked = here & torch.isneginf(bias.detach()[local.clamp(0, bias.shape[0] - 1)])
    count = masked.sum()
    if shard is not None:
        shard.sum_(count)
    if int(count):
        example = ""
        if masked.any():
            i = int(masked.nonzero()[0])
            index = tuple(int(j) for j in torch.unravel_index(torch.tensor(i), shape)) if len(shape) else ()
            example = f", e.g. token_ids[{', '.join(map(str, index))}] = {int(token_ids[i])}"
        raise ValueError(f"token_ids: {int(count)} token(s) in the loss sample a vocabulary entry that bias masks "
                         f"with -inf{example}: a token of probability 0 has log-prob -inf and no defined ratio; "
                         f"leave it out with loss_mask")


def flatten_inputs(*args, **options) -> Tuple[torch.Tensor, FlatInputs]:
    """(hidden as [N, H], the rest checked and flattened): the arguments of _checked_inputs, which does it on this
    rank alone.

    Data parallel (a normaliser left to the ranks): the checks' verdicts travel with the token count in one
    collective, so bad input on one rank is an error on every rank, where that rank alone raising left the others
    waiting in the collective. So do which normalisers each rank passes and a hash of the loss options: a rank
    passing weight_normalizer (or entropy_beta = 0) skips the entropy-weight reduction the others wait in."""
    if not (world_size() > 1 and (options["normalizer"] is None or options["weight_normalizer"] is None)):
        return _checked_inputs(*args, **options)
    refused = None
    try:
        flat_hidden, x = _checked_inputs(*args, **options)
        count = float(x.valid.sum())
    except (ValueError, TypeError) as exc:
        refused, count = exc, 0.0
    hidden = args[0]
    device = hidden.device if isinstance(hidden, torch.Tensor) and hidden.device.type != "cpu" else None
    # 20 bits of a hash h: sum(h)^2 == world * sum(h^2) holds exactly in float64 iff every rank's h is the same.
    code = float(zlib.crc32(repr(options["cfg"]).encode()) % 2 ** 20)
    given = [float(options[k] is not None) for k in ("normalizer", "weight_normalizer")]
    count, refusals, *given, code_sum, code_sq = all_reduce_sums(count, float(refused is not None), *given, code,
                                                                 code * code, device=device)
    if refused is not None:
        raise refused
    if refusals:
        raise ValueError(f"{int(refusals)} other data-parallel rank(s) refused their inputs to the loss (their error "
                         f"says why); every rank raises, so that none waits for the others in a collective")
    world = world_size()
    for name, ranks in zip(("normalizer", "weight_normalizer"), given):
        if 0 < ranks < world:
            raise ValueError(f"{name} is given on {int(ranks)} of {world} data-parallel ranks: pass it on every rank "
                             f"or on none (left out, the ranks reduce it together)")
    if code_sum * code_sum != world * code_sq:
        raise ValueError(f"the loss options differ between data-parallel ranks (this rank's: {options['cfg']}): "
                         f"every rank must compute the same loss")
    x.distributed = True
    if x.normalizer is None:  # D_global / world: DDP's averaging then gives the full-batch gradient
        x.normalizer = max(count, 1.0) / world
    return flat_hidden, x


# What every rank of a vocab_parallel_group must pass alike besides token_ids: argument -> FlatInputs field.
# hidden and teacher_hidden are not compared (a pass over N x H each): ranks of one tensor-parallel group compute
# them alike from the same tokens, which are compared.
_SAME_ON_EVERY_RANK = {name: name for name in ("route", "advantages", "old_logprobs", "ref_logprobs", "is_weights",
                                               "normalizer", "weight_normalizer")} | {"loss_mask": "valid"}


def _checked_inputs(hidden, weight, token_ids, advantages, route, teacher_hidden, *, old_logprobs, ref_logprobs,
                    loss_mask, is_weights, bias, normalizer, weight_normalizer, cfg: SRPOLossConfig,
                    shard=None) -> Tuple[torch.Tensor, FlatInputs]:
    """flatten_inputs on this rank alone. `shard`: the vocab_parallel VocabShard, whose `weight` and `bias` are this
    rank's block of a vocabulary of `shard.vocab` (token ids are global)."""
    flat_hidden, flat_ids, shape, extremes = check_projection(hidden, weight, token_ids, bias, shard,
                                                              cfg.temperature)
    vocab = weight.shape[0] if shard is None else shard.vocab
    refused = None
    try:
        tokens = _per_token_inputs(flat_hidden, shape, vocab, advantages, route, teacher_hidden, old_logprobs,
                                   ref_logprobs, loss_mask, is_weights, normalizer, weight_normalizer, cfg)
    except (ValueError, TypeError) as exc:
        if shard is None:
            raise
        refused = exc
    if shard is not None:
        # Every check above is this rank's alone: agree on the verdict, and on the data, before the collectives.
        shard.agree(refused, same={name: None if refused is not None else tokens[field]
                                   for name, field in _SAME_ON_EVERY_RANK.items()})
    teacher_hidden = tokens["teacher_hidden"]
    if teacher_hidden is not None or shard is not None:  # under a shard every rank joins the scan's collective
        extremes.update(_require_finite(shard, teacher_hidden=teacher_hidden))
        if teacher_hidden is not None:
            check_logit_range("teacher_hidden", teacher_hidden, weight, cfg.temperature, extremes, shard)
    _refuse_masked_targets(bias, flat_ids, tokens["valid"], shape, shard)
    return flat_hidden, FlatInputs(token_ids=flat_ids, **tokens, token_shape=shape, absmax=extremes)


def _per_token_inputs(flat_hidden, shape, vocab, advantages, route, teacher_hidden, old_logprobs, ref_logprobs,
                      loss_mask, is_weights, normalizer, weight_normalizer, cfg: SRPOLossConfig) -> dict:
    """The checks of the per-token inputs and normalisers on their own (no collective), as FlatInputs' fields."""
    device = flat_hidden.device
    dtype = math_dtype(flat_hidden.dtype)
    if isinstance(advantages, numbers.Real) and not isinstance(advantages, bool):  # numpy scalars too
        advantages = torch.full(shape, float(advantages), device=device, dtype=dtype)
    adv = _per_token("advantages", advantages, shape, device, dtype, broadcast=True)
    n = adv.numel()
    if route is None:
        route_flat = torch.zeros(n, dtype=torch.bool, device=device)
    else:
        route_flat = _bool_per_token("route", route, shape, device, broadcast=True)
    valid = (torch.ones(n, dtype=torch.bool, device=device) if loss_mask is None
             else _bool_per_token("loss_mask", loss_mask, shape, device))
    n_sd = int(route_flat.sum())
    if teacher_hidden is None:
        if n_sd:
            raise ValueError(f"teacher_hidden is required: route marks {n_sd} tokens for the SDPO branch")
    else:
        teacher_hidden = _float_tensor("teacher_hidden", teacher_hidden, device)
        if teacher_hidden.dim() != 2 or teacher_hidden.shape != (n_sd, flat_hidden.shape[1]):
            raise ValueError(f"teacher_hidden must have shape [M, H] = ({n_sd}, {flat_hidden.shape[1]}) "
                             f"(one row per route-True token), got {tuple(teacher_hidden.shape)}")
        # The teacher's rows take the student's GEMM, so its dtype (no gradient flows back: a cast loses nothing
        # the loss would use). Every backend and the reference then see the same operands.
        teacher_hidden = teacher_hidden.detach().to(flat_hidden.dtype)
    old = None if old_logprobs is None else _per_token("old_logprobs", old_logprobs, shape, device, dtype)
    if cfg.ref_beta > 0 and ref_logprobs is None:
        raise ValueError("ref_logprobs is required when ref_beta > 0")
    ref = None if ref_logprobs is None else _per_token("ref_logprobs", ref_logprobs, shape, device, dtype)
    isw = None
    if is_weights is not None:
        isw = _per_token("is_weights", is_weights, shape, device, dtype)
        if (isw < 0).any():
            raise ValueError("is_weights must be >= 0 everywhere")
    normalizer = _positive_scalar("normalizer", normalizer)
    if normalizer is not None and cfg.reduction != "mean":
        raise ValueError(f"normalizer is the denominator of reduction='mean': with reduction={cfg.reduction!r} it "
                         f"would be ignored (divide the result yourself, or use reduction='mean')")
    weight_normalizer = _positive_scalar("weight_normalizer", weight_normalizer)
    if weight_normalizer is not None:
        # A mean of exp(-beta H_T) with 0 <= H_T <= log V lies in [V^-beta, 1]. Below, the normalised weights would
        # overflow fp32 (1e-300 gave an inf loss); above, e.g. a token count passed here by mistake, every distilled
        # token's loss would shrink silently.
        floor = -cfg.entropy_beta * math.log(vocab)
        log_wn = math.log(weight_normalizer)
        if not floor * (1 + 1e-6) - 1e-6 <= log_wn <= 1e-6:
            raise ValueError(f"weight_normalizer must be a mean of exp(-entropy_beta * H_T), in "
                             f"[V^-entropy_beta, 1] = [exp({floor:.4g}), 1] for V = {vocab} and entropy_beta = "
                             f"{cfg.entropy_beta}, got {weight_normalizer:.4g}")
    return dict(advantages=adv, route=route_flat, valid=valid, teacher_hidden=teacher_hidden, old_logprobs=old,
                ref_logprobs=ref, is_weights=isw, normalizer=normalizer, weight_normalizer=weight_normalizer)
