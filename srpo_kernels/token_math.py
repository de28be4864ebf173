"""Per-token math that lives after the vocabulary reduction (SPEC §1), shared by every backend.

The backends reduce each row of logits to a few numbers (log-prob of the target, entropies, divergence); this
module turns those into per-token losses and into the two coefficients the gradient pass needs:
``dL/dlogits = c_logp * (onehot(y) - p) + c_div * dD/dlogits``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from .backends.support import phi_terms
from .config import SRPOLossConfig


@dataclass
class GRPOTerms:
    loss: torch.Tensor  # clipped surrogate per token
    dloss_dlogp: torch.Tensor
    clipped: torch.Tensor  # bool: the clip (or dual clip) is what set the loss, so no gradient flows
    constant: torch.Tensor  # bool: clipped, or A = 0: the surrogate does not depend on logp (see grpo_surrogate)


def grpo_surrogate(logp, old_logp: Optional[torch.Tensor], adv, cfg: SRPOLossConfig) -> GRPOTerms:
    """``max(-A rho, -A clip(rho))`` with dual clip for ``A < 0``; on-policy (no old) means rho = 1, grad = -A."""
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    # -A * rho is 0 for A = 0 whatever rho, also where rho overflowed fp32 (old log-probs 88 below the current):
    # -0 * inf made the loss NaN and the token count as clipped.
    unclipped = torch.where(adv == 0, torch.zeros_like(ratio), -adv * ratio)
    clipped_loss = -adv * ratio.clamp(1.0 - cfg.eps_low, 1.0 + cfg.eps_high)
    # In range the two are equal and both carry -A*rho; out of range only the unclipped side has a gradient.
    flows = unclipped >= clipped_loss
    loss = torch.maximum(unclipped, clipped_loss)
    if cfg.dual_clip is not None:
        cap = -cfg.dual_clip * adv
        dual = (adv < 0) & (loss > cap)
        loss = torch.where(dual, cap, loss)
        flows = flows & ~dual
    grad = torch.where(flows, unclipped, torch.zeros_like(loss))  # d(-A rho)/dlogp = -A rho
    # A constant token contributes nothing to the gradient, whatever its upstream gradient (a NaN included), as
    # autograd's clamp and max give it nothing (the reference detaches its ratio there).
    return GRPOTerms(loss=loss, dloss_dlogp=grad, clipped=~flows, constant=~flows | (adv == 0))


def sdpo_is_weight(logp, old_logp: Optional[torch.Tensor], cfg: SRPOLossConfig) -> torch.Tensor:
    """Detached ``min(exp(logp - old), is_clip)`` (ratio 1 when on-policy)."""
    ratio = torch.ones_like(logp) if old_logp is None else torch.exp(logp - old_logp)
    return ratio if cfg.is_clip is None else ratio.clamp(max=cfg.is_clip)


def log_entropy_weight(teacher_entropy, cfg: SRPOLossConfig) -> torch.Tensor:
    """Log of the unnormalised SRPO weight ``exp(-beta * H_T)`` (confident teacher targets count more), in fp64:
    the weight itself underflows fp32 once beta * H_T passes ~87, so it is only ever used normalised."""
    return -cfg.entropy_beta * teacher_entropy.double()


def distill_weight(teacher_entropy, cfg: SRPOLossConfig, log_mu: float, dtype: torch.dtype) -> torch.Tensor:
    """The normalised weight ``exp(-beta H_T) / mu`` from ``log mu``, in `dtype`."""
    return torch.exp(log_entropy_weight(teacher_entropy, cfg) - log_mu).to(dtype)


def log_weight_sum(teacher_entropy, cfg: SRPOLossConfig) -> float:
    """``log sum exp(-beta H_T)`` over the given tokens (-inf for none), without under- or overflow."""
    if teacher_entropy.numel() == 0:
        return -math.inf
    return float(torch.logsumexp(log_entropy_weight(teacher_entropy, cfg), 0))


def k3_penalty(logp, ref_logp):
    """``k3 = exp(r) - r - 1`` with ``r = ref - logp``, and its derivative ``1 - exp(r)`` wrt logp.

    Where the policy is near its reference (|r| small, early in training) that formula cancels to r^2 / 2 from terms
    of size 1: in fp32 the loss's penalty was 2% off at |r| ~ 1e-3 and all of it at 1e-4, as the naive loss's is. k3
    is phi(-r) of support.phi_terms, which takes it from its series there, and the derivative is -expm1(r)."""
    r = ref_logp - logp
    er = torch.exp(r)
    return phi_terms(torch.ones_like(r), -r, er), -torch.expm1(r)
