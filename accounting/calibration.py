r"""Calibration: the noise or the number of steps that meets a target epsilon, on the safe side.

Like dp_accounting's ``mechanism_calibration``, we return a parameter whose epsilon is *at
most* the target, never merely the closest one:

* :func:`calibrate_noise` returns sigma with :math:`\varepsilon(\sigma) \le` target and
  :math:`\varepsilon(\sigma / (1 + \text{tolerance})) >` target, so it is within
  ``tolerance`` (relative) of the smallest feasible sigma;
* :func:`max_steps` returns n with :math:`\varepsilon(n) \le` target and
  :math:`\varepsilon(n + 1) >` target.

Epsilon is the guarantee of the chosen accountant (RDP: its bound; PRV: the upper bound),
non-increasing in sigma and non-decreasing in steps. :func:`_solve` brackets the target from
a starting guess (secant extrapolation, growing strides), then shrinks the bracket by
Illinois regula falsi on :math:`\log\varepsilon` (nearly linear in log sigma and in log
steps), probing one tolerance step inside the bracket whenever a proposal lands that close:
5-8 evaluations for RDP. For PRV, the start comes from the RDP answer refined on a coarse
PRV grid (``eps_error`` 0.1, about ten times cheaper); usually only the last two or three
evaluations use the requested precision. With PRV the upper bound is at least ``eps_error``
(0.01), so targets below that are out of reach.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.conversions import CONVERSIONS, Conversion, _minimise
from maskdp.accounting.errors import CalibrationError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import ACCOUNTANTS, Accountant, _rdp_substitute, account
from maskdp.accounting.prv import PRVCurve, default_eps_error
from maskdp.accounting.relations import Relation, parse_relation, substitute_epsilon

SIGMA_MIN = 0.05
SIGMA_MAX = 1e4
STEPS_MAX = 10**12
PRV_EPS_ERROR = 0.01
"""The PRV precision calibration answers to (the default of :func:`~maskdp.accounting.prv.prv_epsilon`)."""
_COARSE_EPS_ERROR = 0.1
_COARSE_MARGIN = 0.001


# ------------------------------------------------------------------------------ solver


def _solve(
    g: Callable[[float], float],
    x0: float,
    *,
    step: float,
    stride: float,
    lo: float,
    hi: float,
    feasible_up: bool,
    integer: bool,
    at_limit: Callable[[bool], CalibrationError],
) -> float:
    """The feasible end of a bracket of width <= ``step`` around the root of ``g``.

    ``g(x) <= 0`` is feasible; feasibility holds above the root when ``feasible_up`` (sigma)
    and below it otherwise (steps). ``at_limit(feasible)`` builds the error raised when the
    bracketing reaches ``lo``/``hi`` without changing status.
    """
    sign = 1.0 if feasible_up else -1.0  # direction from infeasible to feasible

    def clamp(x: float) -> float:
        x = min(max(x, lo), hi)
        return float(round(x)) if integer else x

    x, gx = x0, g(x0)
    prev: tuple[float, float] | None = None
    while True:
        towards = sign if gx > 0 else -sign  # where the other status lies
        move = stride
        if prev is not None and prev[1] != gx:
            secant = abs(gx * (x - prev[0]) / (gx - prev[1])) * 1.2
            move = min(max(secant, step), 8.0 * abs(x - prev[0]))
        x_new = clamp(x + towards * move)
        if x_new == x:
            raise at_limit(gx <= 0)
        g_new = g(x_new)
        if (g_new <= 0) != (gx <= 0):
            break
        prev, x, gx, stride = (x, gx), x_new, g_new, stride * 2.0
    if gx <= 0:
        feasible, g_f, infeasible, g_i = x, gx, x_new, g_new
    else:
        feasible, g_f, infeasible, g_i = x_new, g_new, x, gx
    return _shrink(g, feasible, g_f, infeasible, g_i, step, integer)


def _shrink(
    g: Callable[[float], float],
    feasible: float,
    g_f: float,
    infeasible: float,
    g_i: float,
    step: float,
    integer: bool,
) -> float:
    """Illinois regula falsi on the bracket (geometric positions for integers), plus a probe
    one ``step`` inside the bracket whenever the next proposal would land that close."""

    def open_width() -> bool:
        return abs(infeasible - feasible) > step * (1.0 + 1e-9)

    def propose(w_f: float, w_i: float) -> float:
        frac = min(max(w_f / (w_f - w_i), 0.02), 0.98)
        if not integer:
            return feasible + frac * (infeasible - feasible)
        c = math.exp(math.log(feasible) + frac * (math.log(infeasible) - math.log(feasible)))
        lo, hi = sorted((feasible, infeasible))
        return min(max(float(round(c)), lo + 1.0), hi - 1.0)

    w_f, w_i, last = g_f, g_i, ""
    while open_width():
        c = propose(w_f, w_i)
        g_c = g(c)
        if g_c <= 0:
            feasible, g_f, w_f = c, g_c, g_c
            w_i = w_i / 2.0 if last == "f" else w_i  # Illinois: unstick a one-sided approach
            last = "f"
        else:
            infeasible, g_i, w_i = c, g_c, g_c
            w_f = w_f / 2.0 if last == "i" else w_f
            last = "i"
        if open_width() and abs(propose(w_f, w_i) - c) <= step:
            probe = c + math.copysign(step, (infeasible if c == feasible else feasible) - c)
            g_p = g(probe)
            if g_p <= 0:
                feasible, g_f, w_f = probe, g_p, g_p
            else:
                infeasible, g_i, w_i = probe, g_p, g_p
    return feasible


def _gap(value: float, goal: float) -> float:
    """Signed distance of an epsilon from its goal (<= 0: feasible), in log space when the
    goal is positive: epsilon is close to a power law in sigma and in steps, so the bracket
    search interpolates almost exactly there."""
    if goal > 0:
        return math.log(max(value, 1e-300) / goal)
    return value - goal


# ------------------------------------------------------------------------------- epsilon


def _check_common(
    target_epsilon: float, delta: float, accountant: str, conversion: str, relation: Relation | str
) -> tuple[float, float, str, str, Relation]:
    return (
        _validate.positive("target_epsilon", target_epsilon),
        _validate.open_unit("delta", delta),
        _validate.choice("accountant", accountant, ACCOUNTANTS),
        _validate.choice("conversion", conversion, CONVERSIONS),
        parse_relation(relation),
    )


def _rdp_epsilon(rdp: np.ndarray, delta: float, conversion: str, relation: Relation) -> float:
    """RDP guarantee of a whole RDP curve on DEFAULT_ORDERS (edge warnings silenced)."""
    from maskdp.accounting.rdp import DEFAULT_ORDERS

    if relation is Relation.SUBSTITUTE:
        return _rdp_substitute(rdp, delta, conversion)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return _minimise(DEFAULT_ORDERS, rdp, delta, conversion).epsilon


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
    target, d, name, conv, rel = _check_common(
        target_epsilon, delta, accountant, conversion, relation
    )
    q = _validate.sample_rate("sample_rate", sample_rate)
    n = _validate.count("steps", steps)
    step = math.log1p(_validate.positive("tolerance", tolerance))
    limits = {
        "lo": math.log(SIGMA_MIN),
        "hi": math.log(SIGMA_MAX),
        "feasible_up": True,
        "integer": False,
    }
    at_limit = _sigma_error(target)

    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_poisson_gaussian

    def g_rdp(x: float) -> float:
        rdp = n * rdp_poisson_gaussian(q, math.exp(x), DEFAULT_ORDERS)
        return _gap(_rdp_epsilon(rdp, d, conv, rel), target)

    x_rdp = _solve(g_rdp, 0.0, step=step, stride=math.log(2.0), at_limit=at_limit, **limits)
    if name == "rdp":
        return math.exp(x_rdp)

    def g_prv(eps_error: float | None, estimate: bool, goal: float) -> Callable[[float], float]:
        def g(x: float) -> float:
            event = PoissonGaussianEvent(q, math.exp(x), n)
            result = account(
                [event], d, accountant="prv", conversion=conv, relation=rel, eps_error=eps_error
            )
            return _gap(result.epsilon_estimate if estimate else result.epsilon_upper, goal)

        return g

    # Coarse estimate aimed just inside where the fine upper bound (about estimate +
    # eps_error) meets the target, from the RDP answer (PRV is tighter: smaller sigma).
    x_c = _solve(
        g_prv(_COARSE_EPS_ERROR, True, target - PRV_EPS_ERROR - _COARSE_MARGIN),
        x_rdp,
        step=step,
        stride=0.05,
        at_limit=at_limit,
        **limits,
    )
    # The final search uses the ledger's own default precision, so the answer is safe and
    # tight for exactly the epsilon a ledger reports.
    return math.exp(
        _solve(
            g_prv(None, False, target),
            x_c,
            step=step,
            stride=step,
            at_limit=at_limit,
            **limits,
        )
    )


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
    target, d, name, conv, rel = _check_common(
        target_epsilon, delta, accountant, conversion, relation
    )
    q = _validate.sample_rate("sample_rate", sample_rate)
    sigma = _validate.positive("noise_multiplier", noise_multiplier)
    limits = {"lo": 1.0, "hi": float(STEPS_MAX + 1), "feasible_up": False, "integer": True}
    at_limit = _steps_error(target)

    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_poisson_gaussian

    per_step = rdp_poisson_gaussian(q, sigma, DEFAULT_ORDERS)

    def g_rdp(n: float) -> float:
        return _gap(_rdp_epsilon(n * per_step, d, conv, rel), target)

    if g_rdp(1.0) > 0:
        raise at_limit(False)
    n_rdp = int(_solve(g_rdp, 1.0, step=1.0, stride=1.0, at_limit=at_limit, **limits))
    if n_rdp > STEPS_MAX:
        raise at_limit(True)
    if name == "rdp":
        return n_rdp

    coarse = _StepsCurve(
        q, sigma, d, conv, rel, _COARSE_EPS_ERROR, estimate=True, capacity=4 * n_rdp
    )
    n_c = int(
        _solve(
            lambda n: _gap(coarse(int(n)), target - PRV_EPS_ERROR - _COARSE_MARGIN),
            float(n_rdp),
            step=1.0,
            stride=max(1.0, n_rdp / 4.0),
            at_limit=at_limit,
            **limits,
        )
    )
    precision = default_eps_error([PoissonGaussianEvent(q, sigma, max(1, n_c))], d)
    fine = _StepsCurve(
        q, sigma, d, conv, rel, precision, estimate=False, capacity=int(n_c * 1.02) + 2
    )
    n = int(
        _solve(
            lambda n: _gap(fine(int(n)), target),
            float(n_c),
            step=1.0,
            stride=max(1.0, n_c / 500.0),
            at_limit=at_limit,
            **limits,
        )
    )
    if n > STEPS_MAX:
        raise at_limit(True)

    def ledger_epsilon(k: int) -> float:
        event = PoissonGaussianEvent(q, sigma, k)
        return account([event], d, accountant="prv", conversion=conv, relation=rel).epsilon_upper

    # The ledger's precision depends (slightly) on the step count: settle on its answer.
    n = _largest_within(ledger_epsilon, max(1, n), target)
    if n == 0:
        raise at_limit(False)
    if n > STEPS_MAX:
        raise at_limit(True)
    return n


def _largest_within(epsilon_of: Callable[[int], float], start: int, target: float) -> int:
    """Largest n >= 0 with ``epsilon_of(n) <= target`` (non-decreasing), searched from
    ``start`` by doubling strides and bisection (0 when even one step exceeds it)."""
    if epsilon_of(start) <= target:
        good, stride = start, 1
        while good + stride <= STEPS_MAX + 1 and epsilon_of(good + stride) <= target:
            good, stride = good + stride, 2 * stride
        bad = good + stride
    else:
        bad, stride = start, 1
        while bad - stride >= 1 and epsilon_of(bad - stride) > target:
            bad, stride = bad - stride, 2 * stride
        good = max(bad - stride, 0)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if epsilon_of(mid) <= target else (good, mid)
    return good


class _StepsCurve:
    """PRV guarantee (or estimate) of ``n`` steps at (q, sigma), for many ``n``.

    One PRV grid sized for ``capacity`` steps answers every n up to it (prv-accountant's
    error bounds hold for any count up to the maximum); a larger n regrows it.
    """

    def __init__(
        self,
        q: float,
        sigma: float,
        delta: float,
        conversion: str,
        relation: Relation,
        eps_error: float,
        *,
        estimate: bool,
        capacity: int,
    ) -> None:
        self.q, self.sigma, self.delta = q, sigma, delta
        self.conversion, self.relation, self.eps_error = conversion, relation, eps_error
        self.pick = 1 if estimate else 2
        self.capacity = max(1, capacity)
        self._curve: PRVCurve | None = None

    def _grid(self, n: int) -> PRVCurve:
        if self._curve is None or self._curve.max_steps[0] < n:
            size = max(n, self.capacity, 2 * (self._curve.max_steps[0] if self._curve else 0))
            delta_error = self.delta / 1000.0
            if self.relation is Relation.SUBSTITUTE:
                # The search visits erase deltas near the RDP one (RDP overestimates epsilon).
                from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_poisson_gaussian

                rdp = size * rdp_poisson_gaussian(self.q, self.sigma, DEFAULT_ORDERS)
                d_rdp = _rdp_substitute(rdp, self.delta, self.conversion)[1]
                delta_error = (d_rdp if d_rdp > 0 else self.delta * 1e-9) / 1000.0
            self._curve = PRVCurve(
                [(self.q, self.sigma)], [size], eps_error=self.eps_error, delta_error=delta_error
            )
        return self._curve

    def __call__(self, n: int) -> float:
        curve = self._grid(n)
        if self.relation is Relation.ERASE:
            return curve.epsilon(self.delta, [n])[self.pick]

        def erase_eps(d: float) -> float:
            return curve.epsilon(d, [n])[self.pick] if d > curve.delta_error else math.inf

        return substitute_epsilon(erase_eps, self.delta)[0]
