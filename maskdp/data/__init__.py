"""Data: the Poisson loader the guarantee needs, a synthetic dataset, and a clip folder.

Names are loaded lazily (PEP 562), like :mod:`maskdp`.
"""

from __future__ import annotations

from maskdp._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "PoissonDataLoader": "maskdp.data.poisson",
    "EmptyBatchCollate": "maskdp.data.poisson",
    "poisson_loader": "maskdp.data.poisson",
    "MaskDPDataLoader": "maskdp.data.poisson",
    "StepBatches": "maskdp.data.poisson",
    "SyntheticPrivateActions": "maskdp.data.synthetic",
    "RealFootageActions": "maskdp.data.real_footage",
    "ClipFolder": "maskdp.data.folder",
    "FrameWindow": "maskdp.data.footage",
    "read_video": "maskdp.data.footage",
    "read_mask": "maskdp.data.footage",
}

__getattr__, __dir__, __all__ = lazy_exports("maskdp.data", _EXPORTS, globals())
