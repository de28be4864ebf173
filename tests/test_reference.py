"""reference.py, the ground truth every kernel is judged by: its divergences in fp64 against mpmath at 50 digits."""
import pytest
import torch

from srpo_kernels import reference

mp = pytest.importorskip("mpmath", reason="mpmath (a dependency of torch's sympy) gives the 50-digit truth")


def _logits(scale, seed, v=300):
    """Student and teacher logits [2, v] of `scale`, independent draws."""
    g = torch.Generator().manual_seed(seed)
    return tuple(scale * torch.randn(2, v, generator=g, dtype=torch.float64) for _ in range(2))


def _log_softmax(row):
    x = [mp.mpf(t) for t in row]
    lse = mp.log(mp.fsum(mp.exp(t) for t in x))
    return [t - lse for t in x]


def _exact(z, u, alpha):
    """From the logits: the fp64 log-probs a caller passes are rounded, and not exactly normalised."""
    a = mp.mpf(alpha)
    out = []
    for row_z, row_u in zip(z.tolist(), u.tolist()):
        terms = []
        for x, y in zip(_log_softmax(row_z), _log_softmax(row_u)):
            p, q = mp.exp(x), mp.exp(y)
            if alpha == 0.0:
                terms.append(q * (y - x))
            elif alpha == 1.0:
                terms.append(p * (x - y))
            else:
                m = (1 - a) * p + a * q
                terms.append((1 - a) * p * mp.log(p / m) + a * q * mp.log(q / m))
        out.append(mp.fsum(terms))
    return out


@pytest.mark.parametrize("alpha", [0.0, 1e-8, 0.5, 1 - 1e-8, 1.0])
@pytest.mark.parametrize("rows", ["nearly_uniform", "sharp"])
def test_fp64_divergence_matches_mpmath(alpha, rows):
    """Nearly uniform rows at alpha = 1 - 1e-8 (and 1e-8) were 2.5e-4 off: lq - lm rounded at |lm|, above the
    log(q/m) ~ (1-a)(1 - p/q) it stood for. (The plain sums keep the reference plain: they lose digits only for a KL
    below ~1e-13, far under what an fp32 result can resolve.)"""
    mp.mp.dps = 50
    z, u = {"nearly_uniform": lambda: _logits(1e-3, 0), "sharp": lambda: _logits(30.0, 2)}[rows]()
    ours = reference.divergence(z.log_softmax(-1), u.log_softmax(-1), alpha)
    for got, want in zip(ours.tolist(), _exact(z, u, alpha)):
        assert abs(got - float(want)) <= 1e-6 * abs(float(want)), (got, float(want))
