"""The accounting commands as Python functions: the CLI is a thin shell around these.

Each ``compute_*`` function takes keyword-only arguments spelled like the CLI options
(``sample_rate`` for ``--sample-rate``), validates them once through :mod:`maskdp.accounting.params`
(raising :class:`~maskdp.accounting.errors.InvalidParameterError` on bad input) and returns a frozen
report with ``to_dict()`` (:mod:`maskdp.accounting.reports`).

A report holds one result per accountant asked for (``accountant="all"`` runs both RDP and
PRV). Every result is a guarantee, so the report's headline is the best of them: the
smallest epsilon, the smallest noise multiplier, the largest step count or the smallest
attacker TPR bound. No value is ever NaN or infinite: an unbounded one raises
:class:`~maskdp.accounting.errors.AccountingError`.

The numerical core (RDP, PRV, calibration, risk) is imported inside the functions, so that
importing this module stays cheap and the RDP path never imports scipy.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from dataclasses import fields
from typing import Any, TypeVar

from maskdp.accounting.choices import Accountant
from maskdp.accounting.errors import AccountingError
from maskdp.accounting.params import (
    DEFAULT_DELTA,
    EpsilonParams,
    NoiseParams,
    RiskParams,
    StepsParams,
    parse,
)
from maskdp.accounting.reports import (
    EpsilonBound,
    EpsilonReport,
    NoiseReport,
    NoiseResult,
    RiskBound,
    RiskReport,
    StepsReport,
    StepsResult,
)

__all__ = [
    "EpsilonBound",
    "EpsilonReport",
    "NoiseReport",
    "NoiseResult",
    "RiskBound",
    "RiskReport",
    "StepsReport",
    "StepsResult",
    "compute_epsilon",
    "compute_noise",
    "compute_risk",
    "compute_steps",
    "epsilon_report",
    "noise_report",
    "risk_report",
    "steps_report",
]

_GuaranteeParams = EpsilonParams | NoiseParams | StepsParams
"""Inputs that fix delta, the conversion and the relation of an epsilon guarantee."""
_P = TypeVar("_P", EpsilonParams, NoiseParams, StepsParams, RiskParams)
_R = TypeVar("_R", EpsilonReport, NoiseReport, StepsReport, RiskReport)


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise AccountingError(
            f"{what} is unbounded for these parameters (is the noise multiplier far too small?)"
        )
    return value


def _warn_delta(delta: float | None, dataset_size: int | None) -> None:
    if delta is not None and dataset_size is not None and delta * dataset_size >= 1:
        warnings.warn(
            f"delta={delta:g} is not below 1/dataset_size={1 / dataset_size:g}: the guarantee "
            "allows leaking a whole record; choose a smaller delta",
            UserWarning,
            stacklevel=4,  # the caller of the *_report function (via _report)
        )


_RESOLVED = {"sample_rate": "q", "steps": "num_steps"}
"""Report inputs whose value is resolved from the parameters: the rate q and the step count."""


def _report(report: type[_R], params: _P, result: Callable[[Accountant, _P], Any]) -> _R:
    """``report`` of one ``result`` per accountant asked for. Its inputs are the parameters of
    the same names, resolved (``sample_rate`` is q, ``steps`` the step count); warns first
    when ``delta`` is not below ``1 / dataset_size``."""
    _warn_delta(params.delta, params.dataset_size)
    results = tuple(result(accountant, params) for accountant in params.accountants)
    names = [f.name for f in fields(report) if f.name not in ("accountant", "results")]
    inputs = {name: getattr(params, _RESOLVED.get(name, name)) for name in names}
    return report(accountant=params.accountant, results=results, **inputs)


# --- epsilon ---------------------------------------------------------------------------------


def _epsilon_bound(
    accountant: Accountant, params: _GuaranteeParams, *, noise_multiplier: float, steps: int
) -> EpsilonBound:
    """One accountant's guarantee for ``steps`` steps at (``params.q``, ``noise_multiplier``),
    as a :class:`~maskdp.accounting.ledger.PrivacyLedger` of them reports it."""
    from maskdp.accounting.ledger import PrivacyLedger

    ledger = PrivacyLedger()
    ledger.record(params.q, noise_multiplier, steps=steps)
    result = ledger.report(
        params.delta,
        accountant=accountant,
        conversion=params.conversion,
        relation=params.relation,
    )
    return _READERS[accountant](result, delta=params.delta, conversion=params.conversion)


def _read_rdp(result: Any, *, delta: float, conversion: str) -> EpsilonBound:
    """An :class:`~maskdp.accounting.conversions.EpsilonResult` as a bound."""
    return EpsilonBound(
        accountant="rdp",
        epsilon=_finite(result.epsilon, "epsilon"),
        delta=delta,
        conversion=conversion,
        order=_finite(result.order, "the optimal order"),
        at_grid_edge=bool(result.at_grid_edge),
    )


def _read_prv(result: Any, *, delta: float, conversion: str) -> EpsilonBound:
    """A :class:`~maskdp.accounting.prv.PRVResult` as a bound: its upper end is the guarantee."""
    return EpsilonBound(
        accountant="prv",
        epsilon=_finite(result.epsilon_upper, "epsilon"),
        delta=delta,
        epsilon_estimate=_finite(result.epsilon_estimate, "epsilon"),
        epsilon_lower=_finite(result.epsilon_lower, "epsilon"),
    )


_READERS: dict[Accountant, Callable[..., EpsilonBound]] = {"rdp": _read_rdp, "prv": _read_prv}


def epsilon_report(params: EpsilonParams) -> EpsilonReport:
    """The (epsilon, delta) guarantee of ``steps`` Poisson-subsampled Gaussian steps."""

    def bound(accountant: Accountant, p: EpsilonParams) -> EpsilonBound:
        return _epsilon_bound(accountant, p, noise_multiplier=p.noise_multiplier, steps=p.num_steps)

    return _report(EpsilonReport, params, bound)


# --- calibration -----------------------------------------------------------------------------


def _target(accountant: Accountant, params: NoiseParams | StepsParams) -> dict[str, Any]:
    """What calibration must meet, as the keyword arguments that
    :func:`~maskdp.accounting.calibration.calibrate_noise` and
    :func:`~maskdp.accounting.calibration.max_steps` share: epsilon at most
    ``target_epsilon`` at ``delta`` under this accountant, conversion and relation, at rate q."""
    return {
        "target_epsilon": params.target_epsilon,
        "delta": params.delta,
        "sample_rate": params.q,
        "accountant": accountant,
        "conversion": params.conversion,
        "relation": params.relation,
    }


def _achieved(
    accountant: Accountant,
    params: NoiseParams | StepsParams,
    *,
    noise_multiplier: float,
    steps: int,
) -> dict[str, Any]:
    """The accountant and the epsilon (with its conversion) a calibrated answer achieves."""
    bound = _epsilon_bound(accountant, params, noise_multiplier=noise_multiplier, steps=steps)
    return {"accountant": accountant, "epsilon": bound.epsilon, "conversion": bound.conversion}


def _noise_result(accountant: Accountant, params: NoiseParams) -> NoiseResult:
    """One accountant's smallest certified noise and the epsilon it achieves."""
    from maskdp.accounting.calibration import calibrate_noise

    sigma = calibrate_noise(steps=params.num_steps, **_target(accountant, params))
    achieved = _achieved(accountant, params, noise_multiplier=sigma, steps=params.num_steps)
    return NoiseResult(noise_multiplier=_finite(sigma, "the noise multiplier"), **achieved)


