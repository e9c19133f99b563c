"""Video models: a ViT with the token-drop protocol, a small 3D CNN, and ``prepare``."""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "VideoViT": "maskdp.models.vit",
    "PositionalEmbedding": "maskdp.models.vit",
    "SmallVideoCNN": "maskdp.models.cnn",
    "prepare": "maskdp.models.preparation",
    "PrepareReport": "maskdp.models.preparation",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maskdp.models' has no attribute {name!r}")
    return getattr(importlib.import_module(module), name)
