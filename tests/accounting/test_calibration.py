"""Calibration lands on the safe side and round-trips."""

from __future__ import annotations

import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maskdp.accounting.calibration import calibrate_noise, max_steps
from maskdp.accounting.errors import CalibrationError, InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import account, guarantee


def eps(q, sigma, steps, delta=1e-5, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        return guarantee(account([PoissonGaussianEvent(q, sigma, steps)], delta, **kw))


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.2, 20.0),
    q=st.floats(1e-3, 1.0),
    steps=st.integers(1, 20_000),
    relation=st.sampled_from(["erase", "substitute"]),
)
def test_noise_is_on_the_safe_side_and_within_tolerance(target, q, steps, relation):
    try:
        sigma = calibrate_noise(target, 1e-5, sample_rate=q, steps=steps, relation=relation)
    except CalibrationError:
        return  # e.g. sigma > 1e4 needed; covered below
    assert eps(q, sigma, steps, relation=relation) <= target
    assert eps(q, sigma / 1.001, steps, relation=relation) > target


@settings(max_examples=12, deadline=None)
@given(sigma0=st.floats(0.4, 50.0), q=st.floats(1e-3, 1.0), steps=st.integers(1, 20_000))
def test_noise_round_trip(sigma0, q, steps):
    target = eps(q, sigma0, steps)
    if not 1e-3 < target < 1e3:
        return
    sigma = calibrate_noise(target, 1e-5, sample_rate=q, steps=steps, tolerance=1e-4)
    # sigma0 is feasible, so the smallest feasible sigma is <= sigma0, and sigma is within
    # 1e-4 of the smallest one
    assert sigma <= sigma0 * (1 + 1e-4) * (1 + 1e-9)
    assert sigma >= sigma0 * (1 - 1e-6)


@settings(max_examples=20, deadline=None)
@given(
    target=st.floats(0.3, 20.0),
    q=st.floats(1e-4, 1.0),
    sigma=st.floats(0.5, 20.0),
    relation=st.sampled_from(["erase", "substitute"]),
)
def test_steps_are_on_the_safe_side(target, q, sigma, relation):
    try:
        n = max_steps(target, 1e-5, sample_rate=q, noise_multiplier=sigma, relation=relation)
    except CalibrationError:
        assert (
            eps(q, sigma, 1, relation=relation) > target
            or eps(q, sigma, 10**12, relation=relation) <= target
        )
        return
    assert n >= 1
    assert eps(q, sigma, n, relation=relation) <= target
    assert eps(q, sigma, n + 1, relation=relation) > target


@settings(max_examples=15, deadline=None)
@given(n0=st.integers(1, 100_000), q=st.floats(1e-3, 0.5), sigma=st.floats(0.6, 10.0))
def test_steps_round_trip(n0, q, sigma):
    target = eps(q, sigma, n0)
    n = max_steps(target, 1e-5, sample_rate=q, noise_multiplier=sigma)
    assert n >= n0
    assert eps(q, sigma, n) <= target < eps(q, sigma, n + 1)


def test_prv_calibration_is_safe_and_tighter_than_rdp():
    q, steps, target = 0.01, 1000, 1.0
    sigma = calibrate_noise(target, 1e-5, sample_rate=q, steps=steps, accountant="prv")
    assert eps(q, sigma, steps, accountant="prv") <= target
    assert eps(q, sigma / 1.001, steps, accountant="prv") > target
    assert sigma < calibrate_noise(target, 1e-5, sample_rate=q, steps=steps)


def test_prv_max_steps_is_safe():
    q, sigma, target = 0.01, 1.5, 1.0
    n = max_steps(target, 1e-5, sample_rate=q, noise_multiplier=sigma, accountant="prv")
    assert eps(q, sigma, n, accountant="prv") <= target < eps(q, sigma, n + 1, accountant="prv")
    assert n >= max_steps(target, 1e-5, sample_rate=q, noise_multiplier=sigma)


def test_impossible_targets_raise_calibration_error():
    with pytest.raises(CalibrationError, match="noise_multiplier=10000"):
        calibrate_noise(1e-6, 1e-10, sample_rate=1.0, steps=10**6)
    with pytest.raises(CalibrationError, match="single step"):
        max_steps(0.01, 1e-5, sample_rate=1.0, noise_multiplier=1.0)
    with pytest.raises(CalibrationError, match="already meets"):
        calibrate_noise(1e4, 1e-5, sample_rate=1e-3, steps=1)
    with pytest.raises(CalibrationError, match="more than"):
        max_steps(10.0, 1e-5, sample_rate=1e-6, noise_multiplier=100.0)


def test_bad_input_raises():
    with pytest.raises(InvalidParameterError, match="target_epsilon"):
        calibrate_noise(0.0, 1e-5, sample_rate=0.1, steps=10)
    with pytest.raises(InvalidParameterError, match="steps"):
        calibrate_noise(1.0, 1e-5, sample_rate=0.1, steps=10.0)  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="sample_rate"):
        max_steps(1.0, 1e-5, sample_rate=0.0, noise_multiplier=1.0)
    with pytest.raises(InvalidParameterError, match="tolerance"):
        calibrate_noise(1.0, 1e-5, sample_rate=0.1, steps=10, tolerance=0.0)
    with pytest.raises(InvalidParameterError, match="delta"):
        max_steps(1.0, 1.0, sample_rate=0.1, noise_multiplier=1.0)
