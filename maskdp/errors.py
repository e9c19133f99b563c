"""Typed errors of the maskdp package.

Errors on user input subclass :class:`ValueError` or :class:`TypeError` so that the CLI
maps them to exit code 2 with a one-line message.
"""

from __future__ import annotations


class MaskDPError(ValueError):
    """Base class of maskdp errors caused by bad input or an unsafe configuration."""


class InvalidInputError(MaskDPError):
    """A batch, mask or argument has the wrong shape, dtype, device or value."""


class UnsafeModelError(MaskDPError):
    """The model holds a layer that would break the privacy guarantee (e.g. BatchNorm)."""


class UnsupportedModelError(MaskDPError):
    """The chosen engine cannot compute per-sample norms for a layer of this model."""


class ViewContractError(MaskDPError):
    """A public view depends on sensitive content or changes shapes it must keep."""


class PrivacyBudgetExceeded(RuntimeError):
    """The next step would spend more than the target epsilon; raised before the step."""
