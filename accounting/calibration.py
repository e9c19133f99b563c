r"""Calibration: the noise or the number of steps that meets a target epsilon, on the safe side.

Like dp_accounting's ``mechanism_calibration``, we return a parameter whose epsilon is *at
most* the target, never merely the closest one:

* :func:`calibrate_noise` returns sigma with :math:`\varepsilon(\sigma) \le` target and
  :math:`\varepsilon(\sigma / (1 + \text{tolerance})) >` target, so it is within
  ``tolerance`` (relative) of the smallest feasible sigma;
* :func:`max_steps` returns n with :math:`\varepsilon(n) \le` target and
  :math:`\varepsilon(n + 1) >` target.

Epsilon is the guarantee of the chosen accountant (RDP: its bound; PRV: the upper bound),
non-increasing in sigma and non-decreasing in steps.
:func:`~maskdp.accounting.search.safe_root` brackets the target from a starting guess
(secant extrapolation, growing strides), then shrinks the bracket by Illinois regula falsi
on :math:`\log\varepsilon` (nearly linear in log sigma and in log steps), probing one
tolerance step inside the bracket whenever a proposal lands that close: 5-8 evaluations for
RDP. For PRV, the start comes from the RDP answer refined on a coarse
PRV grid (``eps_error`` 0.1, about ten times cheaper); usually only the last two or three
evaluations use the requested precision. With PRV the upper bound is at least ``eps_error``
(0.01), so targets below that are out of reach.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import cast

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.choices import ACCOUNTANTS, CONVERSIONS, Accountant, Conversion
from maskdp.accounting.conversions import _minimise
from maskdp.accounting.errors import CalibrationError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import account
from maskdp.accounting.prv import PRVCurve, PRVResult, default_eps_error
from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events
from maskdp.accounting.relations import Relation, parse_relation
from maskdp.accounting.search import largest_feasible, safe_root

__all__ = ["PRV_EPS_ERROR", "SIGMA_MAX", "SIGMA_MIN", "STEPS_MAX", "calibrate_noise", "max_steps"]

SIGMA_MIN = 0.05
SIGMA_MAX = 1e4
STEPS_MAX = 10**12
PRV_EPS_ERROR = 0.01
"""Allowance for the PRV's epsilon error when the coarse search aims below the target; the
fine search and the ledger's own answer (:func:`~maskdp.accounting.prv.default_eps_error`)
settle the last digits."""
_COARSE_EPS_ERROR = 0.1
_COARSE_MARGIN = 0.001

_Search = Callable[..., float]  # safe_root with the limits of one problem bound


# ------------------------------------------------------------------------------- the goal


@dataclass(frozen=True)
class _Goal:
    """A validated target: epsilon at most ``epsilon`` at ``delta`` (``conversion`` for RDP,
    ``relation`` for both accountants)."""

    epsilon: float
    delta: float
    conversion: str
    relation: Relation


def _check_common(
    target_epsilon: float, delta: float, accountant: str, conversion: str, relation: Relation | str
) -> tuple[str, _Goal]:
    """The accountant's name and the goal, validated (in the order of the signature)."""
    target = _validate.positive("target_epsilon", target_epsilon)
    d = _validate.open_unit("delta", delta)
    name = _validate.choice("accountant", accountant, ACCOUNTANTS)
    conv = _validate.choice("conversion", conversion, CONVERSIONS)
    return name, _Goal(target, d, conv, parse_relation(relation))


def _gap(value: float, goal: float) -> float:
    """Signed distance of an epsilon from its goal (<= 0: feasible), in log space when the
    goal is positive: epsilon is close to a power law in sigma and in steps, so the bracket
    search interpolates almost exactly there."""
    if goal > 0:
        return math.log(max(value, 1e-300) / goal)
    return value - goal


def _rdp_step(q: float, sigma: float, relation: Relation) -> np.ndarray:
    """RDP of one step on DEFAULT_ORDERS under ``relation``."""
    return rdp_of_events([PoissonGaussianEvent(q, sigma)], DEFAULT_ORDERS, relation=relation)


