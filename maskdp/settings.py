r"""``PrivacySettings``: every privacy and engine setting of a MaskDP run, validated once.

The optimizer, ``make_private``, ``make_private_with_epsilon`` and the audit all take or
build one of these; nothing else validates these values. Frozen: a run's mechanism cannot
change under it (use :meth:`PrivacySettings.replace` to derive another).

The release of one step (DESIGN.md section 3) is

.. math:: G = \frac{1}{B_{pub}} \sum_{j \in U} h_j
          + \frac{w}{B}\, s\Big(\sum_{i \in P} c_i \Delta_i + N(0, \sigma^2 C^2 I)\Big)

with :math:`\sigma` = ``noise_multiplier``, :math:`C` = ``max_grad_norm``, :math:`q` =
``sample_rate`` (Poisson, private batch :math:`P`), :math:`B` = ``expected_batch_size``,
:math:`B_{pub}` = ``expected_public_batch_size``, :math:`w` = ``private_weight`` and
:math:`s` the optional ``shrinkage``.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from maskdp.accounting.choices import RELATIONS
from maskdp.accounting.ledger import ACCOUNTANTS
from maskdp.checks import (
    check_batch_size,
    check_bool,
    check_choice,
    check_delta,
    check_max_grad_norm,
    check_noise_multiplier,
    check_sample_rate,
    check_target_epsilon,
)
from maskdp.engines.base import check_engine_name
from maskdp.errors import InvalidInputError
from maskdp.mechanism.postprocess import check_private_weight, check_shrinkage
from maskdp.mechanism.subset import check_private_parameters, check_private_term
from maskdp.mechanism.views import ViewArg, as_view
from maskdp.training.precision import check_autocast


@dataclasses.dataclass(frozen=True, kw_only=True)
class PrivacySettings:
    r"""The mechanism's settings (module docstring for the release they define).

    Args:
        noise_multiplier: :math:`\sigma \ge 0`. ``0`` is for tests only: no privacy, the
            optimizer's ``epsilon()`` reports ``math.inf`` once such a step was taken, and
            the step is not written to the ledger (a Gaussian event needs :math:`\sigma > 0`).
        max_grad_norm: the clipping norm :math:`C > 0` of :math:`\Delta_i = g_i - h_i`, taken
            over *all* trainable parameters (set ``requires_grad=False`` on the others).
        sample_rate: the Poisson rate :math:`q \in (0, 1]` of the private batch.
        expected_batch_size: :math:`B = qN`, the divisor of the private term (fixed, never
            the realised batch size).
        expected_public_batch_size: :math:`B_{pub}`, the divisor of the public term
            (default :math:`B`).
        view: the public view (default ``TextureFillView()``, :func:`maskdp.mechanism.views.as_view`)
            or a callable ``(x, m) -> x'``.
        engine: ``"auto"`` or an engine name (:func:`maskdp.engines.base.engine_names`).
        protect_labels: plain DP-SGD on :math:`g_i` (no public term): protects labels too.
        target_epsilon: with ``target_delta``, a step that would make epsilon exceed it
            raises :class:`~maskdp.errors.PrivacyBudgetExceeded` *before* anything changes.
        target_delta: the delta of the budget and the default delta of ``epsilon()``.
        accountant: ``"rdp"`` (default) or ``"prv"`` (tighter, slower; its upper bound).
        relation: ``"erase"`` (default) or ``"substitute"``: the neighbouring relation the
            ledger, the budget guard and ``epsilon()`` account for
            (:mod:`maskdp.accounting.relations`).
        autocast: ``torch.bfloat16`` or ``torch.float16`` runs each engine call under
            ``torch.autocast``; clipped sums, noise and the divisions stay in float32 or
            wider (:mod:`maskdp.training.precision`).
        private_weight: :math:`w \ge 0` on the noisy private sum :math:`Z` (noise added
            *before* weighting; :math:`w < 1` trades the private term's bias for less noise).
            Post-processing of the release, free in privacy (:mod:`maskdp.mechanism.postprocess`).
        shrinkage: ``None`` or ``"james-stein"``: per parameter tensor, the positive-part
            James-Stein shrinkage of :math:`Z` toward zero (post-processing too).
        private_parameters: ``None`` (every trainable parameter) or the names of the
            parameters (or modules) that get the private term; the others learn from the
            public term alone (:mod:`maskdp.mechanism.subset`: same epsilon, less noise).
        private_term: ``"difference"`` (default: :math:`\Delta_i = g_i - h_i` on the private
            parameters, which learn from the public term too) or ``"full"`` (:math:`g_i` on
            full clips: the private parameters, a residual branch, learn from it alone and
            the others from the public term alone; :mod:`maskdp.mechanism.subset`).
    """

    noise_multiplier: float
    max_grad_norm: float
    sample_rate: float
    expected_batch_size: int
    expected_public_batch_size: int | None = None
    view: ViewArg = None
    engine: str = "auto"
    protect_labels: bool = False
    target_epsilon: float | None = None
    target_delta: float | None = None
    accountant: str = "rdp"
    relation: str = "erase"
    autocast: torch.dtype | None = None
    private_weight: float = 1.0
    shrinkage: str | None = None
    private_parameters: tuple[str, ...] | None = None
    private_term: str = "difference"

    def __post_init__(self) -> None:
        batch = check_batch_size(self.expected_batch_size)
        public = self.expected_public_batch_size
        normalised = {
            "noise_multiplier": check_noise_multiplier(self.noise_multiplier),
            "max_grad_norm": check_max_grad_norm(self.max_grad_norm),
            "sample_rate": check_sample_rate(self.sample_rate),
            "expected_batch_size": batch,
            "expected_public_batch_size": batch
            if public is None
            else check_batch_size(public, "expected_public_batch_size"),
            "view": as_view(self.view),
            "engine": check_engine_name(self.engine),
            "protect_labels": check_bool("protect_labels", self.protect_labels),
            "accountant": check_choice("accountant", self.accountant, ACCOUNTANTS),
            "relation": check_choice("relation", self.relation, RELATIONS),
            "autocast": check_autocast(self.autocast),
            "private_weight": check_private_weight(self.private_weight),
            "shrinkage": check_shrinkage(self.shrinkage),
            "private_parameters": check_private_parameters(self.private_parameters),
            "private_term": check_private_term(self.private_term),
            **_budget(self.target_epsilon, self.target_delta, self.noise_multiplier),
        }
        for name, value in normalised.items():
            object.__setattr__(self, name, value)

    @classmethod
    def build(cls, **options: Any) -> PrivacySettings:
        """``PrivacySettings(**options)``, an unknown name refused with a one-line
        :class:`~maskdp.errors.InvalidInputError` naming it."""
        unknown = sorted(set(options) - {f.name for f in dataclasses.fields(cls)})
        if unknown:
            raise InvalidInputError(f"unknown privacy setting {unknown[0]!r}")
        missing = [
            f.name for f in dataclasses.fields(cls) if _required(f) and f.name not in options
        ]
        if missing:
            raise InvalidInputError(f"missing privacy setting {missing[0]!r}")
        return cls(**options)

    def replace(self, **changes: Any) -> PrivacySettings:
        """A copy with ``changes`` applied and validated again."""
        current = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        return PrivacySettings.build(**{**current, **changes})

    @property
    def private(self) -> bool:
        """Whether steps add noise (``noise_multiplier > 0``)."""
        return self.noise_multiplier > 0


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _budget(epsilon: Any, delta: Any, sigma: Any) -> dict[str, float | None]:
    if epsilon is not None and delta is None:
        raise InvalidInputError(
            "target_epsilon needs target_delta: pass target_delta= (e.g. 1 / dataset size)"
        )
    if epsilon is not None and sigma == 0:
        raise InvalidInputError(
            "target_epsilon needs noise_multiplier > 0: without noise epsilon is infinite"
        )
    return {
        "target_epsilon": None if epsilon is None else check_target_epsilon(epsilon),
        "target_delta": None if delta is None else check_delta(delta, "target_delta"),
    }


def resolve_settings(settings: PrivacySettings | None, options: dict[str, Any]) -> PrivacySettings:
    """``settings``, or one built from keyword ``options`` (never both)."""
    if settings is None:
        return PrivacySettings.build(**options)
    if options:
        raise InvalidInputError(
            f"pass either settings= or keyword settings, not both (got {sorted(options)})"
        )
    if not isinstance(settings, PrivacySettings):
        raise InvalidInputError(
            f"settings must be a PrivacySettings, got {type(settings).__name__}"
        )
    return settings


class SettingAttribute:
    """A read-only attribute that reads the same-named field of ``obj.settings``."""

    def __set_name__(self, owner: type, name: str) -> None:
        self.name = name

    def __get__(self, obj: Any, owner: type | None = None) -> Any:
        return self if obj is None else getattr(obj.settings, self.name)
