"""Privacy events: what a training run did, as data (accountants interpret it).

An event is a small frozen record; it is validated on construction, so an invalid event
never exists.
"""

from __future__ import annotations

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
