"""The empirical privacy audit against independent truths.

- Clopper-Pearson against scipy's exact binomial interval and the closed form for 0 errors;
  the epsilon bound against hand-computed cases;
- the statistics on exact Gaussian-mechanism scores: the bound stays below the mechanism's
  exact epsilon (Balle and Wang 2018, Thm. 8) in at least 95% of repetitions, and gets
  close to it;
- MaskDP-SGD end to end: a sensitive canary stays below the accountant's epsilon (with
  enough runs that a noiseless, leaking step would exceed it, shown by the sigma = 0 run);
  a moderately noisy one is detected but bounded; a public canary is detected far above
  the accountant's epsilon whatever the noise, because public content is not protected.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from scipy import stats
from scipy.optimize import brentq

import maskdp.analysis.runs as runs_module
from maskdp.analysis.audit import AuditResult, audit
from maskdp.analysis.canary import plant_canary, rademacher_pattern
from maskdp.analysis.stats import (
    Counts,
    choose_threshold,
    clopper_pearson,
    clopper_pearson_upper,
    count_guesses,
    epsilon_lower_bound,
    theory_epsilon,
)
from maskdp.checks import check_calibration, check_confidence, check_count, check_positive
from maskdp.errors import InvalidInputError
from maskdp.mechanism.views import DropView, FillView
from maskdp.models import PrivateResidual, SmallVideoCNN, VideoViT
from maskdp.settings import PrivacySettings

DELTA = 1e-5
# A fixed engine keeps these tests about the audit (all engines agree with the reference
# loop in test_engines.py); "hooks" is the fastest on these tiny models.
ENGINE = "hooks"
# A small audit: one step at sigma = 1, C = 0.1, 4 runs per world.
SMALL = {"noise_multiplier": 1.0, "max_grad_norm": 0.1, "steps": 1, "trials": 4, "engine": ENGINE}


def tiny_cnn() -> SmallVideoCNN:
    return SmallVideoCNN(num_classes=2, in_channels=1, width=4, groups=2)


def tiny_data(n: int = 4, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Clips (n, 1, 4, 8, 8) in [0, 1], a central 4x4 sensitive box, random labels."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 1, 4, 8, 8, generator=gen)
    m = torch.zeros(n, 4, 8, 8, dtype=torch.bool)
    m[:, :, 2:6, 2:6] = True
    y = torch.randint(0, 2, (n,), generator=gen)
    return x, m, y


def best_possible(runs: int) -> float:
    """The bound of a perfect test on ``runs`` evaluated runs per world: the audit's ceiling."""
    return epsilon_lower_bound(Counts(tp=runs, fp=0, tn=runs, fn=0), delta=DELTA)


def separation(result: AuditResult) -> float:
    """Standardised mean difference of the two worlds' scores: estimates mu = sqrt(T) / sigma."""
    s_in, s_out = np.array(result.scores_in), np.array(result.scores_out)
    return float((s_in.mean() - s_out.mean()) / np.sqrt((s_in.var() + s_out.var()) / 2))


def gaussian_epsilon(mu: float, delta: float) -> float:
    """Exact epsilon(delta) of the Gaussian mechanism with sensitivity / std = mu."""

    def gap(eps: float) -> float:
        return (
            stats.norm.cdf(-eps / mu + mu / 2)
            - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
            - delta
        )

    return brentq(gap, 0.0, 100.0)


# ----------------------------------------------------------------------------- statistics


@pytest.mark.parametrize(
    ("k", "n", "confidence"),
    [(0, 1, 0.95), (0, 50, 0.975), (3, 50, 0.95), (17, 40, 0.99), (49, 50, 0.9), (7, 7, 0.95)],
)
def test_clopper_pearson_matches_scipy(k: int, n: int, confidence: float) -> None:
    ours = clopper_pearson_upper(k, n, confidence)
    ci = stats.binomtest(k, n, alternative="less").proportion_ci(
        confidence_level=confidence, method="exact"
    )
    assert ours == pytest.approx(ci.high, rel=1e-9, abs=1e-12)
    if k < n:  # the Beta quantile, independently
        assert ours == pytest.approx(stats.beta.ppf(confidence, k + 1, n - k), rel=1e-9)


