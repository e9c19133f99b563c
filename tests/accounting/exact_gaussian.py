r"""Closed-form privacy profile of the Gaussian mechanism: the independent truth of the tests.

Balle & Wang 2018, "Improving the Gaussian mechanism for differential privacy", Thm. 8: the
Gaussian mechanism with sensitivity 1 and noise sigma is (eps, delta(eps))-DP exactly for

    delta(eps) = Phi(-eps * s + 1 / (2 s)) - e^eps * Phi(-eps * s - 1 / (2 s)),   s = sigma,

and for nothing smaller. Its trade-off curve is the mu-GDP curve, mu = 1 / sigma
(Dong, Roth, Su 2019): TPR(fpr) = Phi(Phi^-1(fpr) + mu).
"""

from __future__ import annotations

import math


def exact_gaussian_delta(sigma: float, eps: float) -> float:
    from scipy.stats import norm

    return float(
        norm.cdf(-eps * sigma + 1 / (2 * sigma))
        - math.exp(eps) * norm.cdf(-eps * sigma - 1 / (2 * sigma))
    )


def exact_gaussian_epsilon(sigma: float, delta: float) -> float:
    from scipy.optimize import brentq

    return float(
        brentq(lambda e: exact_gaussian_delta(sigma, e) - delta, 0.0, 100.0, xtol=1e-14, rtol=1e-14)
    )


def exact_gaussian_tpr(sigma: float, fpr: float) -> float:
    from scipy.stats import norm

    return float(norm.cdf(norm.ppf(fpr) + 1.0 / sigma))
