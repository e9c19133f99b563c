r"""Privacy events: what a training run did, as data (accountants interpret it).

An event is a small frozen record; it is validated on construction, so an invalid event
never exists. :func:`merge_events` is the one place where events of the same mechanism are
combined, for the ledger, the RDP and the PRV accountants.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from maskdp.accounting import _validate
from maskdp.accounting.errors import InvalidParameterError

_FIELDS = ("sample_rate", "noise_multiplier", "steps")


@dataclass(frozen=True)
class PoissonGaussianEvent:
    r"""``steps`` compositions of the Poisson-subsampled Gaussian mechanism.

    One step includes every record independently with probability ``sample_rate`` (q), sums
    the per-record contributions clipped to L2 norm 1 (sensitivity 1) and adds
    :math:`N(0, \sigma^2 I)` noise with :math:`\sigma` = ``noise_multiplier``.

    Attributes:
        sample_rate: q in (0, 1].
        noise_multiplier: sigma, a finite number > 0.
        steps: number of compositions, an integer >= 1 (bool and float are rejected).
    """

    sample_rate: float
    noise_multiplier: float
    steps: int = 1

    def __post_init__(self) -> None:
        # Normalise numpy scalars to plain Python numbers so that equality, hashing and JSON
        # behave the same whatever the caller passed.
        object.__setattr__(
            self, "sample_rate", _validate.sample_rate("sample_rate", self.sample_rate)
        )
        object.__setattr__(
            self, "noise_multiplier", _validate.positive("noise_multiplier", self.noise_multiplier)
        )
        object.__setattr__(self, "steps", _validate.count("steps", self.steps))

    def to_dict(self) -> dict[str, Any]:
        """``{"sample_rate": q, "noise_multiplier": sigma, "steps": n}``."""
        return {
            "sample_rate": self.sample_rate,
            "noise_multiplier": self.noise_multiplier,
            "steps": self.steps,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> PoissonGaussianEvent:
        """Inverse of :meth:`to_dict`; validates keys and values."""
        if not isinstance(d, dict):
            raise InvalidParameterError(f"event must be a dict, got {type(d).__name__}")
        missing = [k for k in ("sample_rate", "noise_multiplier") if k not in d]
        extra = sorted(set(d) - set(_FIELDS))
        if missing or extra:
            raise InvalidParameterError(
                f"event must have keys sample_rate, noise_multiplier[, steps]; "
                f"missing {missing}, unexpected {extra}"
            )
        return cls(d["sample_rate"], d["noise_multiplier"], d.get("steps", 1))


def merge_events(
    events: Iterable[PoissonGaussianEvent], *, adjacent_only: bool = False, name: str = "events"
) -> tuple[PoissonGaussianEvent, ...]:
    r"""``events`` with the steps of equal (q, sigma) summed into one event, first seen first.

    Composing a mechanism :math:`n` times and then :math:`m` times is its
    :math:`(n + m)`-fold composition, and composition is commutative (RDP: Mironov 2017,
    Prop. 1; PRV: a convolution, Gopi et al. 2021), so merging changes no guarantee; it lets
    an accountant evaluate each mechanism once. With ``adjacent_only`` only runs of
    consecutive equal events merge, which keeps the order of a ledger's history.

    Raises:
        InvalidParameterError: an item is not a :class:`PoissonGaussianEvent` (``name``
            names the sequence in the message).
    """
    merged: list[PoissonGaussianEvent] = []
    position: dict[tuple[float, float], int] = {}
    for event in events:
        if not isinstance(event, PoissonGaussianEvent):
            raise InvalidParameterError(
                f"{name} must be PoissonGaussianEvent instances, got {type(event).__name__}"
            )
        key = (event.sample_rate, event.noise_multiplier)
        at = position.get(key)
        if at is not None and (not adjacent_only or at == len(merged) - 1):
            merged[at] = PoissonGaussianEvent(*key, merged[at].steps + event.steps)
        else:
            position[key] = len(merged)
            merged.append(event)
    return tuple(merged)
