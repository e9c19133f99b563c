r"""The ``hooks`` engine: Opacus per-sample gradients over the stacked pair of passes.

The full and public passes of a batch of B records are stacked into one batch of 2B rows
``[full; public]`` and the loss is weighted +1 on the full rows and -1 on the public rows,
:math:`L = \sum_i \ell(f(x_i), y_i) - \sum_i \ell(f(\pi(r_i)), y_i)`. Opacus's layer rules
(``opacus.grad_sample``, ``loss_reduction="sum"``, batch first) give the per-row gradients
of :math:`L`, so (DESIGN.md section 4)

:math:`\Delta_i = \text{grad\_sample}[i] + \text{grad\_sample}[B + i] = g_i - h_i`.

When the two passes cannot be stacked (different input shapes or keyword tensors), or the
model draws random numbers (the two halves of a stacked batch would draw differently), they
run as two forward/backward passes, the second after restoring the generator state of the
first (:class:`~maskdp.engines.base.RngSnapshot`). The hooks are attached for one ``compute`` and removed
afterwards, with every attribute Opacus set on parameters or modules: between calls the
user's model is exactly as before. ``torch.autograd.grad`` is used, so ``param.grad`` is
never written. The batched gradient it returns (:math:`\sum_i \Delta_i`) is compared with
the sum of the per-sample rows: a parameter used outside the module that owns it would be
missed by the hooks, and is reported instead of silently under-clipped.

Opacus is imported on first use (it costs about 2 s on top of torch).
"""

from __future__ import annotations

import copy
import functools
import warnings
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn

from maskdp.engines.base import (
    ClippedSum,
    Engine,
    MaskedBatch,
    RngSnapshot,
    empty_result,
    register_engine,
    trainable_parameters,
)
from maskdp.engines.persample import clipped_result
from maskdp.errors import UnsupportedModelError
from maskdp.mechanism.views import ModelInput

# Relative tolerance of the check sum_j grad_sample[j] == batched gradient.
_CONSISTENCY_RTOL = 1e-4


def _positional_embedding_grad_sample(
    layer: nn.Module, activations: list[Tensor], backprops: Tensor
) -> dict[nn.Parameter, Tensor]:
    """Per-sample gradient of ``x + weight``: the output gradient of each sample itself."""
    return {layer.weight: backprops} if layer.weight.requires_grad else {}


@functools.cache
def _opacus() -> Any:
    """Import ``opacus.grad_sample`` once and register maskdp's own layer rules."""
    from opacus import grad_sample

    from maskdp.models.vit import PositionalEmbedding

    grad_sample.register_grad_sampler(PositionalEmbedding)(_positional_embedding_grad_sample)
    return grad_sample


def _registered_base(cls: type, registry: Mapping[type, Any]) -> type | None:
    """The registered layer type ``cls`` behaves as: itself, or a registered base class whose
    ``forward`` it inherits unchanged (torchvision's ``Conv3DSimple`` is an ``nn.Conv3d``)."""
    if cls in registry:
        return cls
    for base in cls.__mro__[1:]:
        if base in registry and cls.forward is base.forward:
            return base
    return None


class _SamplerRegistry:
    """Opacus's grad-sampler registry, extended to subclasses that keep their base's forward.

    Opacus looks samplers up by exact type and some samplers branch on ``type(layer)``, so a
    subclass's layer is handed to the base sampler as a shallow copy whose class is the base
    (same parameter objects, same configuration).
    """

    def __init__(self, registry: Mapping[type, Any]) -> None:
        self._registry = registry

    def __contains__(self, cls: object) -> bool:
        return isinstance(cls, type) and _registered_base(cls, self._registry) is not None

    def __getitem__(self, cls: type) -> Any:
        base = _registered_base(cls, self._registry)
        if base is None:
            raise KeyError(cls)
        sampler = self._registry[base]
        if base is cls:
            return sampler

        def as_base(layer: nn.Module, activations: list[Tensor], backprops: Tensor) -> Any:
            proxy = copy.copy(layer)
            proxy.__class__ = base
            return sampler(proxy, activations, backprops)

        return as_base


