r"""The brute-force oracle: one sample at a time, two autograd calls per sample.

Every other engine is tested against this one. It computes, for each record separately,
:math:`g_i` and :math:`h_i` with ``torch.autograd.grad``, then :math:`\Delta_i`, its norm,
:math:`c_i` and the sums. Slow by design and obviously correct.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskdp.engines.base import (
    Engine,
    MaskedBatch,
    MaskedGradient,
    clip_factors,
    empty_result,
    register_engine,
    trainable_parameters,
)
from maskdp.views import ModelInput


@register_engine
class ReferenceEngine(Engine):
    """Per-sample loop (the oracle). Supports every model; never chosen by ``"auto"``."""

    name = "reference"
    priority = 1000
    autocast_safe = True  # fp32 gradients from autograd, float64 norms

    def _grad(self, sample: ModelInput, target: Tensor) -> tuple[list[Tensor], Tensor]:
        params = list(trainable_parameters(self.model).values())
        loss = self.loss_fn(sample(self.model), target).sum()
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        return [
            torch.zeros_like(p) if g is None else g for g, p in zip(grads, params, strict=True)
        ], loss

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> MaskedGradient:
        if len(batch) == 0:
            return empty_result(self.model)
        names = list(trainable_parameters(self.model))
        public_sum = [torch.zeros_like(p) for p in trainable_parameters(self.model).values()]
        deltas, losses = [], []
        for i in range(len(batch)):
            target = batch.targets[i : i + 1]
            full, loss = self._grad(batch.full.select(i), target)
            losses.append(loss.detach())
            if batch.public is None:
                deltas.append(full)
                continue
            public, _ = self._grad(batch.public.select(i), target)
            public_sum = [s + h for s, h in zip(public_sum, public, strict=True)]
            deltas.append([g - h for g, h in zip(full, public, strict=True)])
        norms = torch.stack(
            [torch.sqrt(sum((d.double() ** 2).sum() for d in delta)) for delta in deltas]
        ).to(batch.full.inputs.dtype)
        factors = clip_factors(norms, max_grad_norm)
        private = [
            sum(c * delta[j] for c, delta in zip(factors, deltas, strict=True))
            for j in range(len(names))
        ]
        return MaskedGradient(
            public=dict(zip(names, public_sum, strict=True)),
            private=dict(zip(names, private, strict=True)),
            norms=norms,
            clip_factors=factors,
            loss=torch.stack(losses).mean(),
        )
