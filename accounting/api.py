"""The accounting commands as Python functions: the CLI is a thin shell around these.

Each ``compute_*`` function takes keyword-only arguments spelled like the CLI options
(``sample_rate`` for ``--sample-rate``), validates them once through :mod:`maskdp.accounting.params`
(raising :class:`~maskdp.accounting.errors.InvalidParameterError` on bad input) and returns a frozen
report with ``to_dict()``.

A report holds one result per accountant asked for (``accountant="all"`` runs both RDP and
PRV). Every result is a guarantee, so the report's headline is the best of them: the
smallest epsilon, the smallest noise multiplier, the largest step count or the smallest
attacker TPR bound. ``to_dict()`` gives the inputs, ``accountant`` (as asked), the headline
keys, every key of the single result when one accountant was asked for, and ``results`` (a
list with one dict per accountant). No value is ever NaN or infinite.

The numerical core (RDP, PRV, calibration, risk) is imported inside the functions, so that
importing this module stays cheap and the RDP path never imports scipy.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar

from maskdp.accounting.errors import AccountingError
from maskdp.accounting.params import (
    DEFAULT_DELTA,
    Accountant,
    EpsilonParams,
    NoiseParams,
    RiskParams,
    StepsParams,
    parse,
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


def _finite(value: float, what: str) -> float:
    value = float(value)
    if not math.isfinite(value):
        raise AccountingError(
            f"{what} is unbounded for these parameters (is the noise multiplier far too small?)"
        )
    return value


def _compact(obj: Any) -> dict[str, Any]:
    """``asdict`` without the ``None`` fields (a key absent means "does not apply")."""
    return {key: value for key, value in asdict(obj).items() if value is not None}


# --- one accountant's answer ---------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class EpsilonBound:
    """One accountant's epsilon at ``delta``; ``epsilon`` is an upper bound (the guarantee).

    RDP fills ``conversion``, ``order`` (the optimal Renyi order) and ``at_grid_edge``; PRV
    fills ``epsilon_estimate`` and ``epsilon_lower`` (``epsilon`` is its upper bound).
    """

    accountant: Accountant
    epsilon: float
    delta: float
    conversion: str | None = None
    order: float | None = None
    at_grid_edge: bool | None = None
    epsilon_estimate: float | None = None
    epsilon_lower: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _compact(self)


@dataclass(frozen=True, kw_only=True)
class NoiseResult:
    """The smallest noise multiplier this accountant certifies for the target, and the
    epsilon it achieves (at most the target)."""

    accountant: Accountant
    noise_multiplier: float
    epsilon: float
    conversion: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _compact(self)


@dataclass(frozen=True, kw_only=True)
class StepsResult:
    """The largest step count this accountant certifies for the target, the matching
    number of epochs (``steps * q``) and the epsilon it achieves (at most the target)."""

    accountant: Accountant
    steps: int
    epochs: float
    epsilon: float
    conversion: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return _compact(self)


@dataclass(frozen=True, kw_only=True)
class RiskBound:
    """Upper bounds on a membership attacker's true-positive rate at ``fpr`` and on its
    advantage (TPR - FPR), from this accountant's privacy curve."""

    accountant: Accountant
    tpr_upper: float
    advantage_upper: float
    epsilon: float | None = None
    delta: float | None = None

    def to_dict(self) -> dict[str, Any]:
        return _compact(self)


# --- reports --------------------------------------------------------------------------------


@dataclass(frozen=True, kw_only=True)
class _Report:
    """Inputs (resolved), the accountant asked for, and one result per accountant."""

    accountant: str
    results: tuple[Any, ...]

    HEADLINE: ClassVar[tuple[str, ...]] = ()

    @property
    def best(self) -> Any:
        raise NotImplementedError

    def inputs(self) -> dict[str, Any]:
        skip = {"accountant", "results"}
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        best = self.best.to_dict()
        head = best if len(self.results) == 1 else {k: best[k] for k in self.HEADLINE}
        head = {k: v for k, v in head.items() if k != "accountant"}
        return {
            **self.inputs(),
            "accountant": self.accountant,
            **head,
            "results": [r.to_dict() for r in self.results],
        }