@functools.cache
def _hooks_class() -> type:
    """Opacus's ``GradSampleHooks`` with the extended registry, recording in any mode.

    Opacus skips modules in eval mode (it expects no backward there); the engine always
    runs a backward, and must give the same numbers whatever the model's mode.
    """
    base = _opacus().GradSampleHooks

    class _AnyModeHooks(base):  # type: ignore[misc, valid-type]
        GRAD_SAMPLERS = _SamplerRegistry(base.GRAD_SAMPLERS)

        def capture_activations_hook(self, module, forward_input, _forward_output):  # noqa: ANN001
            if not self.hooks_enabled or not torch.is_grad_enabled():
                return
            if not any(p.requires_grad for p in module.parameters(recurse=False)):
                return
            if not hasattr(module, "activations"):
                module.activations = []
            module.activations.append([t.detach() for t in forward_input])
            for p in module.parameters(recurse=False):
                if p.requires_grad:
                    p._forward_counter += 1

    return _AnyModeHooks


def unsupported_modules(model: nn.Module) -> list[str]:
    """One line per module the hooks engine cannot give exact per-sample gradients for.

    Opacus has exact rules for the layer types in its registry (Linear, Conv, LayerNorm,
    GroupNorm, Embedding, ... and maskdp's PositionalEmbedding), which also serve subclasses
    that inherit their base's ``forward``. Any other module holding trainable parameters of
    its own would go to Opacus's functorch fallback, which sees only the module's first
    positional input and fails on buffers; it is refused here.
    """
    registry = _opacus().GradSampleHooks.GRAD_SAMPLERS
    paths: dict[type, list[str]] = {}
    for path, module in model.named_modules():
        own = [p for p in module.parameters(recurse=False) if p.requires_grad]
        if own and _registered_base(type(module), registry) is None:
            paths.setdefault(type(module), []).append(path or type(model).__name__)
    problems = []
    for cls, where in paths.items():
        names = ", ".join(where[:3]) + (f" and {len(where) - 3} more" if len(where) > 3 else "")
        if issubclass(cls, nn.MultiheadAttention):
            reason = "nn.MultiheadAttention (Opacus needs its own DPMultiheadAttention)"
        else:
            reason = f"{cls.__name__} has no Opacus per-sample gradient rule"
        problems.append(f"{names}: {reason}")
    return problems


@contextmanager
def _restoring(model: nn.Module) -> Iterator[None]:
    """Delete every attribute added to the model's modules and parameters inside the block."""
    modules = list(model.modules())
    params = list(model.parameters())
    module_keys = [set(vars(m)) for m in modules]
    param_keys = [set(vars(p)) for p in params]
    full_hook_flags = [m._is_full_backward_hook for m in modules]
    try:
        yield
    finally:
        for module, keys, flag in zip(modules, module_keys, full_hook_flags, strict=True):
            for key in set(vars(module)) - keys:
                delattr(module, key)
            module._is_full_backward_hook = flag
        for param, keys in zip(params, param_keys, strict=True):
            for key in set(vars(param)) - keys:
                delattr(param, key)


def _forward(model: nn.Module, sample: ModelInput) -> Tensor:
    try:
        return sample(model)
    except RuntimeError as err:
        if "BackwardHookFunction" not in str(err):
            raise
        raise UnsupportedModelError(
            "the model modifies a layer's output in place (e.g. `out += identity` in "
            "torchvision's ResNet blocks, or an in-place activation), which Opacus's backward "
            "hooks cannot follow; use engine='vmap' (maskdp.models.prepare switches in-place "
            "activations off)"
        ) from err


def _stack(full: ModelInput, public: ModelInput) -> ModelInput | None:
    """``[full; public]`` as one batch, or None when the two passes do not stack."""
    if full.inputs.shape[1:] != public.inputs.shape[1:] or set(full.kwargs) != set(public.kwargs):
        return None
    if any(full.kwargs[k].shape[1:] != public.kwargs[k].shape[1:] for k in full.kwargs):
        return None
    return ModelInput(
        torch.cat([full.inputs, public.inputs]),
        {k: torch.cat([v, public.kwargs[k]]) for k, v in full.kwargs.items()},
    )


