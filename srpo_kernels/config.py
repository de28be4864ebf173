"""One frozen object holding every loss option (instead of 30 positional arguments)."""
from __future__ import annotations

import math
import numbers
from dataclasses import dataclass
from typing import Optional

REDUCTIONS = ("mean", "sum", "none")


def _finite(name: str, value, *, low=None, high=None, low_open=False, allow_none=False) -> Optional[float]:
    """`value` as a Python float (numpy scalars included) once it passes the bounds."""
    if value is None:
        if allow_none:
            return None
        raise ValueError(f"{name} must be a finite number, got None")
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")
    if low is not None and (value <= low if low_open else value < low):
        raise ValueError(f"{name} must be {'>' if low_open else '>='} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")
    return value


def flag(name: str, value) -> bool:
    """`value` (True or False: numpy's bool too, numbers not) as a Python bool."""
    if isinstance(value, bool) or (type(value).__module__ == "numpy" and type(value).__name__ in ("bool", "bool_")):
        return bool(value)
    raise TypeError(f"{name} must be True or False, got {value!r} ({type(value).__module__}.{type(value).__name__})")


def positive_int(name: str, value) -> Optional[int]:
    """`value` (None, or a positive int: numpy integers too, bools not) as a Python int."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be None or a positive int, got {value!r}")
    return int(value)


@dataclass(frozen=True)
class SRPOLossConfig:
    """Options of the SRPO loss (SPEC §1). Defaults follow SRPO/SDPO; every field is validated on construction.

    GRPO branch: ``eps_low``/``eps_high`` clip the ratio, ``dual_clip`` (``None`` disables) caps the loss of
    negative-advantage tokens at ``-dual_clip * A``. SDPO branch: ``alpha`` picks the divergence (0 forward KL,
    1 reverse KL, in between the generalised JSD), ``topk`` restricts it to the student's top-K ids (with one tail
    bucket when ``topk_tail``), ``is_clip`` caps the detached importance weight (``None``: no cap),
    ``entropy_beta`` sets the teacher-entropy weight ``exp(-beta * H_T)``. ``ref_beta`` scales the k3 penalty
    toward ``ref_logprobs`` on every valid token.
    """

    temperature: float = 1.0
    eps_low: float = 0.2
    eps_high: float = 0.28
    dual_clip: Optional[float] = 3.0
    alpha: float = 0.5
    topk: Optional[int] = None
    topk_tail: bool = True
    is_clip: Optional[float] = 2.0
    entropy_beta: float = 1.0
    ref_beta: float = 0.0
    reduction: str = "mean"

    def __post_init__(self):
        # Stored as Python numbers (a numpy scalar passes the checks and is converted), since the kernels take them.
        def put(name, value):
            object.__setattr__(self, name, value)

        put("temperature", _finite("temperature", self.temperature, low=0.0, low_open=True))
        put("eps_low", _finite("eps_low", self.eps_low, low=0.0, high=1.0))
        put("eps_high", _finite("eps_high", self.eps_high, low=0.0))
        put("dual_clip", _finite("dual_clip", self.dual_clip, low=1.0, low_open=True, allow_none=True))
        put("alpha", _finite("alpha", self.alpha, low=0.0, high=1.0))
        put("topk", positive_int("topk", self.topk))
        put("topk_tail", flag("topk_tail", self.topk_tail))
        put("is_clip", _finite("is_clip", self.is_clip, low=0.0, low_open=True, allow_none=True))
        put("entropy_beta", _finite("entropy_beta", self.entropy_beta, low=0.0))
        put("ref_beta", _finite("ref_beta", self.ref_beta, low=0.0))
        if self.reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {self.reduction!r}")