def noise_report(params: NoiseParams) -> NoiseReport:
    """The smallest noise multiplier whose epsilon at ``delta`` is at most the target."""
    return _report(NoiseReport, params, _noise_result)


def _steps_result(accountant: Accountant, params: StepsParams) -> StepsResult:
    """One accountant's largest certified step count, its epochs and its epsilon."""
    from maskdp.accounting.calibration import max_steps

    sigma = params.noise_multiplier
    steps = int(max_steps(noise_multiplier=sigma, **_target(accountant, params)))
    achieved = _achieved(accountant, params, noise_multiplier=sigma, steps=steps)
    return StepsResult(steps=steps, epochs=steps * params.q, **achieved)


def steps_report(params: StepsParams) -> StepsReport:
    """The largest number of steps whose epsilon at ``delta`` is at most the target."""
    return _report(StepsReport, params, _steps_result)


# --- risk ------------------------------------------------------------------------------------


def _risk_bound(accountant: Accountant, params: RiskParams) -> RiskBound:
    """One accountant's bounds on the attacker's TPR at ``fpr`` and advantage."""
    from maskdp.accounting.events import PoissonGaussianEvent
    from maskdp.accounting.risk import attack_risk

    event = PoissonGaussianEvent(
        sample_rate=params.q, noise_multiplier=params.noise_multiplier, steps=params.num_steps
    )
    risk = attack_risk(
        [event],
        fpr=params.fpr,
        delta=params.delta,
        accountant=accountant,
        relation=params.relation,
    )
    return RiskBound(
        accountant=accountant,
        tpr_upper=_finite(risk.tpr_upper, "the TPR bound"),
        advantage_upper=_finite(risk.advantage_upper, "the advantage bound"),
        epsilon=None if risk.epsilon is None else _finite(risk.epsilon, "epsilon"),
        delta=None if risk.delta is None else _finite(risk.delta, "delta"),
    )


