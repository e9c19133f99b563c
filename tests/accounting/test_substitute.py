"""The substitute (replace-one) relation: the antipodal pair, its RDP, its PRV, and its use.

References: dp_accounting's REPLACE_ONE privacy loss distribution (pessimistic and
optimistic), scipy's adaptive quadrature, and brute-force hockey-stick divergences on a grid.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
from maskdp.accounting.conversions import _minimise
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import PrivacyLedger, account
from maskdp.accounting.loss_pairs import LossPair
from maskdp.accounting.prv import prv_epsilon
from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events, rdp_poisson_gaussian
from maskdp.accounting.rdp_substitute import rdp_substitute
from maskdp.accounting.relations import Relation, substitute_epsilon

DELTA = 1e-5


def dp_accounting_replace_one(q: float, sigma: float, steps: int, *, pessimistic: bool) -> float:
    """dp_accounting's REPLACE_ONE epsilon: pessimistic (an upper bound) or optimistic (a
    lower bound; privacy buckets, since connect-the-dots is pessimistic only)."""
    from dp_accounting import privacy_accountant
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.from_gaussian_mechanism(
        sigma,
        sampling_prob=q,
        value_discretization_interval=1e-4,
        pessimistic_estimate=pessimistic,
        use_connect_dots=pessimistic,
        neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE,
    )
    return float(one.self_compose(steps).get_epsilon_for_delta(DELTA))


# ----------------------------------------------------------------------- the dominating pair


def hockey_stick_2d(q: float, sigma: float, x: np.ndarray, x2: np.ndarray, gamma: float) -> float:
    """H_gamma(P || Q) for P = (1-q)N(0) + qN(x), Q = (1-q)N(0) + qN(x2) in the plane, by a
    Riemann sum on a fine grid (brute force)."""
    g = np.linspace(-1.0 - 8.0 * sigma, 1.0 + 8.0 * sigma, 1201)
    h = g[1] - g[0]
    a, b = np.meshgrid(g, g, indexing="ij")

    def density(c: np.ndarray) -> np.ndarray:
        return np.exp(-((a - c[0]) ** 2 + (b - c[1]) ** 2) / (2.0 * sigma**2))

    base = density(np.zeros(2))
    p = (1.0 - q) * base + q * density(x)
    r = (1.0 - q) * base + q * density(x2)
    return float(np.maximum(p - gamma * r, 0.0).sum() * h * h / (2.0 * math.pi * sigma**2))


@pytest.mark.parametrize("q, sigma, gamma", [(0.3, 0.8, 1.5), (0.1, 0.5, 3.0), (0.6, 1.0, 1.1)])
def test_antipodal_pair_dominates_every_pair_of_clipped_contributions(q, sigma, gamma):
    """The lemma of docs/privacy.md: any two contributions of norm <= 1 give a hockey-stick
    divergence at most the antipodal pair's (checked in 2-D, where non-collinear pairs live)."""
    rng = np.random.default_rng(0)
    antipodal = hockey_stick_2d(q, sigma, np.array([1.0, 0.0]), np.array([-1.0, 0.0]), gamma)
    worst = 0.0
    for _ in range(8):  # inside the ball
        pts = rng.normal(size=(2, 2))
        pts /= np.maximum(1.0, np.linalg.norm(pts, axis=1, keepdims=True)) * rng.uniform(
            1.0, 1.5, size=(2, 1)
        )
        worst = max(worst, hockey_stick_2d(q, sigma, pts[0], pts[1], gamma))
    for angle in (0.5, 1.5, 2.5, 3.0):  # on the sphere, at angles below pi
        x2 = np.array([math.cos(angle), math.sin(angle)])
        worst = max(worst, hockey_stick_2d(q, sigma, np.array([1.0, 0.0]), x2, gamma))
    erase = hockey_stick_2d(q, sigma, np.array([1.0, 0.0]), np.zeros(2), gamma)
    assert erase < antipodal and worst <= antipodal + 1e-9
    assert antipodal > 0.01  # not a vacuous comparison


