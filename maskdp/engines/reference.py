r"""The brute-force oracle: one sample at a time, two autograd calls per sample.

Every other engine is tested against this one. It computes, for each record separately,
:math:`g_i` and :math:`h_i` with ``torch.autograd.grad``, then :math:`\Delta_i`, its norm,
:math:`c_i` and the sums. Slow by design and obviously correct.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskdp.engines.base import (
    ClippedSum,
    Engine,
    MaskedBatch,
    RngSnapshot,
    clip_factors,
    clipped_rows,
    empty_result,
    register_engine,
    trainable_parameters,
)
from maskdp.mechanism.views import ModelInput


@register_engine
class ReferenceEngine(Engine):
    """Per-sample loop (the oracle). Supports every model; never chosen by ``"auto"``."""

    name = "reference"
    priority = 1000
    autocast_safe = True  # gradients upcast to float32 or wider, float64 norms

    def _grad(self, sample: ModelInput, target: Tensor) -> list[Tensor]:
        params = list(trainable_parameters(self.model).values())
        loss = self.loss_fn(sample(self.model), target).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)]

    def _delta(self, batch: MaskedBatch, i: int) -> list[Tensor]:
        r""":math:`\Delta_i = g_i - h_i`, both passes under the same random draws."""
        target = batch.targets[i : i + 1]
        snapshot = RngSnapshot(batch.targets.device)
        full = self._grad(batch.full.select(i), target)
        if batch.public is None:
            return full
        snapshot.restore()
        public = self._grad(batch.public.select(i), target)
        return [g - h for g, h in zip(full, public, strict=True)]

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        if len(batch) == 0:
            return empty_result(self.model)
        names = list(trainable_parameters(self.model))
        deltas = [self._delta(batch, i) for i in range(len(batch))]
        norms = torch.stack(
            [torch.sqrt(sum((d.double() ** 2).sum() for d in delta)) for delta in deltas]
        )
        factors = clip_factors(norms, max_grad_norm)
        private = [
            clipped_rows(torch.stack([delta[j] for delta in deltas]), factors).sum(0)
            for j in range(len(names))
        ]
        return ClippedSum(
            private=dict(zip(names, private, strict=True)), norms=norms, clip_factors=factors
        )
