"""The privacy budget guard: refuse a step that would spend more than a target epsilon.

The number of steps a target allows is found once by exponential search then bisection
(:math:`O(\\log m)` accountant queries), then counted down; it is recomputed after a
checkpoint is loaded. Epsilon is non-decreasing in the number of steps for both
accountants' guarantees, which the search relies on.
"""

from __future__ import annotations

from maskdp.accounting.ledger import PrivacyLedger
from maskdp.accounting.search import largest_feasible

MAX_GUARDED_STEPS = 2**31


def epsilon_after(
    ledger: PrivacyLedger,
    more_steps: int,
    *,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    accountant: str,
    relation: str = "erase",
) -> float:
    """Epsilon of ``ledger`` plus ``more_steps`` steps at (q, sigma); ``ledger`` unchanged."""
    trial = ledger.copy()
    trial.record(sample_rate, noise_multiplier, more_steps)
    return trial.epsilon(delta, accountant=accountant, relation=relation)  # type: ignore[arg-type]


def steps_within_budget(
    ledger: PrivacyLedger,
    *,
    target_epsilon: float,
    sample_rate: float,
    noise_multiplier: float,
    delta: float,
    accountant: str,
    relation: str = "erase",
) -> int:
    """The largest m with epsilon(ledger + m steps) <= target (capped at 2**31).

    The returned m is checked directly (its epsilon is at most the target: the safe side).
    """

    def fits(steps: int) -> bool:
        eps = epsilon_after(
            ledger,
            steps,
            sample_rate=sample_rate,
            noise_multiplier=noise_multiplier,
            delta=delta,
            accountant=accountant,
            relation=relation,
        )
        return eps <= target_epsilon

    return largest_feasible(fits, 1, MAX_GUARDED_STEPS)
