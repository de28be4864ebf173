"""The result type of the loss entry points."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Dict

import torch


@dataclass
class SRPOLossOutput:
    """``loss`` is differentiable; the per-token tensors (shape of ``token_ids``) are detached diagnostics: a term
    built on them (an entropy bonus ``loss - c * out.entropy.mean()``) gets no gradient. For one, take the
    differentiable ``fused_logprobs(..., with_entropy=True)``.

    ``teacher_entropy``, ``divergence`` and ``distill_weight`` are 0 on GRPO-routed tokens; ``clipped`` is False on
    SDPO-routed tokens. Diagnostics are reported for every position, masked or not, except ``distill_weight``, 0 where
    masked (it is normalised over the valid SDPO tokens, which a masked one is not among); ``loss_mask`` decides what
    enters the loss and ``metrics``.
    """

    loss: torch.Tensor
    logprobs: torch.Tensor
    entropy: torch.Tensor
    teacher_entropy: torch.Tensor
    divergence: torch.Tensor
    distill_weight: torch.Tensor
    clipped: torch.Tensor
    metrics: Dict[str, float] = field(default_factory=dict)


def summarize(out_logprobs, entropy, teacher_entropy, divergence, distill_weight, clipped, route, valid) -> Dict[str, float]:
    """Scalar metrics over valid tokens, as plain floats (0.0 where a set is empty)."""
    grpo = valid & ~route
    sdpo = valid & route
    n_valid = int(valid.sum())

    def mean(x, sel):
        count = int(sel.sum())
        return float(x[sel].double().sum() / count) if count else 0.0

    return {
        "valid_tokens": float(n_valid),
        "grpo_fraction": float(grpo.sum()) / n_valid if n_valid else 0.0,
        "sdpo_fraction": float(sdpo.sum()) / n_valid if n_valid else 0.0,
        "clip_fraction": mean(clipped.double(), grpo),
        "entropy_mean": mean(entropy, valid),
        "teacher_entropy_mean": mean(teacher_entropy, sdpo),
        "divergence_mean": mean(divergence, sdpo),
        "distill_weight_mean": mean(distill_weight, sdpo),
        "logprob_mean": mean(out_logprobs, valid),
    }
