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
   which MaskDP does not claim to protect (:mod:`maskdp.analysis.canary`).
2. **Canary direction.** At the fixed initial parameters :math:`\theta_0` (one draw of
   ``model_fn``, reused by every run), the canary's contribution to the released sum in
   world 1 minus world 0, :math:`d = (h_1 + c_1\Delta_1) - (h_0 + c_0\Delta_0)`
   (:math:`= c_1 \Delta_1` for a sensitive canary, of norm :math:`\le C`), computed with
   :func:`maskdp.mechanism.gradient.masked_gradient`. The canary is a "gradient canary" in the sense
   of Nasr et al.: its effect on the update is concentrated along :math:`\hat d = d/\lVert d
   \rVert`, and the score reads the update along that direction only.
3. **Runs.** ``trials`` independent MaskDP-SGD runs per world (fresh Poisson samples and
   noise per run, same :math:`\theta_0`), each ``steps`` steps, each built by
   :func:`~maskdp.training.private.make_private` like a user's training
   (:mod:`maskdp.analysis.runs`). Score of a run:
   :math:`s = \langle \theta_0 - \theta_T, \hat d \rangle` (large when the canary pushed the
   parameters along :math:`-\hat d`). For one full-batch SGD step the score is exactly the
   Gaussian mechanism's output along :math:`\hat d`: the worlds differ by
   :math:`\eta\lVert d\rVert / B` in mean with noise :math:`\eta\sigma C / B`.
4. **Test.** Guess "world 1" iff :math:`s > \tau`. The threshold is chosen on the first
   ``calibration_fraction`` of the runs of each world (maximising the bound below); the
   counts :math:`(TP, FP, TN, FN)` come from the remaining runs only, so the threshold is
   independent of the evaluated runs.
5. **Bound.** If the mechanism is :math:`(\varepsilon, \delta)`-DP for the pair of worlds,
   every test satisfies :math:`\mathrm{FPR} + e^{\varepsilon}\mathrm{FNR} \ge 1 - \delta`
   and :math:`\mathrm{FNR} + e^{\varepsilon}\mathrm{FPR} \ge 1 - \delta` (Kairouz, Oh,
   Viswanath 2015, Thm. 2.1), hence :math:`\varepsilon_{lb}`
   (:func:`~maskdp.analysis.stats.epsilon_lower_bound`, with one-sided Clopper-Pearson upper
   bounds on both error rates as in Jagielski et al. 2020). Direction:
   :math:`\varepsilon_{lb}` is a **lower bound** on the epsilon of the audited pair that
   holds with probability at least ``confidence`` over the runs. It is loose by design (a
   few hundred runs cannot see events of probability :math:`\delta`), so
   ``epsilon_lower_bound <= epsilon_theory`` is the expected outcome for a correct
   implementation; the converse is evidence of a bug.

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
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from maskdp.analysis.canary import (
    Loss,
    Region,
    Worlds,
    canary_direction,
    canary_record,
    canary_score,
    fill_gated,
    gated_score,
    make_worlds,
    plant_canary,
    public_direction,
    rademacher_pattern,
)
from maskdp.analysis.config import (
    MECHANISM,
    AuditConfig,
    OptimizerFn,
    as_tensors,
    audit_settings,
)
from maskdp.analysis.runs import BatchFn, RunPlan, audit_randomness, run_worlds, step_batches
from maskdp.analysis.stats import (
    Counts,
    choose_threshold,
    clopper_pearson_upper,
    count_guesses,
    epsilon_lower_bound,
    theory_epsilon,
)
from maskdp.analysis.subsampled import subsampled_audit, subsampled_target
from maskdp.engines.base import trainable_parameters
from maskdp.errors import InvalidInputError
from maskdp.mechanism.views import ViewArg
from maskdp.settings import PrivacySettings

