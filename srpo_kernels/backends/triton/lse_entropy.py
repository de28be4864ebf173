"""Per-row max m, log s (s = sum e^(x - m), so lse = m + log s) and entropy of softmax(x) in one online pass over
vocabulary blocks (entries may be -inf); see torch_chunked.TorchPasses.lse_entropy for why m and log s stay apart.
The kernel writes the shifted sums; log s and the entropy follow from them in fp64 (support.log_s_entropy)."""
import torch
import triton
import triton.language as tl

from ..support import log_s_entropy
from .launch import Launcher


@triton.jit
def lse_entropy_kernel(x_ptr, max_ptr, r_ptr, t_ptr, stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    base = x_ptr + row * stride
    m = tl.full([], -float("inf"), tl.float32)
    # s = 1 + r: the max's own term (exactly 1) stays out of r, so log s = log1p(r) keeps a sharp row's r, which
    # fp32 cannot hold beside 1.
    r = tl.zeros([], tl.float32)
    t = tl.zeros([], tl.float32)  # sum e^{x - m} (x - m): shifted, so the entropy log s - t/s does not cancel
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        x = tl.load(base + cols, mask=cols < n_cols, other=-float("inf")).to(tl.float32)
        block_max = tl.max(x, 0)
        raised = block_max > m
        m_new = tl.maximum(m, block_max)
        live = x > -float("inf")
        d = tl.where(live, x - m_new, 0.0)
        e = tl.where(live, tl.exp(d), 0.0)
        # A block that raises the max leaves its first maximal entry (the new 1) out of the sum.
        first_max = tl.arange(0, BLOCK) == tl.argmax(x, 0)
        block_r = tl.where(raised, tl.sum(tl.where(first_max, 0.0, e), 0), tl.sum(e, 0))
        seen = m > -float("inf")
        scale = tl.where(seen, tl.exp(m - m_new), 0.0)
        shift = tl.where(seen, m - m_new, 0.0)
        s_old = tl.where(seen, 1.0 + r, 0.0)
        t = scale * (t + s_old * shift) + tl.sum(e * d, 0)
        r = tl.where(raised, s_old * scale + block_r, r + block_r)
        m = m_new
    tl.store(max_ptr + row, m)
    tl.store(r_ptr + row, r)
    tl.store(t_ptr + row, t)


_launch = Launcher(lse_entropy_kernel)


def lse_entropy(x: torch.Tensor):
    m, r, t = (x.new_empty(x.shape[0]) for _ in range(3))
    _launch(x.shape[0], x, m, r, t, x.stride(0), x.shape[1])
    return (m,) + log_s_entropy(r, t)
