"""PRV accounting against the exact Gaussian curve and dp_accounting's PLD accountant."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from exact_gaussian import exact_gaussian_delta, exact_gaussian_epsilon
from maskdp.accounting.conversions import epsilon_from_events
from maskdp.accounting.errors import AccountingError, InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.prv import PRVResult, curve_for, default_eps_error, prv_delta, prv_epsilon
from maskdp.accounting.rdp import rdp_of_events


@pytest.mark.parametrize("sigma", [0.5, 1.0, 2.0])
def test_sandwiches_the_exact_gaussian(sigma):
    delta = 1e-5
    exact = exact_gaussian_epsilon(sigma, delta)
    events = [PoissonGaussianEvent(1.0, sigma, 1)]
    res = prv_epsilon(events, delta)
    assert res.epsilon_lower <= exact <= res.epsilon_upper
    # 2 eps_error plus the effect of delta_error on each side
    eps_error = default_eps_error(events, delta)
    assert eps_error == pytest.approx(max(2e-3, 0.004 * epsilon_from_events(events, delta).epsilon))
    assert res.epsilon_upper - res.epsilon_lower <= 2 * eps_error + 0.005
    assert abs(res.epsilon_estimate - exact) < 1e-3
    # RDP (both conversions) is above the truth and above the PRV lower bound.
    for conversion in ("hypothesis-test", "classic"):
        assert (
            epsilon_from_events(
                [PoissonGaussianEvent(1.0, sigma, 1)], delta, conversion=conversion
            ).epsilon
            >= exact
        )


def test_composition_of_gaussians_is_a_gaussian():
    """k steps of sigma = one step of sigma / sqrt(k) (q = 1)."""
    k, sigma = 16, 4.0
    exact = exact_gaussian_epsilon(sigma / math.sqrt(k), 1e-6)
    res = prv_epsilon([PoissonGaussianEvent(1.0, sigma, k)], 1e-6)
    assert res.epsilon_lower <= exact <= res.epsilon_upper


def test_delta_sandwich_and_round_trip():
    sigma = 1.0
    lower, estimate, upper = prv_delta([PoissonGaussianEvent(1.0, sigma, 1)], 2.0)
    exact = exact_gaussian_delta(sigma, 2.0)
    assert lower <= exact <= upper and lower <= estimate <= upper
    res = prv_epsilon([PoissonGaussianEvent(1.0, sigma, 1)], exact)
    assert res.epsilon_lower <= 2.0 <= res.epsilon_upper


def test_upper_deltas_match_scalar_queries():
    curve = curve_for([PoissonGaussianEvent(0.04, 1.5, 300)], eps_error=0.01, delta_error=1e-12)
    eps = np.array([0.0, 0.3, 1.0, 2.5, 4.0])
    np.testing.assert_allclose(
        curve.upper_deltas(eps), [curve.delta(float(e))[2] for e in eps], rtol=1e-9, atol=1e-15
    )


def _pld_epsilons(segments, delta, interval=1e-4):
    """dp_accounting PLD: (optimistic, pessimistic) epsilon; the true value lies between."""
    pld = pytest.importorskip("dp_accounting.pld.privacy_loss_distribution")
    out = []
    for pessimistic in (False, True):
        total = None
        for q, sigma, n in segments:
            one = pld.from_gaussian_mechanism(
                standard_deviation=sigma,
                sampling_prob=q,
                pessimistic_estimate=pessimistic,
                value_discretization_interval=interval,
                use_connect_dots=pessimistic,  # the optimistic rounding needs privacy buckets
            ).self_compose(n)
            total = one if total is None else total.compose(one)
        out.append(total.get_epsilon_for_delta(delta))
    return out


def _check_against_pld(segments, delta):
    optimistic, pessimistic = _pld_epsilons(segments, delta)
    events = [PoissonGaussianEvent(q, s, n) for q, s, n in segments]
    res = prv_epsilon(events, delta)
    slack = 1e-6  # PLD's own rounding of the epsilon search
    assert res.epsilon_lower <= pessimistic + slack
    assert res.epsilon_upper >= optimistic - slack
    # and close: within 1% of the PLD value plus PRV's own error bar
    # (the upper bound is the estimate + eps_error 0.01, + the effect of delta_error)
    assert res.epsilon_upper <= 1.01 * pessimistic + 0.012
    # connect-the-dots PLD is nearly exact: the PRV estimate agrees with it closely
    assert abs(res.epsilon_estimate - pessimistic) <= 0.005 * pessimistic + 0.002
    # PRV is never looser than RDP's guarantee by more than its error bar
    from maskdp.accounting.conversions import rdp_to_epsilon
    from maskdp.accounting.rdp import DEFAULT_ORDERS

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        rdp_eps = rdp_to_epsilon(DEFAULT_ORDERS, rdp_of_events(events), delta).epsilon
    assert res.epsilon_lower <= rdp_eps


@pytest.mark.parametrize(
    "segments",
    [
        [(0.01, 1.0, 1000)],
        [(0.2, 2.0, 50)],
        [(0.001, 0.8, 3000)],
        [(0.02, 1.2, 200), (0.05, 2.5, 100)],  # heterogeneous composition
    ],
)
def test_against_dp_accounting_pld(segments):
    _check_against_pld(segments, 1e-5)


@pytest.mark.slow
def test_against_dp_accounting_pld_random_grid():
    rng = np.random.default_rng(5)
    for _ in range(20):
        q = float(10 ** rng.uniform(-3, 0))
        sigma = float(10 ** rng.uniform(np.log10(0.6), 1))
        n = int(10 ** rng.uniform(0, 3))
        delta = float(10 ** rng.uniform(-8, -3))
        _check_against_pld([(q, sigma, n)], delta)


def test_segments_with_equal_parameters_merge():
    a = prv_epsilon(
        [PoissonGaussianEvent(0.01, 1.0, 100), PoissonGaussianEvent(0.01, 1.0, 50)], 1e-5
    )
    b = prv_epsilon([PoissonGaussianEvent(0.01, 1.0, 150)], 1e-5)
    assert a == b


def test_clamped_at_zero_for_tiny_privacy_loss():
    res = prv_epsilon([PoissonGaussianEvent(1e-6, 1000.0, 1)], 1e-5)
    assert res.epsilon_lower == 0.0 and res.epsilon_estimate >= 0.0 and res.epsilon_upper >= 0.0
    assert res.epsilon_upper <= 0.011


def test_delta_above_delta_at_zero_gives_zero():
    # one Gaussian step, sigma = 1: delta(0) = 2 Phi(1/2) - 1 = 0.383
    assert prv_epsilon([PoissonGaussianEvent(1.0, 1.0, 1)], 0.999).epsilon_upper == 0.0
    assert prv_epsilon([PoissonGaussianEvent(1.0, 1.0, 1)], 0.39).epsilon_upper == 0.0
    res = prv_epsilon([PoissonGaussianEvent(1.0, 1.0, 1)], 0.37)
    assert res.epsilon_lower <= exact_gaussian_epsilon(1.0, 0.37) <= res.epsilon_upper


def test_empty_events_and_to_dict():
    res = prv_epsilon([], 1e-5)
    assert res == PRVResult(0.0, 0.0, 0.0, 1e-5)
    assert res.to_dict() == {
        "epsilon_lower": 0.0,
        "epsilon_estimate": 0.0,
        "epsilon_upper": 0.0,
        "delta": 1e-5,
    }
    assert prv_delta([], 1.0) == (0.0, 0.0, 0.0)


def test_too_many_steps_is_a_clear_error_not_a_crash():
    with pytest.raises(AccountingError, match="eps_error"):
        prv_epsilon([PoissonGaussianEvent(0.01, 1.0, 10**9)], 1e-5)


def test_a_mesh_too_coarse_for_the_step_count_is_refused_not_answered_zero():
    """At 10^9 steps an eps_error in the thousands fits the node limit, but each step's
    rounding bias (mesh 0.02 against losses of about 1e-4) drifts the composition 3.4e6
    past a grid of half-width 8.7e4: the circular FFT wrapped around and the answer read
    epsilon 0 where RDP gives 8.6e4. It must be refused."""
    with pytest.raises(AccountingError, match="too coarse.*drifts"):
        prv_epsilon([PoissonGaussianEvent(0.01, 1.0, 10**9)], 1e-5, eps_error=2108.9)


def test_delta_too_small_for_floating_point_is_a_clear_error():
    with pytest.raises(AccountingError, match="floating-point round-off"):
        prv_epsilon([PoissonGaussianEvent(0.04, 1.5, 100)], 1e-15)


def test_bad_input_raises():
    events = [PoissonGaussianEvent(0.01, 1.0, 10)]
    for delta in (0.0, 1.0, float("nan")):
        with pytest.raises(InvalidParameterError, match="delta"):
            prv_epsilon(events, delta)
    for eps_error in (0.0, -0.01, float("inf")):
        with pytest.raises(InvalidParameterError, match="eps_error"):
            prv_epsilon(events, 1e-5, eps_error=eps_error)
    with pytest.raises(InvalidParameterError, match="delta_error"):
        prv_epsilon(events, 1e-5, delta_error=1e-4)
    with pytest.raises(InvalidParameterError, match="epsilon"):
        prv_delta(events, -1.0)


def large_step_check(steps: int) -> None:
    """The issue's case (q = 0.0005, sigma = 1.5): an answer, inside the RDP bound, with the
    precision the default error asks for."""
    events = [PoissonGaussianEvent(0.0005, 1.5, steps)]
    res = prv_epsilon(events, 1e-5)
    rdp = epsilon_from_events(events, 1e-5).epsilon
    assert 0 < res.epsilon_lower <= res.epsilon_estimate <= res.epsilon_upper < rdp
    # 2 eps_error, widened by delta_error and the round-off slack (at most 1% of delta)
    assert res.epsilon_upper - res.epsilon_lower <= 2 * default_eps_error(events, 1e-5) + 5e-3
    assert res.epsilon_upper <= 1.01 * res.epsilon_estimate + 1e-3


def test_a_million_steps_at_a_tiny_rate_answers():
    large_step_check(10**6)


@pytest.mark.slow
def test_ten_million_steps_answer():
    large_step_check(10**7)


@pytest.mark.slow
def test_ten_million_steps_at_a_small_epsilon_fit_the_node_budget():
    """q = 1e-4, sigma 2, 10^7 steps (epsilon about 0.6): 0.4% of epsilon would need 3e7
    nodes (about 20 s and 2 GB); the default error grows until the grid fits NODE_BUDGET,
    here to under 2% of epsilon. The lower bound stays below dp_accounting's
    pessimistic PLD (an upper bound on the truth; at 1e-4 over 10^7 steps it is loose,
    0.781 against our upper 0.612) and the upper bound below the RDP bound."""
    from dp_accounting.pld import privacy_loss_distribution as pld
    from maskdp.accounting.prv_grid import NODE_BUDGET, affordable_eps_error
    from maskdp.accounting.relations import Relation

    events = [PoissonGaussianEvent(0.0001, 2.0, 10**7)]
    rdp = epsilon_from_events(events, 1e-5).epsilon
    error = default_eps_error(events, 1e-5)
    assert 0.004 * rdp < error == affordable_eps_error(events, 1e-8, Relation.ERASE)
    assert error <= 0.02 * rdp
    curve = curve_for(events, eps_error=error, delta_error=1e-8)
    assert curve is not None and curve.size <= 1.05 * NODE_BUDGET
    res = prv_epsilon(events, 1e-5)
    reference = (
        pld.from_gaussian_mechanism(2.0, sampling_prob=0.0001, value_discretization_interval=1e-4)
        .self_compose(10**7)
        .get_epsilon_for_delta(1e-5)
    )
    assert res.epsilon_lower <= reference  # the PLD is an upper bound on the truth
    assert res.epsilon_lower <= res.epsilon_estimate <= res.epsilon_upper < rdp
    assert res.epsilon_upper - res.epsilon_lower <= 2 * error + 5e-3


@pytest.mark.slow
def test_a_tiny_epsilon_at_ten_million_steps_answers_with_wide_bounds_not_a_refusal():
    """q = 1e-5, sigma 2, 10^7 steps (RDP epsilon 0.08): even the 0.002 floor would need 3.4e7
    nodes, past MAX_NODES. The default takes the error that fits NODE_BUDGET instead (a wide
    band, as prv-accountant answers at a fixed error), and that band overlaps
    prv-accountant's at the same error."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    events = [PoissonGaussianEvent(1e-5, 2.0, 10**7)]
    error = default_eps_error(events, 1e-5)
    assert error > 0.002
    res = prv_epsilon(events, 1e-5)
    assert res.epsilon_lower <= res.epsilon_estimate <= res.epsilon_upper
    assert res.epsilon_upper - res.epsilon_lower <= 2 * error + 5e-3
    theirs = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=1e-5, noise_multiplier=2.0)],
        max_self_compositions=[10**7],
        eps_error=error,
        delta_error=1e-8,
    ).compute_epsilon(1e-5, [10**7])
    assert res.epsilon_lower <= theirs[2] and theirs[0] <= res.epsilon_upper


