"""Typed errors of the accounting package.

Every error raised on user input subclasses :class:`ValueError` so that the CLI maps it to
exit code 2 with a one-line message.
"""

from __future__ import annotations


class AccountingError(ValueError):
    """Base class of every accounting error caused by bad input."""


class InvalidParameterError(AccountingError):
    """A parameter is outside its domain; the message names it and the rule it broke."""


class CalibrationError(AccountingError):
    """No parameter in the search range reaches the target privacy."""
