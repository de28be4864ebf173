"""Prints the coefficients of csrc/srpo_cpu.cpp's log1p_unit: log1p(t) = t + t^2 r(t) on [0, 1], r the degree-9
Chebyshev least-squares fit of (log1p(t) - t) / t^2, in powers of t, highest first (Horner order).

    .venv/bin/python scripts/fit_log1p.py
"""
import numpy as np
from numpy.polynomial import Polynomial, chebyshev

t = np.linspace(1e-6, 1.0, 400_001)
fit = chebyshev.chebfit(2 * t - 1, (np.log1p(t) - t) / t**2, 9)  # on x = 2t - 1 in [-1, 1]
coef = Polynomial(chebyshev.cheb2poly(fit))(Polynomial([-1.0, 2.0])).coef  # back to powers of t
print("\n".join(f"{c:.9e}f" for c in coef[::-1]))
