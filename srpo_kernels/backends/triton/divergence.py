"""Full-vocabulary divergence per row, and the sum its gradient needs (see support.divergence_and_aux).
MODE 0: forward KL(q||p); 1: reverse KL(p||q); 2: generalised JSD. ``om`` = 1 - alpha comes from alpha_constants
in fp64 (in fp32, alpha = 1 - 1e-8 would give 0)."""
import math

import triton
import triton.language as tl

from .jsd_math import exact_difference, jsd_terms, log_ratio, phi_term
from .launch import Launcher


@triton.jit
def divergence_kernel(z_ptr, u_ptr, m_z_ptr, ls_z_ptr, m_u_ptr, ls_u_ptr, gap_hi_ptr, gap_lo_ptr, shift_ptr, d_ptr,
                      aux_ptr, stride, n_cols, alpha, om, log_beta, c0, c1, MODE: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    shift = tl.load(shift_ptr + row)  # the gradient's term at the row's argmax (support.full_vocab_shift)
    m_z, ls_z = tl.load(m_z_ptr + row), tl.load(ls_z_ptr + row)
    m_u, ls_u = tl.load(m_u_ptr + row), tl.load(ls_u_ptr + row)
    acc1 = tl.zeros([BLOCK], tl.float32)
    acc2 = tl.zeros([BLOCK], tl.float32)
    acc3 = tl.zeros([BLOCK], tl.float32)
    gap_hi, gap_lo = tl.load(gap_hi_ptr + row), tl.load(gap_lo_ptr + row)  # support.lse_gap_pair
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        zv = tl.load(z_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        uv = tl.load(u_ptr + row * stride + cols, mask=mask, other=0.0).to(tl.float32)
        lp = zv - m_z - ls_z
        lq = uv - m_u - ls_u
        p = tl.exp(lp)
        q = tl.exp(lq)
        # Entries of zero probability add 0: with masked vocabulary (-inf logits) their log terms are NaN.
        live_p = mask & (p > 0)
        if MODE == 0:  # KL(q||p) = sum q phi(log q - log p), log q - log p as support.log_ratio
            acc1 += tl.where(mask, phi_term(q, log_ratio(uv, zv, gap_hi, gap_lo), p), 0.0)
        elif MODE == 1:  # KL(p||q) = sum p phi(g); the gradient's sum p t, t = (z - u) - shift; one exact z - u
            s, e = exact_difference(zv, uv)
            g = (s - gap_hi) + (e - gap_lo)  # -log_ratio, bit for bit
            acc1 += tl.where(mask, phi_term(p, tl.where(live_p, g, 0.0), q), 0.0)
            acc3 += tl.where(live_p, p * ((s - shift) + e), 0.0)
        else:
            d, e = jsd_terms(log_ratio(uv, zv, gap_hi, gap_lo), log_beta, c0, c1)
            m = om * p + alpha * q  # KL(p||m) = sum p phi(d), KL(q||m) = sum q phi(e)
            acc1 += tl.where(mask, phi_term(p, d, m), 0.0)
            acc2 += tl.where(mask, phi_term(q, e, m), 0.0)
            acc3 += tl.where(live_p, p * (d - shift), 0.0)
    s1 = tl.sum(acc1, 0)
    if MODE == 0:
        tl.store(d_ptr + row, s1)
        tl.store(aux_ptr + row, 0.0)
    elif MODE == 1:
        tl.store(d_ptr + row, s1)
        tl.store(aux_ptr + row, tl.sum(acc3, 0))
    else:
        tl.store(d_ptr + row, om * s1 + alpha * tl.sum(acc2, 0))
        tl.store(aux_ptr + row, tl.sum(acc3, 0))


_launch = Launcher(divergence_kernel)


def divergence_mode(alpha: float) -> int:
    return 0 if alpha == 0.0 else 1 if alpha == 1.0 else 2


def alpha_constants(alpha: float):
    """(om, log_beta, c0, c1) = (1-a, log(a/(1-a)), -log(1-a), -log(a)) in fp64, 0 where undefined (unused there)."""
    if alpha in (0.0, 1.0):
        return 1.0 - alpha, 0.0, 0.0, 0.0
    return 1.0 - alpha, math.log(alpha / (1 - alpha)), -math.log1p(-alpha), -math.log(alpha)


def full_divergence(z, u, norm_z, norm_u, gap, alpha, shift):
    d = z.new_empty(z.shape[0])
    aux = z.new_empty(z.shape[0])
    _launch(z.shape[0], z, u, *(t.contiguous() for t in (*norm_z, *norm_u, *gap, shift)), d, aux, z.stride(0),
            z.shape[1], float(alpha), *alpha_constants(alpha), MODE=divergence_mode(alpha))
    return d, aux
