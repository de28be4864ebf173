"""z <- c_div dD/dz - c_logp p over the full vocabulary, in place (MODE and om = 1 - alpha as in divergence.py)."""
import triton
import triton.language as tl

from .divergence import alpha_constants, divergence_mode
from .jsd_math import exact_difference, jsd_terms, log_ratio
from .launch import Launcher


@triton.jit
def distill_grad_kernel(z_ptr, u_ptr, m_z_ptr, ls_z_ptr, m_u_ptr, ls_u_ptr, gap_hi_ptr, gap_lo_ptr, aux_ptr, shift_ptr,
                        c_logp_ptr, c_div_ptr, stride, n_cols, om, log_beta, c0, c1, MODE: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    shift = tl.load(shift_ptr + row)
    m_z, ls_z = tl.load(m_z_ptr + row), tl.load(ls_z_ptr + row)
    m_u, ls_u = tl.load(m_u_ptr + row), tl.load(ls_u_ptr + row)
    aux = tl.load(aux_ptr + row)
    a = tl.load(c_logp_ptr + row)
    c = tl.load(c_div_ptr + row)
    gap_hi, gap_lo = tl.load(gap_hi_ptr + row), tl.load(gap_lo_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptr = z_ptr + row * stride + cols
        zv = tl.load(ptr, mask=mask, other=0.0).to(tl.float32)
        uv = tl.load(u_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        p = tl.exp(zv - m_z - ls_z)
        if MODE == 0:
            g = p - tl.exp(uv - m_u - ls_u)
        elif MODE == 1:  # t = (z - u) - shift with z - u exact, as divergence_kernel takes it
            s, e = exact_difference(zv, uv)
            g = tl.where(p > 0, p * (((s - shift) + e) - aux), 0.0)  # 0, not NaN, on masked vocabulary
        else:
            d, _e = jsd_terms(log_ratio(uv, zv, gap_hi, gap_lo), log_beta, c0, c1)
            g = tl.where(p > 0, om * p * ((d - shift) - aux), 0.0)
        tl.store(ptr, c * g - a * p, mask=mask)


_launch = Launcher(distill_grad_kernel, writes=("z_ptr",))


def fill_distill_grad(z, u, norm_z, norm_u, gap, aux, c_logp, c_div, alpha, shift):
    _launch(z.shape[0], z, u, *(t.contiguous() for t in (*norm_z, *norm_u, *gap)), aux.contiguous(), shift.contiguous(),
            c_logp.contiguous(), c_div.contiguous(), z.stride(0), z.shape[1], *alpha_constants(float(alpha)),
            MODE=divergence_mode(alpha))
