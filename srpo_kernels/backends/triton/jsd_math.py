"""Device functions shared by the kernels (phi_term and jsd_terms mirror support.phi_terms and support.jsd_terms)."""
import triton
import triton.language as tl


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0, with the rounding of 1 + x corrected (exact to fp32 however small x is)."""
    u = 1.0 + x
    return tl.log(u) - ((u - 1.0) - x) / u


@triton.jit
def phi_term(p, g, pe):
    """p phi(g), phi(g) = g + exp(-g) - 1, for g = log p - log q given pe = p exp(-g) = q: the series (to g^7)
    below |g| = 0.25, else the direct form p g + (pe - p); pe (the limit) where p = 0."""
    small = tl.abs(g) < 0.25
    gs = tl.where(small, g, 0.0)
    poly = -1.9841270e-4 * gs + 1.3888889e-3
    poly = poly * gs - 8.3333333e-3
    poly = poly * gs + 4.1666667e-2
    poly = poly * gs - 1.6666667e-1
    poly = poly * gs + 0.5
    term = tl.where(small, p * gs * gs * poly, p * g + (pe - p))
    return tl.where(p > 0, term, pe)


@triton.jit
def jsd_terms(delta, log_beta, c0, c1):
    """d = log(p / m), e = log(q / m) from delta = log q - log p; c0 = -log(1-a), c1 = -log(a)."""
    s = delta + log_beta
    soft = log1p(tl.exp(-tl.abs(s)))
    pos = s > 0
    d = tl.where(pos, -(delta + (soft - c1)), c0 - soft)
    e = tl.where(pos, c1 - soft, delta + (c0 - soft))
    return d, e


@triton.jit
def exact_difference(a, b):
    """a - b as (s, e), s + e exact, as support.exact_difference (0 for e where s is not finite)."""
    s = a - b
    av = s + b
    bv = s - av
    e = (a - av) - (b + bv)
    return s, tl.where(e == e, e, 0.0)


@triton.jit
def log_ratio(uv, zv, gap_hi, gap_lo):
    """log q - log p = (u - z) + gap as support.log_ratio takes it."""
    s, e = exact_difference(uv, zv)
    return (s + gap_hi) + (e + gap_lo)
