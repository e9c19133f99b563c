r"""Empirical privacy audit: plant a canary, train with and without it, bound epsilon from below.

The accountant's epsilon is an *upper* bound that holds if the code implements the mechanism
it claims. An audit gives a *lower* bound that holds whatever the code does: if the lower
bound ever exceeds the accountant's epsilon (beyond the audit's confidence level), the
implementation leaks more than it reports. A MaskDP audit also shows what is protected: a
canary planted in the **sensitive** region must stay below the accountant's epsilon, while
one planted in the **public** region (trained without clipping, so its influence is not
bounded by the noise) is detected with a large empirical epsilon.

Design (Jagielski, Ullman, Oprea 2020, "Auditing differentially private machine learning:
how private is private SGD?", NeurIPS 2020; Nasr, Song, Thakurta, Papernot, Carlini 2021,
"Adversary instantiation", IEEE S&P 2021, and Nasr et al. 2023, "Tight auditing of differentially private
machine learning", USENIX Security 2023, for white-box gradient canaries with a known
initialisation):

1. **Worlds.** One record of the dataset (``canary_index``) becomes the canary: a
   distinctive pattern (default: a seeded :math:`\pm s` texture) written into its sensitive
   pixels (``canary_region="sensitive"``) or into its public pixels (``"public"``); label
   and mask are kept. Sensitive: world 1 holds the canary, world 0 its ``erase``
   neighbour (the record without sensitive content, seen as its public view): exactly the
   masked adjacency the accountant's epsilon is about (:mod:`maskdp.mechanism.adjacency`). Public:
   world 1 holds the canary, world 0 the original record; these differ in public content,
   which MaskDP does not claim to protect.
2. **Canary direction.** At the fixed initial parameters :math:`\theta_0` (one draw of
   ``model_fn``, reused by every run), the canary's contribution to the released sum in
   world 1 minus world 0, :math:`d = (h_1 + c_1\Delta_1) - (h_0 + c_0\Delta_0)`
   (:math:`= c_1 \Delta_1` for a sensitive canary, of norm :math:`\le C`), computed with
   :func:`maskdp.mechanism.gradient.masked_gradient`. The canary is a "gradient canary" in the sense
   of Nasr et al.: its effect on the update is concentrated along :math:`\hat d = d/\lVert d
   \rVert`, and the score reads the update along that direction only.
3. **Runs.** ``trials`` independent MaskDP-SGD runs per world (fresh Poisson samples and
   noise per run, same :math:`\theta_0`), each ``steps`` steps of
   :class:`~maskdp.training.optimizer.MaskDPOptimizer`. Score of a run:
   :math:`s = \langle \theta_0 - \theta_T, \hat d \rangle` (large when the canary pushed the
   parameters along :math:`-\hat d`). For one full-batch SGD step the score is exactly the
   Gaussian mechanism's output along :math:`\hat d`: the worlds differ by
   :math:`\eta\lVert d\rVert / B` in mean with noise :math:`\eta\sigma C / B`.
4. **Test.** Guess "world 1" iff :math:`s > \tau`. The threshold is chosen on the first
   ``calibration_fraction`` of the runs of each world (maximising the bound below); the
   counts :math:`(TP, FP, TN, FN)` come from the remaining runs only, so the threshold is
   independent of the evaluated runs.
5. **Bound.** If the mechanism is :math:`(\varepsilon, \delta)`-DP for the pair of worlds,
   every test satisfies (Kairouz, Oh, Viswanath 2015, Thm. 2.1)
   :math:`\mathrm{FPR} + e^{\varepsilon}\mathrm{FNR} \ge 1 - \delta` and
   :math:`\mathrm{FNR} + e^{\varepsilon}\mathrm{FPR} \ge 1 - \delta`, hence

   .. math::

       \varepsilon \ge \varepsilon_{lb} = \max\Big(0,\;
           \log\frac{1 - \delta - \overline{\mathrm{FPR}}}{\overline{\mathrm{FNR}}},\;
           \log\frac{1 - \delta - \overline{\mathrm{FNR}}}{\overline{\mathrm{FPR}}}\Big)

   with :math:`\overline{\mathrm{FPR}}, \overline{\mathrm{FNR}}` one-sided Clopper-Pearson
   upper bounds (as in Jagielski et al. 2020), each at level :math:`1 - \alpha/2`
   (union bound; :math:`1 - \alpha` = ``confidence``). Direction: :math:`\varepsilon_{lb}` is
   a **lower bound** on the epsilon of the audited pair that holds with probability at least
   ``confidence`` over the runs. It is loose by design (a few hundred runs cannot see events
   of probability :math:`\delta`), so ``epsilon_lower_bound <= epsilon_theory`` is the
   expected outcome for a correct implementation; the converse is evidence of a bug.

One canary per run keeps the bound elementary; the one-run audit of Steinke, Nasr,
Jagielski 2023, "Privacy auditing with one (1) training run" (many canaries per run, each
included with probability 1/2) needs their main theorem to pool the guesses of one run and
is not implemented here.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from maskdp.checks import (
    check_delta,
    check_max_grad_norm,
    check_noise_multiplier,
    check_sample_rate,
)
from maskdp.engines.base import PerSampleLoss, trainable_parameters
from maskdp.errors import InvalidInputError
from maskdp.mechanism.gradient import check_batch, masked_gradient
from maskdp.mechanism.randomness import InsecureSeededRandomness, Randomness
from maskdp.mechanism.sampling import poisson_sample
from maskdp.mechanism.views import PublicView
from maskdp.training.optimizer import MaskDPOptimizer

Region = Literal["sensitive", "public"]
REGIONS: tuple[str, ...] = ("sensitive", "public")
SCORES: tuple[str, ...] = ("auto", "direction", "gated")
OptimizerFn = Callable[[list[nn.Parameter]], Optimizer]
ViewArg = PublicView | Callable[[Tensor, Tensor], Tensor] | None


# ------------------------------------------------------------------------------ statistics


def _check_count(name: str, value: Any, minimum: int = 0) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def _check_confidence(value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise InvalidInputError(f"confidence must be a number in (0, 1), e.g. 0.95, got {value!r}")
    return float(value)


def _cp_upper(k: np.ndarray, n: int, level: float) -> np.ndarray:
    """Vectorised one-sided Clopper-Pearson upper bound (see :func:`clopper_pearson_upper`)."""
    from scipy.special import betaincinv  # lazy: scipy.special costs ~0.5 s to import

    inner = np.minimum(k, n - 1)  # k = n: the bound is 1
    return np.where(k >= n, 1.0, betaincinv(inner + 1, n - inner, level))


def clopper_pearson_upper(successes: int, trials: int, confidence: float) -> float:
    r"""One-sided Clopper-Pearson upper bound on a binomial proportion.

    :math:`p_u = B^{-1}(\text{confidence};\, k + 1,\, n - k)` for :math:`k < n` (the Beta
    quantile), :math:`1` for :math:`k = n` (Clopper and Pearson 1934). Direction: an upper
    bound, :math:`P(p \le p_u) \ge` ``confidence`` for every true proportion :math:`p`.
    """
    k = _check_count("successes", successes)
    n = _check_count("trials", trials, 1)
    if k > n:
        raise InvalidInputError(f"successes ({k}) must be at most trials ({n})")
    return float(_cp_upper(np.array(k), n, _check_confidence(confidence)))


@dataclass(frozen=True)
class Counts:
    """Outcomes of a membership test: world 1 = "in" (positive), world 0 = "out"."""

    tp: int
    fp: int
    tn: int
    fn: int

    def __post_init__(self) -> None:
        for name in ("tp", "fp", "tn", "fn"):
            object.__setattr__(self, name, _check_count(name, getattr(self, name)))
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


def epsilon_lower_bound(counts: Counts, *, delta: float, confidence: float = 0.95) -> float:
    r"""Empirical epsilon lower bound from membership-test counts (module docstring, step 5).

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
    level = 1.0 - (1.0 - _check_confidence(confidence)) / 2.0
    bound = _bounds(
        np.array([counts.fp]), counts.negatives, np.array([counts.fn]), counts.positives, d, level
    )
    return float(bound[0])


