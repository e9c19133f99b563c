r"""One-dimensional searches over a monotone feasibility, returning the feasible side.

A privacy guarantee is monotone in the run's parameters (epsilon is non-increasing in the
noise multiplier, non-decreasing in the number of steps), so "the noise that meets a
target" and "the steps a budget allows" are searches for the edge of a feasible region.
Both searches below only ever return a point they evaluated and found feasible, so their
answer is safe even when the evaluations are slightly noisy.

* :func:`safe_root`: a root of :math:`g` (:math:`g(x) \le 0` is feasible), bracketed from a
  starting guess by secant extrapolation with growing strides, then shrunk by the Illinois
  variant of regula falsi (Dowell & Jarratt 1971, "A modified regula falsi method for
  computing the root of an equation", BIT 11) to a bracket of width ``step``.
* :func:`largest_feasible`: the largest integer :math:`n \le` ``limit`` with
  ``fits(n)``, by exponential search (doubling strides) from a start, then bisection:
  :math:`O(\log n)` evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Callable

__all__ = ["largest_feasible", "safe_root"]


def safe_root(
    g: Callable[[float], float],
    x0: float,
    *,
    step: float,
    stride: float,
    lo: float,
    hi: float,
    feasible_up: bool,
    integer: bool,
    at_limit: Callable[[bool], Exception],
) -> float:
    """The feasible end of a bracket of width <= ``step`` around the root of ``g``.

    ``g(x) <= 0`` is feasible; feasibility holds above the root when ``feasible_up`` and
    below it otherwise. The bracket search starts at ``x0`` with ``stride``, stays within
    [``lo``, ``hi``] (rounded to integers when ``integer``), and raises ``at_limit(feasible)``
    when it reaches an end without changing status.
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


def largest_feasible(fits: Callable[[int], bool], start: int, limit: int) -> int:
    """The largest n in [0, ``limit``] with ``fits(n)``, searched from ``start`` >= 1.

    ``fits`` must be monotone: ``fits(n)`` implies ``fits(m)`` for 1 <= m <= n. From
    ``start`` the search doubles its stride towards the other status (up while ``fits``,
    down while not), then bisects the bracket; it never evaluates outside [1, ``limit``].
    Returns 0 when ``fits(1)`` is false. From ``start=1`` it evaluates 1, 2, 4, 8, ... and
    then bisects.
    """
    if fits(start):
        good, stride = start, 1
        while good + stride <= limit and fits(good + stride):
            good, stride = good + stride, 2 * stride
        bad = min(good + stride, limit + 1)
    else:
        bad, stride = start, 1
        while bad - stride >= 1 and not fits(bad - stride):
            bad, stride = bad - stride, 2 * stride
        good = max(bad - stride, 0)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good
