r"""What an audit is given, validated before any training: its data, mechanism and plan.

The mechanism audited is one :class:`~maskdp.settings.PrivacySettings` (the same object
:func:`~maskdp.training.private.make_private` builds for every run); everything else the
audit does (runs, canary, test) is an :class:`AuditConfig`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from maskdp.analysis.canary import REGIONS, Loss, Region
from maskdp.checks import (
    check_calibration,
    check_choice,
    check_confidence,
    check_count,
    check_delta,
    check_positive,
    check_sample_rate,
)
from maskdp.errors import InvalidInputError
from maskdp.mechanism.gradient import check_batch
from maskdp.mechanism.views import FillView
from maskdp.settings import PrivacySettings

SCORES: tuple[str, ...] = ("auto", "direction", "gated")
OptimizerFn = Callable[[list[nn.Parameter]], Optimizer]

#: The mechanism's keywords of :func:`~maskdp.analysis.audit.audit` and their defaults;
#: ``settings=`` stands for all of them.
MECHANISM: dict[str, Any] = {
    "noise_multiplier": None,
    "max_grad_norm": None,
    "sample_rate": 1.0,
    "view": None,
    "engine": "auto",
    "protect_labels": False,
    "accountant": "rdp",
    "public_sample_rate": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class AuditConfig:
    r"""The audit's own settings (the mechanism's are a ``PrivacySettings``), validated.

    Args:
        steps: MaskDP-SGD steps per run.
        trials: training runs per world (``2 * trials`` runs in all).
        learning_rate: of the default plain SGD; ``optimizer_fn(params)`` overrides it.
            Keep it small: the score reads the update along :math:`\hat d` taken at
            :math:`\theta_0`, and a large step turns the canary's later gradients away
            from it (measured: 4 full-batch steps at sigma = 2 show a separation of 0.65
            instead of the mechanism's 1.0 with ``0.1``, 1.0 with ``0.01``).
        loss_fn: default ``nn.CrossEntropyLoss()``.
        canary_region: ``"sensitive"`` (audits the guarantee) or ``"public"`` (shows that
            public content is not protected).
        canary_index: the record that becomes the canary (its label and mask are kept).
        canary_scale, canary_pattern: the canary content, a (C, T, H, W) tensor; default a
            seeded :math:`\pm` ``canary_scale`` texture
            (:func:`~maskdp.analysis.canary.rademacher_pattern`).
        calibration_fraction: share of each world's runs used to choose the threshold
            (ignored when ``threshold`` is given; all runs are then evaluated).
        delta, confidence: of the lower bound.
        seed: seeds the initial model, the default pattern, and the runs' sampling and
            noise (replayable: an audit is a test, never a training run).
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

    steps: int
    trials: int = 100
    learning_rate: float = 0.01
    optimizer_fn: OptimizerFn | None = None
    loss_fn: Loss | None = None
    canary_region: Region = "sensitive"
    canary_index: int = 0
    canary_scale: float = 1.0
    canary_pattern: Tensor | None = None
    calibration_fraction: float = 0.5
    threshold: float | None = None
    delta: float = 1e-5
    confidence: float = 0.95
    seed: int = 0
    public_scale: float | None = None
    score: str = "auto"
    #: Calibration runs per world (0 with a given threshold).
    calibration_trials: int = dataclasses.field(init=False)

    def __post_init__(self) -> None:
        trials = check_count("trials", self.trials, 2)
        normalised = {
            "steps": check_count("steps", self.steps, 1),
            "trials": trials,
            "delta": check_delta(self.delta),
            "confidence": check_confidence(self.confidence),
            "seed": check_count("seed", self.seed),
            "calibration_trials": check_calibration(
                trials, self.calibration_fraction, self.threshold
            ),
            "score": check_choice("score", self.score, SCORES),
            "canary_region": check_choice("canary_region", self.canary_region, REGIONS),
            "loss_fn": nn.CrossEntropyLoss() if self.loss_fn is None else self.loss_fn,
            "canary_index": check_count("canary_index", self.canary_index),
            **_optimizer(self.optimizer_fn, self.learning_rate),
            **_canary(self.canary_pattern, self.canary_scale, self.public_scale),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    def optimizer(self, params: list[nn.Parameter]) -> Optimizer:
        """A fresh inner optimizer: ``optimizer_fn(params)``, else SGD at ``learning_rate``."""
        if self.optimizer_fn is not None:
            return self.optimizer_fn(params)
        return torch.optim.SGD(params, lr=self.learning_rate)

    def resolved_score(self, settings: PrivacySettings) -> str:
        """``score`` with ``"auto"`` resolved: gated for a sensitive canary under subsampling
        (and a public term), direction otherwise."""
        if self.score != "auto":
            return self.score
        gated = (
            settings.sample_rate < 1
            and self.canary_region == "sensitive"
            and not settings.protect_labels
        )
        return "gated" if gated else "direction"


def _optimizer(optimizer_fn: Any, learning_rate: Any) -> dict[str, Any]:
    if optimizer_fn is None:
        return {"learning_rate": check_positive("learning_rate", learning_rate)}
    if not callable(optimizer_fn):
        raise InvalidInputError("optimizer_fn must be a callable params -> torch Optimizer")
    return {}


def _canary(pattern: Any, scale: Any, public_scale: Any) -> dict[str, Any]:
    checked = {}
    if pattern is None:
        checked["canary_scale"] = check_positive("canary_scale", scale)
    elif not isinstance(pattern, Tensor):
        raise InvalidInputError("canary_pattern must be a tensor (C, T, H, W) or None")
    if public_scale is not None:
        checked["public_scale"] = check_positive("public_scale", public_scale)
    return checked


# ------------------------------------------------------------------------ the mechanism


def _is_default(value: Any, default: Any) -> bool:
    return value is default or (
        default is not None and type(value) is type(default) and value == default
    )


def audit_settings(
    records: int, settings: PrivacySettings | None = None, **mechanism: Any
) -> PrivacySettings:
    """The audited mechanism on ``records`` records: ``settings``, or the one the keywords
    of :data:`MECHANISM` define.

    As :func:`~maskdp.training.private.make_private` derives them from a Poisson loader at
    rate :math:`q`: :math:`B = \\max(1, \\mathrm{round}(qN))` and
    :math:`B_{pub} = \\max(1, \\mathrm{round}(q_{pub} N))` (``public_sample_rate``, default
    :math:`q`); the public batches are drawn at :math:`B_{pub}/N`.
    """
    unknown = sorted(set(mechanism) - set(MECHANISM))
    if unknown:
        raise InvalidInputError(f"unknown audit setting {unknown[0]!r}")
    if settings is not None:
        given = [k for k, v in mechanism.items() if not _is_default(v, MECHANISM[k])]
        if given:
            raise InvalidInputError(
                f"pass the mechanism either as settings= or as keywords, not both (got {given[0]})"
            )
        return _check_given(records, settings)
    mechanism = {**MECHANISM, **mechanism}
    if mechanism["view"] is None:
        # A deterministic public view: the most powerful audit. The library's default view
        # draws a random texture per call, which only adds variance to the attack's score.
        mechanism["view"] = FillView(0.5)
    for name in ("noise_multiplier", "max_grad_norm"):
        if mechanism[name] is None:
            raise InvalidInputError(f"audit needs {name}= (or settings=)")
    q = check_sample_rate(mechanism.pop("sample_rate"))
    rate = mechanism.pop("public_sample_rate")
    q_pub = q if rate is None else check_sample_rate(rate, "public_sample_rate")
    return PrivacySettings.build(
        sample_rate=q,
        expected_batch_size=max(1, round(q * records)),
        expected_public_batch_size=max(1, round(q_pub * records)),
        **mechanism,
    )


def _check_given(records: int, settings: PrivacySettings) -> PrivacySettings:
    if not isinstance(settings, PrivacySettings):
        raise InvalidInputError(
            f"settings must be a PrivacySettings, got {type(settings).__name__}"
        )
    expected = max(1, round(settings.sample_rate * records))
    if settings.expected_batch_size != expected:
        raise InvalidInputError(
            f"settings.expected_batch_size must be max(1, round(sample_rate * N)) = {expected} "
            f"for these {records} records, got {settings.expected_batch_size}"
        )
    if settings.expected_public_batch_size > records:  # type: ignore[operator]
        raise InvalidInputError(
            f"settings.expected_public_batch_size {settings.expected_public_batch_size} "
            f"exceeds the {records} records"
        )
    return settings


# ------------------------------------------------------------------------ the data


def as_tensors(dataset: Any) -> tuple[Tensor, Tensor, Tensor]:
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
        inputs, mask, targets = (
            torch.stack([torch.as_tensor(r[i]) for r in records]) for i in range(3)
        )
    check_batch(inputs, mask, targets)
    if len(inputs) < 1:
        raise InvalidInputError("dataset is empty; the audit needs at least the canary record")
    return inputs, mask, targets
