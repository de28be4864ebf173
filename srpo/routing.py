"""Advantages and per-rollout routing (SPEC §1) for one group of rollouts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional

import torch

ALGOS = ("srpo", "grpo", "sdpo")


def check_algo(algo: str) -> None:
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of {ALGOS}, got {algo!r}")


@dataclass
class Routing:
    advantages: torch.Tensor  # [G] per rollout
    distill: torch.Tensor  # [G] bool: SDPO branch (self-distillation toward a correct sibling)
    in_loss: torch.Tensor  # [G] bool: contributes to the loss at all (False only for SDPO's non-distilled rollouts)
    sibling: List[Optional[int]]  # index of the correct sibling shown to the teacher, per distilled rollout


def advantages(rewards: torch.Tensor, std_normalize: bool = False) -> torch.Tensor:
    """Dr.GRPO: ``r - mean_group(r)``; optionally divided by the group std (0 where the std is 0). A NaN reward
    (unscorable) stays out of the mean and the std, and its advantage is 0, as in TRL."""
    if rewards.isinf().any():  # one inf made every other advantage -inf, which nan_to_num turned into -3.4e38
        raise ValueError(f"rewards must be finite (NaN marks an unscorable rollout), got inf at index "
                         f"{rewards.isinf().nonzero().flatten().tolist()}")
    scored = rewards[~rewards.isnan()].double()
    if not scored.numel():
        return torch.zeros_like(rewards)
    adv = rewards.double() - scored.mean()
    if std_normalize:
        std = float(scored.std(unbiased=False)) if scored.numel() > 1 else 0.0
        # Equal rewards have std 0, but their rounded mean does not: seven fp32 rewards of 0.3 had a std of 3e-8, and
        # every advantage came out +1. A std within the rewards' own rounding is 0.
        noise = 4 * torch.finfo(rewards.dtype).eps * float(scored.abs().max())
        adv = adv / std if std > noise else torch.zeros_like(adv)
    out = adv.to(rewards.dtype)
    if out.isinf().any():  # finite rewards whose differences from the mean pass the dtype's range
        raise ValueError(f"advantages of these rewards overflow {rewards.dtype} (rewards up to "
                         f"{float(scored.abs().max()):.3g}): pass the rewards in float64 or scale them down")
    return out.nan_to_num(nan=0.0)


def route_group(rewards: torch.Tensor, algo: str, std_normalize: bool = False) -> Routing:
    """``c_i = r_i >= 0.5``; ``m_i`` = another rollout of the group is correct.

    srpo: distill failed rollouts with a correct sibling, GRPO for the rest. grpo: GRPO for all.
    sdpo (as its authors run it): distill every rollout with another correct rollout, correct or not; the rest
    contribute nothing; no GRPO term. A NaN reward (TRL: no reward function could score the rollout) is neither
    correct nor failed: never distilled, with advantage 0 (TRL's "no learning signal").
    """
    check_algo(algo)
    correct = rewards >= 0.5
    n_correct = int(correct.sum())
    others_correct = (n_correct - correct.long()) > 0
    if algo == "grpo":
        distill = torch.zeros_like(correct)
    elif algo == "srpo":
        distill = ~correct & others_correct
    else:
        distill = others_correct
    distill = distill & ~rewards.isnan()
    in_loss = distill.clone() if algo == "sdpo" else torch.ones_like(correct)
    sibling = []
    for i in range(rewards.numel()):
        if distill[i]:
            sibling.append(next(j for j in range(rewards.numel()) if j != i and correct[j]))
        else:
            sibling.append(None)
    return Routing(advantages(rewards, std_normalize), distill, in_loss, sibling)


@dataclass
class RoutedRollouts:
    """Routing of a whole batch: consecutive groups of `group_size` rollouts, flattened in rollout order."""

    advantages: List[float]
    distill: List[bool]
    in_loss: List[bool]
    sibling: List[Optional[int]]  # batch index of the correct sibling shown to the teacher, per distilled rollout


def route_rollouts(rewards: torch.Tensor, group_size: int, algo: str, std_normalize: bool = False) -> RoutedRollouts:
    """``route_group`` over every group of a batch (the trainer and the TRL drop-in both route this way)."""
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    out = RoutedRollouts([], [], [], [])
    for k in range(0, rewards.numel(), group_size):
        routing = route_group(rewards[k:k + group_size], algo, std_normalize)
        out.advantages += routing.advantages.tolist()
        out.distill += [bool(d) for d in routing.distill]
        out.in_loss += [bool(m) for m in routing.in_loss]
        out.sibling += [None if s is None else k + s for s in routing.sibling]
    return out
