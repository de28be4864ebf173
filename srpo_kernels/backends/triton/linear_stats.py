"""Student stats (log-sum-exp, target log-prob, entropy) straight from ``h`` and ``W``: logit tiles are computed
with ``tl.dot`` (bf16/fp16 operands, fp32 accumulators; fp32 operands in full fp32, no TF32) and reduced in
registers, so no ``[C, V]`` logits buffer is written. For passes without a gradient (``fused_logprobs``' forward,
old/reference log-probs under ``no_grad``, the forward of ``reduction="none"``).

Each program owns BM rows and one span of COLS_PER_PROGRAM vocabulary entries (GROUP_M row blocks at a time
sweep all spans) and leaves an online-softmax
partial (max m, sum e^(z-m), sum e^(z-m)(z-m)) per row; ``_combine`` merges the spans' partials in torch
(``[N, V / COLS_PER_PROGRAM]`` floats, not ``[N, V]``).
"""
import math

import torch
import triton
import triton.language as tl

from .launch import COMPILE_OPTIONS, interpreting

# A multiple of every BN below; 1024 gives 149 spans at V = 151 936, so even one row block fills an H100's SMs.
COLS_PER_PROGRAM = 1024
_CONFIGS = [triton.Config({"BM": bm, "BN": bn, "BK": bk}, num_warps=w, num_stages=s)
            for bm, bn, bk, w, s in ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (128, 256, 64, 8, 4),
                                     (256, 128, 64, 8, 3), (128, 128, 64, 4, 4), (64, 128, 64, 4, 4))]
# Row blocks swept together across all spans, so their rows of h stay in L2 while W streams past (the W traffic
# is V x H per group instead of the h traffic being N x H per span).
GROUP_M = 16
# Under the interpreter, small groups: the tests' few row blocks then span a full group and a partial one.
_INTERPRET = {"BM": 16, "BN": 64, "BK": 32, "GROUP_M": 2}


