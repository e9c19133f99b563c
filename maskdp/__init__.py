"""MaskDP: differentially private training where the privacy unit is a masked region of a clip.

Names are loaded lazily (PEP 562): ``import maskdp`` does not import torch, so the
``maskdp epsilon`` command starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.2.0"

_EXPORTS: dict[str, str] = {
    # errors
    "MaskDPError": "maskdp.errors",
    "InvalidInputError": "maskdp.errors",
    "UnsafeModelError": "maskdp.errors",
    "UnsupportedModelError": "maskdp.errors",
    "ViewContractError": "maskdp.errors",
    "PrivacyBudgetExceeded": "maskdp.errors",
    # views
    "ModelInput": "maskdp.views",
    "PublicView": "maskdp.views",
    "FillView": "maskdp.views",
    "RandomFillView": "maskdp.views",
    "DropView": "maskdp.views",
    "CallableView": "maskdp.views",
    "as_view": "maskdp.views",
    # masks and adjacency
    "pixel_to_token_mask": "maskdp.masks",
    "boxes_to_mask": "maskdp.masks",
    # mechanism
    "MaskedGradient": "maskdp.functional",
    "InpaintView": "maskdp.views",
    "masked_gradient": "maskdp.functional",
    "MaskDPOptimizer": "maskdp.optimizer",
    "make_private": "maskdp.privacy",
    "make_private_with_epsilon": "maskdp.privacy",
    "validate_model": "maskdp.validate",
    # secret randomness and the one sampler
    "SecretRandomness": "maskdp.randomness",
    "InsecureSeededRandomness": "maskdp.randomness",
    "poisson_sample": "maskdp.sampling",
    "MaskDPDataLoader": "maskdp.data.poisson",
    # empirical audit (the function is `maskdp.audit.audit`: a top-level `audit` name
    # would be shadowed by the submodule of the same name once it is imported)
    "AuditResult": "maskdp.audit",
}

__all__ = sorted([*_EXPORTS, "__version__"])


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'maskdp' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
