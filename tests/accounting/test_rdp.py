"""RDP of the Poisson-subsampled Gaussian against independent truths.

Truths: the closed form at q = 1, the exact integer binomial formula (for the quadrature used
at fractional orders), Opacus's and dp_accounting's implementations, and a 40-digit mpmath
integral of the definition.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maskdp.accounting import rdp as R
from maskdp.accounting.conversions import epsilon_from_events
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events, rdp_poisson_gaussian


def _opacus_rdp():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        mod = pytest.importorskip("opacus.accountants.analysis.rdp")
    return mod._compute_rdp


def _random_settings(seed: int, n: int):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        q = float(10 ** rng.uniform(-4, 0))
        sigma = float(10 ** rng.uniform(np.log10(0.3), 2))
        orders = np.concatenate([rng.integers(2, 256, 2), 1 + 10 ** rng.uniform(-2, 1.6, 2)])
        yield q, sigma, orders


def test_default_orders_shape():
    o = DEFAULT_ORDERS
    assert o.ndim == 1 and 200 <= o.size <= 500
    assert np.all(np.diff(o) > 0) and o[0] == pytest.approx(1.01) and o[-1] >= 10_000
    assert np.all(o > 1)
    # fine near 1, dense up to 20, integers beyond
    assert np.all(np.diff(o[o < 1.1]) <= 0.0100001)
    assert np.all(np.diff(o[(o >= 1.1) & (o <= 20)]) <= 0.25 + 1e-9)
    assert np.all(o[o > 20] == np.round(o[o > 20]))
    assert not o.flags.writeable


TF_PRIVACY_ORDERS = [
    1.25,
    1.5,
    1.75,
    2.0,
    2.25,
    2.5,
    3.0,
    3.5,
    4.0,
    4.5,
    *range(5, 64),
    128,
    256,
    512,
]
"""tensorflow_privacy's ``compute_dp_sgd_privacy_lib`` grid (TF-Privacy is not installed here)."""


def library_grids() -> dict[str, np.ndarray]:
    from dp_accounting.rdp.rdp_privacy_accountant import DEFAULT_RDP_ORDERS
    from opacus.accountants import RDPAccountant

    return {
        "opacus": np.array(RDPAccountant.DEFAULT_ALPHAS, dtype=float),
        "dp_accounting": np.array(DEFAULT_RDP_ORDERS, dtype=float),
        "tf_privacy": np.array(TF_PRIVACY_ORDERS, dtype=float),
    }


def test_default_orders_contain_the_libraries_default_grids():
    for name, grid in library_grids().items():
        nearest = DEFAULT_ORDERS[np.abs(DEFAULT_ORDERS[None, :] - grid[:, None]).argmin(axis=1)]
        assert np.allclose(nearest, grid, rtol=1e-12, atol=0), name


@pytest.mark.parametrize(
    "q, sigma, steps", [(0.0537, 3.0, 558), (0.01, 1.1, 1000), (0.2, 0.9, 40), (0.001, 4.0, 10**5)]
)
def test_never_looser_than_opacus_or_dp_accounting_on_their_grids(q, sigma, steps):
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant
    from opacus.accountants import RDPAccountant

    ours = epsilon_from_events([PoissonGaussianEvent(q, sigma, steps)], 1e-5).epsilon
    opacus = RDPAccountant()
    opacus.history = [(sigma, q, steps)]
    dpa = rdp_privacy_accountant.RdpAccountant()
    dpa.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
    # Equal orders give equal values up to floating point (1e-9 relative: far below the
    # 4.6e-6 a missing order cost).
    assert ours <= opacus.get_epsilon(1e-5) * (1 + 1e-9)
    assert ours <= dpa.get_epsilon(1e-5) * (1 + 1e-9)


def test_q_one_is_the_gaussian_closed_form():
    orders = np.array([1.01, 1.5, 2.0, 7.25, 100.0, 1e4])
    for sigma in (0.3, 1.0, 7.0, 1000.0):
        np.testing.assert_array_equal(
            rdp_poisson_gaussian(1.0, sigma, orders), orders / (2 * sigma**2)
        )


def test_quadrature_matches_exact_integer_formula():
    """The fractional-order quadrature evaluated at integer orders vs the binomial sum."""
    alphas = np.array([2.0, 3, 5, 8, 13, 20, 50, 300])
    worst = 0.0
    for q in (1e-9, 1e-4, 0.01, 0.1, 0.5, 0.9, 0.999999):
        for sigma in (0.1, 0.3, 0.5, 0.8, 1.3, 3.0, 20.0, 1000.0):
            exact = R._log_am1_integer(q, sigma, alphas)
            quad = R._log_am1_fractional(q, sigma, alphas)
            # log(A - 1) to 1e-12 absolute = A - 1 to 1e-12 relative (or log A when huge).
            err = np.abs(quad - exact) / np.maximum(1.0, np.abs(exact))
            worst = max(worst, float(err.max()))
    assert worst < 1e-12


