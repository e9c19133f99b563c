"""MaskDP: differentially private training where the privacy unit is a masked region of a clip.

Names are loaded lazily (PEP 562): ``import maskdp`` does not import torch, so the
``maskdp epsilon`` command starts fast.
"""

from __future__ import annotations

from maskdp._lazy import lazy_exports

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
    "ModelInput": "maskdp.mechanism.views",
    "PublicView": "maskdp.mechanism.views",
    "FillView": "maskdp.mechanism.views",
    "RandomFillView": "maskdp.mechanism.views",
    "TextureFillView": "maskdp.mechanism.texture_view",
    "CoverageView": "maskdp.mechanism.coverage_view",
    "DropView": "maskdp.mechanism.views",
    "CallableView": "maskdp.mechanism.views",
    "as_view": "maskdp.mechanism.views",
    # masks and adjacency
    "pixel_to_token_mask": "maskdp.mechanism.masks",
    "boxes_to_mask": "maskdp.mechanism.masks",
    # mechanism
    "MaskedGradient": "maskdp.mechanism.gradient",
    "InpaintView": "maskdp.mechanism.views",
    "masked_gradient": "maskdp.mechanism.gradient",
    "MaskDPOptimizer": "maskdp.training.optimizer",
    "make_private": "maskdp.training.private",
    "make_private_with_epsilon": "maskdp.training.private",
    "validate_model": "maskdp.engines.validate",
    # secret randomness and the one sampler
    "SecretRandomness": "maskdp.mechanism.randomness",
    "InsecureSeededRandomness": "maskdp.mechanism.randomness",
    "poisson_sample": "maskdp.mechanism.sampling",
    "MaskDPDataLoader": "maskdp.data.poisson",
    # checkpoints
    "save_checkpoint": "maskdp.training.checkpoint",
    "load_checkpoint": "maskdp.training.checkpoint",
    # empirical audit
    "audit": "maskdp.analysis.audit",
    "AuditResult": "maskdp.analysis.audit",
    # subpackages, reachable from ``import maskdp``
    "accounting": "maskdp.accounting",
    "mechanism": "maskdp.mechanism",
    "engines": "maskdp.engines",
    "training": "maskdp.training",
    "data": "maskdp.data",
    "models": "maskdp.models",
    "analysis": "maskdp.analysis",
}

__getattr__, __dir__, _names = lazy_exports("maskdp", _EXPORTS, globals())
__all__ = [*_names, "__version__"]
