"""RDP -> (epsilon, delta): closed forms, published values, round trips, edges."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from exact_gaussian import exact_gaussian_epsilon
from hypothesis import given, settings
from hypothesis import strategies as st
from maskdp.accounting.conversions import (
    EpsilonResult,
    epsilon_from_events,
    rdp_to_delta,
    rdp_to_epsilon,
)
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events

# Grids the published values were computed on.
OPACUS_ORDERS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64))
"""opacus/accountants/rdp.py RDPAccountant.DEFAULT_ALPHAS."""
TF_PRIVACY_ORDERS = [1.25, 1.5, 1.75, 2.0, 2.25, 2.5, 3.0, 3.5, 4.0, 4.5] + list(range(5, 64))
TF_PRIVACY_ORDERS += [128, 256, 512]
"""tensorflow_privacy compute_dp_sgd_privacy_lib.compute_dp_sgd_privacy."""


def test_exact_gaussian_closed_form_and_rdp_is_above_it():
    exact = exact_gaussian_epsilon(1.0, 1e-5)
    assert exact == pytest.approx(4.377178095681, abs=1e-9)
    event = [PoissonGaussianEvent(1.0, 1.0, 1)]
    ht = epsilon_from_events(event, 1e-5, conversion="hypothesis-test")
    classic = epsilon_from_events(event, 1e-5, conversion="classic")
    assert exact <= ht.epsilon <= classic.epsilon
    # Both conversions are tight-ish for one Gaussian: within 10% / 25% of the truth.
    assert ht.epsilon < 1.1 * exact and classic.epsilon < 1.25 * exact


def test_classic_closed_form_for_the_gaussian():
    """q = 1: rdp(a) = a T/(2 s^2); the classic bound min_a a/(2 s^2) + log(1/d)/(a-1) has the
    closed form 1/(2 s^2) + sqrt(2 log(1/d))/s at a* = 1 + s sqrt(2 log(1/d))."""
    sigma, delta = 3.0, 1e-5
    orders = np.linspace(1.001, 60, 200_000)
    res = rdp_to_epsilon(orders, orders / (2 * sigma**2), delta, conversion="classic")
    closed = 1 / (2 * sigma**2) + math.sqrt(2 * math.log(1 / delta)) / sigma
    assert res.epsilon == pytest.approx(closed, rel=1e-8)
    assert res.order == pytest.approx(1 + sigma * math.sqrt(2 * math.log(1 / delta)), rel=1e-3)


def test_opacus_published_value():
    """opacus/tests/accountants_test.py: q=0.04, sigma=1.5, 2250 steps, delta=1e-5 ->
    7.32911117143. Opacus's get_privacy_spent uses the hypothesis-test conversion (Balle et
    al. 2020, Thm. 21), not the classic one (which gives 8.07)."""
    events = [PoissonGaussianEvent(0.04, 1.5, 2250)]
    rdp = rdp_of_events(events, OPACUS_ORDERS)
    res = rdp_to_epsilon(OPACUS_ORDERS, rdp, 1e-5, conversion="hypothesis-test")
    assert res.epsilon == pytest.approx(7.32911117143, abs=1e-9)
    classic = rdp_to_epsilon(OPACUS_ORDERS, rdp, 1e-5, conversion="classic")
    assert classic.epsilon == pytest.approx(8.0738, abs=1e-3)
    # Our default grid contains the same optimal order (3.9): same value.
    assert epsilon_from_events(events, 1e-5).epsilon == pytest.approx(7.32911117143, abs=1e-9)


@pytest.mark.parametrize(
    ("n", "batch", "sigma", "epochs", "delta", "expected", "order"),
    [
        (60000, 150, 1.3, 15, 1e-5, 0.7242234026109595, 19.0),
        (100000, 100, 1.0, 30, 1e-7, 1.4154988495444845, 13.0),
        (100000000, 1024, 0.1, 10, 1e-7, 5907982.31138195, 1.25),
    ],
)
def test_tf_privacy_published_values(n, batch, sigma, epochs, delta, expected, order):
    """tensorflow_privacy compute_dp_sgd_privacy_test.py (q = batch/n, steps =
    ceil(epochs n / batch), its own order grid, dp_accounting's compute_epsilon, which is the
    hypothesis-test conversion). The first two optima are integer orders, the third is the
    fractional order 1.25 at sigma = 0.1."""
    q, steps = batch / n, math.ceil(epochs * n / batch)
    rdp = rdp_of_events([PoissonGaussianEvent(q, sigma, steps)], TF_PRIVACY_ORDERS)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        res = rdp_to_epsilon(TF_PRIVACY_ORDERS, rdp, delta)
    assert res.epsilon == pytest.approx(expected, rel=1e-12)
    assert res.order == order
    # 1.25 is the first order of that grid: flagged and warned about.
    assert res.at_grid_edge == (order == TF_PRIVACY_ORDERS[0]) == bool(caught)


def test_hypothesis_test_never_above_classic():
    rng = np.random.default_rng(3)
    for _ in range(50):
        q, sigma = float(10 ** rng.uniform(-4, 0)), float(10 ** rng.uniform(-0.5, 1.5))
        events = [PoissonGaussianEvent(q, sigma, int(rng.integers(1, 10_000)))]
        rdp = rdp_of_events(events)
        delta = float(10 ** rng.uniform(-12, -2))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            ht = rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta)
            classic = rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta, conversion="classic")
        assert ht.epsilon <= classic.epsilon


def test_result_fields_and_to_dict():
    res = epsilon_from_events([PoissonGaussianEvent(0.01, 1.0, 1000)], 1e-5)
    assert isinstance(res, EpsilonResult)
    d = res.to_dict()
    assert d == {
        "epsilon": res.epsilon,
        "delta": 1e-5,
        "order": res.order,
        "at_grid_edge": False,
        "conversion": "hypothesis-test",
    }
    assert res.order in DEFAULT_ORDERS
    with pytest.raises(AttributeError):
        res.epsilon = 0.0  # type: ignore[misc]


def test_edge_warning_names_the_order():
    orders = [2.0, 3.0, 4.0]
    rdp = rdp_of_events([PoissonGaussianEvent(0.001, 5.0, 10)], orders)
    with pytest.warns(RuntimeWarning, match="optimal Renyi order 4"):
        res = rdp_to_epsilon(orders, rdp, 1e-5)
    assert res.at_grid_edge and res.order == 4.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        inner = rdp_to_epsilon([2.0, 3.0, 4.0], [10.0, 5.0, 9.0], 1e-5)
    assert not inner.at_grid_edge


def test_clamped_at_zero_and_zero_curve():
    res = rdp_to_epsilon([2.0, 3.0], [0.0, 0.0], 1e-5)
    assert res.epsilon == 0.0 and not res.at_grid_edge
    tiny = rdp_to_epsilon([2.0, 1e4], [1e-12, 1e-8], 0.5)
    assert tiny.epsilon == 0.0 and not tiny.at_grid_edge
    assert rdp_to_delta([2.0], [0.0], 0.0) == 0.0


def test_infinite_rdp_is_ignored_or_gives_infinity():
    with pytest.warns(RuntimeWarning, match="largest"):
        assert rdp_to_epsilon([2.0, 3.0], [math.inf, 1.0], 1e-5).order == 3.0
    assert rdp_to_epsilon([2.0], [math.inf], 1e-5).epsilon == math.inf
    assert rdp_to_delta([2.0], [math.inf], 1.0) == 1.0


@settings(max_examples=40, deadline=None)
@given(
    q=st.floats(1e-4, 1.0),
    sigma=st.floats(0.5, 50.0),
    steps=st.integers(1, 100_000),
    log_delta=st.floats(-12, -2),
    conversion=st.sampled_from(["hypothesis-test", "classic"]),
)
def test_delta_epsilon_delta_round_trip(q, sigma, steps, log_delta, conversion):
    delta = 10**log_delta
    rdp = rdp_of_events([PoissonGaussianEvent(q, sigma, steps)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        res = rdp_to_epsilon(DEFAULT_ORDERS, rdp, delta, conversion=conversion)
    back = rdp_to_delta(DEFAULT_ORDERS, rdp, res.epsilon, conversion=conversion)
    # The same order attains both optima, so the round trip is exact (up to rounding) when
    # epsilon > 0; when epsilon clamps to 0, delta(0) <= delta.
    if res.epsilon > 0:
        assert back == pytest.approx(delta, rel=1e-6)
    else:
        assert back <= delta * (1 + 1e-9)
    # delta is non-increasing in epsilon
    assert rdp_to_delta(DEFAULT_ORDERS, rdp, res.epsilon + 0.1, conversion=conversion) <= back


@settings(max_examples=30, deadline=None)
@given(
    q=st.floats(1e-4, 1.0),
    sigma=st.floats(0.3, 100.0),
    steps=st.integers(1, 10**6),
    extra=st.integers(1, 10**6),
    factor=st.floats(1.01, 4.0),
)
def test_epsilon_monotone_in_steps_q_and_sigma(q, sigma, steps, extra, factor):
    delta = 1e-5
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)

        def eps(q_, s_, n_):
            return epsilon_from_events([PoissonGaussianEvent(q_, s_, n_)], delta).epsilon

        base = eps(q, sigma, steps)
        assert eps(q, sigma, steps + extra) >= base * (1 - 1e-12)
        assert eps(min(1.0, q * factor), sigma, steps) >= base * (1 - 1e-12)
        assert eps(q, sigma * factor, steps) <= base * (1 + 1e-12)


def test_refine_never_larger_and_improves_between_grid_points():
    events = [PoissonGaussianEvent(0.02, 0.9, 700)]
    coarse = [1.5, 4.0, 16.0, 64.0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        grid = epsilon_from_events(events, 1e-6, orders=coarse)
        refined = epsilon_from_events(events, 1e-6, orders=coarse, refine=True)
        dense = epsilon_from_events(events, 1e-6, orders=np.linspace(1.5, 64, 5000))
    assert refined.epsilon <= grid.epsilon
    assert refined.epsilon < grid.epsilon - 0.01  # the coarse grid is far from the optimum
    assert refined.epsilon == pytest.approx(dense.epsilon, rel=1e-4)
    default = epsilon_from_events(events, 1e-6)
    assert epsilon_from_events(events, 1e-6, refine=True).epsilon <= default.epsilon


def test_bad_input_raises():
    for delta in (0.0, 1.0, 1.5, -1e-5, float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="delta"):
            rdp_to_epsilon([2.0], [1.0], delta)
    for eps in (-0.1, float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="epsilon"):
            rdp_to_delta([2.0], [1.0], eps)
    with pytest.raises(InvalidParameterError, match="conversion"):
        rdp_to_epsilon([2.0], [1.0], 1e-5, conversion="renyi")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="same length"):
        rdp_to_epsilon([2.0, 3.0], [1.0], 1e-5)
    with pytest.raises(InvalidParameterError, match="rdp"):
        rdp_to_epsilon([2.0], [-1.0], 1e-5)
    with pytest.raises(InvalidParameterError, match="rdp"):
        rdp_to_epsilon([2.0], [float("nan")], 1e-5)
    with pytest.raises(InvalidParameterError, match="refine"):
        rdp_to_epsilon([2.0], [1.0], 1e-5, refine=True)