def count_guesses(scores_in: Any, scores_out: Any, threshold: float) -> Counts:
    """Counts of the test "world 1 iff score > threshold" on runs of world 1 and world 0."""
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    tp = int((s_in > threshold).sum())
    fp = int((s_out > threshold).sum())
    return Counts(tp=tp, fp=fp, tn=len(s_out) - fp, fn=len(s_in) - tp)


def _as_scores(scores: Any, name: str) -> np.ndarray:
    arr = np.asarray(scores.detach().cpu() if isinstance(scores, Tensor) else scores, float)
    if arr.ndim != 1 or arr.size < 1 or not np.isfinite(arr).all():
        raise InvalidInputError(f"{name} must be a non-empty 1-d array of finite numbers")
    return arr


def choose_threshold(
    scores_in: Any, scores_out: Any, *, delta: float, confidence: float = 0.95
) -> float:
    """The threshold that maximises :func:`epsilon_lower_bound` on these (calibration) runs.

    Candidates are midpoints between consecutive distinct scores and one point beyond each
    end; ties are broken by the balanced accuracy, then by the lowest threshold. Choose it on
    runs that are not evaluated afterwards, or the evaluated bound loses its confidence
    guarantee.
    """
    s_in, s_out = _as_scores(scores_in, "scores_in"), _as_scores(scores_out, "scores_out")
    d = check_delta(delta)
    level = 1.0 - (1.0 - _check_confidence(confidence)) / 2.0
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