@dataclass(frozen=True, kw_only=True)
class EpsilonReport(_Report):
    """``epsilon``: the smallest upper bound on epsilon at ``delta`` over the accountants."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    delta: float
    relation: str
    dataset_size: int | None = None
    batch_size: int | None = None
    epochs: float | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("epsilon",)

    @property
    def best(self) -> EpsilonBound:
        return min(self.results, key=lambda r: r.epsilon)

    @property
    def epsilon(self) -> float:
        return self.best.epsilon


@dataclass(frozen=True, kw_only=True)
class NoiseReport(_Report):
    """``noise_multiplier``: the smallest certified noise for ``target_epsilon``."""

    sample_rate: float
    steps: int
    target_epsilon: float
    delta: float
    relation: str
    dataset_size: int | None = None
    batch_size: int | None = None
    epochs: float | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("noise_multiplier", "epsilon")

    @property
    def best(self) -> NoiseResult:
        return min(self.results, key=lambda r: r.noise_multiplier)

    @property
    def noise_multiplier(self) -> float:
        return self.best.noise_multiplier


@dataclass(frozen=True, kw_only=True)
class StepsReport(_Report):
    """``steps``: the largest certified step count for ``target_epsilon``."""

    sample_rate: float
    noise_multiplier: float
    target_epsilon: float
    delta: float
    relation: str
    dataset_size: int | None = None
    batch_size: int | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("steps", "epochs", "epsilon")

    @property
    def best(self) -> StepsResult:
        return max(self.results, key=lambda r: r.steps)

    @property
    def steps(self) -> int:
        return self.best.steps


@dataclass(frozen=True, kw_only=True)
class RiskReport(_Report):
    """``tpr_upper``: the smallest bound on an attacker's TPR at ``fpr``."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    fpr: float
    delta: float | None = None
    dataset_size: int | None = None
    batch_size: int | None = None
    epochs: float | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("tpr_upper", "advantage_upper")

    @property
    def best(self) -> RiskBound:
        return min(self.results, key=lambda r: r.tpr_upper)

    @property
    def tpr_upper(self) -> float:
        return self.best.tpr_upper


# --- computations ---------------------------------------------------------------------------


def _warn_delta(delta: float | None, dataset_size: int | None) -> None:
    if delta is not None and dataset_size is not None and delta * dataset_size >= 1:
        warnings.warn(
            f"delta={delta:g} is not below 1/dataset_size={1 / dataset_size:g}: the guarantee "
            "allows leaking a whole record; choose a smaller delta",
            UserWarning,
            stacklevel=3,
        )


def _epsilon_bound(
    accountant: Accountant,
    *,
    sample_rate: float,
    noise_multiplier: float,
    steps: int,
    delta: float,
    conversion: str,
    relation: str,
) -> EpsilonBound:
    from maskdp.accounting.ledger import PrivacyLedger

    ledger = PrivacyLedger()
    ledger.record(sample_rate, noise_multiplier, steps=steps)
    result = ledger.report(delta, accountant=accountant, conversion=conversion, relation=relation)
    return _READERS[accountant](result, delta=delta, conversion=conversion)


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


_READERS = {"rdp": _read_rdp, "prv": _read_prv}


def epsilon_report(params: EpsilonParams) -> EpsilonReport:
    """The (epsilon, delta) guarantee of ``steps`` Poisson-subsampled Gaussian steps."""
    _warn_delta(params.delta, params.dataset_size)
    results = tuple(
        _epsilon_bound(
            accountant,
            sample_rate=params.q,
            noise_multiplier=params.noise_multiplier,
            steps=params.num_steps,
            delta=params.delta,
            conversion=params.conversion,
            relation=params.relation,
        )
        for accountant in params.accountants
    )
    return EpsilonReport(
        accountant=params.accountant,
        results=results,
        sample_rate=params.q,
        steps=params.num_steps,
        noise_multiplier=params.noise_multiplier,
        delta=params.delta,
        relation=params.relation,
        dataset_size=params.dataset_size,
        batch_size=params.batch_size,
        epochs=params.epochs,
    )


