r"""The ``vmap`` engine: per-sample differences of two passes with ``torch.func``.

For each record, :math:`\Delta_i = \nabla_\theta [\ell(f_\theta(x_i), y_i) -
\ell(f_\theta(\pi(r_i)), y_i)] = g_i - h_i` is the gradient of the *difference* of two
losses, so one ``grad`` of that difference, mapped over the batch with ``vmap``, gives every
:math:`\Delta_i` at once (the ``functional_call`` + ``grad`` + ``vmap`` recipe of the
torch.func per-sample-gradient tutorial). Memory: one :math:`\Delta_i` per sample, B x P.

Notes:

- Buffers and frozen parameters are passed to ``functional_call`` unbatched; nothing is
  stored on the model.
- ``randomness="different"``: random layers (dropout) draw independent masks per sample, as
  in ordinary batched training. Models that draw an unbatched random tensor and fill it in
  place (torchvision's stochastic depth in train mode) are run with ``randomness="same"``:
  one mask per layer shared by the batch. Inside the mapped function the generator is
  snapshot before the full pass and restored before the public pass, so both passes of a
  record see the same draws and an erased record has :math:`\Delta_i = 0` exactly.
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
    ClippedSum,
    Engine,
    MaskedBatch,
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
    ) -> dict[str, Tensor]:
        """:math:`\\Delta_i` per parameter (B, *shape)."""
        loss = self._sample_loss(constants)
        full, public = batch.full, batch.public

        if public is None:

            def delta(p, xf, kf, y):
                return loss(p, xf, kf, y)

            args = (full.inputs, dict(full.kwargs), batch.targets)
        else:

            def delta(p, xf, kf, xp, kp, y):
                # The same random draws in both passes (module docstring).
                state = torch.get_rng_state()
                cuda = torch.cuda.get_rng_state(xf.device) if xf.is_cuda else None
                value = loss(p, xf, kf, y)
                torch.set_rng_state(state)
                if cuda is not None:
                    torch.cuda.set_rng_state(cuda, xf.device)
                return value - loss(p, xp, kp, y)

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
                    mapped = vmap(grad(delta), in_dims=in_dims, randomness="different")
                    return mapped(params, *args)
                except RuntimeError as err:
                    if _SAME_RANDOMNESS_NEEDED not in str(err):
                        raise
                # Random tensors drawn unbatched and filled in place (torchvision's stochastic
                # depth) cannot differ per sample: draw them once for the whole batch.
                mapped = vmap(grad(delta), in_dims=in_dims, randomness="same")
                return mapped(params, *args)
        except RuntimeError as err:
            if "vmap" not in str(err) and "functorch" not in str(err):
                raise
            first_line = str(err).strip().splitlines()[0][:300]
            raise UnsupportedModelError(
                f"torch.func.vmap cannot run this model ({first_line}); "
                "use another engine (engine='hooks' or engine='reference')"
            ) from err

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        if len(batch) == 0:
            return empty_result(self.model)
        params, constants = self._state()
        return clipped_result(
            self._per_sample(batch, params, constants), max_grad_norm=max_grad_norm
        )