def test_clopper_pearson_zero_successes_closed_form() -> None:
    # P(0 successes) = (1 - p)^n = alpha  =>  p_u = 1 - alpha^(1/n).
    for n in (1, 10, 137):
        assert clopper_pearson_upper(0, n, 0.95) == pytest.approx(1 - 0.05 ** (1 / n))


def test_two_sided_interval_is_two_one_sided_bounds() -> None:
    """The leak test's interval and the audit's upper bound are one Clopper-Pearson."""
    from maskdp.analysis import leakage

    assert leakage.clopper_pearson is clopper_pearson
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 400)]:
        low, high = clopper_pearson(k, n, 0.9)
        assert high == clopper_pearson_upper(k, n, 0.95)
        mirrored = 1 - clopper_pearson_upper(n - k, n, 0.95)  # lower = 1 - upper of failures
        assert low == (0.0 if k == 0 else pytest.approx(mirrored, rel=1e-12))


def test_audit_checks() -> None:
    assert check_count("trials", np.int64(3), 2) == 3
    assert check_positive("scale", 2) == 2.0
    assert check_confidence(0.9) == 0.9
    assert check_calibration(10, 0.5, None) == 5 and check_calibration(10, 0.5, 1.0) == 0
    for bad, match in [
        (lambda: check_count("trials", True), "trials must be an int >= 0"),
        (lambda: check_count("trials", 1.0, 1), "trials must be an int >= 1"),
        (lambda: check_positive("scale", float("inf")), "scale must be finite"),
        (lambda: check_positive("scale", 0), "scale must be a number > 0"),
        (lambda: check_confidence(1), "confidence must be a number in"),
        (lambda: check_calibration(10, 0.01, None), "leaves 0 of 10"),
        (lambda: check_calibration(10, "half", None), "calibration_fraction"),
        (lambda: check_calibration(10, 0.5, float("inf")), "threshold"),
    ]:
        with pytest.raises(InvalidInputError, match=match):
            bad()


def test_epsilon_bound_hand_computed() -> None:
    # A perfect test on 50 + 50 runs: both upper bounds are 1 - (0.025)^(1/50) (union bound).
    u = 1 - 0.025 ** (1 / 50)
    expected = math.log((1 - DELTA - u) / u)
    assert best_possible(50) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(2.5703, abs=1e-3)
    # 5 false positives of 100, 30 false negatives of 100.
    fpr = stats.beta.ppf(0.975, 6, 95)
    fnr = stats.beta.ppf(0.975, 31, 70)
    expected = max(math.log((1 - 0.01 - fpr) / fnr), math.log((1 - 0.01 - fnr) / fpr))
    counts = Counts(tp=70, fp=5, tn=95, fn=30)
    assert epsilon_lower_bound(counts, delta=0.01) == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(math.log((1 - 0.01 - fnr) / fpr))  # the FPR side wins
    # Symmetric: swapping the roles of FPR and FNR gives the same bound.
    swapped = Counts(tp=95, fp=30, tn=70, fn=5)
    assert epsilon_lower_bound(swapped, delta=0.01) == pytest.approx(expected, rel=1e-9)


def test_epsilon_bound_is_zero_without_evidence() -> None:
    assert epsilon_lower_bound(Counts(tp=25, fp=25, tn=25, fn=25), delta=DELTA) == 0.0
    assert epsilon_lower_bound(Counts(tp=0, fp=0, tn=50, fn=50), delta=DELTA) == 0.0
    assert epsilon_lower_bound(Counts(tp=1, fp=1, tn=0, fn=0), delta=DELTA) == 0.0
    # Confidence costs: a higher confidence gives a smaller bound.
    counts = Counts(tp=90, fp=2, tn=98, fn=10)
    assert epsilon_lower_bound(counts, delta=DELTA, confidence=0.99) < epsilon_lower_bound(
        counts, delta=DELTA, confidence=0.9
    )


