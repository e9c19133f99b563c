r"""Shared last step of the engines that materialise every :math:`\Delta_i` (vmap, hooks).

Given :math:`\Delta_i` per parameter (B, *shape), the norm over all trainable parameters
:math:`\lVert\Delta_i\rVert` (accumulated in float64), :math:`c_i = \min(1, C/\lVert\Delta_i\rVert)`
and the clipped sum :math:`\sum_i c_i \Delta_i`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskdp.engines.base import ClippedSum, clip_factors, clipped_rows


def per_sample_norms(deltas: dict[str, Tensor]) -> Tensor:
    r""":math:`\lVert\Delta_i\rVert_2` over all parameters, shape (B,), in float64."""
    per_param = [
        torch.linalg.vector_norm(d.flatten(1), dim=1, dtype=torch.float64) for d in deltas.values()
    ]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), dim=1)


def clipped_result(deltas: dict[str, Tensor], *, max_grad_norm: float) -> ClippedSum:
    r"""The :class:`ClippedSum` of per-sample :math:`\Delta_i` (B, *shape) per parameter.

    Under autocast the rows may be bf16/fp16: the norm is that of the rounded rows, and the
    sum :math:`\sum_i c_i \Delta_i` is taken in float32 or wider with autocast off, so each
    summed contribution has norm :math:`C` up to float32 rounding (:mod:`maskdp.training.precision`).
    A record whose norm is not finite contributes exactly zero.
    """
    norms = per_sample_norms(deltas)
    factors = clip_factors(norms, max_grad_norm)
    device = next(iter(deltas.values())).device if deltas else norms.device
    with torch.autocast(device.type, enabled=False):
        private = {name: clipped_rows(d, factors).sum(0) for name, d in deltas.items()}
    return ClippedSum(private=private, norms=norms, clip_factors=factors)
