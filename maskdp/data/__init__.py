"""Data: the Poisson loader the guarantee needs, a synthetic dataset, and a clip folder.

Names are loaded lazily (PEP 562), like :mod:`maskdp`.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "PoissonDataLoader": "maskdp.data.poisson",
    "EmptyBatchCollate": "maskdp.data.poisson",
    "poisson_loader": "maskdp.data.poisson",
    "MaskDPDataLoader": "maskdp.data.poisson",
    "StepBatches": "maskdp.data.poisson",
    "SyntheticPrivateActions": "maskdp.data.synthetic",
    "ClipFolder": "maskdp.data.folder",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maskdp.data' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