def test_count_and_threshold() -> None:
    s_in, s_out = np.array([2.0, 3.0, 0.5]), np.array([0.0, 1.0, -1.0, 2.5])
    assert count_guesses(s_in, s_out, 1.5) == Counts(tp=2, fp=1, tn=3, fn=1)
    # Perfectly separated scores: the threshold lies in the gap, every guess is right.
    tau = choose_threshold(np.arange(10.0) + 20, np.arange(10.0), delta=DELTA)
    assert 9 < tau < 20
    assert count_guesses(np.arange(10.0) + 20, np.arange(10.0), tau) == Counts(10, 0, 10, 0)


def test_bound_is_valid_and_tight_on_gaussian_scores() -> None:
    """The whole test pipeline on exact Gaussian-mechanism outputs N(0, 1) vs N(mu, 1).

    At delta = 0.05 the bound can approach the truth (unlike at 1e-5), so an invalid bound
    (a point estimate, a missing union bound) would exceed the exact epsilon often.
    """
    mu, delta, n, reps = 1.0, 0.05, 1000, 100
    exact = gaussian_epsilon(mu, delta)
    rng = np.random.default_rng(0)
    bounds = []
    for _ in range(reps):
        out, inn = rng.normal(0.0, 1.0, 2 * n), rng.normal(mu, 1.0, 2 * n)
        tau = choose_threshold(inn[:n], out[:n], delta=delta)
        counts = count_guesses(inn[n:], out[n:], tau)
        bounds.append(epsilon_lower_bound(counts, delta=delta))
    bounds = np.array(bounds)
    assert np.mean(bounds > exact) <= 0.05
    assert np.median(bounds) > 0.6 * exact


@pytest.mark.parametrize(
    "bad",
    [
        lambda: Counts(tp=-1, fp=0, tn=1, fn=1),
        lambda: Counts(tp=True, fp=0, tn=1, fn=1),
        lambda: Counts(tp=0, fp=0, tn=1, fn=0),
        lambda: clopper_pearson_upper(3, 2, 0.95),
        lambda: clopper_pearson_upper(0, 0, 0.95),
        lambda: clopper_pearson_upper(0, 5, 1.0),
        lambda: epsilon_lower_bound(Counts(1, 0, 1, 0), delta=0.0),
        lambda: epsilon_lower_bound((1, 0, 1, 0), delta=DELTA),
        lambda: count_guesses([], [1.0], 0.0),
        lambda: count_guesses([float("nan")], [1.0], 0.0),
    ],
)
def test_statistics_refuse_bad_input(bad) -> None:
    with pytest.raises(InvalidInputError):
        bad()


def test_theory_epsilon_is_the_ledger_epsilon() -> None:
    from maskdp.accounting.ledger import PrivacyLedger

    ledger = PrivacyLedger()
    ledger.record(0.25, 1.5, 7)
    got = theory_epsilon(
        sample_rate=0.25, noise_multiplier=1.5, steps=7, delta=DELTA, accountant="rdp"
    )
    assert got == ledger.epsilon(DELTA)
    assert (
        theory_epsilon(
            sample_rate=1.0, noise_multiplier=0.0, steps=1, delta=DELTA, accountant="rdp"
        )
        == math.inf
    )


# ----------------------------------------------------------------------------- canaries


