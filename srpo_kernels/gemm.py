"""The GEMM precision policy, in one place for every backend.

- GEMM operands stay in the input dtype: bf16/fp16 run on tensor cores (CUDA) or bf16/AMX units (CPU) with fp32
  accumulation inside the GEMM; fp32 stays fp32 (no TF32) and fp64 stays exact.
- Except on a CPU without bf16/fp16 arithmetic (e.g. AVX2-only x86: torch's bf16 GEMM there ran 4.5x slower than
  fp32 at 256 x 256 x 32 000 on an AVX2 EPYC): there the operands are widened to fp32 once per call (a V x H copy of
  the weight), which is what the hardware computes anyway. And for fp16 on the CPU wherever its fp16 logits could
  pass 65 504 (``fp16_logits_may_overflow``): bf16 has fp32's range, fp16 does not.
- The row passes always see fp32 logits (fp64 for fp64 inputs). On CUDA a bf16/fp16 GEMM writes them in fp32
  directly (``out_dtype``, torch >= 2.8). The CPU build of torch has no such op: there the GEMM writes its
  input-dtype result into a scratch buffer, exactly as rounded as the naive bf16 logits, and the C++ backend widens
  each row as its stats pass reads it (``low_logits``, row_ops.Widen); other backends get one widening pass.
- Backward: ``dL/dz`` is narrowed to the input dtype for the ``dh`` and ``dW`` GEMMs (as autograd does for the
  naive loss); fp16's times a power of two per chunk first, undone in fp32 (``fp16_grad_scale``: fp16 has no
  range for a mean's 1/N). ``dW`` and ``db`` accumulate in fp32 across chunks. On CUDA the ``dW`` GEMM adds into
  the fp32 accumulator itself (``addmm(out_dtype=...)``). The CPU's bf16 GEMM cannot, so there it runs per block of
  vocabulary rows, each block's ``[rows, H]`` result (a chunk's share of ``dW``, rounded once to the input dtype, as
  the naive loss rounds its whole ``dW``) added into the accumulator while it is in cache: never a ``V x H``
  temporary, and 2.3-2.8x faster than an fp32 GEMM on widened operands on a Sapphire Rapids CPU (AMX) at
  C = 256-512, H = 256-1024. On an Intel CPU where torch's CPU build carries MKL (x86), the C++ kernel calls MKL's
  bf16/fp16 GEMM with an fp32 C instead, which adds into the accumulator itself: fp32 accumulation all the way (no
  share rounded), within noise of the blocks' speed in bf16 and 1.06-1.46x faster in fp16 on Sapphire Rapids
  (``python -m benchmarks.dw_gemm``). Not on AMD: MKL's bf16 GEMM there ran 2.1-2.4x slower than the blocks
  (2 EPYC cores with avx512_bf16, C, H, V = 256, 256, 32 000 to 576, 576, 49 152), which cost the SmolLM2-like
  shape half its time over the GEMM floor. ``SRPO_KERNELS_CPU_DW=mkl|blocks`` forces either, to measure both ways.
- The gradients are returned in the inputs' dtypes (``returned_grad``). On the CPU the fp32 ``dW`` accumulator is
  narrowed block by block, each block's pages handed back to the OS once converted: the accumulator and its bf16
  copy never both exist whole, which put the bf16 peak above the fp32 one (2048, 256, 151 936: 422 vs 419 MB).
"""
from __future__ import annotations

import functools
import math
import os
from typing import Optional, Sequence, Tuple

import torch

from .backends import cpu as cpu_kernel