def risk_report(params: RiskParams) -> RiskReport:
    """Bounds on a membership attacker's TPR at ``fpr`` (hypothesis-testing view of DP)."""
    return _report(RiskReport, params, _risk_bound)


# --- keyword entry points -------------------------------------------------------------------


def compute_epsilon(
    *,
    noise_multiplier: float,
    sample_rate: float | None = None,
    steps: int | None = None,
    dataset_size: int | None = None,
    batch_size: int | None = None,
    epochs: float | None = None,
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    conversion: str = "hypothesis-test",
    relation: str = "erase",
) -> EpsilonReport:
    """Epsilon at ``delta`` of DP-SGD with Poisson sampling (``maskdp epsilon``).

    Give ``sample_rate`` or ``dataset_size`` with ``batch_size``, and ``steps`` or ``epochs``
    (see :mod:`maskdp.accounting.params`). ``report.epsilon`` is an upper bound.

    Raises:
        InvalidParameterError: a parameter is out of its domain or the combination is wrong.
    """
    return epsilon_report(parse(EpsilonParams, locals()))


def compute_noise(
    *,
    target_epsilon: float,
    sample_rate: float | None = None,
    steps: int | None = None,
    dataset_size: int | None = None,
    batch_size: int | None = None,
    epochs: float | None = None,
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    conversion: str = "hypothesis-test",
    relation: str = "erase",
) -> NoiseReport:
    """Smallest noise multiplier with epsilon <= ``target_epsilon`` (``maskdp noise``).

    Calibration lands on the safe side: ``report.results[i].epsilon <= target_epsilon``.

    Raises:
        InvalidParameterError: bad input. CalibrationError: the target is out of reach.
    """
    return noise_report(parse(NoiseParams, locals()))


def compute_steps(
    *,
    noise_multiplier: float,
    target_epsilon: float,
    sample_rate: float | None = None,
    dataset_size: int | None = None,
    batch_size: int | None = None,
    delta: float = DEFAULT_DELTA,
    accountant: str = "rdp",
    conversion: str = "hypothesis-test",
    relation: str = "erase",
) -> StepsReport:
    """Largest step count with epsilon <= ``target_epsilon`` (``maskdp steps``).

    ``epochs`` in the result is ``steps * q``, the expected number of passes over the data.

    Raises:
        InvalidParameterError: a parameter is out of its domain or the combination is wrong.
    """
    return steps_report(parse(StepsParams, locals()))


def compute_risk(
    *,
    noise_multiplier: float,
    fpr: float,
    sample_rate: float | None = None,
    steps: int | None = None,
    dataset_size: int | None = None,
    batch_size: int | None = None,
    epochs: float | None = None,
    delta: float | None = None,
    accountant: str = "rdp",
    relation: str = "erase",
) -> RiskReport:
    """Upper bound on a membership attacker's TPR at ``fpr`` (``maskdp risk``).

    The bounds use the accountant's whole privacy profile (Kairouz et al. 2015; Dong et al.
    2019); ``delta``, when given, only adds the accountant's epsilon at ``delta`` to the result.

    Raises:
        InvalidParameterError: a parameter is out of its domain or the combination is wrong.
    """
    return risk_report(parse(RiskParams, locals()))
