"""Sensitivity masks: validation, pixel-to-token pooling, boxes and dilation.

A pixel mask is a bool tensor of shape (N, T, H, W): ``True`` marks sensitive content.
A token mask is a bool tensor of shape (N, T', H', W') over a model's tubelet grid (or
flattened to (N, T' * H' * W')): a token is sensitive if any of its pixels is.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from maskdp.errors import InvalidInputError

Tubelet = tuple[int, int, int]


def check_pixel_mask(mask: Tensor, inputs: Tensor | None = None) -> None:
    """Raise :class:`InvalidInputError` unless ``mask`` is a bool (N, T, H, W) pixel mask.

    With ``inputs`` of shape (N, C, T, H, W) the mask must match its N, T, H, W and device.
    """
    if not isinstance(mask, Tensor):
        raise InvalidInputError(f"mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype != torch.bool:
        raise InvalidInputError(
            f"mask must have dtype torch.bool (True = sensitive), got {mask.dtype}; "
            "convert with mask.bool() if it holds 0/1 values"
        )
    if mask.dim() != 4:
        raise InvalidInputError(f"mask must have shape (N, T, H, W), got {tuple(mask.shape)}")
    if inputs is None:
        return
    if inputs.dim() != 5:
        raise InvalidInputError(
            f"inputs must have shape (N, C, T, H, W), got {tuple(inputs.shape)}"
        )
    expected = (inputs.shape[0], *inputs.shape[2:])
    if tuple(mask.shape) != expected:
        raise InvalidInputError(
            f"mask shape {tuple(mask.shape)} does not match inputs shape "
            f"{tuple(inputs.shape)}: expected {expected}"
        )
    if mask.device != inputs.device:
        raise InvalidInputError(
            f"mask is on {mask.device} but inputs are on {inputs.device}; move both to one device"
        )


def _as_tubelet(tubelet_size: int | Sequence[int]) -> Tubelet:
    size = (tubelet_size,) * 3 if isinstance(tubelet_size, int) else tuple(tubelet_size)
    if len(size) != 3 or any((not isinstance(s, int)) or s < 1 for s in size):
        raise InvalidInputError(
            f"tubelet_size must be a positive int or three positive ints, got {tubelet_size!r}"
        )
    return size  # type: ignore[return-value]


def pixel_to_token_mask(
    mask: Tensor,
    tubelet_size: int | Sequence[int],
    *,
    dilation: int = 0,
    flatten: bool = False,
) -> Tensor:
    """Pool a pixel mask (N, T, H, W) to a token mask (N, T/t, H/h, W/w).

    A token is sensitive if any of its pixels is (max pooling, conservative). ``dilation``
    grows the sensitive region by that many tokens in every direction (also conservative).
    The frame and image sizes must be divisible by the tubelet size.
    """
    check_pixel_mask(mask)
    t, h, w = _as_tubelet(tubelet_size)
    _, frames, height, width = mask.shape
    if frames % t or height % h or width % w:
        raise InvalidInputError(
            f"mask of size (T, H, W) = {(frames, height, width)} is not divisible by the "
            f"tubelet size {(t, h, w)}"
        )
    if not isinstance(dilation, int) or dilation < 0:
        raise InvalidInputError(f"dilation must be an int >= 0, got {dilation!r}")
    pooled = F.max_pool3d(mask[:, None].float(), kernel_size=(t, h, w), stride=(t, h, w))
    if dilation:
        k = 2 * dilation + 1
        pooled = F.max_pool3d(pooled, kernel_size=k, stride=1, padding=dilation)
    tokens = pooled[:, 0] > 0
    return tokens.flatten(1) if flatten else tokens


def token_to_pixel_mask(token_mask: Tensor, tubelet_size: int | Sequence[int]) -> Tensor:
    """Expand a token mask (N, T', H', W') to pixels (N, T' t, H' h, W' w)."""
    if token_mask.dtype != torch.bool or token_mask.dim() != 4:
        raise InvalidInputError(
            f"token_mask must be a bool tensor of shape (N, T', H', W'), got "
            f"{token_mask.dtype} {tuple(token_mask.shape)}"
        )
    t, h, w = _as_tubelet(tubelet_size)
    return (
        token_mask.repeat_interleave(t, dim=1)
        .repeat_interleave(h, dim=2)
        .repeat_interleave(w, dim=3)
    )


def boxes_to_mask(
    boxes: Tensor | Sequence[Sequence[float]],
    *,
    frames: int,
    height: int,
    width: int,
) -> Tensor:
    """Pixel mask (T, H, W) of one clip from boxes ``(t, x0, y0, x1, y1)`` in pixels.

    Each box marks ``[y0, y1) x [x0, x1)`` of frame ``t`` as sensitive; coordinates are
    rounded outward (floor the start, ceil the end) so a box never shrinks. A box mask hides
    the exact outline of the sensitive object, which a segmentation mask would reveal.
    """
    box_tensor = torch.as_tensor(boxes, dtype=torch.float64)
    if box_tensor.numel() == 0:
        return torch.zeros(frames, height, width, dtype=torch.bool)
    if box_tensor.dim() != 2 or box_tensor.shape[1] != 5:
        raise InvalidInputError(
            f"boxes must have shape (K, 5) as (t, x0, y0, x1, y1), got {tuple(box_tensor.shape)}"
        )
    if not torch.isfinite(box_tensor).all():
        raise InvalidInputError("boxes must hold finite numbers")
    mask = torch.zeros(frames, height, width, dtype=torch.bool)
    for t, x0, y0, x1, y1 in box_tensor.tolist():
        frame = int(t)
        if frame != t or not 0 <= frame < frames:
            raise InvalidInputError(f"box frame index {t} is not an int in [0, {frames})")
        if x1 < x0 or y1 < y0:
            raise InvalidInputError(f"box ({x0}, {y0}, {x1}, {y1}) has x1 < x0 or y1 < y0")
        xs, xe = max(0, int(x0 // 1)), min(width, int(-(-x1 // 1)))
        ys, ye = max(0, int(y0 // 1)), min(height, int(-(-y1 // 1)))
        mask[frame, ys:ye, xs:xe] = True
    return mask


def dilate_pixel_mask(mask: Tensor, radius: int) -> Tensor:
    """Grow a pixel mask (N, T, H, W) by ``radius`` pixels in H and W (every frame).

    A mitigation for masks derived from sensitive content, whose outline can leak shape.
    """
    check_pixel_mask(mask)
    if not isinstance(radius, int) or radius < 0:
        raise InvalidInputError(f"radius must be an int >= 0, got {radius!r}")
    if radius == 0:
        return mask.clone()
    k = 2 * radius + 1
    grown = F.max_pool3d(mask[:, None].float(), (1, k, k), stride=1, padding=(0, radius, radius))
    return grown[:, 0] > 0
