r"""Renyi DP of the Poisson-subsampled Gaussian mechanism (stdlib ``math`` + numpy only).

Mironov, Talwar, Zhang 2019, "Renyi Differential Privacy of the Sampled Gaussian
Mechanism" (arXiv:1908.10530), Sec. 3: one step with sampling rate :math:`q` and noise
multiplier :math:`\sigma` (sensitivity 1) has, under add/remove-one adjacency, the exact RDP

.. math::

    \varepsilon(\alpha) = \frac{\log A_\alpha}{\alpha - 1}, \qquad
    A_\alpha = \mathbb{E}_{z \sim N(0, \sigma^2)}
        \Big[\big(1 - q + q\, e^{(2z - 1)/(2\sigma^2)}\big)^\alpha\Big].

This is the Renyi divergence of the worse of the two orderings (Mironov et al. Thm. 4/5);
it is an exact value, not a bound, and it is the same curve for dp_accounting's
REPLACE_SPECIAL relation. For :math:`q = 1` it is :math:`\alpha / (2\sigma^2)` exactly.

Both evaluations below compute :math:`\log(A_\alpha - 1)` from sums of *non-negative*
terms, so that :math:`\log A_\alpha` = ``logaddexp(0, log(A - 1))`` keeps full relative
precision even when :math:`A_\alpha - 1` is below the double precision of 1 (Opacus and
dp_accounting sum terms of size 1 and lose it there).

* Integer :math:`\alpha` (Mironov et al. Sec. 3.3, binomial expansion): with
  :math:`b_i = \binom{\alpha}{i} q^i (1-q)^{\alpha-i}` and :math:`\sum_i b_i = 1`,
  :math:`\sum_i i\, b_i = \alpha q`,

  .. math:: A_\alpha - 1 = \sum_{i=2}^{\alpha} b_i \,\mathrm{expm1}\big(i(i-1)/(2\sigma^2)\big).

* Fractional :math:`\alpha`: Mironov et al. give a two-series formula (Sec. 3.3) whose series
  converge only polynomially near their split point (Opacus loops thousands of terms there,
  e.g. 5 ms per order at q = 0.05, sigma = 0.8). We evaluate the defining integral instead.
  With :math:`w = q(e^u - 1)`, :math:`u = (2z-1)/(2\sigma^2)`, :math:`\ell = \log(1+w)`,
  :math:`\beta = \alpha - 1` and :math:`\mathbb{E}[w] = 0` (the likelihood ratio has mean 1):

  .. math::

      A_\alpha - 1 = \mathbb{E}\big[(1+w)^\alpha - 1 - \alpha w\big]
                   = \mathbb{E}\big[\beta\, P(w) + (1+w)\, E(\beta\ell)\big],

  :math:`P(w) = (1+w)\log(1+w) - w \ge 0`, :math:`E(x) = e^x - 1 - x \ge 0`. The integrand
  is analytic in the strip :math:`|\mathrm{Im}\, z/\sigma| < \pi\sigma`, so the trapezoid rule
  in :math:`t = z/\sigma` with step :math:`h = \min(0.5, \sigma/3)` converges
  geometrically (the tests find it within 1e-13 relative of the exact integer formula, and
  check it against Opacus's two-series implementation and an mpmath integral). Truncating
  to :math:`t \in [-20, \alpha/\sigma + 20]` drops a relative :math:`e^{-200}`: the
  log-integrand's stationary points satisfy :math:`z = \alpha\, p(z)` with
  :math:`p \in (0, 1)`, and outside :math:`[0, \alpha/\sigma]` it falls at least as fast as
  :math:`-t^2/2`. When the grid would exceed ``_MAX_NODES`` nodes (fractional orders above
  about :math:`\min(6 \cdot 10^4 \sigma^2, 10^5 \sigma)`), we return the linear
  interpolation of :math:`\log A` between the
  neighbouring integer orders: an upper bound, since :math:`\log A_\alpha` is a cumulant
  generating function, convex in :math:`\alpha`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent, merge_events
from maskdp.accounting.relations import Relation, parse_relation
from numpy.typing import ArrayLike

MAX_ORDER = 1e6
"""Largest accepted Renyi order (integer orders cost ``alpha`` terms each)."""

_MAX_NODES = 200_000  # quadrature nodes of one order; beyond: convexity bound
_MAX_CELLS = 2_000_000  # orders x nodes evaluated at once
_T_LO = -20.0
_T_PAD = 20.0
_LOG_SQRT_2PI = 0.5 * math.log(2.0 * math.pi)


def _default_orders() -> np.ndarray:
    fine = 1.0 + np.arange(1, 10) / 100.0  # 1.01 .. 1.09
    low = 1.1 + np.arange(0, 38) * 0.05  # 1.10 .. 2.95
    mid = 3.0 + np.arange(0, 80) * 0.1  # 3.0 .. 10.9
    high = 10.0 + np.arange(0, 40) * 0.25  # 10 .. 19.75
    integers = np.arange(11.0, 64.0)  # 11 .. 63
    powers = 2.0 ** np.arange(7, 11)  # 128 .. 1024
    geometric = np.round(np.geomspace(20.0, 10_000.0, 120))  # integers 20 .. 10_000
    grid = np.concatenate([fine, low, mid, high, integers, powers, geometric, _LIBRARY_ORDERS])
    return np.unique(np.round(grid, 6))


_LIBRARY_ORDERS = np.array(
    [1 + x / 10.0 for x in range(1, 100)]  # Opacus DEFAULT_ALPHAS, dp_accounting, TF-Privacy
    + [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5]  # TF-Privacy compute_dp_sgd_privacy
    + list(range(5, 64))
    + [128, 256, 512, 1024]
)
"""The default order grids of Opacus (``RDPAccountant.DEFAULT_ALPHAS``), dp_accounting
(``DEFAULT_RDP_ORDERS``) and TF-Privacy (``compute_dp_sgd_privacy_lib``): ours contains
them all, so our epsilon is never above theirs on their own grids."""


DEFAULT_ORDERS: np.ndarray = _default_orders()
DEFAULT_ORDERS.setflags(write=False)
"""Renyi orders used by default: 1.01..1.09 by 0.01, 1.1..2.95 by 0.05, 3..10.9 by 0.1,
10..19.75 by 0.25, the integers 11..63, 128..1024, then 120 integers geometric from 20 to
10_000 (310 orders, sorted). A superset of Opacus's, dp_accounting's and TF-Privacy's
default grids (``_LIBRARY_ORDERS``)."""


# --------------------------------------------------------------------------- integer orders

_logfact_cache: list[np.ndarray] = [np.zeros(1)]


def _log_factorials(n: int) -> np.ndarray:
    """``log(k!)`` for k = 0..n (cached, grows on demand; never handed out for writing)."""
    table = _logfact_cache[0]
    if table.size <= n:
        size = max(n + 1, 2 * table.size)
        table = np.array([math.lgamma(k + 1.0) for k in range(size)])
        table.setflags(write=False)
        _logfact_cache[0] = table
    return table


def _log_expm1(x: np.ndarray) -> np.ndarray:
    """``log(expm1(x))`` for x >= 0 (-inf at 0), without overflow."""
    out = np.empty_like(x)
    big = x > 30.0
    xb = x[big]
    out[big] = xb + np.log1p(-np.exp(-xb))
    small = ~big
    out[small] = np.log(np.expm1(x[small]))
    return out


def _log_am1_integer(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r"""``log(A_alpha - 1)`` at integer orders >= 2: log-sum-exp of the positive terms
    :math:`b_i\, \mathrm{expm1}(i(i-1)/(2\sigma^2))`, i = 2..alpha, vectorised over orders."""
    a = alphas.astype(np.int64)
    counts = a - 1  # terms i = 2..a
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    seg = np.repeat(np.arange(a.size), counts)
    i = np.arange(int(counts.sum())) - np.repeat(starts - 2, counts)
    top = int(a.max())
    logfact = _log_factorials(top)
    log_q, log_1mq = math.log(q), math.log1p(-q)
    # Split log b_i + log expm1(c_i) into a part in i alone, one in (n - i) and one in n.
    k = np.arange(top + 1, dtype=float)
    with np.errstate(divide="ignore"):
        by_i = (
            _log_expm1(k * (k - 1.0) / (2.0 * sigma * sigma))
            + k * (log_q - log_1mq)
            - logfact[: top + 1]
        )
    by_n = logfact[a] + a * log_1mq
    terms = by_i[i] - logfact[a[seg] - i]
    peak = np.maximum.reduceat(terms, starts)
    terms -= peak[seg]
    sums = np.add.reduceat(np.exp(terms, out=terms), starts)
    return by_n + peak + np.log(sums)


# ------------------------------------------------------------------------ fractional orders


def _series(x: np.ndarray, coefficients: np.ndarray) -> np.ndarray:
    """Horner evaluation of ``sum_k coefficients[k] * x**k``."""
    acc = np.full_like(x, coefficients[-1])
    for c in coefficients[-2::-1]:
        acc = acc * x + c
    return acc


# P(w) / w^2 = sum_{k>=2} (-w)^(k-2) / (k(k-1)), |w| < 0.25: 30 terms reach 1e-20.
_P_COEFFS = np.array([(-1.0) ** j / ((j + 2) * (j + 1)) for j in range(30)])
# E(x) / x^2 = sum_{k>=2} x^(k-2) / k!, |x| < 0.25: 16 terms reach 1e-25.
_E_COEFFS = np.array([1.0 / math.factorial(j + 2) for j in range(16)])


def _log_p(ell: np.ndarray) -> np.ndarray:
    r"""``log P(w)``, :math:`P(w) = (1+w)\log(1+w) - w \ge 0`, as a function of ``ell = log1p(w)``."""
    out = np.empty_like(ell)
    big = ell > 2.0
    e = ell[big]
    out[big] = e + np.log(e - 1.0 + np.exp(-e))
    w = np.expm1(np.minimum(ell, 2.0))
    small = ~big & (np.abs(w) < 0.25)
    ws = w[small]
    with np.errstate(divide="ignore"):  # w == 0 exactly gives -inf, as it should
        out[small] = 2.0 * np.log(np.abs(ws)) + np.log(_series(ws, _P_COEFFS))
    mid = ~(big | small)
    e, wm = ell[mid], w[mid]
    out[mid] = np.log(np.exp(e) * e - wm)
    return out


def _log_e(x: np.ndarray) -> np.ndarray:
    r"""``log E(x)``, :math:`E(x) = e^x - 1 - x \ge 0`."""
    out = np.empty_like(x)
    small = np.abs(x) < 0.25
    big = x > 30.0
    mid = ~(small | big)
    xs = x[small]
    with np.errstate(divide="ignore"):
        out[small] = 2.0 * np.log(np.abs(xs)) + np.log(_series(xs, _E_COEFFS))
    xb = x[big]
    out[big] = xb + np.log1p(-(1.0 + xb) * np.exp(-xb))
    xm = x[mid]
    out[mid] = np.log(np.expm1(xm) - xm)
    return out


def _quadrature_step(sigma: float) -> float:
    return min(0.5, sigma / 3.0)


def _quadrature_nodes(sigma: float, alpha: float) -> float:
    """Nodes of the trapezoid grid (a float: it may be astronomically large or inf)."""
    return math.ceil(min((alpha / sigma + _T_PAD - _T_LO) / _quadrature_step(sigma), 1e300)) + 1


def _chunks(alphas: np.ndarray, nodes: Callable[[float], float]) -> Iterator[np.ndarray]:
    """Indices of ``alphas`` in sorted chunks that share the quadrature nodes of their
    largest member (extra nodes only add negligible mass), at most ``_MAX_CELLS`` matrix
    cells a chunk; ``nodes(alpha)`` is the node count an order needs."""
    order = np.argsort(alphas)
    start = 0
    while start < order.size:
        stop = start + 1
        while (
            stop < order.size
            and (stop + 1 - start) * nodes(float(alphas[order[stop]])) <= _MAX_CELLS
        ):
            stop += 1
        yield order[start:stop]
        start = stop


def _log_am1_fractional(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    r"""``log(A_alpha - 1)`` by the trapezoid rule on :math:`t = z/\sigma` (module docstring)."""
    h = _quadrature_step(sigma)
    out = np.empty(alphas.size)
    for chunk in _chunks(alphas, lambda a: _quadrature_nodes(sigma, a)):
        out[chunk] = _trapezoid(q, sigma, h, alphas[chunk])
    return out


def _log1p_w(q: float, u: np.ndarray) -> np.ndarray:
    """``log(1 + w)``, ``w = q * expm1(u)``: via log1p where it cannot overflow (exact for
    tiny w, where ``logaddexp(log1p(-q), log(q) + u)`` would cancel), logaddexp beyond."""
    big = u > 700.0
    return np.where(
        big,
        np.logaddexp(math.log1p(-q), math.log(q) + u),
        np.log1p(q * np.expm1(np.minimum(u, 700.0))),
    )


def _trapezoid(q: float, sigma: float, h: float, alphas: np.ndarray) -> np.ndarray:
    t = _T_LO + h * np.arange(int(_quadrature_nodes(sigma, float(alphas.max()))))
    u = t / sigma - 1.0 / (2.0 * sigma * sigma)
    ell = _log1p_w(q, u)
    log_weight = math.log(h) - 0.5 * t * t - _LOG_SQRT_2PI
    log_p = _log_p(ell)
    beta = (alphas - 1.0)[:, None]
    log_e = _log_e((beta * ell).ravel()).reshape(beta.size, t.size)
    terms = log_weight + np.logaddexp(np.log(beta) + log_p, ell + log_e)
    peak = terms.max(axis=1)
    return peak + np.log(np.exp(terms - peak[:, None]).sum(axis=1))


def _log_a(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """``log A_alpha`` for 0 < q < 1 at any orders > 1 (shape of ``alphas``)."""
    out = np.empty(alphas.size)
    is_int = alphas == np.floor(alphas)
    if is_int.any():
        out[is_int] = np.logaddexp(0.0, _log_am1_integer(q, sigma, alphas[is_int]))
    frac = ~is_int
    if frac.any():
        fa = alphas[frac]
        direct = np.array([_quadrature_nodes(sigma, a) <= _MAX_NODES for a in fa])
        vals = np.empty(fa.size)
        if direct.any():
            vals[direct] = np.logaddexp(0.0, _log_am1_fractional(q, sigma, fa[direct]))
        if not direct.all():
            vals[~direct] = _log_a_interpolated(q, sigma, fa[~direct])
        out[frac] = vals
    return out


def _log_a_interpolated(q: float, sigma: float, alphas: np.ndarray) -> np.ndarray:
    """Upper bound on ``log A_alpha`` by convexity: interpolate between floor and ceil."""
    lo, hi = np.floor(alphas), np.ceil(alphas)
    log_lo = np.zeros(alphas.size)  # log A_1 = 0
    has_lo = lo >= 2
    if has_lo.any():
        log_lo[has_lo] = np.logaddexp(0.0, _log_am1_integer(q, sigma, lo[has_lo]))
    log_hi = np.logaddexp(0.0, _log_am1_integer(q, sigma, hi))
    frac = alphas - lo
    return (1.0 - frac) * log_lo + frac * log_hi


# ------------------------------------------------------------------------------- public API


def _check_orders(orders: ArrayLike) -> np.ndarray:
    arr = _validate.orders(orders)
    if (arr > MAX_ORDER).any():
        raise InvalidParameterError(f"orders must be <= {MAX_ORDER:g}, got {arr.max()!r}")
    return arr


def rdp_poisson_gaussian(
    sample_rate: float, noise_multiplier: float, orders: ArrayLike
) -> np.ndarray:
    r"""Exact RDP of ONE step of the Poisson-subsampled Gaussian mechanism at each order.

    :math:`\varepsilon(\alpha) = \log A_\alpha / (\alpha - 1)` (Mironov, Talwar, Zhang 2019,
    Sec. 3; see the module docstring for how it is evaluated); :math:`\alpha/(2\sigma^2)` when
    ``sample_rate == 1``. Exact value (not a bound) up to floating point, except fractional
    orders above about ``min(6e4 * sigma**2, 1e5 * sigma)``, which get a convexity upper
    bound (module docstring).

    Args:
        sample_rate: q in (0, 1].
        noise_multiplier: sigma > 0.
        orders: Renyi orders, finite, > 1 and <= ``MAX_ORDER``.

    Returns:
        A new float array of the same length as ``orders``, all finite and >= 0.
    """
    q = _validate.sample_rate("sample_rate", sample_rate)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    alphas = _check_orders(orders)
    if q == 1.0:
        with np.errstate(over="ignore", divide="ignore"):
            return alphas / (2.0 * sigma * sigma)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        log_a = _log_a(q, sigma, alphas)
    # Floating point gives up only when the privacy loss is astronomically large (sigma
    # tiny): +inf is then the safe value. NaN must never turn into a small epsilon.
    log_a = np.where(np.isnan(log_a), np.inf, log_a)
    return np.maximum(log_a, 0.0) / (alphas - 1.0)


def rdp_of_events(
    events: Sequence[PoissonGaussianEvent],
    orders: ArrayLike = DEFAULT_ORDERS,
    *,
    relation: Relation | str = "erase",
) -> np.ndarray:
    r"""RDP of the composition of ``events``: :math:`\sum_e \text{steps}_e\, \varepsilon_e(\alpha)`.

    RDP composes additively (Mironov 2017, Prop. 1). Events with equal (q, sigma) are
    evaluated once (:func:`~maskdp.accounting.events.merge_events`). An empty sequence gives
    zeros. ``relation="substitute"`` uses the antipodal pair
    (:func:`~maskdp.accounting.rdp_substitute.rdp_substitute`).
    """
    alphas = _check_orders(orders)
    per_step = rdp_poisson_gaussian
    if parse_relation(relation) is Relation.SUBSTITUTE:
        from maskdp.accounting.rdp_substitute import rdp_substitute as per_step
    rdp = np.zeros(alphas.size)
    for event in merge_events(events):
        rdp += event.steps * per_step(event.sample_rate, event.noise_multiplier, alphas)
    return rdp