@pytest.mark.parametrize("relation", list(Relation))
@pytest.mark.parametrize("q, sigma", [(0.01, 1.1), (0.3, 0.7), (1.0, 2.0)])
def test_loss_law_matches_its_definition(relation, q, sigma):
    pair = LossPair(q, sigma, relation)
    x = np.linspace(-4.0, 5.0, 301)
    assert np.allclose(pair.inverse_loss(pair.loss(x)), x, atol=1e-9)
    # CDF of Y = l(X), X ~ P, against a Monte-Carlo-free brute force: integrate P's density
    # over {x : l(x) <= t} on a fine grid.
    grid = np.linspace(-12.0 * sigma, 1.0 + 12.0 * sigma, 400_001)
    dens = (
        (1 - q) * np.exp(-(grid**2) / (2 * sigma**2))
        + q * np.exp(-((grid - 1) ** 2) / (2 * sigma**2))
    ) / (sigma * math.sqrt(2 * math.pi))
    loss = pair.loss(grid)
    step = grid[1] - grid[0]
    for t in (-0.5, 0.0, 0.02, 0.7, 2.5):
        brute = float(dens[loss <= t].sum() * step)
        assert pair.cdf(np.array([t]))[0] == pytest.approx(brute, abs=2e-5)
        assert pair.sf(np.array([t]))[0] == pytest.approx(1.0 - brute, abs=2e-5)
    # The mean of Y is KL(P || Q); for q = 1 it is 1 / (2 sigma^2) (erase) or 2 / sigma^2.
    if q == 1.0:
        kl = (0.5 if relation is Relation.ERASE else 2.0) / sigma**2
        assert pair.truncated_mean(-60.0, 60.0) == pytest.approx(kl, rel=1e-12)


# ---------------------------------------------------------------------------- RDP of the pair


def rdp_by_quad(q: float, sigma: float, alpha: float) -> float:
    from scipy import integrate

    def log_mix(x: float, shift: float) -> float:
        return float(
            np.logaddexp(
                math.log1p(-q) - x * x / (2 * sigma**2),
                math.log(q) - (x - shift) ** 2 / (2 * sigma**2),
            )
        )

    # Scale the integrand by its value at the tilted peak so that large orders do not overflow.
    def log_f(x: float) -> float:
        return alpha * log_mix(x, 1.0) + (1.0 - alpha) * log_mix(x, -1.0)

    xs = np.linspace(-10 * sigma - 1, 2 * alpha + 10 * sigma, 2001)
    peak = max(log_f(float(x)) for x in xs)
    value, _ = integrate.quad(
        lambda x: math.exp(log_f(x) - peak),
        -30 * sigma - 1,
        2 * alpha + 30 * sigma,
        points=[0.0, 1.0, alpha],
        limit=1000,
        epsabs=0.0,
        epsrel=1e-13,
    )
    return (peak + math.log(value) - math.log(sigma * math.sqrt(2 * math.pi))) / (alpha - 1.0)


@pytest.mark.parametrize("q, sigma", [(0.01, 1.1), (0.2, 0.8), (0.0625, 3.12), (0.5, 2.0)])
def test_rdp_substitute_matches_adaptive_quadrature(q, sigma):
    alphas = np.array([1.5, 2.0, 8.0, 32.5, 100.0])
    ours = rdp_substitute(q, sigma, alphas)
    for a, value in zip(alphas, ours, strict=True):
        assert value == pytest.approx(rdp_by_quad(q, sigma, float(a)), rel=1e-8)
    # The pair is a post-processing of N(1) against N(-1): never above 2 alpha / sigma^2.
    assert np.all(ours <= 2 * alphas / sigma**2)
    assert np.array_equal(rdp_substitute(1.0, sigma, alphas), 2 * alphas / sigma**2)


# ------------------------------------------------------- the accountants against dp_accounting

