r"""The statistics of the audits: binomial bounds, membership-test counts, epsilon bounds.

Clopper-Pearson (Clopper and Pearson 1934): for :math:`k` successes in :math:`n` trials the
exact bounds on the proportion are Beta quantiles, the lower
:math:`B(\alpha; k, n - k + 1)` (0 for :math:`k = 0`) and the upper
:math:`B(1 - \alpha; k + 1, n - k)` (1 for :math:`k = n`), each holding with probability
at least :math:`1 - \alpha`. Both the audit (:mod:`maskdp.analysis.audit`, one-sided upper
bounds on the error rates) and the leak test (:mod:`maskdp.analysis.leakage`, a two-sided
interval) use these.

The epsilon bound (Kairouz, Oh, Viswanath 2015, Thm. 2.1; Jagielski, Ullman, Oprea 2020):
if a mechanism is :math:`(\varepsilon, \delta)`-DP for two worlds, every test that guesses
the world satisfies :math:`\mathrm{FPR} + e^{\varepsilon}\mathrm{FNR} \ge 1 - \delta` and
:math:`\mathrm{FNR} + e^{\varepsilon}\mathrm{FPR} \ge 1 - \delta`, hence

.. math::

    \varepsilon \ge \max\Big(0,\;
        \log\frac{1 - \delta - \overline{\mathrm{FPR}}}{\overline{\mathrm{FNR}}},\;
        \log\frac{1 - \delta - \overline{\mathrm{FNR}}}{\overline{\mathrm{FPR}}}\Big)

with :math:`\overline{\mathrm{FPR}}, \overline{\mathrm{FNR}}` one-sided Clopper-Pearson upper
bounds at level :math:`1 - \alpha/2` each (union bound; :math:`1 - \alpha` = ``confidence``).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from torch import Tensor

from maskdp.checks import check_confidence, check_count, check_delta
from maskdp.errors import InvalidInputError

# ------------------------------------------------------------------------ Clopper-Pearson


def _cp_upper(k: np.ndarray, n: int, level: float) -> np.ndarray:
    """Vectorised one-sided upper bound :math:`B(level; k + 1, n - k)`, 1 for ``k = n``."""
    from scipy.special import betaincinv  # lazy: scipy.special costs ~0.5 s to import

    inner = np.minimum(k, n - 1)  # k = n: the bound is 1
    return np.where(k >= n, 1.0, betaincinv(inner + 1, n - inner, level))


def _cp_lower(k: int, n: int, tail: float) -> float:
    """One-sided lower bound :math:`B(tail; k, n - k + 1)` at level ``1 - tail``, 0 for ``k = 0``."""
    from scipy.special import betaincinv

    return 0.0 if k == 0 else float(betaincinv(k, n - k + 1, tail))


def _check_binomial(successes: Any, trials: Any) -> tuple[int, int]:
    k = check_count("successes", successes)
    n = check_count("trials", trials, 1)
    if k > n:
        raise InvalidInputError(f"successes ({k}) must be at most trials ({n})")
    return k, n


def clopper_pearson_upper(successes: int, trials: int, confidence: float) -> float:
    r"""One-sided Clopper-Pearson upper bound on a binomial proportion.

    :math:`p_u = B^{-1}(\text{confidence};\, k + 1,\, n - k)` for :math:`k < n` (the Beta
    quantile), :math:`1` for :math:`k = n` (Clopper and Pearson 1934). Direction: an upper
    bound, :math:`P(p \le p_u) \ge` ``confidence`` for every true proportion :math:`p`.
    """
    k, n = _check_binomial(successes, trials)
    return float(_cp_upper(np.array(k), n, check_confidence(confidence)))


def clopper_pearson(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    r"""Exact two-sided binomial interval (Clopper and Pearson 1934) from Beta quantiles.

    :math:`[B(\alpha/2; k, n - k + 1), B(1 - \alpha/2; k + 1, n - k)]`, with 0 and 1 at the
    ends. Conservative: its coverage is at least ``confidence``.
    """
    k, n = _check_binomial(successes, trials)
    alpha = 1.0 - check_confidence(confidence)
    return _cp_lower(k, n, alpha / 2), float(_cp_upper(np.array(k), n, 1 - alpha / 2))


# ------------------------------------------------------------------------ membership tests


@dataclass(frozen=True)
class Counts:
    """Outcomes of a membership test: world 1 = "in" (positive), world 0 = "out"."""

    tp: int
    fp: int
    tn: int
    fn: int

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "tn", "fn"):
            object.__setattr__(self, name, check_count(name, getattr(self, name)))
        if self.tp + self.fn < 1 or self.fp + self.tn < 1:
            raise InvalidInputError(
                "counts need at least one run per world (tp + fn >= 1 and fp + tn >= 1)"
            )

    @property
    def positives(self) -> int:
        return self.tp + self.fn

    @property
    def negatives(self) -> int:
        return self.fp + self.tn

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


def _bounds(
    fp: np.ndarray, negatives: int, fn: np.ndarray, positives: int, delta: float, level: float
) -> np.ndarray:
    """Vectorised :func:`epsilon_lower_bound` over arrays of (fp, fn) counts."""
    fpr, fnr = _cp_upper(fp, negatives, level), _cp_upper(fn, positives, level)
    with np.errstate(divide="ignore", invalid="ignore"):
        a = np.log((1.0 - delta - fpr) / fnr)
        b = np.log((1.0 - delta - fnr) / fpr)
    # A non-positive numerator gives nan or -inf: no evidence in that direction.
    return np.maximum(0.0, np.fmax(np.nan_to_num(a, nan=0.0), np.nan_to_num(b, nan=0.0)))


def _level(confidence: float) -> float:
    """The level of each of the two upper bounds: :math:`1 - \\alpha/2` (union bound)."""
    return 1.0 - (1.0 - check_confidence(confidence)) / 2.0


def epsilon_lower_bound(counts: Counts, *, delta: float, confidence: float = 0.95) -> float:
    r"""Empirical epsilon lower bound from membership-test counts (module docstring).

    :math:`\max(0, \log\frac{1-\delta-\overline{FPR}}{\overline{FNR}},
    \log\frac{1-\delta-\overline{FNR}}{\overline{FPR}})` with one-sided Clopper-Pearson upper
    bounds at level :math:`1 - (1 - \text{confidence})/2` each, so that both hold together
    with probability :math:`\ge` ``confidence`` (Kairouz et al. 2015, Thm. 2.1; Jagielski et
    al. 2020). A lower bound on epsilon at that confidence; ``0.0`` when the counts
    show no evidence.
    """
    if not isinstance(counts, Counts):
        raise InvalidInputError(f"counts must be a Counts, got {type(counts).__name__}")
    d = check_delta(delta)
    level = _level(confidence)
    fp, fn = np.array([counts.fp]), np.array([counts.fn])
    return float(_bounds(fp, counts.negatives, fn, counts.positives, d, level)[0])


def as_scores(scores: Any, name: str) -> np.ndarray:
    """``scores`` as a non-empty 1-d float array of finite numbers (a tensor is copied off)."""
    arr = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, float)
    if arr.ndim != 1 or arr.size < 1 or not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} must be a non-empty 1-d array of finite numbers")
    return arr


def count_guesses(scores_in: Any, scores_out: Any, threshold: float) -> Counts:
    """Counts of the test "world 1 iff score > threshold" on runs of world 1 and world 0."""
    s_in, s_out = as_scores(scores_in, "scores_in"), as_scores(scores_out, "scores_out")
    tp = int((s_in > threshold).sum())
    fp = int((s_out > threshold).sum())
    return Counts(tp=tp, fp=fp, tn=len(s_out) - fp, fn=len(s_in) - tp)


def choose_threshold(
    scores_in: Any, scores_out: Any, *, delta: float, confidence: float = 0.95
) -> float:
    """The threshold that maximises :func:`epsilon_lower_bound` on these (calibration) runs.

    Candidates are midpoints between consecutive distinct scores and one point beyond each
    end; ties are broken by the balanced accuracy, then by the lowest threshold. Choose it on
    runs that are not evaluated afterwards, or the evaluated bound loses its confidence
    guarantee.
    """
    s_in, s_out = as_scores(scores_in, "scores_in"), as_scores(scores_out, "scores_out")
    d = check_delta(delta)
    level = _level(confidence)
    values = np.unique(np.concatenate([s_in, s_out]))
    spread = max(1.0, float(values[-1] - values[0]))
    candidates = np.concatenate(
        [[values[0] - spread], (values[:-1] + values[1:]) / 2, [values[-1] + spread]]
    )
    # Guesses "in" are scores > tau: counts from the sorted scores.
    tp = len(s_in) - np.searchsorted(np.sort(s_in), candidates, side="right")
    fp = len(s_out) - np.searchsorted(np.sort(s_out), candidates, side="right")
    fn = len(s_in) - tp
    bounds = _bounds(fp, len(s_out), fn, len(s_in), d, level)
    balanced = tp / len(s_in) - fp / len(s_out)
    best = np.lexsort((balanced, bounds))[-1]  # last key is primary
    ties = np.flatnonzero((bounds == bounds[best]) & (balanced == balanced[best]))
    return float(candidates[ties[0]])


def theory_epsilon(
    *, sample_rate: float, noise_multiplier: float, steps: int, delta: float, accountant: str
) -> float:
    """The accountant's epsilon (an upper bound) for ``steps`` steps at (q, sigma); inf if sigma = 0."""
    from maskdp.accounting.ledger import PrivacyLedger

    if noise_multiplier == 0:
        return math.inf
    ledger = PrivacyLedger()
    ledger.record(sample_rate, noise_multiplier, steps)
    return ledger.epsilon(delta, accountant=accountant)  # type: ignore[arg-type]