# ------------------------------------------------------------------------------ canaries


def rademacher_pattern(shape: Sequence[int], *, scale: float, seed: int) -> Tensor:
    r"""A seeded :math:`\pm` ``scale`` texture: the default canary content."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, tuple(shape), generator=gen).float() * 2 - 1
    return signs * scale


def plant_canary(inputs: Tensor, mask: Tensor, pattern: Tensor, *, region: Region) -> Tensor:
    """One clip (C, T, H, W) with ``pattern`` written into its sensitive or public pixels.

    Pixels outside ``region`` (and the mask, label) are unchanged.
    """
    if region not in REGIONS:
        raise InvalidInputError(f"canary_region must be one of {REGIONS}, got {region!r}")
    where = mask if region == "sensitive" else ~mask
    if not bool(where.any()):
        raise InvalidInputError(
            f"the canary record has no {region} pixels to plant the canary in; "
            "pick another canary_index or change its mask"
        )
    if tuple(pattern.shape) != tuple(inputs.shape):
        raise InvalidInputError(
            f"canary_pattern must have the clip's shape {tuple(inputs.shape)}, "
            f"got {tuple(pattern.shape)}"
        )
    return torch.where(where[None], pattern.to(inputs), inputs)


def canary_score(initial: dict[str, Tensor], final: dict[str, Tensor], direction: Tensor) -> float:
    r""":math:`\langle \theta_0 - \theta_T, \hat d \rangle` over the parameters of ``initial``."""
    diff = torch.cat([(initial[n] - final[n]).detach().double().flatten() for n in initial])
    return float(diff @ direction)


def _score(
    initial: dict[str, Tensor],
    final: dict[str, Tensor],
    direction: Tensor,
    gate: tuple[Tensor, float] | None,
) -> float:
    """The run's score; ``nan`` when a gate is given and the run does not pass it."""
    if gate is not None and canary_score(initial, final, gate[0]) <= gate[1]:
        return math.nan
    return canary_score(initial, final, direction)


def _gated_scores(scores: list[list[float]]) -> list[list[float]]:
    """Runs that failed the gate (``nan``) get a score below every other run's."""
    finite = [v for world in scores for v in world if math.isfinite(v)]
    low = (min(finite) - 1.0 - (max(finite) - min(finite))) if finite else 0.0
    return [[v if math.isfinite(v) else low for v in world] for world in scores]


# ------------------------------------------------------------------------------ result