def _rdp_epsilon(rdp: np.ndarray, goal: _Goal) -> float:
    """RDP guarantee of a whole RDP curve on DEFAULT_ORDERS (edge warnings silenced)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _minimise(DEFAULT_ORDERS, rdp, goal.delta, goal.conversion).epsilon


def _prv_result(
    q: float, sigma: float, steps: int, goal: _Goal, eps_error: float | None
) -> PRVResult:
    """The PRV result of ``steps`` steps at (q, sigma), as the ledger computes it
    (``eps_error=None``: the ledger's default precision)."""
    event = PoissonGaussianEvent(q, sigma, steps)
    result = account(
        [event],
        goal.delta,
        accountant="prv",
        conversion=goal.conversion,
        relation=goal.relation,
        eps_error=eps_error,
    )
    return cast(PRVResult, result)


def _sigma_error(target: float) -> Callable[[bool], CalibrationError]:
    def build(feasible: bool) -> CalibrationError:
        if feasible:
            return CalibrationError(
                f"noise_multiplier={SIGMA_MIN:g} already meets the target epsilon {target:g}; "
                "noise is not what limits privacy here (check sample_rate, steps and delta)"
            )
        return CalibrationError(
            f"even noise_multiplier={SIGMA_MAX:g} gives an epsilon above the target {target:g}"
        )

    return build


def _steps_error(target: float) -> Callable[[bool], CalibrationError]:
    def build(feasible: bool) -> CalibrationError:
        if feasible:
            return CalibrationError(
                f"more than {STEPS_MAX:g} steps meet the target epsilon {target:g}"
            )
        return CalibrationError(f"a single step already exceeds the target epsilon {target:g}")

    return build


# --------------------------------------------------------------------------------- noise


def calibrate_noise(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    steps: int,
    accountant: Accountant = "rdp",
    conversion: Conversion = "hypothesis-test",
    relation: Relation | str = "erase",
    tolerance: float = 1e-3,
) -> float:
    r"""Smallest noise multiplier (to ``tolerance``) whose epsilon is at most the target.

    Returns sigma with :math:`\varepsilon(\sigma) \le` ``target_epsilon`` and
    :math:`\varepsilon(\sigma/(1+\text{tolerance})) >` ``target_epsilon`` (safe side), where
    epsilon is the accountant's guarantee (PRV: the upper bound at the ledger's default precision).
    Raises CalibrationError when even ``SIGMA_MAX`` misses the target, or when ``SIGMA_MIN``
    already meets it (noise is then not what limits privacy).
    """
    name, goal = _check_common(target_epsilon, delta, accountant, conversion, relation)
    q = _validate.sample_rate("sample_rate", sample_rate)
    n = _validate.count("steps", steps)
    step = math.log1p(_validate.positive("tolerance", tolerance))
    search = partial(
        safe_root,
        step=step,
        lo=math.log(SIGMA_MIN),
        hi=math.log(SIGMA_MAX),
        feasible_up=True,
        integer=False,
        at_limit=_sigma_error(goal.epsilon),
    )
    x_rdp = _log_sigma_rdp(q, n, goal, search)
    if name == "rdp":
        return math.exp(x_rdp)
    return math.exp(_log_sigma_prv(q, n, goal, search, start=x_rdp, step=step))


def _log_sigma_rdp(q: float, n: int, goal: _Goal, search: _Search) -> float:
    """log sigma meeting the goal under RDP, searched in log sigma from sigma = 1."""

    def g(x: float) -> float:
        rdp = n * _rdp_step(q, math.exp(x), goal.relation)
        return _gap(_rdp_epsilon(rdp, goal), goal.epsilon)

    return search(g, 0.0, stride=math.log(2.0))


def _log_sigma_prv(
    q: float, n: int, goal: _Goal, search: _Search, *, start: float, step: float
) -> float:
    """log sigma meeting the goal under PRV, searched from the RDP answer ``start`` (PRV is
    tighter: a smaller sigma) first on a coarse grid, then at the ledger's precision."""

    def g(eps_error: float | None, estimate: bool, aim: float) -> Callable[[float], float]:
        def gap(x: float) -> float:
            result = _prv_result(q, math.exp(x), n, goal, eps_error)
            return _gap(result.epsilon_estimate if estimate else result.epsilon_upper, aim)

        return gap

    # Coarse estimate aimed just inside where the fine upper bound (about estimate +
    # eps_error) meets the target.
    aim = goal.epsilon - PRV_EPS_ERROR - _COARSE_MARGIN
    x_c = search(g(_COARSE_EPS_ERROR, True, aim), start, stride=0.05)
    # The final search uses the ledger's own default precision, so the answer is safe and
    # tight for exactly the epsilon a ledger reports.
    return search(g(None, False, goal.epsilon), x_c, stride=step)


# --------------------------------------------------------------------------------- steps


def max_steps(
    target_epsilon: float,
    delta: float,
    *,
    sample_rate: float,
    noise_multiplier: float,
    accountant: Accountant = "rdp",
    conversion: Conversion = "hypothesis-test",
    relation: Relation | str = "erase",
) -> int:
    r"""Largest number of steps whose epsilon is at most the target.

    Returns n >= 1 with :math:`\varepsilon(n) \le` target and :math:`\varepsilon(n+1) >`
    target (PRV: upper bounds at the ledger's default precision). Raises CalibrationError when one step
    already exceeds the target, or when more than ``STEPS_MAX`` steps meet it.
    """
    name, goal = _check_common(target_epsilon, delta, accountant, conversion, relation)
    q = _validate.sample_rate("sample_rate", sample_rate)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    at_limit = _steps_error(goal.epsilon)
    search = partial(
        safe_root,
        step=1.0,
        lo=1.0,
        hi=float(STEPS_MAX + 1),
        feasible_up=False,
        integer=True,
        at_limit=at_limit,
    )
    n_rdp = _steps_rdp(q, sigma, goal, search, at_limit)
    if name == "rdp":
        return n_rdp
    return _steps_prv(q, sigma, goal, search, at_limit, start=n_rdp)


def _steps_rdp(
    q: float, sigma: float, goal: _Goal, search: _Search, at_limit: Callable[[bool], Exception]
) -> int:
    """The largest step count meeting the goal under RDP (RDP is linear in the steps)."""
    per_step = _rdp_step(q, sigma, goal.relation)

    def g(n: float) -> float:
        return _gap(_rdp_epsilon(n * per_step, goal), goal.epsilon)

    if g(1.0) > 0:
        raise at_limit(False)
    n = int(search(g, 1.0, stride=1.0))
    if n > STEPS_MAX:
        raise at_limit(True)
    return n


def _steps_prv(
    q: float,
    sigma: float,
    goal: _Goal,
    search: _Search,
    at_limit: Callable[[bool], Exception],
    *,
    start: int,
) -> int:
    """The largest step count meeting the goal under PRV, from the RDP answer ``start``:
    a coarse PRV grid, then a fine one, then the ledger's own answer."""
    coarse = _StepsCurve(q, sigma, goal, _COARSE_EPS_ERROR, estimate=True, capacity=4 * start)
    aim = goal.epsilon - PRV_EPS_ERROR - _COARSE_MARGIN
    n_c = int(
        search(lambda n: _gap(coarse(int(n)), aim), float(start), stride=max(1.0, start / 4.0))
    )
    precision = default_eps_error(
        [PoissonGaussianEvent(q, sigma, max(1, n_c))], goal.delta, goal.relation
    )
    fine = _StepsCurve(q, sigma, goal, precision, estimate=False, capacity=int(n_c * 1.02) + 2)
    n = int(
        search(lambda n: _gap(fine(int(n)), goal.epsilon), float(n_c), stride=max(1.0, n_c / 500.0))
    )
    if n > STEPS_MAX:
        raise at_limit(True)

    def fits(k: int) -> bool:
        return _prv_result(q, sigma, k, goal, None).epsilon_upper <= goal.epsilon

    # The ledger's precision depends (slightly) on the step count: settle on its answer.
    n = largest_feasible(fits, max(1, n), STEPS_MAX + 1)
    if n == 0:
        raise at_limit(False)
    if n > STEPS_MAX:
        raise at_limit(True)
    return n


class _StepsCurve:
    """PRV guarantee (or estimate) of ``n`` steps at (q, sigma), for many ``n``.

    One PRV grid sized for ``capacity`` steps answers every n up to it (prv-accountant's
    error bounds hold for any count up to the maximum); a larger n regrows it.
    """

    def __init__(
        self,
        q: float,
        sigma: float,
        goal: _Goal,
        eps_error: float,
        *,
        estimate: bool,
        capacity: int,
    ) -> None:
        self.q, self.sigma, self.delta = q, sigma, goal.delta
        self.conversion, self.relation, self.eps_error = goal.conversion, goal.relation, eps_error
        self.pick = 1 if estimate else 2
        self.capacity = max(1, capacity)
        self._curve: PRVCurve | None = None

    def _grid(self, n: int) -> PRVCurve:
        if self._curve is None or self._curve.max_steps[0] < n:
            size = max(n, self.capacity, 2 * (self._curve.max_steps[0] if self._curve else 0))
            self._curve = PRVCurve(
                [(self.q, self.sigma)],
                [size],
                eps_error=self.eps_error,
                delta_error=self.delta / 1000.0,
                relation=self.relation,
            )
        return self._curve

    def __call__(self, n: int) -> float:
        curve = self._grid(n)
        return curve.epsilon(self.delta, [n])[self.pick]