def noise_report(params: NoiseParams) -> NoiseReport:
    """The smallest noise multiplier whose epsilon at ``delta`` is at most the target."""
    from maskdp.accounting.calibration import calibrate_noise

    _warn_delta(params.delta, params.dataset_size)
    results = []
    for accountant in params.accountants:
        sigma = calibrate_noise(
            params.target_epsilon,
            params.delta,
            sample_rate=params.q,
            steps=params.num_steps,
            accountant=accountant,
            conversion=params.conversion,
            relation=params.relation,
        )
        achieved = _epsilon_bound(
            accountant,
            sample_rate=params.q,
            noise_multiplier=sigma,
            steps=params.num_steps,
            delta=params.delta,
            conversion=params.conversion,
            relation=params.relation,
        )
        results.append(
            NoiseResult(
                accountant=accountant,
                noise_multiplier=_finite(sigma, "the noise multiplier"),
                epsilon=achieved.epsilon,
                conversion=achieved.conversion,
            )
        )
    return NoiseReport(
        accountant=params.accountant,
        results=tuple(results),
        sample_rate=params.q,
        steps=params.num_steps,
        target_epsilon=params.target_epsilon,
        delta=params.delta,
        relation=params.relation,
        dataset_size=params.dataset_size,
        batch_size=params.batch_size,
        epochs=params.epochs,
    )


def steps_report(params: StepsParams) -> StepsReport:
    """The largest number of steps whose epsilon at ``delta`` is at most the target."""
    from maskdp.accounting.calibration import max_steps

    _warn_delta(params.delta, params.dataset_size)
    results = []
    for accountant in params.accountants:
        steps = int(
            max_steps(
                params.target_epsilon,
                params.delta,
                sample_rate=params.q,
                noise_multiplier=params.noise_multiplier,
                accountant=accountant,
                conversion=params.conversion,
                relation=params.relation,
            )
        )
        achieved = _epsilon_bound(
            accountant,
            sample_rate=params.q,
            noise_multiplier=params.noise_multiplier,
            steps=steps,
            delta=params.delta,
            conversion=params.conversion,
            relation=params.relation,
        )
        results.append(
            StepsResult(
                accountant=accountant,
                steps=steps,
                epochs=steps * params.q,
                epsilon=achieved.epsilon,
                conversion=achieved.conversion,
            )
        )
    return StepsReport(
        accountant=params.accountant,
        results=tuple(results),
        sample_rate=params.q,
        noise_multiplier=params.noise_multiplier,
        target_epsilon=params.target_epsilon,
        delta=params.delta,
        relation=params.relation,
        dataset_size=params.dataset_size,
        batch_size=params.batch_size,
    )


def risk_report(params: RiskParams) -> RiskReport:
    """Bounds on a membership attacker's TPR at ``fpr`` (hypothesis-testing view of DP)."""
    from maskdp.accounting.events import PoissonGaussianEvent
    from maskdp.accounting.risk import attack_risk

    _warn_delta(params.delta, params.dataset_size)
    event = PoissonGaussianEvent(
        sample_rate=params.q, noise_multiplier=params.noise_multiplier, steps=params.num_steps
    )
    results = []
    for accountant in params.accountants:
        risk = attack_risk([event], fpr=params.fpr, delta=params.delta, accountant=accountant)
        epsilon = getattr(risk, "epsilon", None)
        delta = getattr(risk, "delta", None)
        results.append(
            RiskBound(
                accountant=accountant,
                tpr_upper=_finite(risk.tpr_upper, "the TPR bound"),
                advantage_upper=_finite(risk.advantage_upper, "the advantage bound"),
                epsilon=None if epsilon is None else _finite(epsilon, "epsilon"),
                delta=None if delta is None else _finite(delta, "delta"),
            )
        )
    return RiskReport(
        accountant=params.accountant,
        results=tuple(results),
        sample_rate=params.q,
        steps=params.num_steps,
        noise_multiplier=params.noise_multiplier,
        fpr=params.fpr,
        delta=params.delta,
        dataset_size=params.dataset_size,
        batch_size=params.batch_size,
        epochs=params.epochs,
    )


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
) -> RiskReport:
    """Upper bound on a membership attacker's TPR at ``fpr`` (``maskdp risk``).

    The bounds use the accountant's whole privacy profile (Kairouz et al. 2015; Dong et al.
    2019); ``delta``, when given, only adds the accountant's epsilon at ``delta`` to the result.

    Raises:
        InvalidParameterError: a parameter is out of its domain or the combination is wrong.
    """
    return risk_report(parse(RiskParams, locals()))
