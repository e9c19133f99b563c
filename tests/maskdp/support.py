"""Which engine must compute which model: the explicit support table of the tests.

An engine that refuses a model the table says it supports fails the test that uses it (a
refusal is never turned into a skip); ``test_support_table.py`` checks every pair, both ways,
and which engine ``engine="auto"`` picks. docs/models.md measures the same pattern on more
models (``python docs/support_table.py``).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from maskdp.models import SmallVideoCNN, VideoViT, prepare

ENGINES = ("ghost", "hooks", "vmap", "reference")
NO_HOOKS = ("ghost", "vmap", "reference")  # in-place residuals (out += identity): Opacus refuses
REPLAYED = ("ghost", "vmap", "reference")  # raw parameters, attention: Opacus refuses


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        from torchvision.models import video

        return prepare(getattr(video, name)(num_classes=3)).model

    return build


#: model -> (builder, engines that must compute it, the engine ``auto`` picks); every
#: engine not listed must refuse the model with UnsupportedModelError.
TABLE: dict[str, tuple[Callable[[], nn.Module], tuple[str, ...], str]] = {
    "VideoViT": (lambda: VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2), ENGINES, "ghost"),
    "SmallVideoCNN": (lambda: SmallVideoCNN(num_classes=3, width=4), ENGINES, "ghost"),
    "r3d_18": (_torchvision("r3d_18"), NO_HOOKS, "ghost"),
    "r2plus1d_18": (_torchvision("r2plus1d_18"), NO_HOOKS, "ghost"),
    "swin3d_t": (_torchvision("swin3d_t"), REPLAYED, "ghost"),
}  # fmt: skip


def supported_engines(model: str) -> tuple[str, ...]:
    return TABLE[model][1]


def build(model: str) -> nn.Module:
    torch.manual_seed(0)
    return TABLE[model][0]()
