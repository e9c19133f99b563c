r"""The ghost engine: per-layer norms from captured activations, no per-sample backward.

Forward hooks capture, for every module that owns trainable parameters, its input ``A``;
a tensor hook on its output receives ``G``, the gradient of

.. math:: \sum_i \ell(f(x_i), y_i) - \sum_i \ell(f(\pi(r_i)), y_i)

with respect to that output (public rows carry the weight -1). ``torch.autograd.grad`` is
asked only for the output gradients of the first layers, so no parameter gradient is ever
computed. Per layer a rule of :mod:`maskdp.engines.ghost.layers` turns ``(A, G)`` into
per-sample squared norms of :math:`\Delta_i` and what is needed for
:math:`\sum_i c_i \Delta_i` (DESIGN.md section 4). Samples never mix
(BatchNorm is refused by :func:`maskdp.engines.validate.validate_model`), so the output gradient
of :math:`\sum_i [c_i \ell(full_i) + (1 - c_i) \ell(pub_i)]` is ``G`` rescaled per sample
(book-keeping, Bu et al. 2023): the clipped sum needs no second backward.

Two schedules give the same numbers:

- *stacked* (when both :class:`ModelInput` have the same shapes and the model draws no
  random numbers): one ``2B`` forward and one backward; fewer, larger kernels.
- *sequential*: forward and backward of the full pass, each layer reduced to its per-sample
  gradients (or kept, on the ghost branch), then forward and backward of the public pass
  after restoring the generator state of the full pass (both passes see the same random
  draws); about one pass's activations in memory instead of two.

Each layer is reduced inside the backward as soon as its ``G`` arrives, and its ``A`` and
``G`` are released (:mod:`maskdp.engines.ghost.capture`). Hooks live only for the duration
of :meth:`GhostEngine.compute`; the model keeps its state_dict keys, attributes and
``param.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from maskdp.engines.base import (
    ClippedSum,
    Engine,
    MaskedBatch,
    PerSampleLoss,
    RngSnapshot,
    accumulation_dtype,
    clip_factors,
    empty_result,
    register_engine,
)
from maskdp.engines.ghost.capture import FIX, Call, Capture, Layer, analyse_graph
from maskdp.engines.ghost.layers import (
    LayerResult,
    Mode,
    Pair,
    Pass,
    combine,
    layer_result,
    rule_for,
    uses_ghost,
)
from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.mechanism.views import ModelInput

FULL, PUBLIC, STACKED = "full", "public", "stacked"
_MODES = ("auto", "ghost", "instantiate")


def plan_layers(model: nn.Module) -> list[Layer]:
    """The layers of ``model`` the ghost engine handles; raise if a parameter is not covered.

    Every trainable parameter must be a direct parameter of exactly one module with a rule
    (:func:`~maskdp.engines.ghost.layers.rule_for`).
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
        layers.append(Layer(path, module, rule, {k: prefix + k for k in direct}, direct))
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


class Workspace:
    """Buffers for per-sample gradients, reused from one call to the next.

    Each step instantiates about ``B x P`` values that live until the clip factors are
    known. On CPU, fresh allocations of that size go back to the operating system when
    freed and are faulted in again at the next step (measured: about 8% of a step on a
    1.1M-parameter ViT); keeping them costs that much memory between steps. Buffers are
    matched by their trailing shape, dtype and device and sliced to the batch size.
    """

    def __init__(self) -> None:
        self.free: dict[tuple, list[Tensor]] = {}
        self.used: list[tuple[tuple, Tensor]] = []

    def __call__(self, shape: tuple[int, ...], like: Tensor) -> Tensor:
        n, key = shape[0], (tuple(shape[1:]), like.dtype, like.device)
        buffers = self.free.get(key, [])
        for i, buf in enumerate(buffers):
            if buf.shape[0] >= n:
                buf = buffers.pop(i)
                break
        else:
            buf = torch.empty(shape, dtype=like.dtype, device=like.device)
        self.used.append((key, buf))
        return buf[:n]

    def release(self) -> None:
        """Every buffer is free again (call once no result refers to them)."""
        for key, buf in self.used:
            self.free.setdefault(key, []).append(buf)
        self.used.clear()