@triton.jit
def linear_stats_kernel(h_ptr, w_ptr, b_ptr, y_ptr, m_ptr, s_ptr, t_ptr, zy_ptr, n_rows, n_cols, n_hidden,
                        stride_h, stride_w, inv_t, n_spans, cols_per_program, HAS_BIAS: tl.constexpr,
                        PRECISION: tl.constexpr, UPCAST: tl.constexpr, GROUP_M: tl.constexpr,
                        BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr):
    pid = tl.program_id(0)
    n_row_blocks = tl.cdiv(n_rows, BM)
    width = GROUP_M * n_spans
    first = pid // width * GROUP_M
    group_rows = tl.minimum(n_row_blocks - first, GROUP_M)
    pid_m = first + (pid % width) % group_rows
    span = (pid % width) // group_rows
    rows = pid_m * BM + tl.arange(0, BM)
    row_ok = rows < n_rows
    rows64 = rows.to(tl.int64)
    y = tl.load(y_ptr + rows64, mask=row_ok, other=-1)
    m = tl.full([BM], -float("inf"), tl.float32)
    s = tl.zeros([BM], tl.float32)  # sum e^(z - m)
    t = tl.zeros([BM], tl.float32)  # sum e^(z - m) (z - m): the entropy log s - t/s does not cancel
    zy = tl.zeros([BM], tl.float32)
    v_start = span * cols_per_program
    v_end = tl.minimum(v_start + cols_per_program, n_cols)
    for v0 in range(v_start, v_end, BN):
        cols = v0 + tl.arange(0, BN)
        col_ok = cols < v_end
        acc = tl.zeros([BM, BN], tl.float32)
        for k0 in range(0, n_hidden, BK):
            ks = k0 + tl.arange(0, BK)
            k_ok = ks < n_hidden
            a = tl.load(h_ptr + rows64[:, None] * stride_h + ks[None, :], mask=row_ok[:, None] & k_ok[None, :],
                        other=0.0)
            b = tl.load(w_ptr + cols.to(tl.int64)[None, :] * stride_w + ks[:, None],
                        mask=col_ok[None, :] & k_ok[:, None], other=0.0)
            if UPCAST:
                a, b = a.to(tl.float32), b.to(tl.float32)
            acc = tl.dot(a, b, acc, input_precision=PRECISION)
        if HAS_BIAS:
            acc += tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        z = tl.where(col_ok[None, :], acc * inv_t, -float("inf"))
        zy += tl.sum(tl.where(cols[None, :] == y[:, None], z, 0.0), 1)
        m_new = tl.maximum(m, tl.max(z, 1))
        live = z > -float("inf")  # masked vocabulary (a -inf bias) and the padding columns
        d = tl.where(live, z - m_new[:, None], 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        scale = tl.where(s > 0, tl.exp(m - m_new), 0.0)
        shift = tl.where(s > 0, m - m_new, 0.0)
        t = scale * (t + s * shift) + tl.sum(e * d, 1)
        s = scale * s + tl.sum(e, 1)
        m = m_new
    out = rows64 * n_spans + span
    tl.store(m_ptr + out, m, mask=row_ok)
    tl.store(s_ptr + out, s, mask=row_ok)
    tl.store(t_ptr + out, t, mask=row_ok)
    # Only the span holding a row's target writes its logit.
    tl.store(zy_ptr + rows64, zy, mask=row_ok & (y >= v_start) & (y < v_end))


_tuned = None if interpreting() else triton.autotune(_CONFIGS, key=["n_cols", "n_hidden"])(linear_stats_kernel)


def _combine(m, s, t):
    """Merge per-span partials [N, spans] into (max, log s, entropy) [N] (see torch_chunked.TorchPasses.lse_entropy)."""
    top = m.max(1, keepdim=True).values
    live = s > 0
    shift = torch.where(live, m - top, torch.zeros_like(m))
    w = torch.where(live, shift.exp(), torch.zeros_like(m))
    total = (w * s).sum(1)
    moment = (w * (t + s * shift)).sum(1)
    log_total = total.log()
    return top.squeeze(1), log_total, (log_total - moment / total).clamp_min(0.0)


def linear_student_stats(h: torch.Tensor, weight: torch.Tensor, bias, targets: torch.Tensor, inv_t: float):
    """(lse, logp, entropy) of softmax((h W^T + b) * inv_t), each [N] fp32; h and weight share a dtype."""
    n, hidden = h.shape
    vocab = weight.shape[0]
    h, weight = h.contiguous(), weight.contiguous()
    spans = math.ceil(vocab / COLS_PER_PROGRAM)
    m, s, t = (torch.empty(n, spans, dtype=torch.float32, device=h.device) for _ in range(3))
    zy = torch.empty(n, dtype=torch.float32, device=h.device)
    # The interpreter's bf16/fp16 tl.dot returns garbage (Triton 3.9): there the operands are widened, which
    # computes the same exact products a tensor core accumulates in fp32. "tf32" only names the default for bf16.
    upcast = interpreting() and h.dtype != torch.float32
    precision = "ieee" if h.dtype == torch.float32 or upcast else "tf32"
    args = (h, weight, bias if bias is not None else h, targets.contiguous(), m, s, t, zy, n, vocab, hidden,
            h.stride(0), weight.stride(0), float(inv_t), spans, COLS_PER_PROGRAM)
    flags = dict(HAS_BIAS=bias is not None, PRECISION=precision, UPCAST=upcast)
    if _tuned is None:
        linear_stats_kernel[(triton.cdiv(n, _INTERPRET["BM"]) * spans,)](*args, **flags, **_INTERPRET)
    else:
        _tuned[lambda meta: (triton.cdiv(n, meta["BM"]) * spans,)](*args, **flags, GROUP_M=GROUP_M, **COMPILE_OPTIONS)
    top, log_s, entropy = _combine(m, s, t)
    return top + log_s, (zy - top) - log_s, entropy
