"""z <- -c_logp p - c_ent p (log p + H), in place (the target term and rebalance are added by the caller)."""
import triton
import triton.language as tl

from .launch import Launcher


@triton.jit
def student_grad_kernel(z_ptr, m_ptr, log_s_ptr, ent_ptr, c_logp_ptr, c_ent_ptr, stride, n_cols, HAS_ENT: tl.constexpr,
                        BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    m = tl.load(m_ptr + row)
    log_s = tl.load(log_s_ptr + row)
    a = tl.load(c_logp_ptr + row)
    for start in range(0, n_cols, BLOCK):
        cols = start + tl.arange(0, BLOCK)
        mask = cols < n_cols
        ptr = z_ptr + row * stride + cols
        lp = tl.load(ptr, mask=mask, other=0.0).to(tl.float32) - m - log_s  # (z - m) - log s, as log_softmax rounds
        p = tl.exp(lp)
        g = -a * p
        if HAS_ENT:
            g -= tl.load(c_ent_ptr + row) * tl.where(p > 0, p * (lp + tl.load(ent_ptr + row)), 0.0)  # -inf logits
        tl.store(ptr, g, mask=mask)


_launch = Launcher(student_grad_kernel, writes=("z_ptr",))


def fill_student_grad(z, norm, entropy, c_logp, c_ent):
    has_ent = c_ent is not None
    _launch(z.shape[0], z, norm[0].contiguous(), norm[1].contiguous(), entropy.contiguous(), c_logp.contiguous(),
            c_ent.contiguous() if has_ent else c_logp, z.stride(0), z.shape[1], HAS_ENT=has_ent)