def test_plant_canary_touches_only_its_region() -> None:
    x, m, _ = tiny_data(1)
    pattern = rademacher_pattern(x.shape[1:], scale=3.0, seed=1)
    assert set(pattern.unique().tolist()) == {-3.0, 3.0}
    for region, inside in (("sensitive", m[0]), ("public", ~m[0])):
        planted = plant_canary(x[0], m[0], pattern, region=region)
        assert torch.equal(planted[:, inside], pattern[:, inside])
        assert torch.equal(planted[:, ~inside], x[0][:, ~inside])
    with pytest.raises(InvalidInputError, match="no sensitive pixels"):
        plant_canary(x[0], torch.zeros_like(m[0]), pattern, region="sensitive")
    with pytest.raises(InvalidInputError, match="shape"):
        plant_canary(x[0], m[0], pattern[:, :2], region="public")
    with pytest.raises(InvalidInputError, match="canary_region"):
        plant_canary(x[0], m[0], pattern, region="mask")


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"canary_region": "label"}, "canary_region"),
        ({"trials": 1}, "trials"),
        ({"calibration_fraction": 0.0}, "calibration_fraction"),
        ({"calibration_fraction": 0.99, "trials": 10}, "calibration_fraction"),
        ({"threshold": float("nan")}, "threshold"),
        ({"canary_index": 4}, "canary_index"),
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"sample_rate": 0.0}, "sample_rate"),
        ({"steps": 0}, "steps"),
        ({"delta": 1.0}, "delta"),
        ({"confidence": 1.5}, "confidence"),
        ({"accountant": "moments"}, "accountant"),
        ({"learning_rate": 0.0}, "learning_rate"),
        ({"canary_scale": -1.0}, "canary_scale"),
        ({"canary_pattern": [1.0]}, "canary_pattern"),
        ({"seed": -1}, "seed"),
        ({"seed": None}, "seed"),
        ({"public_sample_rate": 1.5}, "public_sample_rate"),
        ({"public_scale": 0.0}, "public_scale"),
        ({"score": "loss"}, "score"),
    ],
)
def test_audit_refuses_bad_input(kwargs: dict, match: str) -> None:
    with pytest.raises(InvalidInputError, match=match):
        audit(tiny_cnn, tiny_data(), **{**SMALL, **kwargs})


def test_audit_refuses_bad_dataset_and_model() -> None:
    with pytest.raises(InvalidInputError, match="dataset"):
        audit(tiny_cnn, 42, **SMALL)
    x, m, y = tiny_data()
    with pytest.raises(InvalidInputError, match="public pixels"):
        audit(tiny_cnn, (x, torch.ones_like(m), y), canary_region="public", **SMALL)
    with pytest.raises(InvalidInputError, match="nn.Module"):
        audit(lambda: "model", (x, m, y), **SMALL)


# ----------------------------------------------------------------------------- end to end


def test_result_fields_reproducibility_and_rng_hygiene() -> None:
    settings = {**SMALL, "steps": 2}
    before = torch.get_rng_state()
    first = audit(tiny_cnn, tiny_data(), sample_rate=0.5, seed=3, **settings)
    assert torch.equal(torch.get_rng_state(), before)  # the global RNG is untouched
    again = audit(tiny_cnn, tiny_data(), sample_rate=0.5, seed=3, **settings)
    assert first.scores_in == again.scores_in and first.scores_out == again.scores_out
    assert torch.equal(torch.get_rng_state(), before)
    # The seed fixes the whole audit (initial model, pattern, sampling, noise): another
    # seed, other scores.
    other = audit(tiny_cnn, tiny_data(), sample_rate=0.5, seed=4, **settings)
    assert other.scores_in != first.scores_in and other.scores_out != first.scores_out
    assert isinstance(first, AuditResult)
    assert first.calibration_trials == 2 and len(first.scores_in) == len(first.scores_out) == 4
    assert first.counts.positives == first.counts.negatives == 2
    assert first.canary_signal == pytest.approx(0.1)  # saturated: the clip norm
    data = json.loads(json.dumps(first.to_dict()))
    assert data["counts"] == first.counts.to_dict()
    assert set(data["scores_summary"]) == {"in", "out"}
    assert data["epsilon_theory"] == first.epsilon_theory
    # A fixed threshold evaluates every run.
    fixed = audit(tiny_cnn, tiny_data(), seed=3, threshold=0.0, **settings)
    assert fixed.calibration_trials == 0 and fixed.counts.positives == 4


def test_dataset_of_records_equals_stacked_tensors() -> None:
    from maskdp.data import SyntheticPrivateActions

    ds = SyntheticPrivateActions(size=6, frames=4, image_size=16, channels=1, num_classes=2)
    settings = {**SMALL, "trials": 3}
    a = audit(tiny_cnn, ds, **settings)
    b = audit(tiny_cnn, ds.tensors(), **settings)
    assert a.scores_in == b.scores_in and a.scores_out == b.scores_out


