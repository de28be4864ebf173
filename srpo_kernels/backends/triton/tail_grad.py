"""z <- g_tail exp((z - m_t) - log s_t) - c_logp exp((z - m) - log s), in place: every entry as a member of the top-K
tail bucket (the caller then writes the top-K entries themselves); see row_ops.VocabPasses.fill_tail_grad."""
import triton
import triton.language as tl

from .launch import Launcher


@triton.jit
def tail_grad_kernel(z_ptr, m_ptr, log_s_ptr, g_tail_ptr, m_t_ptr, log_s_t_ptr, c_logp_ptr, stride, n_cols,
                     BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    g_tail = tl.load(g_tail_ptr + row)
    m_t = tl.load(m_t_ptr + row)
    log_s_t = tl.load(log_s_t_ptr + row)
    a = tl.load(c_logp_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptr = z_ptr + row * stride + cols
        z = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        tl.store(ptr, g_tail * tl.exp((z - m_t) - log_s_t) - a * tl.exp((z - m) - log_s), mask=mask)


_launch = Launcher(tail_grad_kernel, writes=("z_ptr",))


def fill_tail_grad(z, norm_z, g_tail, norm_tail, c_logp):
    _launch(z.shape[0], z, norm_z[0].contiguous(), norm_z[1].contiguous(), g_tail.contiguous(),
            norm_tail[0].contiguous(), norm_tail[1].contiguous(), c_logp.contiguous(), z.stride(0), z.shape[1])
