"""The C++ CPU backend: compiles ``csrc/srpo_cpu.cpp`` once per machine on first use and caches the library.

The cache lives in ``$SRPO_KERNELS_CACHE`` (default ``~/.cache/srpo_kernels``), keyed by the source, the flags,
the torch version and the CPU, so a changed kernel or machine rebuilds instead of loading a stale binary.
"""
from __future__ import annotations

import hashlib
import os
import platform
import sys
from pathlib import Path
from typing import Optional

import torch

from .support import effective_topk

_FLAGS = ["-O3", "-mprefer-vector-width=512", "-fopenmp", "-fno-math-errno", "-fno-trapping-math", "-DNDEBUG"]
_state = {"loaded": False, "error": None}
MAX_VOCAB = 1 << 24  # kMaxVocab of the kernel: a row's argmax index travels as an exact float


def source_dir() -> Path:
    """csrc/ of a source checkout or editable install, else the copy installed as ``srpo_kernels/csrc``."""
    here = Path(__file__).resolve().parent.parent
    for candidate in (here.parent / "csrc", here / "csrc"):
        if (candidate / "srpo_cpu.cpp").is_file():
            return candidate
    raise FileNotFoundError(f"srpo_cpu.cpp not found next to {here}")


def _cpu_tag() -> str:
    model = platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith(("model name", "flags")):
                model += line
    except OSError:
        pass
    return model


def _flags():
    native = ["-march=native"] if platform.machine() in ("x86_64", "AMD64") else ["-mcpu=native"]
    return _FLAGS + native


def _build():
    from torch.utils import cpp_extension

    src = source_dir() / "srpo_cpu.cpp"
    flags = _flags()
    key = hashlib.sha256(b"\0".join([src.read_bytes(), " ".join(flags).encode(), torch.__version__.encode(),
                                     sys.version.encode(), _cpu_tag().encode()])).hexdigest()[:16]
    root = Path(os.environ.get("SRPO_KERNELS_CACHE", Path.home() / ".cache" / "srpo_kernels"))
    build_dir = root / f"cpu-{key}"
    build_dir.mkdir(parents=True, exist_ok=True)
    # The library file exists from the moment the linker starts writing it: a process started meanwhile loaded a
    # half-written file and lost the kernel for its lifetime. `ready` is written once a build is complete; without
    # it, cpp_extension builds under its lock file, or waits for the process that holds it, then loads.
    ready = build_dir / "ready"
    if ready.is_file():
        torch.ops.load_library(str(build_dir / "srpo_kernels_cpu.so"))
        return
    print(f"srpo_kernels: compiling the C++ CPU kernel into {build_dir} (once per machine, a few seconds)...",
          file=sys.stderr, flush=True)
    cpp_extension.load(name="srpo_kernels_cpu", sources=[str(src)], extra_cflags=flags,
                       extra_ldflags=["-fopenmp"], build_directory=str(build_dir), is_python_module=False,
                       verbose=False)
    ready.touch()


def load_error() -> Optional[str]:
    """None when the kernel is loaded (building it if needed), else why it is not available."""
    if not _state["loaded"] and _state["error"] is None:
        if os.environ.get("SRPO_KERNELS_DISABLE_CPU") == "1":
            _state["error"] = "disabled by SRPO_KERNELS_DISABLE_CPU=1"
        else:
            try:
                _build()
                _state["loaded"] = True
            except Exception as exc:  # a missing compiler must not break the library: report and fall back
                _state["error"] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    return _state["error"]


class CpuRowOps:
    name = "cpu"
    temporaries = 0  # in place, with per-thread scratch rows
    linear_student_stats = None
    vocab_shard = None
    fuses_casts = True

    def __init__(self):
        error = load_error()
        if error is not None:
            raise RuntimeError(f"the C++ CPU kernel is unavailable: {error}")
        self._ops = torch.ops.srpo_kernels

    @staticmethod
    def _f32(t):
        return None if t is None else t.contiguous().float()

    @classmethod
    def _casts(cls, widen):
        """The kernel's (student rows, teacher rows, fp32 bias, T): none without a Widen."""
        if widen is None:
            return None, None, None, 1.0
        return widen.student, widen.teacher, cls._f32(widen.bias), widen.temperature

    def student_stats(self, z, targets, widen=None):
        low, _, bias, temperature = self._casts(widen)
        return self._ops.student_stats(z, targets.contiguous(), low, bias, temperature)

    def student_grad(self, z, targets, stats, c_logp, c_ent, widen=None):
        low, _, bias, temperature = self._casts(widen)
        self._ops.student_grad(z, targets.contiguous(), stats.contiguous(), self._f32(c_logp), self._f32(c_ent),
                               low, bias, temperature)

    def distill_stats(self, z, u, targets, alpha, topk, topk_tail, widen=None):
        k = effective_topk(topk, u.shape[1])
        stats, ids = self._ops.distill_stats(z, u, targets.contiguous(), float(alpha), k or 0, bool(topk_tail),
                                             *self._casts(widen))
        return stats, (ids if k else None)

    def distill_grad(self, z, u, targets, stats, topk_ids, c_logp, c_div, alpha, topk, topk_tail, widen=None):
        low, _, bias, temperature = self._casts(widen)
        self._ops.distill_grad(z, u, targets.contiguous(), stats, topk_ids, self._f32(c_logp), self._f32(c_div),
                               float(alpha), bool(topk_tail), low, bias, temperature)
