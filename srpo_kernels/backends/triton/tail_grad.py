"""z <- g_tail exp(z - shift) - c_logp exp(z - lse), in place: every entry as a member of the top-K tail bucket
(the caller then writes the top-K entries themselves)."""
import triton
import triton.language as tl

from .launch import Launcher


@triton.jit
def tail_grad_kernel(z_ptr, lse_ptr, g_tail_ptr, shift_ptr, c_logp_ptr, stride, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    lse = tl.load(lse_ptr + row)
    g_tail = tl.load(g_tail_ptr + row)
    shift = tl.load(shift_ptr + row)
    a = tl.load(c_logp_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptr = z_ptr + row * stride + cols
        x = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, g_tail * tl.exp(x - shift) - a * tl.exp(x - lse), mask=mask)


_launch = Launcher(tail_grad_kernel, writes=("z_ptr",))


def fill_tail_grad(z, lse_z, g_tail, shift, c_logp):
    _launch(z.shape[0], z, lse_z.contiguous(), g_tail.contiguous(), shift.contiguous(), c_logp.contiguous(),
            z.stride(0), z.shape[1])
