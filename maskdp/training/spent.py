r"""The privacy a training run has spent: its ledger, its step counts and its budget guard.

Every step with :math:`\sigma > 0` is one Poisson-subsampled Gaussian event
:math:`(q, \sigma)` in a :class:`~maskdp.accounting.ledger.PrivacyLedger`; a step without
noise (tests only) is counted apart and makes epsilon infinite. With a target epsilon, the
number of steps the target still allows is found once by bisection (O(log steps) accountant
queries; :func:`~maskdp.training.budget.steps_within_budget`) and then counted down, so
the guard costs nothing per step.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from maskdp.accounting.errors import AccountingError
from maskdp.accounting.ledger import PrivacyLedger
from maskdp.checks import check_delta
from maskdp.errors import InvalidInputError, PrivacyBudgetExceeded
from maskdp.settings import PrivacySettings
from maskdp.training.budget import epsilon_after, steps_within_budget

STATE_KEYS = ("ledger", "steps", "noiseless_steps")


class PrivacySpent:
    """Steps taken under ``settings`` and the privacy they spent."""

    def __init__(
        self,
        settings: PrivacySettings,
        ledger: PrivacyLedger | None = None,
        steps: int = 0,
        noiseless_steps: int = 0,
    ) -> None:
        self.settings = settings
        self.ledger = ledger if ledger is not None else PrivacyLedger()
        self.steps = steps
        self.noiseless_steps = noiseless_steps
        self._budget_left: int | None = None  # steps the target still allows (cached)

    def record_step(self) -> None:
        """One step at :math:`(q, \\sigma)`; a noiseless step makes epsilon infinite."""
        if self.settings.noise_multiplier > 0:
            self.ledger.record(self.settings.sample_rate, self.settings.noise_multiplier, 1)
        else:
            self.noiseless_steps += 1
        self.steps += 1
        if self._budget_left is not None:
            self._budget_left -= 1

    def check_budget(self) -> None:
        """Raise :class:`PrivacyBudgetExceeded` if one more step would pass the target."""
        s = self.settings
        if s.target_epsilon is None or s.target_delta is None:
            return
        if self._budget_left is None:
            self._budget_left = steps_within_budget(
                self.ledger,
                target_epsilon=s.target_epsilon,
                sample_rate=s.sample_rate,
                noise_multiplier=s.noise_multiplier,
                delta=s.target_delta,
                accountant=s.accountant,
                relation=s.relation,
            )
        if self._budget_left == 0:
            eps = epsilon_after(
                self.ledger,
                1,
                sample_rate=s.sample_rate,
                noise_multiplier=s.noise_multiplier,
                delta=s.target_delta,
                accountant=s.accountant,
                relation=s.relation,
            )
            raise PrivacyBudgetExceeded(
                f"step {self.steps + 1} would spend epsilon {eps:.6g} > target_epsilon "
                f"{s.target_epsilon:g} at delta {s.target_delta:g} ({s.accountant}, "
                f"{s.relation}); "
                "stop training or raise the target"
            )

    def epsilon(self, delta: float | None = None) -> float:
        """Epsilon spent at ``delta`` (default ``target_delta``): an upper bound; ``0.0``
        before the first step, ``math.inf`` once a step without noise was taken."""
        if delta is None:
            if self.settings.target_delta is None:
                raise InvalidInputError(
                    "epsilon needs a delta: call epsilon(delta) or set target_delta"
                )
            delta = self.settings.target_delta
        delta = check_delta(delta)
        if self.noiseless_steps:
            return math.inf
        if self.ledger.steps == 0:
            return 0.0
        return self.ledger.epsilon(
            delta,
            accountant=self.settings.accountant,  # type: ignore[arg-type]
            relation=self.settings.relation,
        )

    def to_dict(self) -> dict[str, Any]:
        """The ledger (JSON-compatible) and the step counts."""
        return {
            "ledger": self.ledger.to_dict(),
            "steps": self.steps,
            "noiseless_steps": self.noiseless_steps,
        }

    @classmethod
    def from_dict(cls, settings: PrivacySettings, state: Mapping[str, Any]) -> PrivacySpent:
        """Validate :meth:`to_dict` output; a one-line :class:`InvalidInputError` otherwise."""
        missing = sorted(set(STATE_KEYS) - set(state))
        if missing:
            raise InvalidInputError(f"state_dict lacks {missing}")
        try:
            ledger = PrivacyLedger.from_dict(state["ledger"])
        except (AccountingError, ValueError, TypeError) as err:
            raise InvalidInputError(f"state_dict ledger is invalid: {err}") from None
        steps, noiseless = state["steps"], state["noiseless_steps"]
        for name, value in (("steps", steps), ("noiseless_steps", noiseless)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise InvalidInputError(f"state_dict {name} must be an int >= 0, got {value!r}")
        if steps != ledger.steps + noiseless:
            raise InvalidInputError(
                f"state_dict steps ({steps}) != ledger steps ({ledger.steps}) + noiseless "
                f"steps ({noiseless}): the checkpoint is inconsistent"
            )
        return cls(settings, ledger, steps, noiseless)
