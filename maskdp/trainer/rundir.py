"""The run directory: its file names, a fresh one, its stored config, the overwrite check.

A run directory holds ``config.json`` (the validated :class:`TrainConfig`), ``checkpoint.pt``
(model, optimizer with its privacy ledger, step) and ``metrics.json`` (the
:class:`~maskdp.trainer.result.TrainResult`). Torch-free.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from maskdp.errors import InvalidInputError
from maskdp.trainer.config import TrainConfig, build_config, load_config_file

CONFIG, CHECKPOINT, METRICS = "config.json", "checkpoint.pt", "metrics.json"


def new_run_dir(root: str | Path = "runs") -> Path:
    """A fresh directory ``root/run-YYYYmmdd-HHMMSS[-k]``."""
    base = Path(root) / datetime.now().strftime("run-%Y%m%d-%H%M%S")
    path, k = base, 1
    while path.exists():
        path, k = base.with_name(f"{base.name}-{k}"), k + 1
    return path


def read_config(run_dir: str | Path) -> TrainConfig:
    """The validated config stored in a run directory."""
    path = Path(run_dir) / CONFIG
    if not path.exists():
        raise InvalidInputError(f"{run_dir} is not a run directory: {CONFIG} is missing")
    return build_config(**load_config_file(path))


def check_run_dir(path: Path, config: TrainConfig, *, resume: bool) -> None:
    """Refuse to overwrite a run; to resume, the stored config must equal ``config``."""
    if resume:
        if read_config(path) != config:
            raise InvalidInputError(
                f"--resume: the options differ from {path / CONFIG}; resume with the same options"
            )
    elif (path / CONFIG).exists() or (path / CHECKPOINT).exists():
        raise InvalidInputError(
            f"run directory {path} already holds a run; use --resume or another --run-dir"
        )
