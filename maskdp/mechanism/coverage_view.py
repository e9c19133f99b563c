r"""``CoverageView``: one public view for sensitive scenes, another for sensitive objects.

What the public pass should see in the sensitive region depends on what the region is:

- a **scene** (most of the frame is sensitive: the background behind a public actor) should
  look like *some* scene, so that the model learns to ignore whatever scene is there:
  :class:`~maskdp.mechanism.texture_view.TextureFillView`;
- an **object** (a small part of the frame: a person, a face, a plate) should stay visible
  as an object against the public scene, so that the model still sees where it is and how
  it moves: a constant fill, :class:`~maskdp.mechanism.views.FillView`, whose flat region
  stands out from real backgrounds (a natural texture there hides the object's outline).

Each clip gets ``large`` when the fraction of its pixels that are sensitive exceeds
``threshold`` and ``small`` otherwise. The choice reads the mask alone, which is public, and
both views are public views, so the result is one too (DESIGN.md section 2).

The idea came from single runs (VideoViT, epsilon 1, seed 0) where the constant fill beat
the texture on ``footage-person`` (0.60 against 0.48). Over three seeds it did not hold:
``TextureFillView`` alone matched or beat this view on all three real-footage tasks (it is
the default; benchmarks/RESULTS.md, "Utility on real footage", has the lever table). The
view stays for data where a visible object outline matters; measure on yours.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor

from maskdp.errors import InvalidInputError
from maskdp.mechanism.masks import check_pixel_mask
from maskdp.mechanism.texture_view import TextureFillView
from maskdp.mechanism.views import FillView, ModelInput, PixelView

__all__ = ["CoverageView"]


class CoverageView:
    """``large`` for clips whose sensitive fraction exceeds ``threshold``, else ``small``
    (module docstring). Both must replace pixels (every view but ``DropView``)."""

    def __init__(
        self,
        large: PixelView | None = None,
        small: PixelView | None = None,
        *,
        threshold: float = 0.5,
        seed: int = 0,
    ) -> None:
        self.large = large if large is not None else TextureFillView(seed=seed)
        self.small = small if small is not None else FillView(0.5)
        for name, view in (("large", self.large), ("small", self.small)):
            if not isinstance(view, PixelView):
                raise InvalidInputError(
                    f"CoverageView {name} must be a pixel view (FillView, RandomFillView, "
                    f"TextureFillView, InpaintView, CallableView), got {type(view).__name__}"
                )
        if (
            isinstance(threshold, bool)
            or not isinstance(threshold, (int, float))
            or not (0.0 <= threshold <= 1.0)
        ):
            raise InvalidInputError(f"CoverageView threshold must be in [0, 1], got {threshold!r}")
        self.threshold = float(threshold)

    def choose_large(self, mask: Tensor) -> Tensor:
        """Per clip, whether its sensitive fraction exceeds ``threshold`` (bool, N)."""
        return mask.flatten(1).float().mean(1) > self.threshold

    def public(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        large = self.large.public(inputs, mask).inputs
        small = self.small.public(inputs, mask).inputs
        choice = self.choose_large(mask).view(-1, *([1] * (inputs.dim() - 1)))
        return ModelInput(torch.where(choice, large, small))

    def full(self, inputs: Tensor, mask: Tensor) -> ModelInput:
        check_pixel_mask(mask, inputs)
        return ModelInput(inputs)

    def state_dict(self) -> dict[str, Any]:
        return {
            name: view.state_dict()
            for name, view in (("large", self.large), ("small", self.small))
            if hasattr(view, "state_dict")
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        expected = set(self.state_dict())
        if not isinstance(state, Mapping) or set(state) != expected:
            raise InvalidInputError(
                f"CoverageView state must have the keys {sorted(expected)}, got "
                f"{sorted(state) if isinstance(state, Mapping) else type(state).__name__}"
            )
        for name, view in (("large", self.large), ("small", self.small)):
            if name in state:
                view.load_state_dict(state[name])

    def __repr__(self) -> str:
        return (
            f"CoverageView(large={self.large!r}, small={self.small!r}, threshold={self.threshold})"
        )
