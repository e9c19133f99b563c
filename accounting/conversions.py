r"""From an RDP curve to (epsilon, delta)-DP (stdlib ``math`` + numpy only).

A mechanism with RDP :math:`\rho(\alpha)` at every order of a grid is
:math:`(\varepsilon, \delta)`-DP for every order of the grid with

* ``"hypothesis-test"`` (default): Balle, Barthe, Gaboardi, Hsu, Sato 2020, "Hypothesis
  testing interpretations and Renyi differential privacy", Thm. 21:
  :math:`\varepsilon = \rho(\alpha) + \log\frac{\alpha-1}{\alpha}
  - \frac{\log\delta + \log\alpha}{\alpha-1}`;
* ``"classic"``: Mironov 2017, "Renyi Differential Privacy", Prop. 3:
  :math:`\varepsilon = \rho(\alpha) + \frac{\log(1/\delta)}{\alpha-1}`.

Both are *upper bounds* on the true epsilon; we take the minimum over the grid and clamp at
0. The hypothesis-test bound is never larger than the classic one at the same order, since
:math:`\log\frac{\alpha-1}{\alpha} - \frac{\log\alpha}{\alpha-1} < 0`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.choices import CONVERSIONS, Conversion
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.rdp import DEFAULT_ORDERS, MAX_ORDER, rdp_of_events
from numpy.typing import ArrayLike


@dataclass(frozen=True)
class EpsilonResult:
    """An (epsilon, delta)-DP guarantee derived from RDP.

    Attributes:
        epsilon: the upper bound on epsilon (>= 0; ``inf`` if every order has infinite RDP).
        delta: the delta it holds for.
        order: the Renyi order that attains the minimum (the first grid order when the RDP
            curve is identically 0, i.e. nothing was released).
        at_grid_edge: True when that order is the first or last of the grid while
            epsilon > 0: a wider grid could give a smaller epsilon.
        conversion: ``"hypothesis-test"`` or ``"classic"``.
    """

    epsilon: float
    delta: float
    order: float
    at_grid_edge: bool
    conversion: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_curve(orders: ArrayLike, rdp: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    alphas = _validate.orders(orders)
    try:
        values = np.array(rdp, dtype=float, ndmin=1)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"rdp must be numbers >= 0, got {rdp!r}") from None
    if values.shape != alphas.shape:
        raise InvalidParameterError(
            f"rdp must have the same length as orders ({alphas.size}), got shape {values.shape}"
        )
    bad = np.isnan(values) | (values < 0)
    if bad.any():
        raise InvalidParameterError(
            f"rdp must be numbers >= 0 (inf allowed), got {values[bad][0]!r}"
        )
    return alphas, values


def _epsilons(alphas: np.ndarray, rdp: np.ndarray, log_delta: float, conversion: str) -> np.ndarray:
    """Unclamped epsilon bound at each order."""
    if conversion == "classic":
        return rdp - log_delta / (alphas - 1.0)
    return rdp + np.log1p(-1.0 / alphas) - (log_delta + np.log(alphas)) / (alphas - 1.0)


def rdp_to_epsilon(
    orders: ArrayLike,
    rdp: ArrayLike,
    delta: float,
    *,
    conversion: Conversion = "hypothesis-test",
    refine: bool = False,
) -> EpsilonResult:
    r"""Smallest epsilon over the grid such that the RDP curve implies (epsilon, delta)-DP.

    Upper bound (see the module docstring for both conversions), clamped at 0. Warns
    (``RuntimeWarning``) when the minimising order is the first or last of the grid.

    Args:
        orders: Renyi orders > 1.
        rdp: RDP at each order (>= 0, ``inf`` allowed).
        delta: in (0, 1).
        conversion: ``"hypothesis-test"`` (Balle et al. 2020, Thm. 21) or ``"classic"``
            (Mironov 2017, Prop. 3).
        refine: not available from a bare curve (it needs the mechanism); use
            :func:`epsilon_from_events`. Passing True raises InvalidParameterError.
    """
    alphas, values = _check_curve(orders, rdp)
    d = _validate.open_unit("delta", delta)
    conv = _validate.choice("conversion", conversion, CONVERSIONS)
    if refine:
        raise InvalidParameterError(
            "refine needs the mechanism, not only its RDP curve; use epsilon_from_events(..., refine=True)"
        )
    return _minimise(alphas, values, d, conv)


def _minimise(
    alphas: np.ndarray, values: np.ndarray, delta: float, conversion: str
) -> EpsilonResult:
    if not values.any():  # identically zero: nothing was released
        return EpsilonResult(0.0, delta, float(alphas[0]), False, conversion)
    with np.errstate(invalid="ignore"):
        eps = _epsilons(alphas, values, math.log(delta), conversion)
    if np.isinf(eps).all():
        return EpsilonResult(math.inf, delta, float(alphas[0]), False, conversion)
    k = int(np.argmin(eps))
    epsilon = max(0.0, float(eps[k]))
    edge = epsilon > 0 and alphas.size > 1 and k in (0, alphas.size - 1)
    if edge:
        side = "smallest" if k == 0 else "largest"
        warnings.warn(
            f"the optimal Renyi order {alphas[k]:g} is the {side} order of the grid; "
            "a wider grid may give a smaller epsilon",
            RuntimeWarning,
            stacklevel=3,
        )
    return EpsilonResult(epsilon, delta, float(alphas[k]), bool(edge), conversion)


def rdp_to_delta(
    orders: ArrayLike,
    rdp: ArrayLike,
    epsilon: float,
    *,
    conversion: Conversion = "hypothesis-test",
) -> float:
    r"""Smallest delta over the grid such that the RDP curve implies (epsilon, delta)-DP.

    Upper bound, the inverse of :func:`rdp_to_epsilon` at each order, clamped to [0, 1]:

    * classic: :math:`\delta = \exp((\alpha-1)(\rho(\alpha) - \varepsilon))`;
    * hypothesis-test (Thm. 21 solved for delta):
      :math:`\log\delta = (\alpha-1)\big(\rho(\alpha) - \varepsilon + \log\frac{\alpha-1}{\alpha}\big) - \log\alpha`.
    """
    alphas, values = _check_curve(orders, rdp)
    eps = _validate.non_negative("epsilon", epsilon)
    conv = _validate.choice("conversion", conversion, CONVERSIONS)
    if not values.any():
        return 0.0
    with np.errstate(invalid="ignore", over="ignore"):
        if conv == "classic":
            log_delta = (alphas - 1.0) * (values - eps)
        else:
            log_delta = (alphas - 1.0) * (values - eps + np.log1p(-1.0 / alphas)) - np.log(alphas)
    best = float(np.nanmin(log_delta))
    return min(1.0, math.exp(best)) if best < 0 else 1.0


def epsilon_from_events(
    events: Sequence[PoissonGaussianEvent],
    delta: float,
    *,
    conversion: Conversion = "hypothesis-test",
    orders: ArrayLike = DEFAULT_ORDERS,
    refine: bool = False,
) -> EpsilonResult:
    r"""RDP epsilon of a composition of events (upper bound), optionally refined.

    With ``refine=True`` the RDP curve is recomputed at continuous orders between the two
    grid neighbours of the grid minimiser and minimised by golden-section search; the result
    is the smaller of the grid and refined values, so it is never larger than the grid
    result and stays an upper bound (any order gives a valid bound).
    """
    alphas = _validate.orders(orders)
    d = _validate.open_unit("delta", delta)
    conv = _validate.choice("conversion", conversion, CONVERSIONS)
    events = tuple(events)
    values = rdp_of_events(events, alphas)
    with warnings.catch_warnings():
        if refine:
            warnings.simplefilter("ignore", RuntimeWarning)
        result = _minimise(alphas, values, d, conv)
    if not refine or result.epsilon in (0.0, math.inf):
        return result
    return _refine(events, alphas, result, d, conv)


_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0


def _refine(
    events: tuple[PoissonGaussianEvent, ...],
    alphas: np.ndarray,
    grid: EpsilonResult,
    delta: float,
    conversion: str,
) -> EpsilonResult:
    k = int(np.searchsorted(alphas, grid.order))
    lo = float(alphas[k - 1]) if k > 0 else 1.0 + (grid.order - 1.0) / 2.0
    hi = float(alphas[k + 1]) if k + 1 < alphas.size else min(2.0 * grid.order, MAX_ORDER)
    lo_end, hi_end = lo, hi
    log_delta = math.log(delta)

    def eps_at(a: float) -> float:
        rdp = rdp_of_events(events, [a])
        return float(_epsilons(np.array([a]), rdp, log_delta, conversion)[0])

    x1, x2 = hi - _GOLDEN * (hi - lo), lo + _GOLDEN * (hi - lo)
    f1, f2 = eps_at(x1), eps_at(x2)
    for _ in range(40):
        if hi - lo <= 1e-6 * hi:
            break
        if f1 <= f2:
            hi, x2, f2 = x2, x1, f1
            x1 = hi - _GOLDEN * (hi - lo)
            f1 = eps_at(x1)
        else:
            lo, x1, f1 = x1, x2, f2
            x2 = lo + _GOLDEN * (hi - lo)
            f2 = eps_at(x2)
    best_order, best = (x1, f1) if f1 <= f2 else (x2, f2)
    if max(0.0, best) >= grid.epsilon:
        best_order, best = grid.order, grid.epsilon
    # Past the grid's end, the refined optimum may still sit on the search interval's end.
    edge = grid.at_grid_edge and not (lo_end * 1.001 < best_order < hi_end / 1.001)
    if edge:
        warnings.warn(
            f"the optimal Renyi order {best_order:g} lies at the end of the searched range; "
            "a wider grid may give a smaller epsilon",
            RuntimeWarning,
            stacklevel=3,
        )
    return EpsilonResult(max(0.0, best), delta, float(best_order), bool(edge), conversion)
