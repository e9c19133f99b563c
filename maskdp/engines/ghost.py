r"""The ghost engine: per-layer norms from captured activations, no per-sample backward.

One forward over both views (one stacked ``2B`` call when the two :class:`ModelInput` have
the same shapes, else two calls) with forward hooks capturing, for every module that owns
trainable parameters, its input ``A`` and the gradient edge of its output. One backward of

.. math:: \sum_i \ell(f(x_i), y_i) - \sum_i \ell(f(\pi(r_i)), y_i)

with ``torch.autograd.grad`` towards those output edges gives the output gradients ``G``
(public rows carry the weight -1) without computing any parameter gradient. Per layer a
rule of :mod:`maskdp.engines.ghost_layers` turns ``(A, G)`` into per-sample squared norms of
:math:`\Delta_i`, the public sum :math:`\sum_i h_i`, and a function of the clip factors
giving :math:`\sum_i c_i \Delta_i` (DESIGN.md section 4; book-keeping as in Bu et al. 2023).
Because samples never mix (BatchNorm is refused by :func:`maskdp.validate.validate_model`),
the output gradient of :math:`\sum_i [c_i \ell(full_i) + (1 - c_i) \ell(pub_i)]` is ``G``
rescaled per sample, so no second backward is needed.

Each layer is reduced inside the backward, as soon as its ``G`` arrives, and its ``A``
and ``G`` are released (:mod:`maskdp.engines.ghost_capture`). Hooks live only for the
duration of :meth:`GhostEngine.compute`; the model keeps its state_dict keys, attributes
and ``param.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskdp.engines.base import (
    Engine,
    MaskedBatch,
    MaskedGradient,
    PerSampleLoss,
    clip_factors,
    empty_result,
    register_engine,
)
from maskdp.engines.ghost_capture import FIX, Call, Capture, Layer, analyse_graph
from maskdp.engines.ghost_layers import LayerResult, Mode, Pair, Pass, rule_for
from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.views import ModelInput

FULL, PUBLIC, STACKED = "full", "public", "stacked"
_MODES = ("auto", "ghost", "instantiate")


def plan_layers(model: nn.Module) -> list[Layer]:
    """The layers of ``model`` the ghost engine handles; raise if a parameter is not covered.

    Every trainable parameter must be a direct parameter of exactly one module with a rule
    (:func:`~maskdp.engines.ghost_layers.rule_for`).
    """
    layers: list[Layer] = []
    problems: list[str] = []
    unruled: dict[str, list[str]] = {}
    owners: dict[int, str] = {}
    for path, module in model.named_modules():
        direct = {k: p for k, p in module.named_parameters(recurse=False) if p.requires_grad}
        if not direct:
            continue
        label = f"{path or '<root>'} ({type(module).__name__})"
        for local, param in direct.items():
            if id(param) in owners:
                problems.append(
                    f"{label}: parameter {local!r} is shared with {owners[id(param)]} "
                    "(weight sharing); the ghost engine needs one owner per parameter"
                )
            owners[id(param)] = label
        rule = rule_for(type(module))
        if rule is None:
            key = f"{type(module).__name__} (parameters {sorted(direct)})"
            unruled.setdefault(key, []).append(path or "<root>")
            continue
        extra = sorted(set(direct) - rule.params) if rule.params is not None else []
        reason = rule.refusal(module)
        if extra:
            problems.append(f"{label}: parameters {extra} are not handled by its rule")
        elif reason:
            problems.append(f"{label}: {reason}")
        prefix = f"{path}." if path else ""
        layers.append(Layer(path, module, rule, {k: prefix + k for k in direct}))
    for key, paths in unruled.items():
        shown = ", ".join(paths[:3]) + (f" and {len(paths) - 3} more" if len(paths) > 3 else "")
        problems.append(
            f"{shown}: {key} has no ghost rule (a layer type without a rule, or a raw "
            "nn.Parameter used in a parent module's own forward)"
        )
    if problems:
        raise UnsupportedModelError(
            "ghost engine cannot handle this model: " + "; ".join(problems) + f"; {FIX}"
        )
    return layers


def stackable(full: ModelInput, public: ModelInput) -> bool:
    """Whether both passes can run as one call: same shapes, dtypes and keyword tensors."""

    def sig(t: Tensor) -> tuple:
        return (tuple(t.shape), t.dtype, t.device)

    if sig(full.inputs) != sig(public.inputs) or set(full.kwargs) != set(public.kwargs):
        return False
    return all(sig(v) == sig(public.kwargs[k]) for k, v in full.kwargs.items())


def _stack(full: ModelInput, public: ModelInput) -> ModelInput:
    kwargs = {k: torch.cat([v, public.kwargs[k]]) for k, v in full.kwargs.items()}
    return ModelInput(torch.cat([full.inputs, public.inputs]), kwargs)


class _Reducer:
    """Turns each layer's captured passes into a :class:`LayerResult` as soon as ready."""

    def __init__(self, layers: list[Layer], batch: MaskedBatch, mode: Mode) -> None:
        self.layers, self.n, self.mode = layers, len(batch), mode
        self.protect_labels = batch.protect_labels
        self.capture: Capture | None = None
        device = batch.full.inputs.device
        self.results: dict[int, LayerResult] = {}
        self.sq_norms = torch.zeros(self.n, dtype=torch.float64, device=device)

    def __call__(self, index: int) -> None:
        assert self.capture is not None
        calls = self.capture.calls[index]
        self.capture.calls[index] = {}
        pair = self._pair(self.layers[index], calls)
        del calls
        if pair is None:
            return
        layer = self.layers[index]
        with torch.no_grad():
            result = layer.rule.compute(layer.module, pair, frozenset(layer.names), self.mode)
        self.sq_norms += result.sq_norms
        self.results[index] = result

    def finish(self) -> None:
        """Layers whose output never reached the loss in some pass: zero ``G`` there."""
        assert self.capture is not None
        for index, calls in enumerate(self.capture.calls):
            if calls:
                self(index)

    def _pair(self, layer: Layer, calls: dict[str, Call]) -> Pair | None:
        n = self.n

        def gather(name: str, size: int) -> Pass | None:
            call = calls.get(name)
            if call is None:
                return None
            grad = call.grad
            if grad is None:
                shape, dtype, device = call.output
                grad = torch.zeros(shape, dtype=dtype, device=device)
            for t in (*call.inputs, grad):
                if t.dim() == 0 or t.shape[0] != size:
                    raise UnsupportedModelError(
                        f"{layer.label}: expected batch-first tensors with {size} samples, "
                        f"got shape {tuple(t.shape)}; {FIX}"
                    )
            return Pass(call.inputs, grad, call.edge.node if call.edge is not None else None)

        both = gather(STACKED, 2 * n)
        if both is not None:
            return Pair(
                Pass(tuple(t[:n] for t in both.inputs), both.grad[:n]),
                Pass(tuple(t[n:] for t in both.inputs), both.grad[n:]),
                stacked=both,
            )
        full, public = gather(FULL, n), gather(PUBLIC, n)
        if full is None and public is None:
            return None
        if full is not None and self.protect_labels:
            return Pair(full, None)
        if full is None or public is None:
            raise UnsupportedModelError(
                f"{layer.label} ran in only one of the two passes; the ghost engine needs "
                f"the same layers in the full and public passes; {FIX}"
            )
        return Pair(full, public)


