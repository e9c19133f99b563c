"""A small 3D CNN with GroupNorm (no BatchNorm: its batch statistics mix samples)."""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskdp.checks import check_choice, check_count
from maskdp.errors import InvalidInputError


class AdaptiveAvgMaxPool3d(nn.Module):
    """Global average and global max pooling concatenated along channels (timm's
    ``catavgmax``): (N, C, T, H, W) to (N, 2C, 1, 1, 1). The average keeps what fills the
    clip (a scene), the max what is strong anywhere (a small moving actor)."""

    def __init__(self, output_size: int = 1) -> None:
        super().__init__()
        if output_size != 1:
            raise InvalidInputError(
                f"AdaptiveAvgMaxPool3d pools globally: output_size must be 1, got {output_size}"
            )

    def forward(self, x: Tensor) -> Tensor:
        pooled = torch.cat([x.mean(dim=(2, 3, 4)), x.amax(dim=(2, 3, 4))], dim=1)
        return pooled[:, :, None, None, None]


POOLS = {"avg": nn.AdaptiveAvgPool3d, "max": nn.AdaptiveMaxPool3d, "avgmax": AdaptiveAvgMaxPool3d}


class SmallVideoCNN(nn.Module):
    """``blocks`` Conv3d (3x3x3) + GroupNorm + ReLU blocks, global pooling, a linear head.

    Block 0 keeps the resolution and has ``width`` channels; block 1 halves height and width,
    every later block halves time too; channels double per block up to ``4 * width``.
    ``pool="max"`` keeps the strongest response anywhere in the clip: measured on the
    real-footage task (``maskdp train --scenario footage --mode nonprivate --model cnn``,
    7 epochs), 3 blocks reach 0.71 accuracy with max pooling and 0.25 (chance) with average
    pooling, which dilutes a small moving actor in a panning background. ``pool="avgmax"``
    concatenates both (:class:`AdaptiveAvgMaxPool3d`): ``maskdp train`` gives it to the
    private branch, whose sensitive content may fill the clip (a scene) or not (an actor).

    ``temporal_centering=True`` subtracts each pixel's mean over the clip's frames before
    the first convolution (as :class:`~maskdp.models.VideoViT` does; a per-sample operation,
    so MaskDP's guarantee is unaffected): only what changes over time reaches the network.
    Trained on public views of the real-footage task whose actor is sensitive
    (``footage-person``, where the public view keeps only the actor's moving silhouette,
    filled with texture), the network learns the action with it and stays near chance
    without it (benchmarks/RESULTS.md, "Utility on real footage: main table at the
    current defaults (cnn)").

    Input (N, C, T, H, W); output logits (N, num_classes).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        in_channels: int = 3,
        width: int = 16,
        groups: int = 4,
        blocks: int = 2,
        pool: str = "avg",
        temporal_centering: bool = False,
    ) -> None:
        super().__init__()
        self.temporal_centering = bool(temporal_centering)
        check_count("blocks", blocks, 1)
        layers: list[nn.Module] = []
        channels = in_channels
        for index in range(blocks):
            out = width * 2 ** min(index, 2)
            stride = 1 if index == 0 else ((1, 2, 2) if index == 1 and blocks > 2 else 2)
            layers += [
                nn.Conv3d(channels, out, kernel_size=3, stride=stride, padding=1),
                nn.GroupNorm(groups, out),
                nn.ReLU(),
            ]
            channels = out
        self.features = nn.Sequential(*layers)
        self.pool = POOLS[check_choice("pool", pool, tuple(POOLS))](1)
        self.head = nn.Linear(channels * (2 if pool == "avgmax" else 1), num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.temporal_centering:
            x = x - x.mean(dim=2, keepdim=True)
        return self.head(self.pool(self.features(x)).flatten(1))