__all__ = [
    "AuditConfig",
    "AuditResult",
    "Counts",
    "audit",
    "audit_randomness",
    "canary_direction",
    "canary_score",
    "choose_threshold",
    "clopper_pearson_upper",
    "count_guesses",
    "epsilon_lower_bound",
    "plant_canary",
    "public_direction",
    "rademacher_pattern",
    "run_audit",
    "step_batches",
    "subsampled_audit",
    "subsampled_target",
    "theory_epsilon",
]


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


def audit(
    model_fn: Callable[[], nn.Module],
    dataset: Any,
    *,
    noise_multiplier: float | None = None,
    max_grad_norm: float | None = None,
    steps: int,
    sample_rate: float = 1.0,
    learning_rate: float = 0.01,
    optimizer_fn: OptimizerFn | None = None,
    loss_fn: Loss | None = None,
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
    settings: PrivacySettings | None = None,
) -> AuditResult:
    r"""Audit MaskDP-SGD with a canary in ``canary_region``; see the module docstring.

    ``model_fn`` builds the model, once (under ``seed``, without touching torch's global
    RNG), for the initial parameters every run starts from. ``dataset``: ``(inputs (N, C, T,
    H, W), masks (N, T, H, W), targets (N,))`` or a map-style dataset of ``(x, m, y)``
    records (materialised: keep it small). The mechanism: ``noise_multiplier``,
    ``max_grad_norm``, ``sample_rate`` (:math:`q`; the expected batch size is
    :math:`\max(1, \mathrm{round}(qN))`; ``sample_rate=1``, full batch, gives the strongest
    audit), ``view`` (default ``FillView(0.5)``: deterministic, the most powerful audit),
    ``engine``, ``protect_labels``, ``accountant`` (for
    ``epsilon_theory``) and ``public_sample_rate`` (default :math:`q`; the independent
    public batch has the expected size :math:`B_{pub} = \max(1, \mathrm{round}(q_{pub} N))`
    and is drawn at :math:`B_{pub}/N`, as make_private draws it), as in
    :class:`~maskdp.settings.PrivacySettings`, or all of them as
    one ``settings=`` whose batch sizes fit the dataset
    (:func:`~maskdp.analysis.config.audit_settings`). The other arguments are the fields
    of :class:`~maskdp.analysis.config.AuditConfig`.
    """
    arguments = dict(locals())  # every argument, by name: split between mechanism and plan
    model_fn, data = arguments.pop("model_fn"), as_tensors(arguments.pop("dataset"))
    mechanism = {name: arguments.pop(name) for name in (*MECHANISM, "settings")}
    config = AuditConfig(**arguments)
    return run_audit(model_fn, data, audit_settings(len(data[0]), **mechanism), config)


def _initial_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``model_fn()`` under ``seed``, torch's global generator left as it was."""
    if not callable(model_fn):
        raise InvalidInputError("model_fn must be a callable that returns an nn.Module")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module) or not trainable_parameters(model):
        raise InvalidInputError("model_fn must return an nn.Module with trainable parameters")
    return model


def _canary(data: tuple[Tensor, Tensor, Tensor], config: AuditConfig) -> tuple[Tensor, Tensor]:
    """``(inputs, canary)``: the dataset (with ``public_scale``'s texture) and the canary."""
    inputs, mask, _ = data
    index = config.canary_index
    if index >= len(inputs):
        raise InvalidInputError(f"canary_index {index} is out of range for {len(inputs)} records")
    pattern = config.canary_pattern
    if pattern is None:
        pattern = rademacher_pattern(inputs.shape[1:], scale=config.canary_scale, seed=config.seed)
    return canary_record(
        inputs,
        mask,
        index,
        region=config.canary_region,
        pattern=pattern,
        public_scale=config.public_scale,
        seed=config.seed,
    )