def test_against_mpmath_integral():
    """A 40-digit integral of A_alpha - 1 = E[(1+w)^alpha - 1 - alpha w] at fractional orders."""
    mp = pytest.importorskip("mpmath")
    mp.mp.dps = 40

    def log_a(q, s, a):
        q, s, a = mp.mpf(q), mp.mpf(s), mp.mpf(a)

        def f(z):
            w = q * (mp.exp((2 * z - 1) / (2 * s * s)) - 1)
            return mp.npdf(z, 0, s) * ((1 + w) ** a - 1 - a * w)

        z0 = s * s * mp.log(1 / q - 1) + mp.mpf(0.5)
        pts = sorted(
            {-40 * s, -5 * s, mp.mpf(0), z0 - 2 * s, z0, z0 + 2 * s, a, a + 40 * s + abs(z0)}
        )
        return mp.log1p(mp.quad(f, pts, maxdegree=10))

    cases = [
        (0.0615, 0.305, 1.0106),  # Opacus is 5e-11 off here (series truncation)
        (0.000945, 0.428, 1.0153),  # Opacus is 1e-7 off here
        (0.000115, 16.35, 1.0209),  # A - 1 ~ 5e-13: Opacus is 7e-3 off here
        (0.05, 0.8, 1.5),
        (0.3, 2.0, 7.75),
    ]
    for q, s, a in cases:
        exact = float(log_a(q, s, a))
        ours = rdp_poisson_gaussian(q, s, [a])[0] * (a - 1)
        assert ours == pytest.approx(exact, rel=1e-12)


def test_matches_opacus_on_random_settings():
    """>= 200 random (q, sigma, orders): same RDP as Opacus's two-series implementation.

    Opacus sums terms of size 1 in double precision and truncates its series at e^-30
    (absolute), so its log A carries an absolute error up to ~1e-10; we allow that on top of
    1e-9 relative (our own error is ~1e-15 relative, see the mpmath test).
    """
    compute = _opacus_rdp()
    n = 0
    for q, sigma, orders in _random_settings(seed=7, n=220):
        ours = rdp_poisson_gaussian(q, sigma, orders)
        theirs = np.array([compute(q, sigma, float(a)) for a in orders])
        log_a_ours, log_a_theirs = ours * (orders - 1), theirs * (orders - 1)
        np.testing.assert_allclose(log_a_ours, log_a_theirs, rtol=1e-9, atol=1e-10)
        n += 1
    assert n >= 200


def test_matches_dp_accounting_at_integer_orders():
    """dp_accounting is exact at integer orders (conservative at fractional ones)."""
    dra = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    rng = np.random.default_rng(11)
    for _ in range(200):
        q = float(10 ** rng.uniform(-4, 0))
        sigma = float(10 ** rng.uniform(np.log10(0.3), 2))
        orders = np.unique(rng.integers(2, 400, 4)).astype(float)
        ours = rdp_poisson_gaussian(q, sigma, orders)
        theirs = dra._compute_rdp_poisson_subsampled_gaussian(q, sigma, orders)
        np.testing.assert_allclose(
            ours * (orders - 1), theirs * (orders - 1), rtol=1e-9, atol=1e-13
        )


def test_dp_accounting_is_conservative_at_fractional_orders():
    dra = pytest.importorskip("dp_accounting.rdp.rdp_privacy_accountant")
    orders = np.array([1.25, 1.5, 2.5, 3.3, 7.7])
    ours = rdp_poisson_gaussian(0.05, 0.8, orders)
    theirs = dra._compute_rdp_poisson_subsampled_gaussian(0.05, 0.8, orders)
    assert np.all(theirs >= ours * (1 - 1e-12))


def test_rdp_of_events_composes_additively_and_merges():
    a = PoissonGaussianEvent(0.01, 1.1, 100)
    b = PoissonGaussianEvent(0.2, 3.0, 7)
    a2 = PoissonGaussianEvent(0.01, 1.1, 50)
    total = rdp_of_events([a, b, a2])
    expected = 150 * rdp_poisson_gaussian(0.01, 1.1, DEFAULT_ORDERS) + 7 * rdp_poisson_gaussian(
        0.2, 3.0, DEFAULT_ORDERS
    )
    np.testing.assert_allclose(total, expected, rtol=1e-14)
    np.testing.assert_array_equal(rdp_of_events([]), np.zeros(DEFAULT_ORDERS.size))