@pytest.mark.slow
def test_a_million_steps_against_dp_accounting_pld():
    from dp_accounting.pld import privacy_loss_distribution as pld

    events = [PoissonGaussianEvent(0.0005, 1.5, 10**6)]
    res = prv_epsilon(events, 1e-5)
    pessimistic = pld.from_gaussian_mechanism(
        1.5, sampling_prob=0.0005, value_discretization_interval=1e-4
    ).self_compose(10**6)
    reference = pessimistic.get_epsilon_for_delta(1e-5)  # an upper bound, coarse at 10^6 steps
    assert res.epsilon_lower <= reference
    assert res.epsilon_upper <= 1.01 * reference


@pytest.mark.parametrize("q, sigma, steps", [(0.01, 1.1, 1000), (0.004, 0.8, 2500), (0.2, 2.0, 50)])
def test_erase_matches_prv_accountant(q, sigma, steps):
    """Our float64 implementation of Gopi et al. against theirs (prv-accountant, long double),
    on the same error budget: the estimates agree far inside the error bars."""
    from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

    theirs = PRVAccountant(
        prvs=[PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=sigma)],
        max_self_compositions=[steps],
        eps_error=0.01,
        delta_error=1e-8,
    ).compute_epsilon(1e-5, [steps])
    ours = prv_epsilon(
        [PoissonGaussianEvent(q, sigma, steps)], 1e-5, eps_error=0.01, delta_error=1e-8
    )
    assert ours.epsilon_estimate == pytest.approx(theirs[1], abs=1e-4)
    assert ours.epsilon_upper == pytest.approx(theirs[2], abs=1e-4)


