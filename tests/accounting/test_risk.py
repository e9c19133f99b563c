"""Attack-risk bounds against the exact Gaussian trade-off curve."""

from __future__ import annotations

import math

import numpy as np
import pytest
from exact_gaussian import exact_gaussian_tpr
from hypothesis import given, settings
from hypothesis import strategies as st
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import PrivacyLedger
from maskdp.accounting.risk import (
    RiskResult,
    _advantage_upper,
    _lines,
    attack_risk,
    tpr_bound_from_profile,
)


def test_single_pair_formula():
    eps, delta = 1.0, 1e-3
    for fpr in (0.0, 1e-4, 0.05, 0.3, 0.9, 1.0):
        expected = min(1.0, math.exp(eps) * fpr + delta, 1 - math.exp(-eps) * (1 - delta - fpr))
        assert tpr_bound_from_profile(fpr, [eps], [delta]) == pytest.approx(expected, abs=1e-15)
    assert tpr_bound_from_profile(0.2, [0.0], [0.0]) == pytest.approx(0.2)  # no information


@settings(max_examples=50, deadline=None)
@given(eps=st.floats(0.0, 10.0), delta=st.floats(0.0, 0.5))
def test_advantage_of_one_pair_is_the_known_closed_form(eps, delta):
    """(eps, delta)-DP bounds the advantage by (e^eps - 1 + 2 delta) / (e^eps + 1)."""
    closed = min(1.0, (math.exp(eps) - 1 + 2 * delta) / (math.exp(eps) + 1))
    got = _advantage_upper(*_lines(np.array([eps]), np.array([delta])))
    assert got >= closed - 1e-12
    assert got == pytest.approx(closed, abs=1e-9)


@settings(max_examples=30, deadline=None)
@given(pairs=st.lists(st.tuples(st.floats(0.0, 8.0), st.floats(0.0, 0.3)), min_size=1, max_size=8))
def test_advantage_bounds_a_dense_grid_search(pairs):
    eps = np.array([p[0] for p in pairs])
    dels = np.array([p[1] for p in pairs])
    adv = _advantage_upper(*_lines(eps, dels))
    grid = np.linspace(0, 1, 200_001)
    tpr = np.minimum(1.0, np.min(np.exp(eps)[:, None] * grid + dels[:, None], axis=0))
    tpr = np.minimum(tpr, np.min(1 - np.exp(-eps)[:, None] * (1 - dels[:, None] - grid), axis=0))
    best = float(np.max(tpr - grid))
    for x in grid[::20_000]:  # the vectorised curve is tpr_bound_from_profile
        assert tpr_bound_from_profile(x, eps, dels) == pytest.approx(
            max(x, tpr[int(round(x * 200_000))]), abs=1e-12
        )
    assert adv >= best - 1e-12
    # and it is the maximum, not a loose bound (slopes are at most e^8: grid error < 1.5e-2)
    assert adv <= best + np.exp(eps.max()) * 5e-6 + 1e-12


@pytest.mark.parametrize("sigma", [1.0, 2.0])
def test_gaussian_exact_tradeoff_is_below_both_bounds(sigma):
    events = [PoissonGaussianEvent(1.0, sigma, 1)]
    from scipy.stats import norm

    exact_adv = 2 * norm.cdf(1 / (2 * sigma)) - 1
    for fpr in (1e-4, 1e-2, 0.1):
        exact = exact_gaussian_tpr(sigma, fpr)
        rdp = attack_risk(events, fpr=fpr)
        prv = attack_risk(events, fpr=fpr, accountant="prv")
        assert exact <= prv.tpr_upper <= rdp.tpr_upper + 1e-12
        # PRV's profile is nearly exact: its bound is close to the true trade-off curve
        assert prv.tpr_upper <= exact + 0.01 + 0.03 * exact
        assert exact_adv <= prv.advantage_upper <= exact_adv + 0.01
        assert exact_adv <= rdp.advantage_upper


def test_fields_epsilon_and_monotonicity():
    events = [PoissonGaussianEvent(0.02, 1.0, 2000)]
    res = attack_risk(events, fpr=0.01, delta=1e-5)
    assert isinstance(res, RiskResult)
    assert res.epsilon == PrivacyLedger(events).epsilon(1e-5) and res.delta == 1e-5
    assert res.fpr <= res.tpr_upper <= 1.0 and 0.0 <= res.advantage_upper <= 1.0
    assert res.tpr_upper - res.fpr <= res.advantage_upper + 1e-12
    assert set(res.to_dict()) == {"fpr", "tpr_upper", "advantage_upper", "epsilon", "delta"}
    no_delta = attack_risk(events, fpr=0.01)
    assert no_delta.epsilon is None and no_delta.delta is None
    tprs = [attack_risk(events, fpr=f).tpr_upper for f in (1e-5, 1e-3, 0.1, 0.5)]
    assert tprs == sorted(tprs)
    more = attack_risk([PoissonGaussianEvent(0.02, 1.0, 8000)], fpr=0.01)
    assert more.tpr_upper >= res.tpr_upper and more.advantage_upper >= res.advantage_upper


@pytest.mark.parametrize("sigma", [1e-155, 1e-300])
def test_unbounded_epsilon_gives_the_trivial_bound_without_nan(sigma):
    # Regression (CI fuzz): at sigma=1e-155 every RDP epsilon is inf, the epsilon grid was
    # linspace(0, inf) and the risk command failed on nan. The exact Gaussian curve at
    # mu = 1/sigma says any test reaches TPR 1 at every FPR > 0.
    import warnings

    events = [PoissonGaussianEvent(1.0, sigma, 1)]
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)
        res = attack_risk(events, fpr=0.1)
    assert exact_gaussian_tpr(sigma, 0.1) == pytest.approx(1.0)
    assert res.tpr_upper == 1.0 and res.advantage_upper == 1.0


def test_no_events_means_no_advantage():
    res = attack_risk([], fpr=0.05, delta=1e-5)
    assert res.tpr_upper == pytest.approx(0.05) and res.advantage_upper == pytest.approx(0.0)
    assert res.epsilon == 0.0


def test_bad_input_raises():
    events = [PoissonGaussianEvent(0.1, 1.0, 10)]
    for fpr in (-0.1, 1.5, float("nan")):
        with pytest.raises(InvalidParameterError, match="fpr"):
            attack_risk(events, fpr=fpr)
    with pytest.raises(InvalidParameterError, match="delta"):
        attack_risk(events, fpr=0.1, delta=0.0)
    with pytest.raises(InvalidParameterError, match="accountant"):
        attack_risk(events, fpr=0.1, accountant="gdp")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="equal length"):
        tpr_bound_from_profile(0.1, [1.0, 2.0], [1e-5])
    with pytest.raises(InvalidParameterError, match="deltas"):
        tpr_bound_from_profile(0.1, [1.0], [1.5])