LOW_PRECISION = (torch.bfloat16, torch.float16)
# The CPU's low-precision dW GEMM runs per block of about this many entries of dW (4 MiB of bf16, 8 MiB of the fp32
# accumulator): 2048-8192 rows for H = 256-1024, the fastest measured on 2 Sapphire Rapids cores (256-row blocks were
# up to 1.8x slower).
DW_BLOCK_ELEMENTS = 1 << 21
# returned_grad narrows the CPU's accumulators in blocks of this many bytes of the accumulator, discarding pages only
# for an accumulator of at least DISCARD_MIN_BYTES: glibc's largest mmap threshold, above which free() unmaps the
# block anyway. A smaller one may stay in the heap for the next allocation, which would fault its pages in again
# (3 ms more at 32 000 x 256).
NARROW_BLOCK_BYTES = 4 << 20
DISCARD_MIN_BYTES = 32 << 20
NORM_BLOCK_ROWS = 4096  # max_row_norm's blocks of rows (8 MiB of fp32 at H = 512)
# fp16's dL/dz is scaled by a power of two before it is narrowed, so that its largest entry (and on the CPU the largest
# fp16 output of the GEMMs it feeds) lands just below this: 4x under fp16's largest value, far above its subnormals.
FP16_GRAD_CEILING = 2.0 ** 14
_out_dtype_ok = {}  # device type -> whether torch.mm/addmm take out_dtype there (probed once)
# CPU feature flags (/proc/cpuinfo) of native bf16/fp16 dot products: AVX-512/AMX on x86, bf16/fp16 on Arm.
_CPU_FLAGS = {torch.bfloat16: {"avx512_bf16", "amx_bf16", "bf16"}, torch.float16: {"avx512_fp16", "amx_fp16", "fphp"}}