def exact_bracket(sigma: float, steps: int, delta: float) -> None:
    """q = 1: ``steps`` Gaussian steps are one Gaussian step of sigma / sqrt(steps), whose
    epsilon is known exactly; the PRV bounds must bracket it."""
    res = prv_epsilon([PoissonGaussianEvent(1.0, sigma, steps)], delta)
    exact = exact_gaussian_epsilon(sigma / math.sqrt(steps), delta)
    assert res.epsilon_lower <= exact <= res.epsilon_upper, (steps, delta, res, exact)


def test_long_run_brackets_the_exact_gaussian():
    exact_bracket(700.0, 10**6, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("steps, sigma, delta", [(10**6, 700.0, 3e-9), (10**7, 2200.0, 3e-9)])
def test_long_run_at_small_delta_brackets_the_exact_gaussian(steps, sigma, delta):
    """float64 round-off grows with the step count (the spectrum is raised to the N-th
    power): these cases need the long double composition, and failed without it."""
    exact_bracket(sigma, steps, delta)


def round_off_check(q: float, sigma: float, steps: int, eps_error: float) -> None:
    """The round-off bound covers the float64 composition's deviation from a long double
    composition on the same grid."""
    from maskdp.accounting.prv import PRVCurve
    from maskdp.accounting.prv_discrete import round_off_bound

    curve = PRVCurve([(q, sigma)], [steps], eps_error=eps_error, delta_error=1e-12)
    epsilons = np.linspace(0.0, 12.0, 200)
    fast = np.asarray(curve._composed(None).delta(epsilons))
    precise = np.asarray(curve._composed(None, delta=1e-300).delta(epsilons))
    error = float(np.max(np.abs(fast - precise)))
    assert 0 < error <= round_off_bound(steps, curve.size, np.float64) / 10


def test_round_off_bound_covers_float64():
    round_off_check(0.01, 1.1, 10**4, 0.05)


@pytest.mark.slow
def test_round_off_bound_covers_float64_at_ten_million_steps():
    round_off_check(0.0005, 1.5, 10**7, 0.05)


def test_prv_risk_profile_answers_long_runs():
    """attack_risk with PRV reads epsilon at delta 1e-10: no refusal on a large grid."""
    from maskdp.accounting.risk import attack_risk

    events = [PoissonGaussianEvent(0.01, 1.1, 5000)]
    prv = attack_risk(events, fpr=0.01, accountant="prv")
    rdp = attack_risk(events, fpr=0.01, accountant="rdp")
    assert 0.01 < prv.tpr_upper <= rdp.tpr_upper


def test_a_curve_queried_at_fewer_steps_matches_a_fresh_curve():
    """One grid answers every step count up to its maximum (zero steps: epsilon 0, within
    the eps_error of the bounds)."""
    from maskdp.accounting.prv import PRVCurve

    curve = PRVCurve([(0.02, 1.0)], [400], eps_error=0.01, delta_error=1e-8)
    lower, estimate, upper = curve.epsilon(1e-5, [0])
    assert lower == estimate == 0.0 and upper <= 0.01
    fresh = prv_epsilon([PoissonGaussianEvent(0.02, 1.0, 100)], 1e-5, eps_error=0.01)
    lower, _, upper = curve.epsilon(1e-5, [100])
    assert lower <= fresh.epsilon_upper and fresh.epsilon_lower <= upper