def test_every_run_is_built_by_make_private(monkeypatch) -> None:
    """Each run of each world builds its optimizer and loader with make_private."""
    calls = []
    real = runs_module.make_private

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(runs_module, "make_private", counting)
    settings = {**SMALL, "steps": 2, "trials": 3}
    result = audit(tiny_cnn, tiny_data(), sample_rate=0.5, **settings)
    assert len(calls) == 6 and result.trials == 3
    assert {c["public_batch_size"] for c in calls} == {2}
    assert all(c["noise_multiplier"] == 1.0 and c["engine"] == ENGINE for c in calls)


def test_settings_are_the_keywords() -> None:
    """``settings=`` audits the same mechanism as the keywords; never both."""
    x, m, y = tiny_data()
    plan = {"steps": 2, "trials": 3, "seed": 2}
    keywords = {"noise_multiplier": 1.0, "max_grad_norm": 0.1, "engine": ENGINE}
    by_keywords = audit(tiny_cnn, (x, m, y), sample_rate=0.5, **keywords, **plan)
    settings = PrivacySettings.build(
        sample_rate=0.5, expected_batch_size=2, view=FillView(0.5), **keywords
    )  # the audit's default view (the library's default draws a random texture)
    by_settings = audit(tiny_cnn, (x, m, y), settings=settings, **plan)
    assert by_settings == by_keywords
    with pytest.raises(InvalidInputError, match="not both"):
        audit(tiny_cnn, (x, m, y), settings=settings, noise_multiplier=1.0, **plan)
    with pytest.raises(InvalidInputError, match="expected_batch_size"):
        audit(tiny_cnn, (x, m, y), settings=settings.replace(expected_batch_size=3), **plan)
    with pytest.raises(InvalidInputError, match="noise_multiplier="):
        audit(tiny_cnn, (x, m, y), max_grad_norm=0.1, **plan)
    with pytest.raises(InvalidInputError, match="PrivacySettings"):
        audit(tiny_cnn, (x, m, y), settings=dict(keywords), **plan)


SENSITIVE = {
    "max_grad_norm": 0.1,
    "steps": 1,
    "sample_rate": 1.0,
    "trials": 100,
    "seed": 0,
    "engine": ENGINE,
}


def test_sensitive_canary_stays_below_theory() -> None:
    """sigma = 3: the lower bound stays below the accountant's epsilon.

    The test has teeth: 50 evaluated runs per world could certify up to ~2.57 > epsilon,
    and without noise the same audit does (next test).
    """
    result = audit(tiny_cnn, tiny_data(), noise_multiplier=3.0, **SENSITIVE)
    assert result.epsilon_theory == pytest.approx(1.386, abs=0.01)
    assert best_possible(result.counts.positives) > result.epsilon_theory + 1.0
    assert result.epsilon_lower_bound <= result.epsilon_theory
    # The scores are the Gaussian mechanism along the canary direction: mu = 1 / sigma.
    assert separation(result) == pytest.approx(1 / 3, abs=0.3)


def test_sensitive_canary_without_noise_is_detected() -> None:
    """sigma = 0 (no privacy): the same audit reaches its ceiling, above sigma = 3's epsilon."""
    result = audit(tiny_cnn, tiny_data(), noise_multiplier=0.0, **SENSITIVE)
    assert result.epsilon_theory == math.inf
    assert result.counts == Counts(tp=50, fp=0, tn=50, fn=0)
    assert result.epsilon_lower_bound == pytest.approx(best_possible(50))
    assert result.epsilon_lower_bound > 2.5


def test_sensitive_canary_with_little_noise_is_detected_but_bounded() -> None:
    """sigma = 0.5: the audit sees the leak the accountant allows, and stays below it."""
    result = audit(tiny_cnn, tiny_data(), noise_multiplier=0.5, **SENSITIVE)
    assert 0.5 < result.epsilon_lower_bound <= result.epsilon_theory
    assert separation(result) == pytest.approx(2.0, abs=0.3)