@register_engine
class HooksEngine(Engine):
    r"""Per-sample :math:`\Delta_i` from Opacus grad samples of the +1/-1 weighted stacked pass."""

    name = "hooks"
    priority = 20
    autocast_safe = True  # persample.clipped_result reduces in fp32 with autocast off

    @classmethod
    def check_support(cls, model: nn.Module) -> None:
        problems = unsupported_modules(model)
        if problems:
            raise UnsupportedModelError(
                "the hooks engine cannot compute exact per-sample gradients for "
                + "; ".join(problems)
                + "; use engine='vmap'"
            )

    def _rows(
        self, sample: ModelInput, targets: Tensor, weights: Tensor
    ) -> tuple[dict[str, Tensor], dict[str, Tensor], Tensor]:
        """Per-row gradients of :math:`\\sum_j w_j \\ell_j`, the batched gradient, row losses."""
        params = trainable_parameters(self.model)
        hooks = _hooks_class()(self.model, batch_first=True, loss_reduction="sum", strict=False)
        try:
            with torch.enable_grad(), warnings.catch_warnings():
                # Expected for the first layer: its input does not require a gradient.
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                losses = self.loss_fn(_forward(self.model, sample), targets)
                grads = torch.autograd.grad(
                    (weights.to(losses.dtype) * losses).sum(),
                    list(params.values()),
                    allow_unused=True,
                )
            rows, batched = {}, {}
            for (name, p), g in zip(params.items(), grads, strict=True):
                rows[name] = self._grad_sample(name, p, g, len(sample))
                batched[name] = torch.zeros_like(p) if g is None else g
        finally:
            hooks.cleanup()
        return rows, batched, losses.detach()

    @staticmethod
    def _grad_sample(name: str, p: nn.Parameter, g: Tensor | None, rows: int) -> Tensor:
        gs = getattr(p, "grad_sample", None)
        if isinstance(gs, list):  # a module called several times in one forward
            gs = torch.stack(gs).sum(0)
        if gs is None:
            if g is not None:
                raise UnsupportedModelError(
                    f"parameter {name} received a gradient but no per-sample gradient from "
                    "the hooks (it is used outside the module that owns it); use engine='vmap'"
                )
            return torch.zeros((rows, *p.shape), dtype=p.dtype, device=p.device)
        return gs[:rows]

    def _check_consistent(self, rows: dict[str, Tensor], batched: dict[str, Tensor]) -> None:
        scales = {
            name: torch.linalg.vector_norm(gs.flatten(1).double(), dim=1).sum()
            for name, gs in rows.items()
        }
        overall = sum(scales.values(), torch.zeros((), dtype=torch.float64))
        for name, gs in rows.items():
            gap = torch.linalg.vector_norm(gs.double().sum(0) - batched[name].double())
            # Rows and the batched gradient are two roundings of one backward, whose error
            # is relative to the whole gradient, not to one parameter's: a conv bias
            # followed by GroupNorm has an exact gradient of 0 and rows of rounding noise.
            # Under autocast the rows are bf16/fp16: a few roundings of that dtype.
            eps = torch.finfo(gs.dtype).eps
            atol = 4 * eps * float(overall) + 1e-12
            rtol = max(_CONSISTENCY_RTOL, 4 * eps)
            if gap > rtol * scales[name] + atol:
                raise UnsupportedModelError(
                    f"per-sample gradients of {name} do not add up to its batched gradient "
                    f"(gap {float(gap):.3g}): the model uses this parameter in a way the hooks "
                    "do not see; use engine='vmap'"
                )

    def _per_sample(self, batch: MaskedBatch) -> dict[str, Tensor]:
        """:math:`\\Delta_i` (B, *shape) per parameter."""
        n, full, public, targets = len(batch), batch.full, batch.public, batch.targets
        ones = torch.ones(n, device=targets.device)
        if public is None:
            rows, batched, _ = self._rows(full, targets, ones)
            self._check_consistent(rows, batched)
            return rows
        stacked = None if batch.random else _stack(full, public)
        if stacked is not None:
            rows, batched, _ = self._rows(
                stacked, torch.cat([targets, targets]), torch.cat([ones, -ones])
            )
            self._check_consistent(rows, batched)
            return {k: v[:n] + v[n:] for k, v in rows.items()}
        snapshot = RngSnapshot(targets.device)
        full_rows, full_batched, _ = self._rows(full, targets, ones)
        snapshot.restore()
        public_rows, public_batched, _ = self._rows(public, targets, ones)
        self._check_consistent(full_rows, full_batched)
        self._check_consistent(public_rows, public_batched)
        return {k: full_rows[k] - public_rows[k] for k in full_rows}

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        if len(batch) == 0:
            return empty_result(self.model)
        with _restoring(self.model):
            deltas = self._per_sample(batch)
        return clipped_result(deltas, max_grad_norm=max_grad_norm)
