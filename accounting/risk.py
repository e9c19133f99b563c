r"""What a privacy guarantee means for an attacker: bounds on membership-inference power.

Hypothesis-testing view of DP (Kairouz, Oh, Viswanath 2015, Thm. 2.1; Dong, Roth, Su 2019,
"Gaussian Differential Privacy", Prop. 2.5 / f-DP): a mechanism is
:math:`(\varepsilon, \delta)`-DP iff every test of "the record is in" vs "out" with
false-positive rate :math:`\alpha` has true-positive rate

.. math::

    \mathrm{TPR} \le \min\big(1,\; e^{\varepsilon}\alpha + \delta,\;
                              1 - e^{-\varepsilon}(1 - \delta - \alpha)\big).

A whole privacy profile :math:`\{(\varepsilon_j, \delta_j)\}` holds simultaneously, so the
minimum over :math:`j` is still an *upper bound* on the TPR of every attack (the profile's
trade-off curve, Dong et al. Prop. 2.12). The profile comes from the RDP curve (each point is
an RDP-to-DP conversion, hence valid) or from PRV upper bounds on delta.

The advantage :math:`\max_\alpha (\mathrm{TPR}(\alpha) - \alpha)` of this piecewise-linear
concave bound is computed exactly: its maximum is where the lowest non-decreasing piece
meets the lowest decreasing one, found by bisection; we return the value at the bracket end
that bounds it from above.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.choices import ACCOUNTANTS, Accountant
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.relations import Relation, parse_relation


@dataclass(frozen=True)
class RiskResult:
    """Upper bounds on an attacker's power implied by a privacy profile.

    Attributes:
        fpr: the false-positive rate asked about.
        tpr_upper: upper bound on the true-positive rate of any attack at ``fpr``.
        advantage_upper: upper bound on max over all FPR of (TPR - FPR) (membership
            advantage; 0 = no information, 1 = perfect inference).
        epsilon: the accountant's epsilon at ``delta`` (None when no delta was given).
        delta: the delta asked about (None when not given).
    """

    fpr: float
    tpr_upper: float
    advantage_upper: float
    epsilon: float | None
    delta: float | None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_profile(epsilons: Any, deltas: Any) -> tuple[np.ndarray, np.ndarray]:
    try:
        eps = np.array(epsilons, dtype=float, ndmin=1)
        dels = np.array(deltas, dtype=float, ndmin=1)
    except (TypeError, ValueError):
        raise InvalidParameterError("epsilons and deltas must be arrays of numbers") from None
    if eps.ndim != 1 or eps.shape != dels.shape or eps.size == 0:
        raise InvalidParameterError(
            f"epsilons and deltas must be non-empty 1-d arrays of equal length, got {eps.shape} and {dels.shape}"
        )
    if np.isnan(eps).any() or (eps < 0).any():
        raise InvalidParameterError("epsilons must be numbers >= 0 (inf allowed)")
    if np.isnan(dels).any() or (dels < 0).any() or (dels > 1).any():
        raise InvalidParameterError("deltas must be numbers in [0, 1]")
    return eps, dels


def _lines(eps: np.ndarray, dels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Slopes and intercepts of the affine TPR bounds (finite epsilons only), plus TPR <= 1."""
    finite = np.isfinite(eps)
    e, d = eps[finite], dels[finite]
    up = np.exp(e)
    down = np.exp(-e)
    slopes = np.concatenate([up, down, [0.0]])
    intercepts = np.concatenate([d, 1.0 - down * (1.0 - d), [1.0]])
    return slopes, intercepts


def tpr_bound_from_profile(fpr: float, epsilons: np.ndarray, deltas: np.ndarray) -> float:
    r"""Upper bound on the TPR at ``fpr`` of every test against a mechanism with this profile.

    :math:`\min\big(1, \min_j \min(e^{\varepsilon_j}\alpha + \delta_j,
    1 - e^{-\varepsilon_j}(1 - \delta_j - \alpha))\big)` (module docstring; Kairouz et al.
    2015, Dong et al. 2019). Never below ``fpr``.
    """
    alpha = _validate.closed_unit("fpr", fpr)
    slopes, intercepts = _lines(*_check_profile(epsilons, deltas))
    return float(min(1.0, max(alpha, np.min(slopes * alpha + intercepts))))


