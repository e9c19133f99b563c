r"""The privacy ledger: what a run did, as (q, sigma, steps) segments, and what it cost.

Training only appends to the ledger (:meth:`PrivacyLedger.record`); accountants interpret it.
Composition over segments is heterogeneous: the RDP accountant adds the segments' RDP
curves (Mironov 2017, Prop. 1), the PRV accountant convolves their privacy loss
distributions (Gopi et al. 2021). The ledger serialises to JSON so that it survives
checkpoints.

:func:`account` is the one function that resolves an accountant name, a conversion and a
relation into a result; the ledger, the calibration and the risk modules all go through it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from maskdp.accounting import _validate
from maskdp.accounting.choices import ACCOUNTANTS, CONVERSIONS, Accountant, Conversion
from maskdp.accounting.conversions import EpsilonResult, _minimise
from maskdp.accounting.errors import AccountingError
from maskdp.accounting.events import PoissonGaussianEvent, merge_events
from maskdp.accounting.prv import PRVResult, curve_for, default_eps_error
from maskdp.accounting.relations import Relation, parse_relation

__all__ = ["ACCOUNTANTS", "FORMAT", "FORMAT_VERSION", "PrivacyLedger", "account", "guarantee"]

FORMAT = "maskdp-privacy-ledger"
FORMAT_VERSION = 1


# ------------------------------------------------------------------------------ accounting


def _rdp(
    events: Sequence[PoissonGaussianEvent],
    delta: float,
    conversion: str,
    relation: Relation,
    eps_error: float,
) -> EpsilonResult:
    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events

    rdp = rdp_of_events(events, DEFAULT_ORDERS, relation=relation)
    return _minimise(DEFAULT_ORDERS, rdp, delta, conversion)


def _prv(
    events: Sequence[PoissonGaussianEvent],
    delta: float,
    conversion: str,
    relation: Relation,
    eps_error: float,
) -> PRVResult:
    curve = curve_for(events, eps_error=eps_error, delta_error=delta / 1000.0, relation=relation)
    if curve is None:  # no events
        return PRVResult(0.0, 0.0, 0.0, delta)
    lower, estimate, upper = curve.epsilon(delta)
    return PRVResult(lower, estimate, upper, delta)


_ACCOUNTANTS: dict[Accountant, Callable[..., EpsilonResult | PRVResult]] = {
    "rdp": _rdp,
    "prv": _prv,
}


def account(
    events: Sequence[PoissonGaussianEvent],
    delta: float,
    *,
    accountant: Accountant = "rdp",
    conversion: Conversion = "hypothesis-test",
    relation: Relation | str = Relation.ERASE,
    eps_error: float | None = None,
) -> EpsilonResult | PRVResult:
    r"""Epsilon of the composition of ``events`` at ``delta``: the rich result.

    * ``accountant="rdp"``: :class:`EpsilonResult` on :data:`~maskdp.accounting.rdp.DEFAULT_ORDERS`
      with ``conversion`` (an upper bound);
    * ``accountant="prv"``: :class:`PRVResult` (lower, estimate, upper; the upper is the
      guarantee), ``eps_error`` its epsilon error (default:
      :func:`maskdp.accounting.prv.default_eps_error`); ``conversion`` is ignored.
    * ``relation="substitute"``: the replace-one (antipodal) pair of
      :mod:`maskdp.accounting.loss_pairs`, in both accountants (RDP: its Renyi divergence by
      quadrature, looser after conversion; PRV: tight, with lower and upper bounds).
    """
    d = _validate.open_unit("delta", delta)
    name = _validate.choice("accountant", accountant, ACCOUNTANTS)
    conv = _validate.choice("conversion", conversion, CONVERSIONS)
    rel = parse_relation(relation)
    events = tuple(events)
    if eps_error is None:
        eps_error = default_eps_error(events, d, rel) if name == "prv" else 0.01
    ee = _validate.positive("eps_error", eps_error)
    return _ACCOUNTANTS[name](events, d, conv, rel, ee)


def guarantee(result: EpsilonResult | PRVResult) -> float:
    """The epsilon a result guarantees: ``epsilon`` (RDP) or ``epsilon_upper`` (PRV)."""
    return result.epsilon if isinstance(result, EpsilonResult) else result.epsilon_upper


# ---------------------------------------------------------------------------------- ledger


def _merged(segments: Iterable[PoissonGaussianEvent]) -> tuple[PoissonGaussianEvent, ...]:
    """Consecutive segments with equal (q, sigma) merged (the history keeps its order)."""
    return merge_events(segments, adjacent_only=True, name="segments")


class PrivacyLedger:
    """An append-only record of Poisson-subsampled Gaussian segments.

    Consecutive segments with equal (q, sigma) are merged (composition does not depend on
    how steps are grouped). Two ledgers are equal when their merged segments are.
    """

    __slots__ = ("_segments",)
    __hash__ = None  # type: ignore[assignment]  # mutable

    def __init__(self, segments: Iterable[PoissonGaussianEvent] = ()) -> None:
        self._segments: tuple[PoissonGaussianEvent, ...] = _merged(segments)

    @property
    def segments(self) -> tuple[PoissonGaussianEvent, ...]:
        """The merged segments, oldest first (immutable events in a tuple)."""
        return self._segments

    @property
    def steps(self) -> int:
        """Total number of steps over all segments."""
        return sum(seg.steps for seg in self._segments)

    def record(self, sample_rate: float, noise_multiplier: float, steps: int = 1) -> None:
        """Append ``steps`` steps at (q, sigma); validates everything before changing state."""
        event = PoissonGaussianEvent(sample_rate, noise_multiplier, steps)
        self._segments = _merged((*self._segments, event))

    def report(
        self,
        delta: float,
        *,
        accountant: Accountant = "rdp",
        conversion: Conversion = "hypothesis-test",
        relation: Relation | str = Relation.ERASE,
    ) -> EpsilonResult | PRVResult:
        """The rich result of :func:`account` for this ledger."""
        return account(
            self._segments, delta, accountant=accountant, conversion=conversion, relation=relation
        )

    def epsilon(
        self,
        delta: float,
        *,
        accountant: Accountant = "rdp",
        conversion: Conversion = "hypothesis-test",
        relation: Relation | str = Relation.ERASE,
    ) -> float:
        """The guaranteed epsilon at ``delta`` (an upper bound; PRV: its upper bound)."""
        return guarantee(
            self.report(delta, accountant=accountant, conversion=conversion, relation=relation)
        )

    # ------------------------------------------------------------------ serialisation

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "segments": [seg.to_dict() for seg in self._segments],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PrivacyLedger:
        """Inverse of :meth:`to_dict`; AccountingError on anything unexpected."""
        if not isinstance(d, dict):
            raise AccountingError(f"ledger must be a JSON object, got {type(d).__name__}")
        if d.get("format") != FORMAT:
            raise AccountingError(f"ledger format must be {FORMAT!r}, got {d.get('format')!r}")
        if d.get("version") != FORMAT_VERSION:
            raise AccountingError(
                f"ledger version must be {FORMAT_VERSION}, got {d.get('version')!r} (written by another MaskDP?)"
            )
        segments = d.get("segments")
        if not isinstance(segments, list):
            raise AccountingError(f"ledger segments must be a list, got {type(segments).__name__}")
        return cls(PoissonGaussianEvent.from_dict(s) for s in segments)

    def to_json(self) -> str:
        return json.dumps(self.to_dict())

    @classmethod
    def from_json(cls, s: str) -> PrivacyLedger:
        """Parse :meth:`to_json` output; AccountingError on corrupt input."""
        if not isinstance(s, (str, bytes, bytearray)):
            raise AccountingError(f"ledger JSON must be a string, got {type(s).__name__}")
        try:
            data = json.loads(s)
        except (ValueError, RecursionError) as exc:
            raise AccountingError(f"ledger JSON is corrupt: {exc}") from None
        return cls.from_dict(data)

    def copy(self) -> PrivacyLedger:
        return PrivacyLedger(self._segments)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PrivacyLedger):
            return NotImplemented
        return self._segments == other._segments

    def __repr__(self) -> str:
        return f"PrivacyLedger(segments={list(self._segments)!r})"
