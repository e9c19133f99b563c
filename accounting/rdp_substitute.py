r"""Renyi DP of one step under ``substitute``: the antipodal pair, by quadrature.

The pair (:mod:`maskdp.accounting.loss_pairs`) is :math:`P = (1-q)N(0, \sigma^2) +
qN(1, \sigma^2)`, :math:`Q = (1-q)N(0, \sigma^2) + qN(-1, \sigma^2)`; it is symmetric, so
:math:`D_\alpha(P \| Q) = D_\alpha(Q \| P)` and

.. math::

    \varepsilon(\alpha) = \frac{\log A_\alpha}{\alpha - 1}, \qquad
    A_\alpha - 1 = \mathbb{E}_Q\big[r^\alpha - 1 - \alpha (r - 1)\big]
                = \mathbb{E}_Q\big[\beta P(w) + (1 + w) E(\beta \ell)\big],

with :math:`r = p/q`, :math:`w = r - 1`, :math:`\ell = \log r`, :math:`\beta = \alpha - 1`
and :math:`\mathbb{E}_Q[w] = 0`; :math:`P` and :math:`E` are the non-negative functions of
:mod:`maskdp.accounting.rdp`, whose trapezoid rule in :math:`t = x/\sigma` this module reuses
(step :math:`\min(0.5, \sigma/3)`, from :math:`t = -20 - 1/\sigma` to
:math:`2\alpha/\sigma + 20`: the integrand :math:`q\,r^\alpha` peaks below
:math:`x = 2\alpha`). Where that grid would exceed ``_MAX_NODES`` nodes we return
:math:`2\alpha/\sigma^2`, the RDP of :math:`N(1, \sigma^2)` against :math:`N(-1, \sigma^2)`:
an upper bound, since the pair is their post-processing (with probability :math:`1-q`
replace the output by fresh :math:`N(0, \sigma^2)` noise).

No closed form is known to us; the tests check the quadrature against scipy's adaptive
``quad`` of the defining integral and the resulting epsilons against dp_accounting's
REPLACE_ONE privacy loss distribution (which they must never undercut). Converted to
(epsilon, delta), this RDP bound is looser than the PRV answer (docs/privacy.md).
"""

from __future__ import annotations

import math

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.loss_pairs import LossPair
from maskdp.accounting.rdp import (
    _LOG_SQRT_2PI,
    _MAX_NODES,
    _T_LO,
    _T_PAD,
    _check_orders,
    _chunks,
    _log_e,
    _log_p,
    _quadrature_step,
)
from maskdp.accounting.relations import Relation
from numpy.typing import ArrayLike


def _nodes(sigma: float, alpha: float) -> float:
    span = 2.0 * alpha / sigma + _T_PAD - (_T_LO - 1.0 / sigma)
    return math.ceil(min(span / _quadrature_step(sigma), 1e300)) + 1


def _log_am1(pair: LossPair, alphas: np.ndarray) -> np.ndarray:
    """``log(A_alpha - 1)`` for sorted chunks of orders sharing the largest one's nodes."""
    q, sigma = pair.q, pair.sigma
    h = _quadrature_step(sigma)
    out = np.empty(alphas.size)
    for chunk in _chunks(alphas, lambda a: _nodes(sigma, a)):
        t = (_T_LO - 1.0 / sigma) + h * np.arange(int(_nodes(sigma, float(alphas[chunk].max()))))
        ell = pair.loss(t * sigma)
        log_q_density = np.logaddexp(
            math.log1p(-q) - 0.5 * t * t, math.log(q) - 0.5 * (t + 1.0 / sigma) ** 2
        )
        log_weight = math.log(h) + log_q_density - _LOG_SQRT_2PI
        beta = (alphas[chunk] - 1.0)[:, None]
        log_e = _log_e((beta * ell).ravel()).reshape(beta.size, t.size)
        terms = log_weight + np.logaddexp(np.log(beta) + _log_p(ell), ell + log_e)
        peak = terms.max(axis=1)
        out[chunk] = peak + np.log(np.exp(terms - peak[:, None]).sum(axis=1))
    return out


def rdp_substitute(sample_rate: float, noise_multiplier: float, orders: ArrayLike) -> np.ndarray:
    r"""RDP of ONE step of the Poisson-subsampled Gaussian under ``substitute`` (replace-one).

    :math:`\varepsilon(\alpha) = D_\alpha(P \| Q)` of the antipodal pair (module docstring);
    :math:`2\alpha/\sigma^2` when ``sample_rate == 1`` (and, as an upper bound, at orders
    whose quadrature grid would be too large).

    Args:
        sample_rate: q in (0, 1].
        noise_multiplier: sigma > 0.
        orders: Renyi orders, finite, > 1 and <= ``MAX_ORDER``.

    Returns:
        A new float array of the same length as ``orders``, all >= 0.
    """
    q = _validate.sample_rate("sample_rate", sample_rate)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    alphas = _check_orders(orders)
    with np.errstate(over="ignore", divide="ignore"):
        full = 2.0 * alphas / (sigma * sigma)
    if q == 1.0:
        return full
    direct = np.array([_nodes(sigma, float(a)) <= _MAX_NODES for a in alphas], dtype=bool)
    out = full.copy()
    if direct.any():
        pair = LossPair(q, sigma, Relation.SUBSTITUTE)
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            log_a = np.logaddexp(0.0, _log_am1(pair, alphas[direct]))
        log_a = np.where(np.isnan(log_a), np.inf, log_a)
        out[direct] = np.minimum(np.maximum(log_a, 0.0) / (alphas[direct] - 1.0), full[direct])
    return out