SETTINGS = [
    (0.01, 1.1, 1000),
    (0.0625, 3.12, 128),
    (0.004, 0.8, 2500),
    (0.02, 0.7, 500),
    (0.1, 2.0, 100),
    (0.05, 1.5, 200),
    (0.0256, 1.0, 391),
    (0.001, 1.0, 5000),
    (0.2, 4.0, 50),
    (0.5, 6.0, 20),
    (1.0, 5.0, 10),
    (0.03, 0.9, 300),
    (0.008, 1.3, 3000),
    (0.15, 2.5, 150),
    (0.0537, 3.0, 558),
    (0.3, 3.0, 60),
    (0.012, 0.6, 800),
    (0.07, 1.8, 400),
    (0.002, 0.9, 4000),
    (0.04, 5.0, 1000),
    (0.25, 8.0, 200),
    (0.005, 2.0, 2000),
]


def check_against_replace_one(q: float, sigma: float, steps: int) -> None:
    events = [PoissonGaussianEvent(q, sigma, steps)]
    upper_ref = dp_accounting_replace_one(q, sigma, steps, pessimistic=True)
    lower_ref = dp_accounting_replace_one(q, sigma, steps, pessimistic=False)
    prv = prv_epsilon(events, DELTA, relation="substitute")
    assert lower_ref <= prv.epsilon_upper <= 1.01 * upper_ref, (q, sigma, steps, prv, upper_ref)
    assert prv.epsilon_lower <= upper_ref
    rdp = account(events, DELTA, accountant="rdp", relation="substitute").epsilon
    assert rdp >= upper_ref * (1 - 1e-9)  # a valid bound, looser than the numerical curve


@pytest.mark.parametrize("q, sigma, steps", SETTINGS[:3])
def test_substitute_within_one_percent_of_dp_accounting_replace_one(q, sigma, steps):
    check_against_replace_one(q, sigma, steps)


@pytest.mark.slow
@pytest.mark.parametrize("q, sigma, steps", SETTINGS[3:])
def test_substitute_within_one_percent_of_dp_accounting_replace_one_grid(q, sigma, steps):
    check_against_replace_one(q, sigma, steps)


def test_tight_substitute_beats_group_privacy():
    """The issue's table: the antipodal pair halves the gap that group privacy leaves."""
    events = [PoissonGaussianEvent(0.01, 1.1, 1000)]
    rdp = rdp_of_events(events, DEFAULT_ORDERS)

    def erase_eps(d: float) -> float:
        return _minimise(DEFAULT_ORDERS, rdp, d, "hypothesis-test").epsilon

    group = substitute_epsilon(erase_eps, DELTA)[0]
    tight = prv_epsilon(events, DELTA, relation="substitute").epsilon_upper
    rdp_tight = account(events, DELTA, relation="substitute").epsilon
    erase = prv_epsilon(events, DELTA).epsilon_upper
    assert erase < tight < rdp_tight < group
    assert tight < 0.7 * group


def test_ledger_and_risk_use_the_substitute_pair():
    from maskdp.accounting.risk import attack_risk

    ledger = PrivacyLedger()
    ledger.record(0.01, 1.1, 1000)
    events = [PoissonGaussianEvent(0.01, 1.1, 1000)]
    expected = prv_epsilon(events, DELTA, relation="substitute").epsilon_upper
    assert ledger.epsilon(DELTA, accountant="prv", relation="substitute") == pytest.approx(expected)
    erase = attack_risk(events, fpr=0.01, accountant="prv")
    substitute = attack_risk(events, fpr=0.01, accountant="prv", relation="substitute")
    assert substitute.tpr_upper > erase.tpr_upper


def test_per_step_rdp_of_substitute_is_above_erase():
    alphas = np.array([1.5, 2.0, 10.0, 64.0])
    erase = rdp_poisson_gaussian(0.05, 1.2, alphas)
    assert np.all(rdp_substitute(0.05, 1.2, alphas) > erase)
