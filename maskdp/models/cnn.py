"""A small 3D CNN with GroupNorm (no BatchNorm: its batch statistics mix samples)."""

from __future__ import annotations

from torch import Tensor, nn


class SmallVideoCNN(nn.Module):
    """Two strided Conv3d + GroupNorm + ReLU blocks, global average pooling, a linear head.

    Input (N, C, T, H, W); output logits (N, num_classes).
    """

    def __init__(
        self, *, num_classes: int, in_channels: int = 3, width: int = 16, groups: int = 4
    ) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv3d(in_channels, width, kernel_size=3, padding=1),
            nn.GroupNorm(groups, width),
            nn.ReLU(),
            nn.Conv3d(width, 2 * width, kernel_size=3, stride=2, padding=1),
            nn.GroupNorm(groups, 2 * width),
            nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool3d(1)
        self.head = nn.Linear(2 * width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.pool(self.features(x)).flatten(1))