def test_does_not_mutate_orders():
    orders = np.array([2.0, 1.5, 3.0])
    before = orders.copy()
    rdp_poisson_gaussian(0.1, 1.0, orders)
    rdp_of_events([PoissonGaussianEvent(0.1, 1.0, 3)], orders)
    np.testing.assert_array_equal(orders, before)


@pytest.mark.parametrize("q", [1e-6, 1e-4, 0.3, 0.999999, 1.0])
@pytest.mark.parametrize("sigma", [0.3, 1.0, 1000.0])
def test_finite_and_monotone_in_order_on_the_whole_domain(q, sigma):
    orders = np.concatenate([DEFAULT_ORDERS, [1e4 + 0.5, 2e4]])
    orders.sort()
    rdp = rdp_poisson_gaussian(q, sigma, orders)
    assert np.all(np.isfinite(rdp)) and np.all(rdp >= 0)
    # RDP is non-decreasing in the order (up to 1e-12 relative rounding)
    assert np.all(np.diff(rdp) >= -1e-12 * rdp[1:])
    total = rdp_of_events([PoissonGaussianEvent(q, sigma, 10**9)], orders)
    assert np.all(np.isfinite(total))
    from maskdp.accounting.conversions import epsilon_from_events

    for steps in (1, 10**9):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            for conversion in ("hypothesis-test", "classic"):
                res = epsilon_from_events(
                    [PoissonGaussianEvent(q, sigma, steps)], 1e-5, conversion=conversion
                )
                assert math.isfinite(res.epsilon) and res.epsilon >= 0


@settings(max_examples=60, deadline=None)
@given(
    q=st.floats(1e-6, 1.0),
    factor=st.floats(1.001, 10.0),
    sigma=st.floats(0.3, 1000.0),
    order=st.one_of(st.integers(2, 3000).map(float), st.floats(1.01, 60.0)),
)
def test_monotone_in_q_and_sigma(q, factor, sigma, order):
    q2 = min(1.0, q * factor)
    base = rdp_poisson_gaussian(q, sigma, [order])[0]
    more_q = rdp_poisson_gaussian(q2, sigma, [order])[0]
    more_sigma = rdp_poisson_gaussian(q, sigma * factor, [order])[0]
    assert more_q >= base * (1 - 1e-12)
    assert more_sigma <= base * (1 + 1e-12)


def test_bad_input_raises():
    for q in (0.0, -0.1, 1.5, float("nan"), float("inf"), True, "0.1"):
        with pytest.raises(InvalidParameterError, match="sample_rate"):
            rdp_poisson_gaussian(q, 1.0, [2.0])
    for sigma in (0.0, -1.0, float("nan"), float("inf")):
        with pytest.raises(InvalidParameterError, match="noise_multiplier"):
            rdp_poisson_gaussian(0.1, sigma, [2.0])
    for orders in ([1.0], [0.5, 2.0], [float("nan")], [float("inf")], [], [[2.0, 3.0]], [2e6]):
        with pytest.raises(InvalidParameterError, match="orders"):
            rdp_poisson_gaussian(0.1, 1.0, orders)
    with pytest.raises(InvalidParameterError, match="events"):
        rdp_of_events([(0.1, 1.0, 3)])


def test_huge_fractional_order_falls_back_to_a_convexity_upper_bound():
    # sigma = 0.3, order 90_000.5: too many quadrature nodes; interpolation of log A between
    # the neighbouring integer orders (an upper bound by convexity).
    a = 90_000.5
    value = rdp_poisson_gaussian(0.01, 0.3, [a])[0] * (a - 1)
    lo = rdp_poisson_gaussian(0.01, 0.3, [90_000.0])[0] * 89_999.0
    hi = rdp_poisson_gaussian(0.01, 0.3, [90_001.0])[0] * 90_000.0
    assert value == pytest.approx(0.5 * (lo + hi), rel=1e-12)


@pytest.mark.parametrize("sigma", [1e-300, 1e-200, 1e-160, 1e-20])
@pytest.mark.parametrize("q", [0.5, 1.0])
def test_vanishing_noise_never_reports_a_small_epsilon(q: float, sigma: float) -> None:
    """Floating point breakdown at tiny sigma must err to +inf, never to NaN or 0."""
    from maskdp.accounting.conversions import rdp_to_epsilon

    rdp = rdp_poisson_gaussian(q, sigma, DEFAULT_ORDERS)
    assert not np.isnan(rdp).any()
    assert rdp_to_epsilon(DEFAULT_ORDERS, 10 * rdp, 1e-5).epsilon > 1e6
