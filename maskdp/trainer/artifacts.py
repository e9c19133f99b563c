"""A stored run after training: ``maskdp evaluate`` and ``maskdp export``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from maskdp.errors import InvalidInputError
from maskdp.io import atomic_torch_save
from maskdp.trainer.config import TrainConfig
from maskdp.trainer.run import Run
from maskdp.trainer.rundir import read_config


def _restore(config: TrainConfig, run_dir: str | Path) -> Run:
    """The run stored in ``run_dir``, rebuilt from its config and checkpoint."""
    run = Run(config, Path(run_dir))
    run.load()
    return run


def evaluate(run_dir: str | Path) -> dict[str, Any]:
    """Accuracy and privacy spent of the checkpoint in ``run_dir``."""
    run = _restore(read_config(run_dir), run_dir)
    return {**run.metrics(), "run_dir": str(run_dir)}


def export(run_dir: str | Path, out: str | Path) -> dict[str, Any]:
    """Write the releasable weights of ``run_dir``'s checkpoint to ``out`` (atomically).

    The file holds the model's ``state_dict`` alone (loadable with ``weights_only=True``),
    never optimizer state or anything else of the run; ``out`` must not exist.
    """
    config = read_config(run_dir)
    target = Path(out)
    if target.exists():
        raise InvalidInputError(f"{target} already exists; choose another output path")
    run = _restore(config, run_dir)
    state = {k: v.detach().cpu() for k, v in run.model.state_dict().items()}
    atomic_torch_save(state, target)
    epsilon = run.epsilon()
    return {
        "run_dir": str(run_dir),
        "weights": str(target),
        "epsilon": epsilon if math.isfinite(epsilon) else None,
        "delta": config.delta if run.optimizer is not None else None,
    }
