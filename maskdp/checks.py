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


def check_noise_multiplier(value: float) -> float:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise InvalidInputError(
            f"noise_multiplier must be a finite number >= 0 (0 only for testing), got {value!r}"
        )
    return float(value)


def check_max_grad_norm(value: float) -> float:
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"max_grad_norm must be a finite number > 0, got {value!r}")
    return float(value)


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
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise InvalidInputError(f"target_epsilon must be a finite number > 0, got {value!r}")
    return float(value)
