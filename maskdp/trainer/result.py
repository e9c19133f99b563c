"""What :func:`maskdp.trainer.run.train` returns and writes to ``metrics.json``. Torch-free."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class TrainResult:
    """The privacy spent, the schedule and the test accuracy of a finished run.

    ``epsilon`` and ``delta`` are ``None`` for a non-private run, as are ``accountant`` and
    ``relation`` (how epsilon was computed) and ``engine`` (the engine that computed the
    private steps; with ``engine="auto"``, the one it chose). ``accuracy`` is on full
    test clips; ``masked_accuracy`` (MaskDP runs) on the test clips' public views
    (:mod:`maskdp.inference`). ``train_seconds`` is the
    wall time of the training loop: a function of the batch sizes, whose law is the same in
    both worlds of the erase relation; timing channels are outside the guarantee
    (docs/privacy.md).
    """

    mode: str
    epsilon: float | None
    delta: float | None
    steps: int
    private_steps: int
    noise_multiplier: float
    sample_rate: float
    accuracy: float
    train_seconds: float
    run_dir: str
    masked_accuracy: float | None = None
    accountant: str | None = None
    relation: str | None = None
    engine: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """The fields as a dict, in this order (the content of ``metrics.json``)."""
        return asdict(self)