def _advantage_upper(slopes: np.ndarray, intercepts: np.ndarray) -> float:
    """Upper bound on max over x in [0, 1] of min_m(s_m x + c_m) - x (exact up to 1e-15)."""
    rising = slopes >= 1.0  # pieces of TPR - FPR that do not decrease
    s_up, c_up = slopes[rising] - 1.0, intercepts[rising]
    s_dn, c_dn = slopes[~rising] - 1.0, intercepts[~rising]

    def up(x: float) -> float:
        return float(np.min(s_up * x + c_up)) if s_up.size else math.inf

    def down(x: float) -> float:
        return float(np.min(s_dn * x + c_dn)) if s_dn.size else math.inf

    lo, hi = 0.0, 1.0
    if up(hi) <= down(hi):
        return max(0.0, min(up(hi), down(hi)))
    if up(lo) >= down(lo):
        return max(0.0, min(up(lo), down(lo)))
    for _ in range(100):  # up - down increases: bisect its sign change
        mid = 0.5 * (lo + hi)
        if up(mid) < down(mid):
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-15:
            break
    # The maximum lies in [lo, hi]; up is non-decreasing and down is decreasing there.
    return max(0.0, min(1.0, up(hi), down(lo)))


def _rdp_profile(
    events: Sequence[PoissonGaussianEvent], relation: Relation
) -> tuple[np.ndarray, np.ndarray]:
    """(epsilon, delta) pairs from the RDP curve: epsilon at a log grid of deltas, and delta
    at a grid of epsilons; each pair is a valid hypothesis-test conversion."""
    import warnings

    from maskdp.accounting.conversions import _minimise, rdp_to_delta
    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events

    rdp = rdp_of_events(events, DEFAULT_ORDERS, relation=relation)
    deltas = np.geomspace(1e-16, 0.5, 120)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        eps_at = np.array(
            [_minimise(DEFAULT_ORDERS, rdp, d, "hypothesis-test").epsilon for d in deltas]
        )
    finite = eps_at[np.isfinite(eps_at)]  # an unbounded epsilon (tiny sigma) is no pair at all
    grid = np.linspace(0.0, float(finite.max()) if finite.size else 0.0, 120)
    dels_at = np.array([rdp_to_delta(DEFAULT_ORDERS, rdp, e) for e in grid])
    return np.concatenate([eps_at, grid]), np.concatenate([deltas, dels_at])


def _prv_profile(
    events: Sequence[PoissonGaussianEvent], eps_error: float, relation: Relation
) -> tuple[np.ndarray, np.ndarray]:
    """(epsilon, upper delta) pairs from the PRV curve on an epsilon grid."""
    from maskdp.accounting.prv import curve_for

    curve = curve_for(events, eps_error=eps_error, delta_error=1e-12, relation=relation)
    if curve is None:
        return np.zeros(1), np.zeros(1)
    top = curve.epsilon(1e-10)[2]
    grid = np.linspace(0.0, top, 400)
    return grid, curve.upper_deltas(grid)


def attack_risk(
    events: Sequence[PoissonGaussianEvent],
    *,
    fpr: float,
    delta: float | None = None,
    accountant: Accountant = "rdp",
    relation: Relation | str = Relation.ERASE,
) -> RiskResult:
    r"""Upper bounds on membership-inference power against the composition of ``events``.

    ``tpr_upper``: bound on the TPR of any attack at false-positive rate ``fpr``;
    ``advantage_upper``: bound on the best TPR - FPR over all FPR. Both are computed from the
    whole privacy profile (module docstring), not only the (epsilon, delta) at ``delta``;
    ``epsilon`` reports the accountant's guarantee at ``delta`` when it is given.
    ``relation``: ``erase`` or ``substitute`` (:mod:`maskdp.accounting.relations`).
    """
    from maskdp.accounting.ledger import account, guarantee

    alpha = _validate.closed_unit("fpr", fpr)
    name = _validate.choice("accountant", accountant, ACCOUNTANTS)
    d = None if delta is None else _validate.open_unit("delta", delta)
    rel = parse_relation(relation)
    events = tuple(events)
    if name == "rdp":
        eps, dels = _rdp_profile(events, rel)
    else:
        eps, dels = _prv_profile(events, eps_error=0.01, relation=rel)
    slopes, intercepts = _lines(eps, dels)
    tpr = float(min(1.0, max(alpha, np.min(slopes * alpha + intercepts))))
    advantage = _advantage_upper(slopes, intercepts)
    epsilon = None if d is None else guarantee(account(events, d, accountant=name, relation=rel))
    return RiskResult(alpha, tpr, advantage, epsilon, d)