@dataclass(frozen=True)
class AuditResult:
    r"""Outcome of :func:`audit`.

    Attributes:
        epsilon_lower_bound: empirical lower bound on epsilon at ``delta``, valid with
            probability ``confidence`` (module docstring, step 5).
        epsilon_theory: the accountant's epsilon (an upper bound) for the same
            (``sample_rate``, ``noise_multiplier``, ``steps``) at ``delta``; ``inf`` without
            noise. It covers the sensitive region only: a public canary may exceed it.
        counts: outcomes on the evaluated runs (world 1 = canary in = positive).
        threshold: the score threshold of the test.
        canary_signal: :math:`\lVert d \rVert`, the canary's effect on one step's released sum
            at :math:`\theta_0` (:math:`\le C` for a sensitive canary).
        scores_in, scores_out: scores of every run of world 1 and world 0 (calibration runs
            first).
    """

    epsilon_lower_bound: float
    epsilon_theory: float
    delta: float
    confidence: float
    canary_region: str
    counts: Counts
    threshold: float
    trials: int
    calibration_trials: int
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    steps: int
    canary_signal: float
    scores_in: tuple[float, ...]
    scores_out: tuple[float, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain, strict-JSON types (an infinite theory epsilon becomes ``None``); adds
        ``scores_summary`` (mean, std, min, max per world)."""
        out = asdict(self)
        if not math.isfinite(out["epsilon_theory"]):
            out["epsilon_theory"] = None
        out["counts"] = self.counts.to_dict()
        out["scores_in"] = list(self.scores_in)
        out["scores_out"] = list(self.scores_out)
        out["scores_summary"] = {
            "in": _summary(self.scores_in),
            "out": _summary(self.scores_out),
        }
        return out


def _summary(scores: Sequence[float]) -> dict[str, float]:
    arr = np.asarray(scores, float)
    return {
        "mean": float(arr.mean()),
        "std": float(arr.std()),
        "min": float(arr.min()),
        "max": float(arr.max()),
    }


# ------------------------------------------------------------------------------ the audit


def _as_tensors(dataset: Any) -> tuple[Tensor, Tensor, Tensor]:
    """(inputs, masks, targets) from a 3-tuple of stacked tensors or a dataset of records."""
    if (
        isinstance(dataset, (tuple, list))
        and len(dataset) == 3
        and all(isinstance(t, Tensor) for t in dataset)
    ):
        inputs, mask, targets = dataset
    else:
        try:
            records = [dataset[i] for i in range(len(dataset))]
        except TypeError:
            raise InvalidInputError(
                "dataset must be a (inputs, masks, targets) tuple of tensors or a map-style "
                f"dataset of (x, m, y) records, got {type(dataset).__name__}"
            ) from None
        if not records:
            raise InvalidInputError("dataset is empty; the audit needs at least the canary record")
        inputs = torch.stack([torch.as_tensor(r[0]) for r in records])
        mask = torch.stack([torch.as_tensor(r[1]) for r in records])
        targets = torch.stack([torch.as_tensor(r[2]) for r in records])
    check_batch(inputs, mask, targets)
    if len(inputs) < 1:
        raise InvalidInputError("dataset is empty; the audit needs at least the canary record")
    return inputs, mask, targets


def _check_positive(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise InvalidInputError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite, got {value!r}")
    return float(value)


@dataclass(frozen=True)
class _RunSettings:
    """What every training run of an audit shares."""

    loss_fn: nn.Module | PerSampleLoss
    optimizer_fn: OptimizerFn
    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    public_sample_rate: float
    expected_public_batch_size: int
    steps: int
    view: ViewArg
    engine: str
    protect_labels: bool

    def masked_gradient_kwargs(self) -> dict[str, Any]:
        return {
            "max_grad_norm": self.max_grad_norm,
            "view": self.view,
            "engine": self.engine,
            "protect_labels": self.protect_labels,
        }


def _worlds(
    inputs: Tensor, index: int, canary: Tensor, region: str
) -> tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]:
    """``((inputs, present) of world 0, (inputs, present) of world 1)``; world 1 holds the canary.

    Sensitive: world 0 is world 1 with the canary erased (``present = False``: the model sees
    its public view). Public: world 0 is the original dataset.
    """
    present1 = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
    inputs1 = inputs.clone()
    inputs1[index] = canary
    if region == "sensitive":
        present0 = present1.clone()
        present0[index] = False
        return (inputs1, present0), (inputs1, present1)
    return (inputs, present1), (inputs1, present1)


def _contribution(
    model: nn.Module, record: tuple[Tensor, Tensor, Tensor, Tensor], settings: _RunSettings
) -> dict[str, Tensor]:
    r"""One record's terms in the released sum, in units of the private sum: :math:`h\,
    B / B_{pub} + c\Delta` when it is in both batches (:math:`c\,g` with protected labels)."""
    x, m, y, present = record
    result = masked_gradient(
        model,
        settings.loss_fn,
        x[None],
        m[None],
        y[None],
        present=present[None],
        public=None if settings.protect_labels else (x[None], m[None], y[None]),
        **settings.masked_gradient_kwargs(),
    )
    ratio = settings.expected_batch_size / settings.expected_public_batch_size
    return {n: result.public[n] * ratio + result.private[n] for n in result.private}


def canary_direction(
    model: nn.Module,
    worlds: tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]],
    mask: Tensor,
    targets: Tensor,
    index: int,
    settings: _RunSettings,
) -> tuple[Tensor, float]:
    r"""Unit :math:`\hat d` (float64, trainable parameters flattened in order) and :math:`\lVert d \rVert`.

    :math:`d` = the canary record's term in world 1 minus world 0 at the model's current
    parameters (module docstring, step 2).
    """
    terms = [
        _contribution(model, (x[index], mask[index], targets[index], p[index]), settings)
        for x, p in worlds
    ]
    names = list(trainable_parameters(model))
    d = torch.cat([(terms[1][k] - terms[0][k]).detach().double().flatten() for k in names])
    norm = float(d.norm())
    if not norm > 0:
        raise InvalidInputError(
            "the canary does not change the released gradient at the initial parameters; "
            "raise canary_scale, pass another canary_pattern or pick another canary_index"
        )
    return d / norm, norm


def public_direction(
    model: nn.Module,
    world: tuple[Tensor, Tensor],
    mask: Tensor,
    targets: Tensor,
    index: int,
    settings: _RunSettings,
) -> tuple[Tensor, float]:
    r"""Unit :math:`\hat h` and :math:`\lVert h \rVert` of the canary record's public gradient
    at the current parameters (the same in both worlds of a sensitive canary)."""
    x, present = world
    result = masked_gradient(
        model,
        settings.loss_fn,
        x[index : index + 1],
        mask[index : index + 1],
        targets[index : index + 1],
        present=present[index : index + 1],
        public=(x[index : index + 1], mask[index : index + 1], targets[index : index + 1]),
        **settings.masked_gradient_kwargs(),
    )
    names = list(trainable_parameters(model))
    h = torch.cat([result.public[k].detach().double().flatten() for k in names])
    norm = float(h.norm())
    if not norm > 0:
        raise InvalidInputError("the canary record has no public gradient to gate on")
    return h / norm, norm


def _audit_optimizer(
    model: nn.Module, settings: _RunSettings, seed: int
) -> tuple[MaskDPOptimizer, Randomness]:
    """One optimizer reused by every run (its inner state is reset per run), and the
    public batch's randomness."""
    private, public = _randomness(seed)
    optimizer = MaskDPOptimizer(
        settings.optimizer_fn(list(trainable_parameters(model).values())),
        model=model,
        loss_fn=settings.loss_fn,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        expected_batch_size=settings.expected_batch_size,
        sample_rate=settings.sample_rate,
        expected_public_batch_size=settings.expected_public_batch_size,
        view=settings.view,
        engine=settings.engine,
        protect_labels=settings.protect_labels,
        randomness=private,
    )
    return optimizer, public


def _randomness(seed: int) -> tuple[Randomness, Randomness]:
    """(private, public) randomness of the audit, replayable from ``seed``.

    An audit is an offline test of the mechanism, never a training run: the warning of
    seeded randomness is silenced here on purpose.
    """
    state = np.random.SeedSequence([seed]).generate_state(2, dtype=np.uint64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return tuple(InsecureSeededRandomness(int(v >> np.uint64(1))) for v in state)


def step_batches(
    n: int, settings: _RunSettings, private: Randomness, public: Randomness
) -> tuple[Tensor, Tensor]:
    """Indices of one step's private Poisson batch and of its independent public batch."""
    return (
        poisson_sample(n, settings.sample_rate, randomness=private),
        poisson_sample(n, settings.public_sample_rate, randomness=public),
    )


def _train_run(
    optimizer: MaskDPOptimizer,
    data: tuple[Tensor, Tensor, Tensor, Tensor],
    settings: _RunSettings,
    public_randomness: Randomness,
) -> dict[str, Tensor]:
    """``steps`` MaskDP-SGD steps with Poisson batches from ``data``; the final parameters.

    ``data`` is ``(inputs, masks, targets, present)``; the model starts wherever it is.
    """
    inputs, mask, targets, present = data
    for _ in range(settings.steps):
        take, public = (
            i.to(inputs.device)
            for i in step_batches(len(inputs), settings, optimizer.randomness, public_randomness)
        )
        optimizer.backward(
            inputs[take],
            mask[take],
            targets[take],
            public=None
            if settings.protect_labels
            else (inputs[public], mask[public], targets[public]),
            present=present[take],
        )
        optimizer.step()
    return {k: p.detach().clone() for k, p in trainable_parameters(optimizer.model).items()}


def _check_calibration(trials: int, fraction: Any, threshold: Any) -> int:
    """Calibration runs per world: 0 with a given threshold, else round(trials * fraction)."""
    if threshold is not None:
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not math.isfinite(threshold)
        ):
            raise InvalidInputError(f"threshold must be a finite number or None, got {threshold!r}")
        return 0
    if isinstance(fraction, bool) or not isinstance(fraction, (int, float)):
        raise InvalidInputError(
            f"calibration_fraction must be a number in (0, 1), got {fraction!r}"
        )
    calibration = int(round(trials * fraction))
    if not 1 <= calibration <= trials - 1:
        raise InvalidInputError(
            f"calibration_fraction {fraction!r} leaves {calibration} of {trials} runs per world "
            "for calibration; both parts need at least one run"
        )
    return calibration


def audit(
    model_fn: Callable[[], nn.Module],
    dataset: Any,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    steps: int,
    sample_rate: float = 1.0,
    learning_rate: float = 0.01,
    optimizer_fn: OptimizerFn | None = None,
    loss_fn: nn.Module | PerSampleLoss | None = None,
    view: ViewArg = None,
    engine: str = "auto",
    protect_labels: bool = False,
    canary_region: Region = "sensitive",
    canary_index: int = 0,
    canary_scale: float = 1.0,
    canary_pattern: Tensor | None = None,
    trials: int = 100,
    calibration_fraction: float = 0.5,
    threshold: float | None = None,
    delta: float = 1e-5,
    confidence: float = 0.95,
    accountant: str = "rdp",
    seed: int = 0,
    public_sample_rate: float | None = None,
    public_scale: float | None = None,
    score: str = "auto",
) -> AuditResult:
    r"""Audit MaskDP-SGD with a canary in ``canary_region``; see the module docstring.

    Args:
        model_fn: builds the model; called once (under ``seed``, without touching torch's
            global RNG) for the initial parameters every run starts from.
        dataset: ``(inputs (N, C, T, H, W), masks (N, T, H, W), targets (N,))`` or a
            map-style dataset of ``(x, m, y)`` records (materialised: keep it small).
        noise_multiplier, max_grad_norm, sample_rate, steps: the MaskDP-SGD settings
            audited (:class:`~maskdp.training.optimizer.MaskDPOptimizer`); the expected batch size
            is ``max(1, round(sample_rate * N))``. ``sample_rate=1`` (full batch) gives the
            strongest audit: the other records then add no sampling variance to the score.
        learning_rate: of the default plain SGD; ``optimizer_fn(params)`` overrides it.
            Keep it small: the score reads the update along :math:`\hat d` taken at
            :math:`\theta_0`, and a large step turns the canary's later gradients away
            from it (measured: 4 full-batch steps at sigma = 2 show a separation of 0.65
            instead of the mechanism's 1.0 with ``0.1``, 1.0 with ``0.01``).
        loss_fn: default ``nn.CrossEntropyLoss()``. ``view``, ``engine``, ``protect_labels``:
            as in :class:`~maskdp.training.optimizer.MaskDPOptimizer`.
        canary_region: ``"sensitive"`` (audits the guarantee) or ``"public"`` (shows that
            public content is not protected).
        canary_index: the record that becomes the canary (its label and mask are kept).
        canary_scale, canary_pattern: the canary content, a (C, T, H, W) tensor; default a
            seeded :math:`\pm` ``canary_scale`` texture (:func:`rademacher_pattern`).
        trials: training runs per world (``2 * trials`` runs in all).
        calibration_fraction: share of each world's runs used to choose the threshold
            (ignored when ``threshold`` is given; all runs are then evaluated).
        delta, confidence: of the lower bound; ``accountant`` (``"rdp"``, ``"prv"``): for
            ``epsilon_theory``.
        seed: seeds the initial model, the default pattern, and the runs' sampling and
            noise (replayable: an audit is a test, never a training run).
        public_sample_rate: rate of the independent public batch (default ``sample_rate``).
        public_scale: when given, the canary record's *public* pixels become a seeded
            :math:`\pm` ``public_scale`` texture in both worlds, so that its public gradient
            :math:`h` is large: the target of the subsampled audit, where a release that
            shows whether the record was sampled would be seen.
        score: ``"direction"`` reads the update along :math:`\hat d`; ``"gated"`` reads it
            only in runs where the update's component along the record's own public
            gradient :math:`\hat h` exceeds half of what one plain SGD step at
            ``learning_rate`` would give it (the record "looks sampled"), and puts the other
            runs below every threshold. A mechanism whose public term came from the private
            batch shows its unamplified Gaussian there. ``"auto"``: gated for a sensitive
            canary with ``sample_rate < 1``, direction otherwise.
    """
    from maskdp.accounting.ledger import ACCOUNTANTS

    # ---- validate everything before any training
    sigma = check_noise_multiplier(noise_multiplier)
    clip = check_max_grad_norm(max_grad_norm)
    q = check_sample_rate(sample_rate)
    steps = _check_count("steps", steps, 1)
    trials = _check_count("trials", trials, 2)
    d = check_delta(delta)
    conf = _check_confidence(confidence)
    seed = _check_count("seed", seed)
    q_pub = (
        q
        if public_sample_rate is None
        else check_sample_rate(public_sample_rate, "public_sample_rate")
    )
    calibration = _check_calibration(trials, calibration_fraction, threshold)
    if score not in SCORES:
        raise InvalidInputError(f"score must be one of {SCORES}, got {score!r}")
    if score == "auto":
        gated = q < 1 and canary_region == "sensitive" and not protect_labels
        score = "gated" if gated else "direction"
    if canary_region not in REGIONS:
        raise InvalidInputError(f"canary_region must be one of {REGIONS}, got {canary_region!r}")
    if accountant not in ACCOUNTANTS:
        raise InvalidInputError(f"accountant must be one of {ACCOUNTANTS}, got {accountant!r}")
    if optimizer_fn is None:
        lr = _check_positive("learning_rate", learning_rate)

        def optimizer_fn(params: list[nn.Parameter]) -> Optimizer:
            return torch.optim.SGD(params, lr=lr)

    elif not callable(optimizer_fn):
        raise InvalidInputError("optimizer_fn must be a callable params -> torch Optimizer")
    if not callable(model_fn):
        raise InvalidInputError("model_fn must be a callable that returns an nn.Module")
    inputs, mask, targets = _as_tensors(dataset)
    n = len(inputs)
    index = _check_count("canary_index", canary_index)
    if index >= n:
        raise InvalidInputError(f"canary_index {index} is out of range for {n} records")
    if canary_pattern is None:
        scale = _check_positive("canary_scale", canary_scale)
        canary_pattern = rademacher_pattern(inputs.shape[1:], scale=scale, seed=seed)
    elif not isinstance(canary_pattern, Tensor):
        raise InvalidInputError("canary_pattern must be a tensor (C, T, H, W) or None")
    if public_scale is not None:
        texture = rademacher_pattern(
            inputs.shape[1:], scale=_check_positive("public_scale", public_scale), seed=seed + 1
        )
        inputs = inputs.clone()
        inputs[index] = plant_canary(inputs[index], mask[index], texture, region="public")
    canary = plant_canary(inputs[index], mask[index], canary_pattern, region=canary_region)
    theory = theory_epsilon(
        sample_rate=q, noise_multiplier=sigma, steps=steps, delta=d, accountant=accountant
    )
    settings = _RunSettings(
        loss_fn=nn.CrossEntropyLoss() if loss_fn is None else loss_fn,
        optimizer_fn=optimizer_fn,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=q,
        expected_batch_size=max(1, round(q * n)),
        public_sample_rate=q_pub,
        expected_public_batch_size=max(1, round(q_pub * n)),
        steps=steps,
        view=view,
        engine=engine,
        protect_labels=protect_labels,
    )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module) or not trainable_parameters(model):
        raise InvalidInputError("model_fn must return an nn.Module with trainable parameters")
    device = next(iter(trainable_parameters(model).values())).device
    inputs, mask, targets = inputs.to(device), mask.to(device), targets.to(device)
    worlds = _worlds(inputs, index, canary.to(device), canary_region)

    # ---- the canary direction at theta_0, then the runs
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    initial = {k: p.detach().clone() for k, p in trainable_parameters(model).items()}
    direction, signal = canary_direction(model, worlds, mask, targets, index, settings)
    if canary_region == "sensitive" and signal < 0.5 * clip:
        warnings.warn(
            f"the canary's clipped contribution {signal:.3g} is well below max_grad_norm "
            f"{clip:g}: the audit is weaker than it could be; raise canary_scale",
            RuntimeWarning,
            stacklevel=2,
        )
    gate = None
    if score == "gated":
        gate = public_direction(model, worlds[1], mask, targets, index, settings)
        gate = (gate[0], learning_rate * gate[1] / (2 * settings.expected_public_batch_size))
    scores: list[list[float]] = [[], []]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)  # the model's own random draws (dropout), replayable too
        optimizer, public_randomness = _audit_optimizer(model, settings, seed)
        inner_state = optimizer.original_optimizer.state_dict()
        try:
            for world, (x_w, present_w) in enumerate(worlds):
                for _ in range(trials):
                    model.load_state_dict(initial_state)
                    optimizer.original_optimizer.load_state_dict(inner_state)
                    final = _train_run(
                        optimizer, (x_w, mask, targets, present_w), settings, public_randomness
                    )
                    scores[world].append(_score(initial, final, direction, gate))
        finally:
            optimizer.close()
            model.load_state_dict(initial_state)
    scores = _gated_scores(scores)

    # ---- threshold on the calibration runs, counts on the others
    s_out, s_in = np.asarray(scores[0]), np.asarray(scores[1])
    if threshold is None:
        tau = choose_threshold(s_in[:calibration], s_out[:calibration], delta=d, confidence=conf)
    else:
        tau = float(threshold)
    counts = count_guesses(s_in[calibration:], s_out[calibration:], tau)
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(counts, delta=d, confidence=conf),
        epsilon_theory=theory,
        delta=d,
        confidence=conf,
        canary_region=canary_region,
        counts=counts,
        threshold=tau,
        trials=trials,
        calibration_trials=calibration,
        noise_multiplier=sigma,
        max_grad_norm=clip,
        sample_rate=q,
        steps=steps,
        canary_signal=signal,
        scores_in=tuple(float(s) for s in s_in),
        scores_out=tuple(float(s) for s in s_out),
    )


# ------------------------------------------------------------------- a ready audit target


class _LinearProbe(nn.Module):
    """A linear classifier on flattened clips: the smallest model a canary can steer."""

    def __init__(self, features: int, classes: int) -> None:
        super().__init__()
        self.fc = nn.Linear(features, classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(x.flatten(1))


def _squared_output(outputs: Tensor, targets: Tensor) -> Tensor:
    """:math:`\\lVert f(x) \\rVert^2 / 2` per sample: a loss whose gradient never saturates."""
    return outputs.pow(2).sum(1) / 2


def subsampled_target(
    records: int = 10,
) -> tuple[Callable[[], nn.Module], tuple[Tensor, Tensor, Tensor], PerSampleLoss]:
    """``(model_fn, dataset, loss_fn)`` for a subsampled audit that can see the public term.

    ``records`` tiny clips (1 x 2 x 2 x 2, first frame sensitive) of small content, a linear
    model and a loss whose gradient grows with the input (no softmax saturation), so that
    with ``public_scale`` the canary record's public gradient dominates the update: a
    mechanism that released it only when the record is in the private batch shows it.
    """
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(records, 1, 2, 2, 2, generator=gen) * 0.1
    m = torch.zeros(records, 2, 2, 2, dtype=torch.bool)
    m[:, 0] = True
    y = torch.randint(0, 2, (records,), generator=gen)
    return (lambda: _LinearProbe(8, 2)), (x, m, y), _squared_output


def subsampled_audit(
    trials: int, noise_multiplier: float, *, same_batch: bool = False, seed: int = 0
) -> AuditResult:
    """The one-step audit at ``q = 0.1`` whose gated score can see the public term.

    On :func:`subsampled_target` with ``public_scale=3`` (the canary record's public
    gradient dominates the update), ``trials`` runs per world, the PRV accountant's
    epsilon as theory. ``same_batch=True`` audits, for comparison, MaskDP 0.1's broken
    mechanism: the private batch reused as the public one (:func:`step_batches` swapped for
    the run), whose release shows whether the record was sampled.
    """
    global step_batches
    original = step_batches

    def private_batch_twice(
        n: int, settings: _RunSettings, private: Randomness, public: Randomness
    ) -> tuple[Tensor, Tensor]:
        take, _ = original(n, settings, private, public)
        return take, take

    model_fn, data, loss_fn = subsampled_target()
    step_batches = private_batch_twice if same_batch else original
    try:
        return audit(
            model_fn,
            data,
            loss_fn=loss_fn,
            noise_multiplier=noise_multiplier,
            max_grad_norm=1.0,
            steps=1,
            sample_rate=0.1,
            trials=trials,
            engine="reference",
            canary_scale=3.0,
            public_scale=3.0,
            learning_rate=1.0,
            accountant="prv",
            seed=seed,
        )
    finally:
        step_batches = original
