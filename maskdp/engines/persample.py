r"""Shared last step of the engines that materialise every :math:`\Delta_i` (vmap, hooks).

Given :math:`\Delta_i` per parameter (B, *shape), the norm over all trainable parameters
:math:`\lVert\Delta_i\rVert` (accumulated in float64), :math:`c_i = \min(1, C/\lVert\Delta_i\rVert)`
and the clipped sum :math:`\sum_i c_i \Delta_i`.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskdp.engines.base import MaskedGradient, clip_factors


def per_sample_norms(deltas: dict[str, Tensor], dtype: torch.dtype) -> Tensor:
    r""":math:`\lVert\Delta_i\rVert_2` over all parameters, shape (B,), computed in float64."""
    per_param = [
        torch.linalg.vector_norm(d.flatten(1), dim=1, dtype=torch.float64) for d in deltas.values()
    ]
    return torch.linalg.vector_norm(torch.stack(per_param, dim=1), dim=1).to(dtype)


def _at_least_fp32(t: Tensor) -> Tensor:
    """bf16/fp16 rows (from autocast) in fp32; other dtypes unchanged."""
    return t.float() if t.dtype in (torch.float16, torch.bfloat16) else t


def clipped_result(
    deltas: dict[str, Tensor],
    public: dict[str, Tensor],
    losses: Tensor,
    *,
    max_grad_norm: float,
    dtype: torch.dtype,
) -> MaskedGradient:
    r"""The :class:`MaskedGradient` of per-sample :math:`\Delta_i` and the public sum.

    Under autocast the rows may be bf16/fp16: the norm is that of the rounded rows, and the
    sum :math:`\sum_i c_i \Delta_i` is taken in fp32 with autocast off, so that each
    summed contribution has norm :math:`C` up to fp32 rounding and the rounding of the sum
    is fp32's, not bf16's (:mod:`maskdp.precision`).
    """
    norms = per_sample_norms(deltas, dtype)
    factors = clip_factors(norms, max_grad_norm)
    device = next(iter(deltas.values())).device if deltas else norms.device
    with torch.autocast(device.type, enabled=False):
        private = {}
        for name, d in deltas.items():
            d = _at_least_fp32(d)
            private[name] = torch.einsum("b,b...->...", factors.to(d.dtype), d)
    return MaskedGradient(
        public=public, private=private, norms=norms, clip_factors=factors, loss=losses.mean()
    )
