"""The self-teacher: the re-prompt that shows a correct sibling's solution, and the EMA copy of the policy."""
from __future__ import annotations

import copy
import re
from typing import List

import torch

_THINK = re.compile(r"<think>.*?</think>", re.S)


def strip_thinking(text: str) -> str:
    return _THINK.sub("", text).strip()


def teacher_user_turn(prompt: str, sibling_solution: str) -> str:
    """SPEC §1: the rollout's own attempt is never shown."""
    return (f"{prompt}\n\nCorrect solution:\n\n{strip_thinking(sibling_solution)}\n\n"
            "Correctly solve the original question.")


def teacher_prompt_ids(tokenizer, prompt: str, sibling_solution: str) -> List[int]:
    """Chat-templated teacher prompt, ending where the assistant's response begins."""
    return chat_prompt_ids(tokenizer, teacher_user_turn(prompt, sibling_solution))


def chat_prompt_ids(tokenizer, user_turn: str) -> List[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_turn}], add_generation_prompt=True,
                                        tokenize=True)
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy. A Hugging Face model is rebuilt from its config and loaded, because trainers patch
    attributes onto model instances (TRL wraps forward) that ``deepcopy`` carries over still bound to the original,
    which would make the "EMA" teacher silently run the live policy."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "load_state_dict"):
        clone = type(model)(config)
        clone.load_state_dict(model.state_dict())
        return clone.to(next(model.parameters()).device)
    return copy.deepcopy(model)


TEACHERS = ("ema", "live")


def check_teacher(teacher: str) -> None:
    if teacher not in TEACHERS:
        raise ValueError(f"teacher must be 'ema' or 'live', got {teacher!r}")


def check_ema_rate(rate: float) -> None:
    if not 0 < rate <= 1:
        raise ValueError(f"ema_rate must be in (0, 1], got {rate}")


class EMATeacher:
    """``theta' <- (1 - rate) theta' + rate theta`` after each optimiser step; frozen, eval mode."""

    def __init__(self, model: torch.nn.Module, rate: float = 0.05):
        check_ema_rate(rate)
        self.rate = rate
        self.model = _fresh_copy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for t, s in zip(self.model.parameters(), model.parameters()):
            t.lerp_(s.detach(), self.rate)
