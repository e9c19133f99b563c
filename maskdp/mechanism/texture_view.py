r"""``TextureFillView``: sensitive pixels replaced by moving, natural-image-like textures.

A constant fill teaches a model nothing about what real content looks like where the mask
is; trained on it, a model is lost on full clips. This view puts in each clip's sensitive
region a texture with the second-order statistics of natural images, moving as a panning
camera would, so that the public term teaches the model to ignore whatever is there.

Every number is drawn from the view's own generator, never from the data (DESIGN.md
section 2: a public view is a function of the public content, the mask and data-independent
randomness). For one clip of :math:`C` channels, :math:`T` frames of :math:`H \times W`:

- a Gaussian random field per channel with amplitude spectrum :math:`|k|^{-\alpha}`
  (natural images have :math:`\alpha \approx 1`: Field 1987, van der Schaaf and van Hateren
  1996), :math:`\alpha \sim U[\alpha_{lo}, \alpha_{hi}]`; the channels share a luminance
  field and add ``chroma`` times their own, as the channels of photographs are correlated;
- a pan of :math:`v \sim U[-s, s]^2` pixels per frame (``max_speed`` :math:`s`), plus
  (``follow_region``) the displacement :math:`d_t` of the sensitive region's centroid since
  the first frame (:func:`region_offsets`, a function of the mask, which is public), so
  the texture rides with a moving region as the content it replaces does (a person's
  clothes move with the person); applied as the phase ramp
  :math:`e^{-2\pi i\, k \cdot (v t + d_t)}` on the periodic field: seamless and exact at
  sub-pixel shifts;
- each channel normalised to zero mean and unit variance, then mapped to
  :math:`b + \gamma z` with brightness :math:`b \sim U[0.2, 0.8]` (plus a per-channel tint
  in :math:`\pm 0.1`) and contrast :math:`\gamma \sim U[0.05, 0.3]`, scaled to
  ``[low, high]`` and clipped there.

Like :class:`~maskdp.mechanism.views.RandomFillView`, the view draws from the secret stream
of :func:`maskdp.mechanism.randomness.private_scope` on the private side of a step, so its
own generator (serving the public batch) never advances by an amount that depends on the
private batch.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import Tensor

from maskdp.checks import check_finite
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import in_private_scope
from maskdp.mechanism.views import PixelView

__all__ = ["TextureFillView", "region_offsets"]

_BRIGHTNESS = (0.2, 0.8)
_TINT = 0.1
_CONTRAST = (0.05, 0.3)


class TextureFillView(PixelView):
    """Replace sensitive pixels by a moving pink-noise texture per clip (module docstring).

    Args:
        low, high: the value range of the clips (``[0, 1]`` for :mod:`maskdp.data`).
        alpha: the range of the spectral exponent :math:`\\alpha`.
        max_speed: the largest pan speed, pixels per frame along each axis.
        chroma: the weight of each channel's own field beside the shared luminance.
        follow_region: move the texture with the sensitive region's centroid.
        seed: seeds the view's generator (public; saved by :meth:`state_dict`).
    """

    def __init__(
        self,
        low: float = 0.0,
        high: float = 1.0,
        *,
        alpha: tuple[float, float] = (0.8, 1.6),
        max_speed: float = 1.5,
        chroma: float = 0.3,
        follow_region: bool = True,
        seed: int = 0,
    ) -> None:
        if not (_is_real(low) and _is_real(high) and low < high):
            raise InvalidInputError(
                f"TextureFillView needs finite low < high, got low={low!r}, high={high!r}"
            )
        self.low, self.high = float(low), float(high)
        alpha_lo, alpha_hi = (check_finite("alpha", a) for a in alpha)
        if alpha_lo > alpha_hi:
            raise InvalidInputError(f"TextureFillView alpha must be (low, high), got {alpha!r}")
        self.alpha = (alpha_lo, alpha_hi)
        self.max_speed = check_finite("max_speed", max_speed)
        self.chroma = check_finite("chroma", chroma)
        if not isinstance(follow_region, bool):
            raise InvalidInputError(
                f"TextureFillView follow_region must be True or False, got {follow_region!r}"
            )
        self.follow_region = follow_region
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def fill(self, inputs: Tensor, mask: Tensor) -> Tensor:
        """:meth:`replacement`, riding with the region when ``follow_region``."""
        return self.replacement(inputs, region_offsets(mask) if self.follow_region else None)

    def replacement(self, inputs: Tensor, offsets: Tensor | None = None) -> Tensor:
        """The texture (N, C, T, H, W); frame t shifted by ``offsets[:, t]`` (N, T, 2)
        pixels on top of the random pan."""
        if inputs.dim() != 5:
            raise InvalidInputError(
                f"TextureFillView needs clips (N, C, T, H, W), got shape {tuple(inputs.shape)}"
            )
        n, channels, frames, height, width = inputs.shape
        if inputs.numel() == 0:
            return torch.empty_like(inputs)
        generator = None if in_private_scope() else self._generator
        draws = self._draws(n, channels, height, width, generator)
        fields = _moving_fields(draws, frames, height, width, offsets, device=inputs.device)
        texture = self._colour(fields, draws, channels)  # (N, C, T, H, W) in [0, 1]
        texture = self.low + (self.high - self.low) * texture
        return texture.clamp_(self.low, self.high).to(dtype=inputs.dtype)

    def _draws(
        self, n: int, channels: int, height: int, width: int, generator: torch.Generator | None
    ) -> dict[str, Tensor]:
        """Every random number of a batch, on the CPU, in a fixed order."""

        def uniform(*shape: int, lo: float = 0.0, hi: float = 1.0) -> Tensor:
            return lo + (hi - lo) * torch.rand(shape, generator=generator)

        return {
            "white": torch.randn((n, channels + 1, height, width), generator=generator),
            "alpha": uniform(n, lo=self.alpha[0], hi=self.alpha[1]),
            "velocity": uniform(n, 2, lo=-self.max_speed, hi=self.max_speed),
            "brightness": uniform(n, lo=_BRIGHTNESS[0], hi=_BRIGHTNESS[1]),
            "tint": uniform(n, channels, lo=-_TINT, hi=_TINT),
            "contrast": uniform(n, lo=_CONTRAST[0], hi=_CONTRAST[1]),
        }

    def _colour(self, fields: Tensor, draws: dict[str, Tensor], channels: int) -> Tensor:
        """Luminance plus ``chroma`` times each channel's field, normalised per channel and
        mapped to brightness + tint + contrast * field: (N, C, T, H, W)."""
        luminance, own = fields[:, :, :1], fields[:, :, 1:]
        mixed = (luminance + self.chroma * own).transpose(1, 2)  # (N, C, T, H, W)
        mean = mixed.mean(dim=(2, 3, 4), keepdim=True)
        std = mixed.std(dim=(2, 3, 4), keepdim=True).clamp_min(1e-6)
        device = fields.device
        base = (draws["brightness"][:, None] + draws["tint"]).to(device)
        contrast = draws["contrast"].to(device)
        return base[..., None, None, None] + contrast.view(-1, 1, 1, 1, 1) * (mixed - mean) / std

    def state_dict(self) -> dict[str, Tensor]:
        return {"generator": self._generator.get_state()}

    def load_state_dict(self, state: Mapping[str, Tensor]) -> None:
        self._generator.set_state(state["generator"])

    def __repr__(self) -> str:
        return (
            f"TextureFillView(low={self.low}, high={self.high}, alpha={self.alpha}, "
            f"max_speed={self.max_speed}, chroma={self.chroma}, "
            f"follow_region={self.follow_region}, seed={self.seed})"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def region_offsets(mask: Tensor) -> Tensor:
    """Displacement (N, T, 2), in pixels (rows, columns), of each clip's sensitive-region
    centroid from its first frame. A frame without sensitive pixels takes the centroid of
    the nearest earlier frame that has some (leading empty frames: of the first frame that
    has some): a function of the mask alone."""
    frames, height, width = mask.shape[1:]
    weight = mask.to(torch.float32)
    area = weight.sum(dim=(2, 3))
    ys = torch.arange(height, dtype=torch.float32, device=mask.device)
    xs = torch.arange(width, dtype=torch.float32, device=mask.device)
    rows = (weight.sum(3) * ys).sum(2) / area.clamp_min(1)
    cols = (weight.sum(2) * xs).sum(2) / area.clamp_min(1)
    centre = torch.stack([rows, cols], dim=-1)  # (N, T, 2)
    seen = area > 0
    for t in range(1, frames):  # carry the last centroid forward over empty frames
        centre[:, t] = torch.where(seen[:, t, None], centre[:, t], centre[:, t - 1])
        seen[:, t] |= seen[:, t - 1]
    for t in range(frames - 2, -1, -1):  # and the first one back over leading empty frames
        centre[:, t] = torch.where(seen[:, t, None], centre[:, t], centre[:, t + 1])
    return centre - centre[:, :1]


def _moving_fields(
    draws: dict[str, Tensor],
    frames: int,
    height: int,
    width: int,
    offsets: Tensor | None = None,
    *,
    device: torch.device,
) -> Tensor:
    r"""Fields with spectrum :math:`|k|^{-\alpha}`, shifted by :math:`v t` plus ``offsets``
    (N, T, 2) when given: (N, T, C+1, H, W).

    The DC term is dropped (each channel is normalised afterwards)."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    radius = torch.sqrt(fy**2 + fx**2)
    radius[0, 0] = math.inf
    alpha = draws["alpha"].to(device).view(-1, 1, 1, 1)
    spectrum = torch.fft.rfft2(draws["white"].to(device)) * radius.pow(-alpha)  # (N, C+1, h, w)
    velocity = draws["velocity"].to(device)
    t = torch.arange(frames, device=device, dtype=torch.float32)
    displacement = velocity[:, None, :] * t[None, :, None]  # (N, T, 2)
    if offsets is not None:
        displacement = displacement + offsets.to(device)
    phase = displacement[..., 0, None, None] * fy + displacement[..., 1, None, None] * fx
    ramp = torch.polar(torch.ones_like(phase), -2.0 * math.pi * phase)  # (N, T, h, w)
    return torch.fft.irfft2(spectrum[:, None] * ramp[:, :, None], s=(height, width))