def test_public_canary_is_detected_whatever_the_noise() -> None:
    """Public content trains without clipping: sigma = 100 does not hide a public canary.

    The accountant's epsilon (0.03) covers the sensitive region only; the public canary
    exceeds it by far, while a sensitive canary under the same settings does not.
    """
    noisy = {
        "noise_multiplier": 100.0,
        "max_grad_norm": 1e-4,
        "steps": 1,
        "trials": 100,
        "engine": ENGINE,
    }
    public = audit(tiny_cnn, tiny_data(), canary_region="public", **noisy)
    assert public.epsilon_theory < 0.05
    assert public.counts == Counts(tp=50, fp=0, tn=50, fn=0)
    assert public.epsilon_lower_bound > 2.5
    sensitive = audit(tiny_cnn, tiny_data(), canary_region="sensitive", **{**noisy, "trials": 40})
    assert sensitive.epsilon_lower_bound <= sensitive.epsilon_theory


# Four steps on 8 records, 200 runs per world.
MULTISTEP = {"max_grad_norm": 0.1, "steps": 4, "trials": 200, "seed": 1, "engine": ENGINE}


@pytest.mark.slow
def test_composition_is_audited_as_the_composed_gaussian() -> None:
    """4 full-batch steps at sigma = 2 release the Gaussian mechanism with mu = sqrt(4) / 2."""
    result = audit(tiny_cnn, tiny_data(8), noise_multiplier=2.0, **MULTISTEP)
    assert separation(result) == pytest.approx(1.0, abs=0.25)
    assert result.epsilon_lower_bound <= result.epsilon_theory


@pytest.mark.slow
def test_subsampled_multistep_stays_below_theory() -> None:
    result = audit(tiny_cnn, tiny_data(8), noise_multiplier=1.0, sample_rate=0.5, **MULTISTEP)
    assert result.epsilon_lower_bound <= result.epsilon_theory


@pytest.mark.slow
def test_vit_with_drop_view() -> None:
    def vit() -> VideoViT:
        return VideoViT(
            num_classes=2,
            in_channels=1,
            frames=4,
            image_size=8,
            tubelet_size=(2, 4, 4),
            dim=16,
            depth=1,
            heads=2,
        )

    view = DropView((2, 4, 4))
    x, m, y = tiny_data()
    m[:] = False
    m[:, :2, :4, :4] = True  # one whole tubelet is sensitive
    common = {"max_grad_norm": 1e-3, "steps": 1, "trials": 100, "view": view, "engine": ENGINE}
    sensitive = audit(vit, (x, m, y), noise_multiplier=3.0, **common)
    assert sensitive.epsilon_lower_bound <= sensitive.epsilon_theory
    public = audit(vit, (x, m, y), noise_multiplier=30.0, canary_region="public", **common)
    assert public.epsilon_lower_bound > 2.0 > public.epsilon_theory


def residual_pair() -> PrivateResidual:
    """A public CNN plus a private CNN branch (zero_init=False: the branch's gradient
    reaches its convolutions from the first step)."""
    return PrivateResidual(tiny_cnn(), tiny_cnn(), zero_init=False)


def branch_settings(noise_multiplier: float) -> PrivacySettings:
    """The full term on the branch, one full-batch step over 4 records, C = 0.1."""
    return PrivacySettings.build(
        noise_multiplier=noise_multiplier, max_grad_norm=0.1, sample_rate=1.0,
        expected_batch_size=4, view=FillView(0.5), engine=ENGINE,
        private_parameters=PrivateResidual.PRIVATE, private_term="full",
    )  # fmt: skip


def test_private_branch_sensitive_canary_stays_below_theory() -> None:
    """The full term (maskdp.models.PrivateResidual) keeps the guarantee: sigma = 3, the
    lower bound stays below the accountant's epsilon, and it is the Gaussian mechanism
    along the canary (mu = 1 / sigma); without noise the same audit reaches its ceiling."""
    plan = {"steps": 1, "trials": 100, "seed": 0}
    noisy = audit(residual_pair, tiny_data(), settings=branch_settings(3.0), **plan)
    assert noisy.epsilon_lower_bound <= noisy.epsilon_theory
    assert separation(noisy) == pytest.approx(1 / 3, abs=0.3)
    leaking = audit(residual_pair, tiny_data(), settings=branch_settings(0.0), **plan)
    assert leaking.counts == Counts(tp=50, fp=0, tn=50, fn=0)
    assert leaking.epsilon_lower_bound > noisy.epsilon_theory + 1.0
