"""Tasks (prompt + answer) and verifiers (response, answer) -> reward in [0, 1]."""
from __future__ import annotations

import importlib
import json
import math
import random
import re
import warnings
from dataclasses import dataclass
from typing import Any, Callable, List

_NUMBER = re.compile(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_INTEGER = re.compile(r"[-+]?\d+")


@dataclass
class Example:
    prompt: str
    answer: Any


def numeric(response: str, answer) -> float:
    """1 if the last number in the response equals the answer (surrounding text is fine): integers exactly, others to
    a relative 1e-6. Thousands separators are dropped on both sides ("1,234"), and ".5", "2." and "1e3" read as
    numbers."""
    found = _NUMBER.findall(response.replace(",", ""))
    if not found:
        return 0.0
    said, expected = found[-1], str(answer).replace(",", "").strip()
    if _INTEGER.fullmatch(said) and _INTEGER.fullmatch(expected):
        return float(int(said) == int(expected))  # exactly: floats merge integers beyond 2^53 (20! and 20! + 1)
    # Relative: an absolute 1e-6 took 2e-9 for 1e-9, and any answer below 1e-6 for 0.
    return float(math.isclose(float(said), float(expected), rel_tol=1e-6))


def mcq(response: str, answer) -> float:
    """1 if the last standalone letter A-D in the response is the answer letter (SciKnowEval style). The answer may
    be written "B", "b", "(B)" or "B."; anything else is an error, not a silent 0 for every rollout."""
    letter = re.fullmatch(r"\s*\(?([A-Da-d])\)?[.:]?\s*", str(answer))
    if letter is None:
        raise ValueError(f"mcq: the answer must be a letter A-D, got {answer!r}")
    found = re.findall(r"\b([A-D])\b", response)
    return float(bool(found) and found[-1] == letter.group(1).upper())


def toolcall(response: str, answer) -> float:
    """1 if "Action:" and "Action Input:" lines match the answer's action exactly and its action_input as JSON
    (ToolAlpaca): {"q":"cats"} is {"q": "cats"}; an input that is not JSON on either side is compared as text."""
    action = re.search(r"^\s*Action:\s*(.*?)\s*$", response, re.M)
    action_input = re.search(r"^\s*Action Input:\s*(.*?)\s*$", response, re.M)
    if not (action and action_input):
        return 0.0
    return float(action.group(1) == answer["action"] and _json(action_input.group(1)) == _json(answer["action_input"]))


def _json(value):
    """`value` parsed if it is JSON text, else as given (a dict or list from the dataset stays itself)."""
    if not isinstance(value, str):
        return value
    try:
        return json.loads(value)
    except ValueError:
        return value


def parity(response: str, answer) -> float:
    """1 if the sum of the response's character codes is even: a reward with no skill behind it, for measuring
    compute (about half of any model's rollouts pass, so every routing case occurs even with a random model)."""
    return float(sum(map(ord, response)) % 2 == 0)


def math_verify(response: str, answer) -> float:
    """1 if Hugging Face's math-verify (optional extra ``[tasks]``) finds the response's final answer equal to
    `answer`: LaTeX, fractions, sets and intervals compared as mathematics, not as strings."""
    from math_verify import parse, verify

    return float(verify(parse(str(answer)), parse(response)))


VERIFIERS = {"numeric": numeric, "mcq": mcq, "toolcall": toolcall, "parity": parity, "math-verify": math_verify}
_EXTRA = "pip install 'srpo-kernels[tasks]'"


def get_verifier(spec: str) -> Callable[[str, Any], float]:
    """A built-in name or ``module:function``."""
    if spec == "math-verify":
        try:
            import math_verify  # noqa: F401
        except ImportError:
            raise ValueError(f"verifier 'math-verify' needs the math-verify package: {_EXTRA}") from None
    if spec in VERIFIERS:
        return VERIFIERS[spec]
    if ":" not in spec:
        raise ValueError(f"verifier must be one of {sorted(VERIFIERS)} or 'module:function', got {spec!r}")
    module, func = spec.split(":", 1)
    try:
        fn = getattr(importlib.import_module(module), func)
    except (ImportError, AttributeError) as exc:
        raise ValueError(f"verifier {spec!r}: {type(exc).__name__}: {exc}") from None
    if not callable(fn):
        raise ValueError(f"verifier {spec!r} is not callable: {type(fn).__name__}")
    return fn


class SeededTask:
    """A task whose draws come from its own seeded ``rng``; ``state``/``set_state`` let checkpoints replay them."""

    def __init__(self, seed: int = 0):
        self.rng = random.Random(seed)

    def state(self):
        return self.rng.getstate()

    def set_state(self, state):
        self.rng.setstate(state)


class Arithmetic(SeededTask):
    """Generated problems ``a op b`` with `digits`-digit operands; operators from `ops`."""

    verifier = "numeric"

    def __init__(self, digits: int = 2, ops: str = "+-", seed: int = 0):
        if digits < 1 or not ops or set(ops) - set("+-*"):
            raise ValueError(f"arithmetic needs digits >= 1 and ops from '+-*', got {digits}, {ops!r}")
        super().__init__(seed)
        self.digits, self.ops = digits, ops

    def sample(self, n: int) -> List[Example]:
        lo, hi = 10 ** (self.digits - 1) if self.digits > 1 else 0, 10 ** self.digits - 1
        out = []
        for _ in range(n):
            a, b, op = self.rng.randint(lo, hi), self.rng.randint(lo, hi), self.rng.choice(self.ops)
            out.append(Example(f"What is {a} {op} {b}? Answer with a number.", eval(f"{a}{op}{b}")))
        return out


class Parity(SeededTask):
    """Prompts for the `parity` verifier (``--task parity``): the step's compute, not learning, is what it shows."""

    verifier = "parity"

    def sample(self, n: int) -> List[Example]:
        return [Example(f"Say something about the number {self.rng.randint(0, 999)}.", None) for _ in range(n)]


class JsonlDataset(SeededTask):
    """``{"prompt": ..., "answer": ...}`` per line, sampled with replacement. `held_out` examples, drawn by a fixed
    seed, are kept out of the draws: they are the evaluation's (``held_out_examples``)."""

    def __init__(self, path: str, verifier: str, seed: int = 0, held_out: int = 0):
        examples: List[Example] = []
        feedback = 0
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                    if not isinstance(row, dict) or "prompt" not in row or "answer" not in row:
                        raise ValueError('expected an object with "prompt" and "answer"')
                    if not isinstance(row["prompt"], str):  # str() of a message list became the prompt's text
                        raise ValueError(f'"prompt" must be the text of the user turn, got '
                                         f'{type(row["prompt"]).__name__}')
                    examples.append(Example(row["prompt"], row["answer"]))
                    feedback += "feedback" in row
                except (json.JSONDecodeError, ValueError) as exc:
                    raise ValueError(f"{path}:{lineno}: malformed dataset line: {exc}") from None
        if not examples:
            raise ValueError(f"{path}: no examples")
        if held_out >= len(examples):
            raise ValueError(f"{path}: {len(examples)} example(s), and evaluation holds out {held_out} "
                             f"(--eval-prompts): none would be left to train on; add examples or lower --eval-prompts")
        if feedback:  # SDPO's rich feedback: SRPO's teacher is shown a correct sibling's solution instead
            warnings.warn(f"{path}: {feedback} line(s) hold a \"feedback\" field, which the trainer does not use "
                          f"(the teacher is shown a correct sibling's solution, SPEC §1)")
        # The split does not depend on the run's seed: runs with other seeds evaluate on the same examples.
        order = list(range(len(examples)))
        random.Random(0).shuffle(order)
        held = set(order[:held_out])
        self.held_out_examples = [examples[i] for i in sorted(held)]
        self.examples = [e for i, e in enumerate(examples) if i not in held]
        self.verifier = verifier
        super().__init__(seed)

    def sample(self, n: int) -> List[Example]:
        return [self.rng.choice(self.examples) for _ in range(n)]


ANSWER_TAG = re.compile(r"<answer>(.*?)</answer>", re.S)


def final_answer(response: str) -> str:
    """The last <answer>...</answer> of a response, else its last non-empty line."""
    tagged = ANSWER_TAG.findall(response)
    if tagged:
        return tagged[-1].strip()
    lines = [line.strip() for line in response.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


class ReasoningGym(SeededTask):
    """Procedural problems from reasoning-gym (optional extra ``[tasks]``; ``--task reasoning-gym:NAME``), e.g.
    ``basic_arithmetic``, ``leg_counting``, ``chain_sum``. Each example's answer is the dataset's entry, and the
    reward is the dataset's own ``score_answer`` on the response's final answer (see ``final_answer``)."""

    PREFIX = "reasoning-gym:"
    FORMAT = "\nGive only the final answer, inside <answer></answer>."

    def __init__(self, name: str, seed: int = 0, size: int = 1_000_000):
        try:
            import reasoning_gym
        except ImportError:
            raise ValueError(f"--task {self.PREFIX}{name} needs the reasoning-gym package: {_EXTRA}") from None
        names = sorted(reasoning_gym.factory.DATASETS)
        if name not in names:
            raise ValueError(f"unknown reasoning-gym dataset {name!r}; one of {', '.join(names)}")
        self.data = reasoning_gym.create_dataset(name, size=size, seed=seed)  # generated lazily, per index
        super().__init__(seed)

    def sample(self, n: int) -> List[Example]:
        entries = [self.data[self.rng.randrange(len(self.data))] for _ in range(n)]
        return [Example(e["question"] + self.FORMAT, e) for e in entries]

    def verify(self, response: str, entry) -> float:
        return float(self.data.score_answer(answer=final_answer(response), entry=entry))


def load_task(task: str, verifier: str, digits: int = 1, ops: str = "+-", seed: int = 0, eval_prompts: int = 16):
    """(training task, `eval_prompts` held-out examples, verifier) for ``TrainConfig.task``: ``arithmetic``,
    ``parity``, ``reasoning-gym:NAME``, or a JSONL file scored by `verifier`. A generated task's held-out examples
    are drawn with another seed; a JSONL file's are lines kept out of training."""
    held_out = seed + 10_007
    if verifier != "numeric" and (task in ("arithmetic", "parity") or task.startswith(ReasoningGym.PREFIX)):
        raise ValueError(f"verifier {verifier!r} applies to JSONL tasks only: task {task!r} has its own")
    if task == "arithmetic":
        return Arithmetic(digits, ops, seed=seed), Arithmetic(digits, ops, seed=held_out).sample(eval_prompts), \
            numeric
    if task == "parity":
        return Parity(seed=seed), Parity(seed=held_out).sample(eval_prompts), parity
    if task.startswith(ReasoningGym.PREFIX):
        name = task[len(ReasoningGym.PREFIX):]
        train = ReasoningGym(name, seed=seed)
        return train, ReasoningGym(name, seed=held_out).sample(eval_prompts), train.verify
    verify = get_verifier(verifier)
    # Drawn from the same file, the "held-out" prompts were training prompts: the evaluation measured recall.
    train = JsonlDataset(task, verifier, seed=seed, held_out=eval_prompts)
    return train, train.held_out_examples, verify
