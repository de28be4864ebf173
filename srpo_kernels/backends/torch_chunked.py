"""Chunked PyTorch backend: the five vocabulary-wide passes as tensor ops on one ``[C, V]`` chunk (any device);
the RowOps contract around them is tensor_row_ops.TensorRowOps, shared with the Triton backend."""
from __future__ import annotations

import torch

from .support import (exact_difference, jsd_terms, jsd_value_and_aux, log_ratio, log_s_entropy, phi_terms,
                      relative_difference, reverse_kl, shifted_logp, xlogy_diff)
from .tensor_row_ops import TensorRowOps


class TorchPasses:
    """row_ops.VocabPasses as tensor ops."""

    def lse_entropy(self, x):
        """Per-row (max m, log s with s = sum e^(x - m), entropy) of softmax(x); entries may be -inf.

        lse = m + log s. Log-probs and entropies come from the shifted form ((x - m) - log s, as log_softmax),
        never from x - lse: that rounds every log-prob at |lse|, an error that a near-certain token's log-prob
        (-3e-5 with logits of 5) or a sharp row's entropy takes whole (50x and 6x the naive error). A row with
        no finite entry (a top-K tail with nothing in it) gets lse = -inf and entropy 0. log s and the entropy in
        fp64 from the fp32 sums (support.log_s_entropy)."""
        top = x.argmax(-1, keepdim=True)
        m = x.gather(-1, top)
        y = x - torch.where(torch.isfinite(m), m, torch.zeros_like(m))  # an empty tail row (all -inf): lse -inf
        e = y.exp().scatter_(-1, top, 0.0)  # the max's own term, exactly 1, is kept out of the sum r
        r = e.sum(-1)
        t = torch.where(e > 0, e * y, torch.zeros_like(e)).sum(-1)
        # s = 1 + r and log s = log1p(r): on a sharp row fp32 cannot hold 1 + r, so log(s) and H would lose r.
        return (m.squeeze(-1),) + log_s_entropy(r, t)

    def full_divergence(self, z, u, norm_z, norm_u, gap, alpha, shift):
        """(D, aux) over the full vocabulary, see divergence_and_aux; ``norm_*`` = (row max, log s) of each side.
        log q - log p is taken as support.log_ratio (`gap` its pair); aux is a sum over the row, which vocabulary
        blocks add up (see row_ops.VocabPasses for `shift`)."""
        if alpha == 1.0:  # g = log p - log q (-log_ratio, bit for bit) and t = (z - u) - shift from one exact z - u
            s, e = exact_difference(z, u)
            g = (s - gap[0][:, None]).add_(e - gap[1][:, None])
            t = s.sub_(shift[:, None]).add_(e)
            return reverse_kl(shifted_logp(z, norm_z), shifted_logp(u, norm_u).exp(), g, t)
        delta = log_ratio(u, z, gap)
        lp, lq = shifted_logp(z, norm_z), shifted_logp(u, norm_u)
        if alpha == 0.0:  # KL(q||p) = sum q phi(log q - log p)
            d = phi_terms(lq.exp(), delta, lp.exp()).sum(-1)
            return d, torch.zeros_like(d)
        return jsd_value_and_aux(lp, lq, delta, alpha, shift)

    def fill_student_grad(self, z, norm, entropy, c_logp, c_ent):
        """z <- -c_logp p - c_ent p (log p + H), in place; ``norm`` = (row max, log s)."""
        log_p = shifted_logp(z, norm)
        p = log_p.exp()
        grad = -c_logp[:, None] * p
        if c_ent is not None:  # p (log p + H), 0 where p = 0 (-inf logits)
            grad -= c_ent[:, None] * xlogy_diff(p, log_p, -entropy[:, None])
        z.copy_(grad)

    def fill_distill_grad(self, z, u, norm_z, norm_u, gap, aux, c_logp, c_div, alpha, shift):
        """z <- c_div dD/dz - c_logp p over the full vocabulary, in place (``norm_*``, `gap` as in full_divergence)."""
        log_p = shifted_logp(z, norm_z)
        if alpha == 1.0:  # p (t - aux) with t = z - u - shift, as full_divergence took it
            grad = c_div[:, None] * xlogy_diff(log_p.exp(), relative_difference(z, u, shift), aux[:, None])
        elif alpha == 0.0:
            grad = c_div[:, None] * (log_p.exp() - shifted_logp(u, norm_u).exp())  # p - q, as the kernels take it
        else:  # (1-a) p (d - aux), d from delta as full_divergence took it
            d, _ = jsd_terms(log_ratio(u, z, gap), alpha)
            grad = c_div[:, None] * (1 - alpha) * xlogy_diff(log_p.exp(), d - shift[:, None], aux[:, None])
        grad -= c_logp[:, None] * log_p.exp()
        z.copy_(grad)

    def fill_tail_grad(self, z, norm_z, g_tail, norm_tail, c_logp):
        """z <- g_tail exp((z - m_t) - log s_t) - c_logp exp((z - m) - log s), in place (every entry as a tail
        member): exp(z - lse) would round each p at |lse|."""
        m_t, ls_t = norm_tail
        spread = torch.exp((z - m_t[:, None]) - ls_t[:, None])
        z.copy_(g_tail[:, None] * spread - c_logp[:, None] * torch.exp((z - norm_z[0][:, None]) - norm_z[1][:, None]))


# The torch passes peak at ~13 [V] fp32 rows per chunk row (1.72 GB extra at N = 2048, H = 256, V = 151 936, half
# SDPO, with 208-row chunks); sizing the chunk for 6 temporaries brings that to 290 MB there (below half the N x V
# logits), at the cost of small chunks.
TORCH_TEMPORARIES = 6


def torch_row_ops() -> TensorRowOps:
    return TensorRowOps(TorchPasses(), name="torch", temporaries=TORCH_TEMPORARIES)