class _Reducer:
    """Reduces each layer as soon as its output gradients arrive (called from the capture's
    tensor hooks inside the backward).

    Stacked: one ``2n`` pass, reduced at once. Sequential: in the full pass a layer on the
    instantiate branch is reduced to its per-sample gradients :math:`S(A^f, G^f)` (its
    ``A``, ``G`` are released before the public pass runs); a layer on the ghost branch keeps
    its full-pass ``A``, ``G`` until the public pass brings the other half.
    """

    def __init__(
        self, layers: list[Layer], batch: MaskedBatch, mode: Mode, workspace: Workspace | None
    ) -> None:
        self.layers, self.n, self.mode = layers, len(batch), mode
        self.workspace = workspace
        self.protect_labels = batch.protect_labels
        self.capture: Capture | None = None
        self.partial: dict[int, dict[str, Tensor]] = {}
        self.results: dict[int, LayerResult] = {}
        self.device = batch.full.inputs.device
        self.sq_norms = torch.zeros(self.n, dtype=torch.float64, device=self.device)
        self.sq_slack = torch.zeros_like(self.sq_norms)
        self.slack = torch.zeros_like(self.sq_norms)

    def __call__(self, index: int) -> None:
        assert self.capture is not None
        layer, calls = self.layers[index], self.capture.calls[index]
        # Full precision whatever the forward ran in: the norms bound the released sums.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            if STACKED in calls:
                self._stacked(index, layer, calls[STACKED])
            elif PUBLIC in calls:
                self._second(index, layer, calls)
            else:
                self._first(index, layer, calls)

    def _result(self, layer: Layer, pair: Pair, mode: Mode) -> LayerResult:
        return layer_result(layer.rule, layer.module, pair, frozenset(layer.names), mode)

    def _stacked(self, index: int, layer: Layer, call: Call) -> None:
        n, both = self.n, self._pass(layer, call, 2 * self.n)
        pair = Pair(
            Pass(tuple(t[:n] for t in both.inputs), both.grad[:n]),
            Pass(tuple(t[n:] for t in both.inputs), both.grad[n:]),
            stacked=both,
        )
        self._finish(index, self._result(layer, pair, self.mode))

    def _first(self, index: int, layer: Layer, calls: dict[str, Call]) -> None:
        """Sequential full pass: reduce what can be reduced without the public pass."""
        full = self._pass(layer, calls[FULL], self.n)
        if self.protect_labels:
            self._finish(index, self._result(layer, Pair(full, None), self.mode))
        elif not uses_ghost(layer.rule, layer.module, full, 2, self.mode):
            self.partial[index] = layer.rule.per_sample(layer.module, full, frozenset(layer.names))
            calls.clear()
        # else: the ghost branch keeps the full pass's A and G for the public pass

    def _second(self, index: int, layer: Layer, calls: dict[str, Call]) -> None:
        """Sequential public pass: complete the layer started in the full pass."""
        public = self._pass(layer, calls[PUBLIC], self.n)
        if index in self.partial:
            names = frozenset(layer.names)
            per_sample = layer.rule.per_sample(layer.module, public, names)
            self._finish(index, combine(self.partial.pop(index), per_sample, self.n))
        elif FULL in calls:
            pair = Pair(self._pass(layer, calls[FULL], self.n), public)
            self._finish(index, self._result(layer, pair, "ghost"))
        else:
            raise self._one_pass(layer)

    def _finish(self, index: int, result: LayerResult) -> None:
        assert self.capture is not None
        self.capture.calls[index] = {}
        self.sq_norms += result.sq_norms
        if result.sq_slack is not None:
            self.sq_slack += result.sq_slack
        if result.slack is not None:
            self.slack += result.slack
        self.results[index] = result

    def flush(self, name: str) -> None:
        """After a pass's backward: layers whose output never reached the loss get ``G = 0``."""
        assert self.capture is not None
        for index, calls in enumerate(self.capture.calls):
            call = calls.get(name)
            if call is not None and call.grad is None:
                shape, dtype, device = call.output
                call.grad = torch.zeros(shape, dtype=dtype, device=device)
                if all(c.grad is not None for c in calls.values()):
                    self(index)

    def check_complete(self) -> None:
        """Every layer that ran in the full pass must have run in the public pass too."""
        assert self.capture is not None
        for index, calls in enumerate(self.capture.calls):
            if index in self.partial or calls:
                raise self._one_pass(self.layers[index])

    @staticmethod
    def _one_pass(layer: Layer) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{layer.label} ran in only one of the two passes; the ghost engine needs the "
            f"same layers in the full and public passes; {FIX}"
        )

    def _pass(self, layer: Layer, call: Call, size: int) -> Pass:
        """The call as a :class:`Pass`; low-precision activations (autocast) are upcast to
        the parameters' dtype promoted to float32, so that norms and sums are computed in
        float32 or wider whatever the model's dtype."""
        assert call.grad is not None
        for t in (*call.inputs, call.grad):
            if t.dim() == 0 or t.shape[0] != size:
                raise UnsupportedModelError(
                    f"{layer.label}: expected batch-first tensors with {size} samples, got "
                    f"shape {tuple(t.shape)}; {FIX}"
                )
        dtype = accumulation_dtype(layer.dtype)
        inputs = tuple(
            t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in call.inputs
        )
        grad = call.grad if call.grad.dtype == dtype else call.grad.to(dtype)
        node = call.edge.node if call.edge is not None else None
        return Pass(inputs, grad, node, self.workspace)


