"""What the accounting commands return: one result per accountant, and a report of them.

A result is one accountant's answer; every result is a guarantee, so a report's headline
(:attr:`_Report.best`) is the best of them: the smallest epsilon, the smallest noise
multiplier, the largest step count or the smallest attacker TPR bound. ``to_dict()`` gives
the inputs, ``accountant`` (as asked), the headline keys, every key of the single result when
one accountant was asked for, and ``results`` (a list with one dict per accountant); a key
absent means "does not apply".

Frozen dataclasses, standard library only: :mod:`maskdp.accounting.api` fills them in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any, ClassVar, Generic, TypeVar

from maskdp.accounting.choices import Accountant

__all__ = [
    "EpsilonBound",
    "EpsilonReport",
    "NoiseReport",
    "NoiseResult",
    "RiskBound",
    "RiskReport",
    "StepsReport",
    "StepsResult",
]


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

_Result = TypeVar("_Result", EpsilonBound, NoiseResult, StepsResult, RiskBound)


@dataclass(frozen=True, kw_only=True)
class _Report(Generic[_Result]):
    """Inputs (resolved), the accountant asked for, and one result per accountant."""

    accountant: str
    results: tuple[_Result, ...]

    HEADLINE: ClassVar[tuple[str, ...]] = ()
    """The headline keys; the first one ranks the results."""
    LARGEST_IS_BEST: ClassVar[bool] = False
    """Whether the best result has the largest first headline key (else the smallest)."""

    @property
    def best(self) -> _Result:
        """The result with the best guarantee: the smallest first headline key (the largest
        when ``LARGEST_IS_BEST``), the first such result on a tie."""
        key = self.HEADLINE[0]
        pick = max if self.LARGEST_IS_BEST else min
        return pick(self.results, key=lambda result: getattr(result, key))

    def inputs(self) -> dict[str, Any]:
        """The inputs as resolved (``sample_rate``, ``steps``, ...), without the absent ones."""
        skip = {"accountant", "results"}
        return {
            f.name: getattr(self, f.name)
            for f in fields(self)
            if f.name not in skip and getattr(self, f.name) is not None
        }

    def to_dict(self) -> dict[str, Any]:
        """Inputs, ``accountant``, the headline (or the single result) and ``results``."""
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
class EpsilonReport(_Report[EpsilonBound]):
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
    def epsilon(self) -> float:
        return self.best.epsilon


@dataclass(frozen=True, kw_only=True)
class NoiseReport(_Report[NoiseResult]):
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
    def noise_multiplier(self) -> float:
        return self.best.noise_multiplier


@dataclass(frozen=True, kw_only=True)
class StepsReport(_Report[StepsResult]):
    """``steps``: the largest certified step count for ``target_epsilon``."""

    sample_rate: float
    noise_multiplier: float
    target_epsilon: float
    delta: float
    relation: str
    dataset_size: int | None = None
    batch_size: int | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("steps", "epochs", "epsilon")
    LARGEST_IS_BEST: ClassVar[bool] = True

    @property
    def steps(self) -> int:
        return self.best.steps


@dataclass(frozen=True, kw_only=True)
class RiskReport(_Report[RiskBound]):
    """``tpr_upper``: the smallest bound on an attacker's TPR at ``fpr``."""

    sample_rate: float
    steps: int
    noise_multiplier: float
    fpr: float
    delta: float | None = None
    relation: str = "erase"
    dataset_size: int | None = None
    batch_size: int | None = None
    epochs: float | None = None

    HEADLINE: ClassVar[tuple[str, ...]] = ("tpr_upper", "advantage_upper")

    @property
    def tpr_upper(self) -> float:
        return self.best.tpr_upper