def _gate(
    model: nn.Module,
    worlds: Worlds,
    labels: tuple[Tensor, Tensor],
    settings: PrivacySettings,
    config: AuditConfig,
) -> tuple[Tensor, float] | None:
    """The gated score's ``(direction, level)``: half of one plain SGD step's update along
    the record's public gradient :math:`\\hat h`; ``None`` for the direction score."""
    if config.resolved_score(settings) != "gated":
        return None
    index, loss_fn = config.canary_index, config.loss_fn
    h, norm = public_direction(model, worlds[1], *labels, index, settings, loss_fn)
    return h, config.learning_rate * norm / (2 * settings.expected_public_batch_size)


def _warn_weak(signal: float, settings: PrivacySettings, config: AuditConfig) -> None:
    clip = settings.max_grad_norm
    if config.canary_region == "sensitive" and signal < 0.5 * clip:
        warnings.warn(
            f"the canary's clipped contribution {signal:.3g} is well below max_grad_norm "
            f"{clip:g}: the audit is weaker than it could be; raise canary_scale",
            RuntimeWarning,
            stacklevel=4,
        )


def run_audit(
    model_fn: Callable[[], nn.Module],
    data: tuple[Tensor, Tensor, Tensor],
    settings: PrivacySettings,
    config: AuditConfig,
    *,
    batches: BatchFn = step_batches,
) -> AuditResult:
    """The audit of the mechanism ``settings`` on ``data`` (:func:`as_tensors`) under
    ``config``: canary, direction, runs, test (module docstring, steps 1 to 5).

    ``batches`` turns each run's make_private loader into the steps' batches
    (:func:`~maskdp.analysis.runs.step_batches`; the subsampled audit swaps it).
    """
    inputs, canary = _canary(data, config)
    theory = theory_epsilon(
        sample_rate=settings.sample_rate,
        noise_multiplier=settings.noise_multiplier,
        steps=config.steps,
        delta=config.delta,
        accountant=settings.accountant,
    )
    model = _initial_model(model_fn, config.seed)
    device = next(iter(trainable_parameters(model).values())).device
    inputs, mask, targets = (t.to(device) for t in (inputs, *data[1:]))
    worlds = make_worlds(inputs, config.canary_index, canary.to(device), config.canary_region)
    labels = (mask, targets)
    direction, signal = canary_direction(
        model, worlds, *labels, config.canary_index, settings, config.loss_fn
    )
    _warn_weak(signal, settings, config)
    gate = _gate(model, worlds, labels, settings, config)
    initial = {k: p.detach().clone() for k, p in trainable_parameters(model).items()}
    plan = RunPlan(settings, config.loss_fn, config.optimizer, config.steps, config.seed, batches)
    scores = run_worlds(
        model,
        worlds,
        labels,
        plan,
        config.trials,
        lambda final: gated_score(initial, final, direction, gate),
    )
    return _result(fill_gated(scores), settings, config, theory, signal)


def _result(
    scores: list[list[float]],
    settings: PrivacySettings,
    config: AuditConfig,
    theory: float,
    signal: float,
) -> AuditResult:
    """Threshold on the calibration runs, counts and bound on the others."""
    s_out, s_in = np.asarray(scores[0]), np.asarray(scores[1])
    calibration, d, conf = config.calibration_trials, config.delta, config.confidence
    if config.threshold is None:
        tau = choose_threshold(s_in[:calibration], s_out[:calibration], delta=d, confidence=conf)
    else:
        tau = float(config.threshold)
    counts = count_guesses(s_in[calibration:], s_out[calibration:], tau)
    return AuditResult(
        epsilon_lower_bound=epsilon_lower_bound(counts, delta=d, confidence=conf),
        epsilon_theory=theory,
        delta=d,
        confidence=conf,
        canary_region=config.canary_region,
        counts=counts,
        threshold=tau,
        trials=config.trials,
        calibration_trials=calibration,
        noise_multiplier=settings.noise_multiplier,
        max_grad_norm=settings.max_grad_norm,
        sample_rate=settings.sample_rate,
        steps=config.steps,
        canary_signal=signal,
        scores_in=tuple(float(s) for s in s_in),
        scores_out=tuple(float(s) for s in s_out),
    )
