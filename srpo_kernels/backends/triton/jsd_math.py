"""Device functions shared by the kernels (jsd_terms mirrors support.jsd_terms)."""
import triton
import triton.language as tl


@triton.jit
def log1p(x):
    """log(1 + x) for x >= 0, with the rounding of 1 + x corrected (exact to fp32 however small x is)."""
    u = 1.0 + x
    return tl.log(u) - ((u - 1.0) - x) / u


@triton.jit
def jsd_terms(lp, lq, log_beta):
    """d = log p - log m + log(1-a), e = log q - log m + log a via softplus of s = log(a q / ((1-a) p))."""
    s = lq - lp + log_beta
    soft = log1p(tl.exp(-tl.abs(s)))
    return -(tl.maximum(s, 0.0) + soft), -(tl.maximum(-s, 0.0) + soft)