@register_engine
class GhostEngine(Engine):
    """Ghost norms of the stacked pair per layer, then clipped sums by book-keeping.

    ``stack=True``: run both views as one ``2B`` call with one backward when their shapes
    agree (fewer, larger kernels). Default ``stack=False``: the full pass runs forward and
    backward first and is reduced before the public pass runs (about one pass's activations
    in memory instead of two; measured as fast or faster on CPU, see benchmarks/RESULTS.md). ``mode``: ``"auto"`` chooses per layer between
    ghost norm and instantiation by cost, ``"ghost"`` / ``"instantiate"`` force one branch
    where a layer has both (for tests). ``reuse_buffers``: keep the buffers of per-sample
    gradients (about ``B x P`` values) between calls instead of allocating them anew
    (:class:`Workspace`); :meth:`close` releases them.
    """

    name = "ghost"
    priority = 10
    autocast_safe = True  # reductions run in fp32; contributions stay <= C (test_precision)

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | PerSampleLoss,
        *,
        stack: bool = False,
        mode: Mode = "auto",
        reuse_buffers: bool = True,
    ) -> None:
        super().__init__(model, loss_fn)
        if mode not in _MODES:
            raise InvalidInputError(f"mode must be one of {_MODES}, got {mode!r}")
        self.stack = bool(stack)
        self.mode: Mode = mode
        self.layers = plan_layers(model)
        self.trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        self.workspace = Workspace() if reuse_buffers else None

    @classmethod
    def check_support(cls, model: nn.Module) -> None:
        plan_layers(model)

    def close(self) -> None:
        if self.workspace is not None:
            self.workspace = Workspace()

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        if len(batch) == 0:
            return empty_result(self.model)
        try:
            return self._compute(batch, max_grad_norm)
        finally:
            if self.workspace is not None:
                self.workspace.release()  # results never alias its buffers

    def _compute(self, batch: MaskedBatch, max_grad_norm: float) -> ClippedSum:
        n, targets = len(batch), batch.targets
        reducer = _Reducer(self.layers, batch, self.mode, self.workspace)
        stack = self.stack and not batch.random and batch.public is not None
        with Capture(self.layers, reducer) as capture:
            reducer.capture = capture
            if stack and stackable(batch.full, batch.public):
                stacked = _stack(batch.full, batch.public)
                losses = self._run(capture, STACKED, stacked, torch.cat([targets, targets]))
                objective = losses[:n].sum() - losses[n:].sum()
                self._backward(objective, capture, STACKED)
                reducer.flush(STACKED)
            else:
                snapshot = RngSnapshot(targets.device)
                losses = self._run(capture, FULL, batch.full, targets)
                self._backward(losses.sum(), capture, FULL)
                reducer.flush(FULL)
                if batch.public is not None:
                    snapshot.restore()  # the same random draws as the full pass
                    public = self._run(capture, PUBLIC, batch.public, targets)
                    self._backward(-public.sum(), capture, PUBLIC)
                    reducer.flush(PUBLIC)
                    reducer.check_complete()
        # Exact up to rounding on the instantiate branch; on the ghost branch a certified
        # upper bound on the norm of what is summed (ghost_layers.ghost_slack).
        norms = (reducer.sq_norms + reducer.sq_slack).sqrt() + reducer.slack
        factors = clip_factors(norms, max_grad_norm)
        private: dict[str, Tensor] = {}
        with torch.no_grad(), torch.autocast(targets.device.type, enabled=False):
            for index, result in sorted(reducer.results.items()):
                names = self.layers[index].names
                private.update({names[k]: v for k, v in result.private(factors).items()})
        return ClippedSum(private=self._shaped(private), norms=norms, clip_factors=factors)

    def _run(self, capture: Capture, name: str, model_input: ModelInput, targets: Tensor) -> Tensor:
        """One forward pass recorded under ``name``; the per-sample losses."""
        capture.current = name
        with torch.enable_grad():
            losses = self.loss_fn(model_input(self.model), targets)
        capture.check_versions()
        return losses

    def _backward(self, objective: Tensor, capture: Capture, name: str) -> None:
        """One backward through every layer of pass ``name``; the capture's hooks reduce the
        layers on the way. Refuses parameters used outside their module
        (:func:`analyse_graph`), including modules that did not run in this pass while their
        parameters reached the loss.
        """
        if objective.grad_fn is None:
            return
        calls = [{name: c[name]} if name in c else {} for c in capture.calls]
        entries = analyse_graph(objective.grad_fn, self.layers, calls)
        uncalled = [
            (layer, param)
            for layer, layer_calls in zip(self.layers, calls, strict=True)
            if not layer_calls
            for param in layer.params.values()
        ]
        del calls  # the capture alone holds A and G, so that reduced layers free them
        inputs = [*entries, *(p for _, p in uncalled)]
        if not inputs:
            return
        grads = torch.autograd.grad(objective, inputs, allow_unused=True)
        for (layer, _), grad in zip(uncalled, grads[len(entries) :], strict=True):
            if grad is not None:
                raise UnsupportedModelError(
                    f"{layer.label}: its parameters are used outside its own forward (e.g. "
                    f"F.linear(x, module.weight) in a parent); {FIX}"
                )

    def _shaped(self, private: dict[str, Tensor]) -> dict[str, Tensor]:
        """Parameter-shaped sums in the model's order, in float32 or wider; zeros where a
        layer took no part."""
        out = {}
        for name, param in self.trainable:
            dtype = accumulation_dtype(param.dtype)
            value = private.get(name)
            if value is None:
                out[name] = torch.zeros(param.shape, dtype=dtype, device=param.device)
            else:
                out[name] = value.reshape(param.shape).to(dtype)
        return out