@register_engine
class GhostEngine(Engine):
    """Ghost norms of the stacked pair per layer, then clipped sums by book-keeping.

    ``stack``: run both views as one ``2B`` call when their shapes agree (faster); ``mode``:
    ``"auto"`` chooses per layer between ghost norm and instantiation by cost, ``"ghost"`` /
    ``"instantiate"`` force one branch where a layer has both (for tests).
    """

    name = "ghost"
    priority = 10

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | PerSampleLoss,
        *,
        stack: bool = True,
        mode: Mode = "auto",
    ) -> None:
        super().__init__(model, loss_fn)
        if mode not in _MODES:
            raise InvalidInputError(f"mode must be one of {_MODES}, got {mode!r}")
        self.stack = bool(stack)
        self.mode: Mode = mode
        self.layers = plan_layers(model)

    @classmethod
    def check_support(cls, model: nn.Module) -> None:
        plan_layers(model)

    def _forward(self, batch: MaskedBatch, capture: Capture) -> tuple[Tensor, Tensor]:
        """The objective :math:`\\sum \\ell_{full} - \\sum \\ell_{pub}` and the full losses."""
        n, targets = len(batch), batch.targets
        if batch.public is None:
            capture.current = FULL
            losses = self.loss_fn(batch.full(self.model), targets)
            return losses.sum(), losses
        if self.stack and stackable(batch.full, batch.public):
            capture.current = STACKED
            outputs = _stack(batch.full, batch.public)(self.model)
            losses = self.loss_fn(outputs, torch.cat([targets, targets]))
            return losses[:n].sum() - losses[n:].sum(), losses[:n]
        capture.current = FULL
        full = self.loss_fn(batch.full(self.model), targets)
        capture.current = PUBLIC
        public = self.loss_fn(batch.public(self.model), targets)
        return full.sum() - public.sum(), full

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> MaskedGradient:
        n = len(batch)
        if n == 0:
            return empty_result(self.model)
        inputs = batch.full.inputs
        reducer = _Reducer(self.layers, batch, self.mode)
        with torch.enable_grad(), Capture(self.layers, reducer) as capture:
            reducer.capture = capture
            objective, losses = self._forward(batch, capture)
        capture.check_versions()
        self._backward(objective, capture)
        reducer.finish()
        dtype = inputs.dtype if inputs.is_floating_point() else torch.get_default_dtype()
        norms = reducer.sq_norms.sqrt().to(dtype)
        factors = clip_factors(norms, max_grad_norm)
        public: dict[str, Tensor] = {}
        private: dict[str, Tensor] = {}
        for index, result in sorted(reducer.results.items()):
            names = self.layers[index].names
            public.update({names[k]: v for k, v in result.public.items()})
            private.update({names[k]: v for k, v in result.private(factors).items()})
        reducer.results.clear()
        return self._assemble(public, private, norms, factors, losses, batch.protect_labels)

    def _backward(self, objective: Tensor, capture: Capture) -> None:
        """One backward through every layer; the capture's hooks reduce them on the way.

        Also refuses parameters used outside their module (:func:`analyse_graph`), including
        modules that never ran while their parameters reached the loss.
        """
        if objective.grad_fn is None:
            return
        entries = analyse_graph(objective.grad_fn, self.layers, capture.calls)
        uncalled = [
            (layer, layer.module.get_parameter(local))
            for layer, calls in zip(self.layers, capture.calls)
            if not calls
            for local in layer.names
        ]
        inputs = [*entries, *(p for _, p in uncalled)]
        if not inputs:
            return
        grads = torch.autograd.grad(objective, inputs, allow_unused=True)
        for (layer, _), grad in zip(uncalled, grads[len(entries) :]):
            if grad is not None:
                raise UnsupportedModelError(
                    f"{layer.label}: its parameters are used outside its own forward (e.g. "
                    f"F.linear(x, module.weight) in a parent); {FIX}"
                )

    def _assemble(
        self,
        public: dict[str, Tensor],
        private: dict[str, Tensor],
        norms: Tensor,
        factors: Tensor,
        losses: Tensor,
        protect_labels: bool,
    ) -> MaskedGradient:
        """Parameter-shaped sums in the model's order; zeros where a layer took no part."""
        def shaped(value: Tensor | None, param: Tensor) -> Tensor:
            if value is None:
                return torch.zeros_like(param)
            return value.reshape(param.shape).to(param.dtype)

        out_public, out_private = {}, {}
        for name, param in self.model.named_parameters():
            if param.requires_grad:
                out_private[name] = shaped(private.get(name), param)
                out_public[name] = shaped(None if protect_labels else public.get(name), param)
        return MaskedGradient(
            public=out_public,
            private=out_private,
            norms=norms,
            clip_factors=factors,
            loss=losses.detach().mean(),
        )
