"""Group privacy of size 2: the substitute relation from the erase one."""

from __future__ import annotations

import math

import pytest
from exact_gaussian import exact_gaussian_epsilon
from maskdp.accounting.errors import AccountingError, InvalidParameterError
from maskdp.accounting.relations import Relation, parse_relation, substitute_epsilon


def test_relation_values_and_parsing():
    assert Relation.ERASE == "erase" and Relation.SUBSTITUTE.value == "substitute"
    assert parse_relation("substitute") is Relation.SUBSTITUTE
    assert parse_relation(Relation.ERASE) is Relation.ERASE
    for bad in ("replace", "", None, 1):
        with pytest.raises(InvalidParameterError, match="relation"):
            parse_relation(bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("sigma", [0.7, 2.0, 8.0])
@pytest.mark.parametrize("delta", [1e-3, 1e-6, 1e-9])
def test_group_privacy_condition_holds_and_is_nearly_tight(sigma, delta):
    def erase(d: float) -> float:
        return exact_gaussian_epsilon(sigma, d)

    eps, d = substitute_epsilon(erase, delta)
    assert eps == pytest.approx(2 * erase(d), rel=1e-12)
    assert (1 + math.exp(erase(d))) * d <= delta * (1 + 1e-12)
    # the largest feasible d to 1e-6 relative: slightly larger d is infeasible
    bigger = d * (1 + 1e-5)
    assert (1 + math.exp(erase(bigger))) * bigger > delta


@pytest.mark.parametrize("sigma", [0.7, 2.0, 8.0])
def test_upper_bounds_the_exact_replace_one_gaussian(sigma):
    """q = 1: substituting one record moves the sum by up to 2, i.e. an exact Gaussian with
    noise sigma / 2. Group privacy must never claim less than that."""
    delta = 1e-5
    eps, _ = substitute_epsilon(lambda d: exact_gaussian_epsilon(sigma, d), delta)
    exact_replace = exact_gaussian_epsilon(sigma / 2, delta)
    assert eps >= exact_replace
    assert eps >= exact_gaussian_epsilon(sigma, delta)  # and above erase


def test_zero_epsilon_profile():
    assert substitute_epsilon(lambda d: 0.0, 1e-5) == (0.0, 5e-6)


def test_invalid_profile_and_delta():
    with pytest.raises(AccountingError, match="invalid epsilon"):
        substitute_epsilon(lambda d: float("nan"), 1e-5)
    # no erase delta qualifies: no finite bound is claimed
    assert substitute_epsilon(lambda d: math.inf, 1e-5) == (math.inf, 0.0)
    assert substitute_epsilon(lambda d: 800.0, 1e-5) == (math.inf, 0.0)
    for delta in (0.0, 1.0, float("nan")):
        with pytest.raises(InvalidParameterError, match="delta"):
            substitute_epsilon(lambda d: 1.0, delta)
