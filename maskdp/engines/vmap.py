r"""The ``vmap`` engine: per-sample differences of two passes with ``torch.func``.

For each record, :math:`\Delta_i = \nabla_\theta [\ell(f_\theta(x_i), y_i) -
\ell(f_\theta(\pi(r_i)), y_i)] = g_i - h_i` is the gradient of the *difference* of two
losses, so one ``grad`` of that difference, mapped over the batch with ``vmap``, gives every
:math:`\Delta_i` at once (the ``functional_call`` + ``grad`` + ``vmap`` recipe of the
torch.func per-sample-gradient tutorial). Memory: one :math:`\Delta_i` per sample, B x P.
The public sum :math:`\sum_i h_i` is one ordinary batched backward over the public pass.

Notes:

- Buffers and frozen parameters are passed to ``functional_call`` unbatched; nothing is
  stored on the model.
- ``randomness="different"``: random layers (dropout) draw independent masks per sample, as
  in ordinary batched training. Models that draw an unbatched random tensor and fill it in
  place (torchvision's stochastic depth in train mode) are run with ``randomness="same"``:
  one mask per layer shared by the batch. Dropout masks are data-independent randomness, so the
  privacy argument is unchanged; but with dropout active the ``h_i`` inside
  :math:`\Delta_i` and the separately computed public sum use different masks (the
  identity of DESIGN.md section 3 then holds in distribution only). Models in eval mode
  are deterministic.
- torch.func has no batching rule for CPU ``scaled_dot_product_attention``: it falls back
  to a loop over samples, which is correct but slow: on the default VideoViT at batch 16,
  one CPU thread, vmap took 1.1-1.3x the time of the hooks engine and 1.25-1.65x the ghost
  engine (still about half the per-sample reference loop). The fallback warning is silenced.
- Token-drop models see every token slot under vmap (no data-dependent sizes), see
  :func:`maskdp.models.vit._kept_slots`.
- Models doing data-dependent control flow (``.item()``, ``int(tensor)``) or writing a
  per-sample value in place into a shared tensor cannot be mapped; ``compute`` raises
  :class:`~maskdp.errors.UnsupportedModelError` naming the ``torch.func`` error.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import Tensor
from torch.func import functional_call, grad, vmap

from maskdp.engines.base import (
    Engine,
    MaskedBatch,
    MaskedGradient,
    empty_result,
    register_engine,
    trainable_parameters,
)
from maskdp.engines.persample import clipped_result
from maskdp.errors import UnsupportedModelError

_FALLBACK_WARNING = "There is a performance drop because we have not yet implemented the batching"
_SAME_RANDOMNESS_NEEDED = "Cannot ask for different inplace randomness on an unbatched tensor"


@register_engine
class VmapEngine(Engine):
    r"""Per-sample :math:`\Delta_i` by ``vmap(grad(loss(full_i) - loss(public_i)))``."""

    name = "vmap"
    priority = 30
    autocast_safe = True  # persample.clipped_result reduces in fp32 with autocast off

    def _state(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Trainable parameters (detached, differentiated) and everything else (constants)."""
        trainable = {n: p.detach() for n, p in trainable_parameters(self.model).items()}
        constants = {n: p.detach() for n, p in self.model.named_parameters() if n not in trainable}
        constants.update(dict(self.model.named_buffers()))
        return trainable, constants

    def _sample_loss(self, constants: dict[str, Tensor]) -> Callable[..., Tensor]:
        model, loss_fn = self.model, self.loss_fn

        def loss(
            params: dict[str, Tensor], inputs: Tensor, kwargs: dict[str, Tensor], target: Tensor
        ) -> Tensor:
            # One sample inside vmap: restore a batch dimension of one for the model.
            batch_kwargs = {k: v.unsqueeze(0) for k, v in kwargs.items()}
            outputs = functional_call(
                model, (params, constants), (inputs.unsqueeze(0),), batch_kwargs
            )
            return loss_fn(outputs, target.unsqueeze(0)).sum()

        return loss

    def _per_sample(
        self, batch: MaskedBatch, params: dict[str, Tensor], constants: dict[str, Tensor]
    ) -> tuple[dict[str, Tensor], Tensor]:
        """:math:`\\Delta_i` per parameter (B, *shape) and the full-pass losses (B,)."""
        loss = self._sample_loss(constants)
        full, public = batch.full, batch.public

        if public is None:

            def delta(p, xf, kf, y):
                value = loss(p, xf, kf, y)
                return value, value.detach()

            args = (full.inputs, dict(full.kwargs), batch.targets)
        else:

            def delta(p, xf, kf, xp, kp, y):
                value = loss(p, xf, kf, y)
                return value - loss(p, xp, kp, y), value.detach()

            args = (
                full.inputs,
                dict(full.kwargs),
                public.inputs,
                dict(public.kwargs),
                batch.targets,
            )

        in_dims = (None, *([0] * len(args)))
        try:
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_FALLBACK_WARNING)
                try:
                    mapped = vmap(
                        grad(delta, has_aux=True), in_dims=in_dims, randomness="different"
                    )
                    return mapped(params, *args)
                except RuntimeError as err:
                    if _SAME_RANDOMNESS_NEEDED not in str(err):
                        raise
                # Random tensors drawn unbatched and filled in place (torchvision's stochastic
                # depth) cannot differ per sample: draw them once for the whole batch.
                mapped = vmap(grad(delta, has_aux=True), in_dims=in_dims, randomness="same")
                return mapped(params, *args)
        except RuntimeError as err:
            if "vmap" not in str(err) and "functorch" not in str(err):
                raise
            first_line = str(err).strip().splitlines()[0][:300]
            raise UnsupportedModelError(
                f"torch.func.vmap cannot run this model ({first_line}); "
                "use another engine (engine='hooks' or engine='reference')"
            ) from err

    def _public_sum(self, batch: MaskedBatch, params: dict[str, Tensor]) -> dict[str, Tensor]:
        r""":math:`\sum_i h_i` by one batched backward of :math:`\sum_i \ell(f(\pi(r_i)), y_i)`."""
        if batch.public is None:
            return {n: torch.zeros_like(p) for n, p in params.items()}
        live = trainable_parameters(self.model)
        with torch.enable_grad():
            total = self.loss_fn(batch.public(self.model), batch.targets).sum()
            grads = torch.autograd.grad(total, list(live.values()), allow_unused=True)
        return {
            n: torch.zeros_like(p) if g is None else g
            for (n, p), g in zip(live.items(), grads, strict=True)
        }

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> MaskedGradient:
        if len(batch) == 0:
            return empty_result(self.model)
        params, constants = self._state()
        deltas, losses = self._per_sample(batch, params, constants)
        return clipped_result(
            deltas,
            self._public_sum(batch, params),
            losses,
            max_grad_norm=max_grad_norm,
            dtype=batch.full.inputs.dtype,
        )
