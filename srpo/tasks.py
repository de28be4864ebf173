"""Tasks (prompt + answer) and verifiers (response, answer) -> reward in [0, 1]."""
from __future__ import annotations

import importlib
import json
import random
import re
from dataclasses import dataclass
from typing import Any, Callable, List, Optional

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


@dataclass
class Example:
    prompt: str
    answer: Any
    feedback: Optional[str] = None


def numeric(response: str, answer) -> float:
    """1 if the last number in the response equals the answer (surrounding text is fine)."""
    found = _NUMBER.findall(response.replace(",", ""))
    if not found:
        return 0.0
    return float(abs(float(found[-1]) - float(answer)) < 1e-6)


def mcq(response: str, answer) -> float:
    """1 if the last standalone letter A-D in the response is the answer letter (SciKnowEval style)."""
    found = re.findall(r"\b([A-D])\b", response)
    return float(bool(found) and found[-1] == str(answer).strip().upper())


def toolcall(response: str, answer) -> float:
    """1 if "Action:" and "Action Input:" lines match the answer's action and action_input exactly (ToolAlpaca)."""
    action = re.search(r"^\s*Action:\s*(.*?)\s*$", response, re.M)
    action_input = re.search(r"^\s*Action Input:\s*(.*?)\s*$", response, re.M)
    if not (action and action_input):
        return 0.0
    expected_input = answer["action_input"]
    if not isinstance(expected_input, str):
        expected_input = json.dumps(expected_input)
    return float(action.group(1) == answer["action"] and action_input.group(1) == expected_input)


def parity(response: str, answer) -> float:
    """1 if the sum of the response's character codes is even: a reward with no skill behind it, for measuring
    compute (about half of any model's rollouts pass, so every routing case occurs even with a random model)."""
    return float(sum(map(ord, response)) % 2 == 0)


VERIFIERS = {"numeric": numeric, "mcq": mcq, "toolcall": toolcall, "parity": parity}


def get_verifier(spec: str) -> Callable[[str, Any], float]:
    """A built-in name or ``module:function``."""
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise ValueError(f"verifier must be one of {sorted(VERIFIERS)} or 'module:function', got {spec!r}")
    module, func = spec.split(":", 1)
    return getattr(importlib.import_module(module), func)


class Arithmetic:
    """Generated problems ``a op b`` with `digits`-digit operands; operators from `ops`."""

    verifier = "numeric"

    def __init__(self, digits: int = 2, ops: str = "+-", seed: int = 0):
        if digits < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"arithmetic needs digits >= 1 and ops from '+-*', got {digits}, {ops!r}")
        self.digits, self.ops, self.rng = digits, ops, random.Random(seed)

    def sample(self, n: int) -> List[Example]:
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits - 1
        out = []
        for _ in range(n):
            a, b, op = self.rng.randint(lo, hi), self.rng.randint(lo, hi), self.rng.choice(self.ops)
            out.append(Example(f"What is {a} {op} {b}? Answer with a number.", eval(f"{a}{op}{b}")))
        return out

    def state(self):
        return self.rng.getstate()

    def set_state(self, state):
        self.rng.setstate(state)


class Parity:
    """Prompts for the `parity` verifier (``--task parity``): the step's compute, not learning, is what it shows."""

    verifier = "parity"

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def sample(self, n: int) -> List[Example]:
        return [Example(f"Say something about the number {self.rng.randint(0, 999)}.", None) for _ in range(n)]

    def state(self):
        return self.rng.getstate()

    def set_state(self, state):
        self.rng.setstate(state)


class JsonlDataset:
    """``{"prompt": ..., "answer": ..., "feedback"?: ...}`` per line, sampled with replacement."""

    def __init__(self, path: str, verifier: str, seed: int = 0):
        self.examples: List[Example] = []
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
                        raise ValueError('expected an object with "prompt" and "answer"')
                    self.examples.append(Example(str(row["prompt"]), row["answer"], row.get("feedback")))
                except (json.JSONDecodeError, ValueError) as exc:
                    raise ValueError(f"{path}:{lineno}: malformed dataset line: {exc}") from None
        if not self.examples:
            raise ValueError(f"{path}: no examples")
        self.verifier = verifier
        self.rng = random.Random(seed)

    def sample(self, n: int) -> List[Example]:
        return [self.rng.choice(self.examples) for _ in range(n)]

    def state(self):
        return self.rng.getstate()

    def set_state(self, state):
        self.rng.setstate(state)