@functools.lru_cache(maxsize=None)
def _cpuinfo(*keys: str) -> str:
    """The value of the first /proc/cpuinfo line starting with one of `keys` ("" where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(keys):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return ""


def _cpu_flags() -> frozenset:
    return frozenset(_cpuinfo("flags", "Features").split())


def mkl_dw_gemm_preferred() -> bool:
    """Whether the CPU's low-precision dW goes through MKL's fp32-C GEMM (where it exists) rather than the blocks:
    on Intel CPUs only (see the module's docstring), unless ``SRPO_KERNELS_CPU_DW`` is "mkl" or "blocks"."""
    choice = os.environ.get("SRPO_KERNELS_CPU_DW", "auto")
    if choice not in ("auto", "mkl", "blocks"):
        raise ValueError(f"SRPO_KERNELS_CPU_DW must be auto, mkl or blocks, got {choice!r}")
    if choice != "auto":
        return choice == "mkl"
    return _cpuinfo("vendor_id") == "GenuineIntel"


def native_low_precision(dtype: torch.dtype, device: torch.device) -> bool:
    """Whether GEMMs in `dtype` run at least at fp32 speed on `device` (GPUs: yes; CPUs: by their feature flags,
    unless ``SRPO_KERNELS_CPU_GEMM`` is "low" or "fp32", to measure both ways)."""
    if device.type != "cpu":
        return True
    choice = os.environ.get("SRPO_KERNELS_CPU_GEMM", "auto")
    if choice not in ("auto", "low", "fp32"):
        raise ValueError(f"SRPO_KERNELS_CPU_GEMM must be auto, low or fp32, got {choice!r}")
    if choice != "auto":
        return choice == "low"
    return bool(_CPU_FLAGS.get(dtype, set()) & _cpu_flags())


def _supports_out_dtype(device: torch.device) -> bool:
    if device.type not in _out_dtype_ok:
        try:
            a = torch.ones(2, 2, dtype=torch.bfloat16, device=device)
            acc = torch.zeros(2, 2, dtype=torch.float32, device=device)
            torch.addmm(acc, a, a, out_dtype=torch.float32, out=acc)
            torch.mm(a, a, out_dtype=torch.float32, out=acc)
            _out_dtype_ok[device.type] = True
        except (RuntimeError, TypeError, NotImplementedError):
            _out_dtype_ok[device.type] = False
    return _out_dtype_ok[device.type]


def max_row_norm(t: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """The largest 2-norm of a row of `t`, computed in `dtype`, a block of rows at a time (no copy of all of `t` in
    `dtype`; vector_norm's own `dtype` argument made none either, but ran 4x slower on fp16)."""
    t = t.detach().reshape(-1, t.shape[-1])
    return max((float(torch.linalg.vector_norm(t[i:i + NORM_BLOCK_ROWS].to(dtype), dim=1).max())
                for i in range(0, t.shape[0], NORM_BLOCK_ROWS)), default=0.0)


def _absmax(t: torch.Tensor) -> float:
    lo, hi = torch.aminmax(t)  # one pass, no temporary (vector_norm's inf-norm ran 20x slower on fp16)
    return float(torch.maximum(-lo, hi))


def fp16_logits_may_overflow(weight: torch.Tensor, rows: Sequence[torch.Tensor], weight_absmax: float,
                             rows_absmax: float) -> bool:
    """Whether an fp16 GEMM of `rows` by `weight` could write an inf where it cannot write fp32 (the CPU): the GEMM
    accumulates in fp32, but its fp16 output overflows past 65 504 (h W^T gave inf logits, then NaN log-probs beside
    a finite loss, where the fp32 accumulation held the exact value). First the free bound |h . w| <= H max|h| max|w|
    (the maxima `weight_absmax` and `rows_absmax` come from the finiteness scan); where that does not clear, the
    sharper |h|_2 |w|_2 (Cauchy-Schwarz; one pass over the operands: 46 ms for a 151 936 x 1024 fp16 weight on 2
    EPYC cores). Where it reaches fp16's range the GEMMs widen (fp32 logits, and a V x H fp32 copy of the weight for
    this call)."""
    if weight.dtype != torch.float16 or _supports_out_dtype(weight.device) or not rows:
        return False
    fp16_max = torch.finfo(torch.float16).max
    if weight.shape[1] * weight_absmax * rows_absmax < fp16_max:
        return False
    return max_row_norm(weight) * max(max_row_norm(r) for r in rows) >= fp16_max


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype of logits, row passes and accumulators: fp64 for fp64 inputs, else fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class Gemms:
    """The three GEMMs of a chunk (logits, dh, dW) for one weight, following the policy above."""

    def __init__(self, weight: torch.Tensor, bias: Optional[torch.Tensor], temperature: float,
                 rows: Sequence[Optional[torch.Tensor]] = (), absmax: Optional[dict] = None):
        """`rows`: the tensors of rows the logits GEMM multiplies by ``weight``, (hidden, teacher_hidden); `absmax`:
        their and the weight's largest |entry| by those names, as inputs.FlatInputs carries them from the finiteness
        scan (read here only where not given)."""
        w = weight.detach()
        absmax = absmax or {}

        def largest(name, t):
            return absmax[name] if name in absmax else _absmax(t)

        widen = w.dtype in LOW_PRECISION and not native_low_precision(w.dtype, w.device)
        # max |W| where the CPU's fp16 GEMMs write fp16: fp16_logits_may_overflow's and fp16_grad_scale's bounds
        self.weight_absmax = None
        if not widen and w.dtype == torch.float16 and not _supports_out_dtype(w.device):
            named = [(n, r) for n, r in zip(("hidden", "teacher_hidden"), rows) if r is not None and r.numel()]
            self.weight_absmax = largest("weight", w)
            widen = fp16_logits_may_overflow(w, [r for _, r in named], self.weight_absmax,
                                             max((largest(n, r) for n, r in named), default=0.0))
        if widen:
            w = w.float()
            self.weight_absmax = None
        self.weight = w
        self.operand = w.dtype
        self.math = math_dtype(self.operand)
        self.low = self.operand in LOW_PRECISION
        self.fp32_out = self.low and _supports_out_dtype(self.weight.device)
        # Decided once a call, before any GEMM: a bad SRPO_KERNELS_CPU_DW fails here, not in the chunk loop.
        self.mkl_dw = self.low and not self.fp32_out and w.device.type == "cpu" and mkl_dw_gemm_preferred()
        self.bias = None if bias is None else bias.detach().to(self.math)
        self.temperature, self.inv_t = temperature, 1.0 / temperature
        # Logits are divided by T, as the naive loss divides them, unless 1/T is exact (T a power of two): z * fl(1/T)
        # scales a whole row by the one rounding error of 1/T, which a row's entropy then sums coherently, and beta
        # carries into the weights (two random sweeps of 600 fp32 cases: 9 outputs over the 5x-naive bound before,
        # 1 after; tests/test_edges.py).
        self.exact_inv_t = math.frexp(temperature)[0] == 0.5

    def operand_rows(self, rows: torch.Tensor) -> torch.Tensor:
        return rows if rows.dtype == self.operand else rows.to(self.operand)

    def logits(self, h: torch.Tensor, out: torch.Tensor, scratch: Optional[torch.Tensor]) -> torch.Tensor:
        """out (math dtype) <- (h W^T + b) / T. `scratch` (input dtype, out's shape) is needed on the CPU path for
        bf16/fp16 operands, where the GEMM cannot write fp32."""
        w_t = self.weight.T
        if not self.low and self.bias is not None:  # fp32/fp64: the bias (and an exact 1/T) folded into the GEMM
            if self.exact_inv_t:
                return torch.addmm(self.bias, h, w_t, beta=self.inv_t, alpha=self.inv_t, out=out)
            torch.addmm(self.bias, h, w_t, out=out)
        else:
            if self.fp32_out:
                torch.mm(h, w_t, out_dtype=self.math, out=out)
            elif self.low:
                out.copy_(torch.mm(h, w_t, out=scratch))
            else:
                torch.mm(h, w_t, out=out)
            if self.bias is not None:
                out.add_(self.bias)
        if self.temperature == 1.0:
            return out
        return out.mul_(self.inv_t) if self.exact_inv_t else out.div_(self.temperature)

    def low_logits(self, h: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
        """The CPU's bf16/fp16 GEMM alone, h W^T into `scratch` (input dtype), for a backend that widens it itself
        (bias and 1/T applied there, see row_ops.Widen)."""
        return torch.mm(h, self.weight.T, out=scratch)

    def narrow(self, dz: torch.Tensor, scratch: Optional[torch.Tensor],
               h: torch.Tensor) -> Tuple[torch.Tensor, float]:
        """dL/dz as the backward GEMMs' operand, and the factor their results take to undo its scale: (dz, 1) in
        fp32/fp64; in bf16 (fp32's range) a copy and 1; in fp16 a copy times a power of two (`fp16_grad_scale`; `h`:
        the chunk's rows of hidden) and its inverse. `dz` is the caller's scratch: fp16's scale is applied in place."""
        if not self.low:
            return dz, 1.0
        if self.operand != torch.float16:
            return scratch.copy_(dz), 1.0
        scale = self.fp16_grad_scale(dz, h)
        return scratch.copy_(dz.mul_(scale) if scale != 1.0 else dz), 1.0 / scale  # a power of two: exact

    def fp16_grad_scale(self, dz: torch.Tensor, h: torch.Tensor) -> float:
        """The power of two that lifts a chunk's dL/dz off fp16's subnormals before it is narrowed (below 6e-5 fp16
        keeps fewer bits, below 6e-8 none). A mean over N tokens makes dL/dz about 1/N; and under torch.amp's
        GradScaler the naive loss's dL/dz carries the scaler's factor where ours, computed in the forward, did not
        (fp16 dh 5.0e-3 from fp64 against the naive loss's 6.2e-4 at N = 8192, V = 4000). The largest scaled entry
        lands below FP16_GRAD_CEILING; on the CPU, whose fp16 GEMMs write fp16, so do the dh and dW outputs' bounds
        (V entries of a row times max |W|, C of a column times max |h|: loose, but exact row and column sums of |dz|
        cost as much as the GEMMs)."""
        lo, hi = torch.aminmax(dz)
        extremes = [hi, -lo]
        if not self.fp32_out:
            h_lo, h_hi = torch.aminmax(h)
            extremes += [h_hi.float(), -h_lo.float()]
        values = torch.stack(extremes).tolist()  # one sync
        top = max(values[:2])
        if not self.fp32_out:
            top *= max(1.0, dz.shape[1] * self.weight_absmax, dz.shape[0] * max(values[2:]))
        if not 0.0 < top < math.inf:
            return 1.0
        return math.ldexp(1.0, max(-60, min(60, math.floor(math.log2(FP16_GRAD_CEILING / top)))))

    def grad_hidden(self, dz_op: torch.Tensor) -> torch.Tensor:
        """dL/dh rows (math dtype, or the input dtype on the CPU's low-precision path: index_copy_ widens them)."""
        if self.fp32_out:
            return torch.mm(dz_op, self.weight, out_dtype=self.math)
        return dz_op @ self.weight

    def add_grad_weight(self, acc: torch.Tensor, dz_op: torch.Tensor, h: torch.Tensor, beta: float,
                        alpha: float = 1.0) -> None:
        """acc (fp32/fp64, V x H) <- beta * acc + alpha * dz_op^T h, with no V x H temporary."""
        if self.fp32_out:
            torch.addmm(acc, dz_op.T, h, beta=beta, alpha=alpha, out_dtype=self.math, out=acc)
        elif self.mkl_dw and _fp32_acc_gemm(acc):
            torch.ops.srpo_kernels.grad_weight(acc, dz_op, h, beta, alpha)
        elif self.low:  # CPU: see the module's docstring
            add_grad_weight_blocks(acc, dz_op, h, beta, alpha)
        else:
            torch.addmm(acc, dz_op.T, h, beta=beta, alpha=alpha, out=acc)


def _fp32_acc_gemm(acc: torch.Tensor) -> bool:
    """Whether the C++ kernel's grad_weight (MKL's bf16/fp16 GEMM into an fp32 C, from torch's own CPU build) can
    add into `acc`."""
    return (acc.device.type == "cpu" and acc.dtype == torch.float32 and acc.stride(-1) == 1
            and cpu_kernel.load_error() is None and torch.ops.srpo_kernels.grad_weight_available())


def add_grad_weight_blocks(acc: torch.Tensor, dz_op: torch.Tensor, h: torch.Tensor, beta: float,
                           alpha: float = 1.0) -> None:
    """acc (fp32) <- beta * acc + alpha * dz_op^T h (bf16/fp16 operands) where there is no fp32-C GEMM: the GEMM per
    block of vocabulary rows, each block's share added while it is in cache (see the module's docstring)."""
    rows = max(64, DW_BLOCK_ELEMENTS // max(1, h.shape[1]))
    for v0 in range(0, acc.shape[0], rows):
        _accumulate(acc[v0:v0 + rows], torch.mm(dz_op[:, v0:v0 + rows].T, h), beta, alpha)


def _accumulate(block: torch.Tensor, part: torch.Tensor, beta: float, alpha: float = 1.0) -> None:
    """block (fp32) <- beta * block + alpha * part (bf16/fp16): one pass in the C++ kernel where it is built (torch's
    mixed-dtype add widens `part` into a fresh temporary first). beta = 0 overwrites: the accumulator is not
    written yet and may hold anything, NaN included."""
    if block.dtype == torch.float32 and cpu_kernel.load_error() is None:
        torch.ops.srpo_kernels.accumulate(block, part, beta, alpha)
    elif beta == 0.0:
        torch.mul(part, alpha, out=block)
    else:
        block.mul_(beta).add_(part, alpha=alpha)


def returned_grad(acc: Optional[torch.Tensor], dtype: torch.dtype, scale: Optional[torch.Tensor] = None):
    """An accumulator (fp32/fp64, owned by the caller, who drops it after) as the gradient in `dtype`, times `scale`
    (in place). Narrowing on the CPU goes block by block and discards each converted block's pages (C++ kernel):
    peak memory of the accumulator alone, not of the accumulator plus its narrowed copy."""
    if acc is None:
        return None
    if scale is not None:
        acc.mul_(scale)
    if acc.dtype == dtype:
        return acc
    if (acc.device.type != "cpu" or not acc.is_contiguous() or acc.numel() * acc.element_size() < DISCARD_MIN_BYTES
            or cpu_kernel.load_error() is not None):
        return acc.to(dtype)
    out = torch.empty(acc.shape, dtype=dtype)
    src, dst = acc.view(-1), out.view(-1)
    step = max(1, NARROW_BLOCK_BYTES // acc.element_size())
    for i in range(0, src.numel(), step):
        dst[i:i + step].copy_(src[i:i + step])
        torch.ops.srpo_kernels.discard_pages(src[i:i + step])
    return out
