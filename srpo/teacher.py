"""The self-teacher: the re-prompt that shows a correct sibling's solution, and the EMA copy of the policy."""
from __future__ import annotations

import copy
import re
from typing import List

import torch

_THINK = re.compile(r"<think>.*?</think>", re.S)


def strip_thinking(text: str) -> str:
    """The response without its thinking: closed ``<think>...</think>`` blocks; text before a ``</think>`` that
    has no opening tag (templates such as DeepSeek-R1's put ``<think>`` in the prompt, so the response starts inside
    it); and an unclosed ``<think>`` to the end (a response cut off while thinking)."""
    text = _THINK.sub("", text)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    return text.split("<think>", 1)[0].strip()


def teacher_user_turn(prompt: str, sibling_solution: str) -> str:
    """SPEC §1: the rollout's own attempt is never shown."""
    return (f"{prompt}\n\nCorrect solution:\n\n{strip_thinking(sibling_solution)}\n\n"
            "Correctly solve the original question.")


def teacher_prompt_ids(tokenizer, prompt: str, sibling_solution: str) -> List[int]:
    """Chat-templated teacher prompt, ending where the assistant's response begins."""
    return chat_prompt_ids(tokenizer, teacher_user_turn(prompt, sibling_solution))


def chat_prompt_ids(tokenizer, user_turn: str) -> List[int]:
    """`user_turn` as one chat-templated user turn ending where the assistant's response begins; for a tokenizer with
    no chat template (a base model's), the plain text, as TRL keeps a plain-text prompt (apply_chat_template raised
    at the first rollout)."""
    if getattr(tokenizer, "chat_template", None) is None:
        return list(tokenizer(user_turn)["input_ids"])
    ids = tokenizer.apply_chat_template([{"role": "user", "content": user_turn}], add_generation_prompt=True,
                                        tokenize=True)
    if not isinstance(ids, list):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def _fresh_copy(model: torch.nn.Module) -> torch.nn.Module:
    """An independent copy. A Hugging Face model is rebuilt from its config and loaded, because trainers patch
    attributes onto model instances (TRL wraps forward) that ``deepcopy`` carries over still bound to the original,
    which would make the "EMA" teacher silently run the live policy. A PEFT model (which its config cannot rebuild)
    is deep-copied: the teacher runs its decoder's forward, which nobody patches."""
    config = getattr(model, "config", None)
    if config is not None and hasattr(model, "load_state_dict") and not hasattr(model, "get_base_model"):
        clone = type(model)(config)
        # Built in the default dtype (fp32): each weight takes the model's dtype, or a bf16 policy got an fp32
        # teacher (twice the memory, a slower forward, other roundings than the policy's).
        source = dict(model.named_parameters())
        for name, p in clone.named_parameters():
            if name in source and p.dtype != source[name].dtype:
                p.data = p.data.to(source[name].dtype)
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
    """``theta' <- (1 - rate) theta' + rate theta`` after each optimiser step; frozen, eval mode.

    A bf16/fp16 teacher keeps beside each weight the part of its EMA value that rounding to the weight's dtype
    dropped (a residual of the same dtype: together ~16 bits for bf16). Without it, an update below half an ulp
    (0.4% of a bf16 weight) rounds away: at rate 0.05 a weight stays put until the policy is ~8% away from it, so
    the teacher of a bf16 model (TRL loads checkpoints in their bf16) stayed the initial policy."""

    def __init__(self, model: torch.nn.Module, rate: float = 0.05):
        check_ema_rate(rate)
        self.rate = rate
        self.model = _fresh_copy(model).eval()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self._residuals = [None] * len(list(self.model.parameters()))  # made on a bf16/fp16 weight's first move

    def state_dict(self) -> dict:
        """The teacher's weights and residuals, for a checkpoint (a resumed run continues the same EMA)."""
        return {"model": self.model.state_dict(), "residuals": self._residuals}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        if set(state) != {"model", "residuals"}:  # a checkpoint from before the residuals: the weights alone
            state = {"model": state, "residuals": [None] * len(self._residuals)}
        self.model.load_state_dict(state["model"])
        if len(state["residuals"]) != len(self._residuals):
            raise ValueError("EMA teacher checkpoint: its residuals do not match this model's parameters")
        self._residuals = [None if r is None else r.to(p.device, p.dtype)
                           for r, p in zip(state["residuals"], self.model.parameters())]

    @torch.no_grad()
    def update(self, model: torch.nn.Module):
        for i, (t, s) in enumerate(zip(self.model.parameters(), model.parameters())):
            if not s.requires_grad:
                continue  # frozen (a LoRA run's base model): it did not move, and its EMA is itself
            if t.dtype not in _ROUNDED:
                t.lerp_(s.detach().to(t.dtype), self.rate)
                continue
            if self._residuals[i] is None:
                self._residuals[i] = torch.zeros_like(t)
            residual = self._residuals[i]
            # In slices: fp32 temporaries of a whole embedding matrix would be gigabytes.
            rows = max(1, _SLICE * max(1, t.shape[0]) // max(1, t.numel())) if t.dim() else 1
            for t_, r_, s_ in zip(_slices(t, rows), _slices(residual, rows), _slices(s.detach(), rows)):
                exact = t_.float() + r_.float()
                exact.lerp_(s_.float(), self.rate)
                t_.copy_(exact)
                r_.copy_(exact - t_.float())


_ROUNDED = (torch.bfloat16, torch.float16)
_SLICE = 1 << 22  # entries per fp32 temporary of EMATeacher.update (16 MiB)


def _slices(t: torch.Tensor, rows: int):
    """Views of `t` (a 0-d tensor as one entry) of at most `rows` rows each."""
    return (t.unsqueeze(0) if t.dim() == 0 else t).split(rows)
