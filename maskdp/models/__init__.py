"""Video models: a ViT with the token-drop protocol, a small 3D CNN, ``prepare``, adapters
for Hugging Face and pytorchvideo video classifiers, and a public model plus a private
residual branch."""

from __future__ import annotations

from maskdp._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "VideoViT": "maskdp.models.vit",
    "PositionalEmbedding": "maskdp.models.vit",
    "SmallVideoCNN": "maskdp.models.cnn",
    "AdaptiveAvgMaxPool3d": "maskdp.models.cnn",
    "prepare": "maskdp.models.preparation",
    "PrepareReport": "maskdp.models.preparation",
    "from_huggingface": "maskdp.models.adapters",
    "HuggingFaceVideo": "maskdp.models.adapters",
    "from_pytorchvideo": "maskdp.models.adapters",
    "PyTorchVideo": "maskdp.models.adapters",
    "PrivateResidual": "maskdp.models.residual",
}

__getattr__, __dir__, __all__ = lazy_exports("maskdp.models", _EXPORTS, globals())
