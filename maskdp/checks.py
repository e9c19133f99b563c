"""Argument checks shared by the optimizer, ``make_private``, the sampler and the audit.

Each returns the normalised value or raises :class:`~maskdp.errors.InvalidInputError` with
a one-line message naming the argument, what it must be and what it got.
"""

from __future__ import annotations

import math
from typing import Any

from maskdp.errors import InvalidInputError


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(name: str, value: Any, *, positive: bool = False, note: str = "") -> float:
    """A finite number (never a bool) ``>= 0``, or ``> 0`` when ``positive``; ``note`` follows
    the rule in the message."""
    if not _is_number(value) or not math.isfinite(value) or value < 0 or (positive and value == 0):
        rule = "> 0" if positive else ">= 0"
        raise InvalidInputError(f"{name} must be a finite number {rule}{note}, got {value!r}")
    return float(value)


def check_noise_multiplier(value: float) -> float:
    return check_finite("noise_multiplier", value, note=" (0 only for testing)")


def check_max_grad_norm(value: float) -> float:
    return check_finite("max_grad_norm", value, positive=True)


def check_sample_rate(value: float, name: str = "sample_rate") -> float:
    if not _is_number(value) or not 0.0 < value <= 1.0:
        raise InvalidInputError(
            f"{name} must be a number in (0, 1] (expected batch size / dataset size), got {value!r}"
        )
    return float(value)


def check_batch_size(value: int, name: str = "expected_batch_size") -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(
            f"{name} must be an int >= 1 (sample rate * dataset size), got {value!r}"
        )
    return value


def check_delta(value: float, name: str = "delta") -> float:
    if not _is_number(value) or not 0.0 < value < 1.0:
        raise InvalidInputError(f"{name} must be a number in (0, 1), got {value!r}")
    return float(value)


def check_target_epsilon(value: float) -> float:
    return check_finite("target_epsilon", value, positive=True)


def check_bool(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise InvalidInputError(f"{name} must be a bool, got {value!r}")
    return value


def check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise InvalidInputError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


def check_count(name: str, value: Any, minimum: int = 0) -> int:
    """An int (numpy ints too, never a bool) of at least ``minimum``."""
    from numbers import Integral  # numpy's ints register as Integral

    if isinstance(value, bool) or not isinstance(value, Integral) or value < minimum:
        raise InvalidInputError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)


def check_positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    if not _is_number(value) or not value > 0:
        raise InvalidInputError(f"{name} must be a number > 0, got {value!r}")
    if not math.isfinite(value):
        raise InvalidInputError(f"{name} must be finite, got {value!r}")
    return float(value)


def check_confidence(value: Any) -> float:
    """A confidence level in (0, 1)."""
    if not _is_number(value) or not 0 < value < 1:
        raise InvalidInputError(f"confidence must be a number in (0, 1), e.g. 0.95, got {value!r}")
    return float(value)


def check_calibration(trials: int, fraction: Any, threshold: Any) -> int:
    """Calibration runs per world of an audit: 0 with a given (finite) ``threshold``, else
    ``round(trials * fraction)``, which must leave at least one run on each side."""
    if threshold is not None:
        if not _is_number(threshold) or not math.isfinite(threshold):
            raise InvalidInputError(f"threshold must be a finite number or None, got {threshold!r}")
        return 0
    if not _is_number(fraction):
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


def check_int_in(name: str, value: Any, low: int, high: int) -> int:
    """An int (numpy ints too, never a bool) in [``low``, ``high``]."""
    from numbers import Integral  # numpy's ints register as Integral

    if isinstance(value, bool) or not isinstance(value, Integral) or not low <= value <= high:
        raise InvalidInputError(f"{name} must be an int in [{low}, {high}], got {value!r}")
    return int(value)
