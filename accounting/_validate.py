"""Validators shared by the accounting modules.

Each raises :class:`~maskdp.accounting.errors.InvalidParameterError` with a one-line message that
names the parameter and the rule it broke, e.g.
``noise_multiplier must be a finite number > 0, got nan``. Never ``assert`` on user input.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import numpy as np
from maskdp.accounting.errors import InvalidParameterError


def _as_float(name: str, value: Any, rule: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise InvalidParameterError(f"{name} must be {rule}, got {value!r}")
    x = float(value)
    if not math.isfinite(x):
        raise InvalidParameterError(f"{name} must be {rule}, got {x!r}")
    return x


def positive(name: str, value: Any) -> float:
    """A finite number > 0."""
    rule = "a finite number > 0"
    x = _as_float(name, value, rule)
    if x <= 0:
        raise InvalidParameterError(f"{name} must be {rule}, got {x!r}")
    return x


def non_negative(name: str, value: Any) -> float:
    """A finite number >= 0."""
    rule = "a finite number >= 0"
    x = _as_float(name, value, rule)
    if x < 0:
        raise InvalidParameterError(f"{name} must be {rule}, got {x!r}")
    return x


def sample_rate(name: str, value: Any) -> float:
    """A number in (0, 1]."""
    rule = "a number in (0, 1]"
    x = _as_float(name, value, rule)
    if not 0 < x <= 1:
        raise InvalidParameterError(f"{name} must be {rule}, got {x!r}")
    return x


def open_unit(name: str, value: Any) -> float:
    """A number in (0, 1) (a delta, a false-positive rate)."""
    rule = "a number in (0, 1)"
    x = _as_float(name, value, rule)
    if not 0 < x < 1:
        raise InvalidParameterError(f"{name} must be {rule}, got {x!r}")
    return x


def closed_unit(name: str, value: Any) -> float:
    """A number in [0, 1]."""
    rule = "a number in [0, 1]"
    x = _as_float(name, value, rule)
    if not 0 <= x <= 1:
        raise InvalidParameterError(f"{name} must be {rule}, got {x!r}")
    return x


def count(name: str, value: Any, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (bool and float are rejected, numpy integers accepted)."""
    rule = f"an integer >= {minimum}"
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise InvalidParameterError(f"{name} must be {rule}, got {value!r}")
    n = int(value)
    if n < minimum:
        raise InvalidParameterError(f"{name} must be {rule}, got {n!r}")
    return n


def choice(name: str, value: Any, allowed: tuple[str, ...]) -> str:
    """One of ``allowed`` (a string, or a str Enum member)."""
    text = getattr(value, "value", value)
    if not isinstance(text, str) or text not in allowed:
        raise InvalidParameterError(f"{name} must be one of {', '.join(allowed)}, got {value!r}")
    return text


def orders(value: Any, name: str = "orders") -> np.ndarray:
    """A non-empty 1-d array of finite Renyi orders > 1 (a fresh float array, input untouched)."""
    try:
        arr = np.array(value, dtype=float, ndmin=1)
    except (TypeError, ValueError):
        raise InvalidParameterError(f"{name} must be finite numbers > 1, got {value!r}") from None
    if arr.ndim != 1 or arr.size == 0:
        raise InvalidParameterError(
            f"{name} must be a non-empty 1-d sequence, got shape {arr.shape}"
        )
    bad = ~(np.isfinite(arr) & (arr > 1))
    if bad.any():
        raise InvalidParameterError(f"{name} must be finite numbers > 1, got {arr[bad][0]!r}")
    return arr
