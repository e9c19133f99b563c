"""The one-dimensional searches behind calibration: safe side, exact answers, few evaluations."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st
from maskdp.accounting.search import largest_feasible, safe_root


class Limit(Exception):
    pass


def _counted(fits):
    calls: list[int] = []

    def wrapped(n: int) -> bool:
        calls.append(n)
        return fits(n)

    return wrapped, calls


@given(answer=st.integers(0, 10**9), start=st.integers(1, 10**9), limit=st.integers(1, 10**9))
def test_largest_feasible_is_exact_and_stays_in_range(answer, start, limit):
    start = min(start, limit)
    fits, calls = _counted(lambda n: n <= answer)
    assert largest_feasible(fits, start, limit) == min(answer, limit)
    assert all(1 <= n <= limit for n in calls)
    assert len(calls) <= 4 * math.log2(limit + 1) + 4


def test_largest_feasible_from_one_doubles_then_bisects():
    fits, calls = _counted(lambda n: n <= 10)
    assert largest_feasible(fits, 1, 2**31) == 10
    assert calls == [1, 2, 4, 8, 16, 12, 10, 11]
    assert largest_feasible(lambda n: False, 1, 2**31) == 0
    assert largest_feasible(lambda n: True, 1, 2**31) == 2**31


@pytest.mark.parametrize("feasible_up", [True, False])
def test_safe_root_returns_the_feasible_end_within_step(feasible_up):
    root = 1.2345
    sign = -1.0 if feasible_up else 1.0  # g <= 0 on the feasible side

    def g(x: float) -> float:
        return sign * (x - root)

    x = safe_root(
        g,
        0.0,
        step=1e-3,
        stride=0.5,
        lo=-10.0,
        hi=10.0,
        feasible_up=feasible_up,
        integer=False,
        at_limit=Limit,
    )
    assert g(x) <= 0 and abs(x - root) <= 1e-3


def test_safe_root_on_integers_and_at_the_limits():
    def g(n: float) -> float:
        return math.log(n / 1000.5)  # feasible: n <= 1000

    on_integers = dict(
        step=1.0, stride=1.0, lo=1.0, feasible_up=False, integer=True, at_limit=Limit
    )
    assert safe_root(g, 1.0, hi=1e6, **on_integers) == 1000.0
    with pytest.raises(Limit) as info:
        safe_root(g, 1.0, hi=100.0, **on_integers)
    assert info.value.args == (True,)  # still feasible at hi
