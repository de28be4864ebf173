"""Per-row log-sum-exp and entropy of softmax(x) in one online pass over vocabulary blocks (entries may be -inf)."""
import torch
import triton
import triton.language as tl

from .launch import Launcher


@triton.jit
def lse_entropy_kernel(x_ptr, lse_ptr, ent_ptr, stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    m = tl.full([], -float("inf"), tl.float32)
    s = tl.zeros([], tl.float32)  # sum e^{x - m}
    t = tl.zeros([], tl.float32)  # sum e^{x - m} (x - m): shifted, so the entropy log s - t/s does not cancel
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        m_new = tl.maximum(m, tl.max(x, 0))
        live = x > -float("inf")
        d = tl.where(live, x - m_new, 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        scale = tl.where(s > 0, tl.exp(m - m_new), 0.0)
        shift = tl.where(s > 0, m - m_new, 0.0)
        t = scale * (t + s * shift) + tl.sum(e * d, 0)
        s = scale * s + tl.sum(e, 0)
        m = m_new
    log_s = tl.log(s)
    tl.store(lse_ptr + row, m + log_s)
    tl.store(ent_ptr + row, tl.maximum(log_s - t / s, 0.0))  # rounding must not give H < 0


_launch = Launcher(lse_entropy_kernel)


def lse_entropy(x: torch.Tensor):
    lse = x.new_empty(x.shape[0])
    ent = x.new_empty(x.shape[0])
    _launch(x.shape[0], x, lse, ent, x.stride(0), x.shape[1])
    return lse, ent
