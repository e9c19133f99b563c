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
- a pan of :math:`v \sim U[-s, s]^2` pixels per frame (``max_speed`` :math:`s`), applied as
  the phase ramp :math:`e^{-2\pi i\, k \cdot v t}` on the periodic field: seamless and exact
  at sub-pixel speeds;
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

__all__ = ["TextureFillView"]

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
        self.seed = int(seed)
        self._generator = torch.Generator().manual_seed(self.seed)

    def replacement(self, inputs: Tensor) -> Tensor:
        if inputs.dim() != 5:
            raise InvalidInputError(
                f"TextureFillView needs clips (N, C, T, H, W), got shape {tuple(inputs.shape)}"
            )
        n, channels, frames, height, width = inputs.shape
        if inputs.numel() == 0:
            return torch.empty_like(inputs)
        generator = None if in_private_scope() else self._generator
        draws = self._draws(n, channels, height, width, generator)
        fields = _moving_fields(draws, frames, height, width, device=inputs.device)
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
            f"max_speed={self.max_speed}, chroma={self.chroma}, seed={self.seed})"
        )


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _moving_fields(
    draws: dict[str, Tensor], frames: int, height: int, width: int, *, device: torch.device
) -> Tensor:
    r"""Fields with spectrum :math:`|k|^{-\alpha}`, panned by :math:`v t`: (N, T, C+1, H, W).

    The DC term is dropped (each channel is normalised afterwards)."""
    fy = torch.fft.fftfreq(height, device=device)[:, None]
    fx = torch.fft.rfftfreq(width, device=device)[None, :]
    radius = torch.sqrt(fy**2 + fx**2)
    radius[0, 0] = math.inf
    alpha = draws["alpha"].to(device).view(-1, 1, 1, 1)
    spectrum = torch.fft.rfft2(draws["white"].to(device)) * radius.pow(-alpha)  # (N, C+1, h, w)
    velocity = draws["velocity"].to(device)
    t = torch.arange(frames, device=device, dtype=torch.float32).view(1, -1, 1, 1)
    shift = velocity[:, 0].view(-1, 1, 1, 1) * fy + velocity[:, 1].view(-1, 1, 1, 1) * fx
    ramp = torch.polar(torch.ones_like(shift * t), -2.0 * math.pi * shift * t)  # (N, T, h, w)
    return torch.fft.irfft2(spectrum[:, None] * ramp[:, :, None], s=(height, width))
