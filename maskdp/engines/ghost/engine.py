r"""The ghost engine: per-layer norms from captured activations, no per-sample backward.

Forward hooks capture, for every module that owns trainable parameters, its input ``A``;
a tensor hook on its output receives ``G``, the gradient of

.. math:: \sum_i \ell(f(x_i), y_i) - \sum_i \ell(f(\pi(r_i)), y_i)

with respect to that output (public rows carry the weight -1). ``torch.autograd.grad`` is
asked only for the output gradients of the first layers, so no parameter gradient is ever
computed. Per layer a rule of :mod:`maskdp.engines.ghost.registry` turns ``(A, G)`` into
per-sample squared norms of :math:`\Delta_i` and what is needed for
:math:`\sum_i c_i \Delta_i` (DESIGN.md section 4). Samples never mix
(BatchNorm is refused by :func:`maskdp.engines.validate.validate_model`), so the output gradient
of :math:`\sum_i [c_i \ell(full_i) + (1 - c_i) \ell(pub_i)]` is ``G`` rescaled per sample
(book-keeping, Bu et al. 2023): the clipped sum needs no second backward.

Two schedules give the same numbers:

- *stacked* (when both :class:`ModelInput` have the same shapes, the model draws no
  random numbers and no layer is replayed, :mod:`maskdp.engines.ghost.functional`): one ``2B`` forward and one backward; fewer, larger kernels.
- *sequential*: forward and backward of the full pass, each layer reduced to its per-sample
  gradients (or kept, on the ghost branch), then forward and backward of the public pass
  after restoring the generator state of the full pass (both passes see the same random
  draws); about one pass's activations in memory instead of two.

Before the first step, :mod:`maskdp.engines.ghost.independence` probes that every layer's
rows are records (two small forward passes on random clips): every rule depends on it.

Each layer is reduced inside the backward as soon as its ``G`` arrives, and its ``A`` and
``G`` are released (:mod:`maskdp.engines.ghost.capture`, :mod:`maskdp.engines.ghost.reducer`). Hooks live only for the duration
of :meth:`GhostEngine.compute`; the model keeps its state_dict keys, attributes and
``param.grad``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

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
from maskdp.engines.ghost.capture import FIX, Capture, Layer, analyse_graph
from maskdp.engines.ghost.functional import PER_MODULE_RULE
from maskdp.engines.ghost.independence import probe_record_independence
from maskdp.engines.ghost.reducer import FULL, PUBLIC, STACKED, Reducer, Workspace
from maskdp.engines.ghost.registry import rule_for
from maskdp.engines.ghost.rules import Mode
from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.mechanism.views import ModelInput

_MODES = ("auto", "ghost", "instantiate")


def plan_layers(model: nn.Module) -> list[Layer]:
    """The layers of ``model`` the ghost engine handles; raise if a parameter is not covered.

    Every trainable parameter must be a direct parameter of exactly one module with a rule
    (:func:`~maskdp.engines.ghost.registry.rule_for`). A module below the root that owns
    parameters without a rule gets the per-module rule
    (:mod:`maskdp.engines.ghost.functional`) for its whole subtree, children included: such
    forwards often use a child's weight without calling the child
    (``nn.MultiheadAttention`` and torchvision's window attention call ``F.linear`` on it).
    """
    layers: list[Layer] = []
    problems: list[str] = []
    unruled: dict[str, list[str]] = {}
    owners: dict[int, str] = {}
    wholes = _whole_modules(model)
    for path, module in model.named_modules():
        if any(path.startswith(whole + ".") for whole in wholes):
            continue  # inside a whole module: its replay covers these parameters
        whole = path in wholes
        direct = {k: p for k, p in module.named_parameters(recurse=whole) if p.requires_grad}
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
        rule = PER_MODULE_RULE if whole else rule_for(type(module))
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
            f"{shown}: {key} has no ghost rule"
            + (
                " (raw parameters in the model's own forward: the per-module rule would "
                "replay the whole model; move them into a submodule, e.g. one that adds the "
                "positional table or concatenates the cls token)"
                if paths == ["<root>"]
                else ""
            )
        )
    if problems:
        raise UnsupportedModelError(
            "ghost engine cannot handle this model: " + "; ".join(problems) + f"; {FIX}"
        )
    return layers


def _whole_modules(model: nn.Module) -> set[str]:
    """Paths of the outermost non-root modules that own trainable parameters no rule covers
    (never BatchNorm, which mixes records and :func:`~maskdp.engines.validate.validate_model`
    refuses, nor recurrent layers, sequence first and outside ``vmap``'s reach)."""
    found: set[str] = set()
    for path, module in model.named_modules():
        if not path or any(path.startswith(whole + ".") for whole in found):
            continue
        if isinstance(module, (_BatchNorm, nn.RNNBase)):
            continue
        owns = any(p.requires_grad for p in module.parameters(recurse=False))
        if owns and rule_for(type(module)) is None:
            found.add(path)
    return found


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
        self.replayed = any(layer.rule.replays for layer in self.layers)
        self._probed = False  # the record-independence probe runs before the first step

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
        if not self._probed:
            # Public structure only: the probe's clips are random (independence.py).
            probe_record_independence(self.model, self.layers, batch.public or batch.full)
            self._probed = True
        reducer = Reducer(self.layers, batch, self.mode, self.workspace)
        # Replayed layers check themselves on public rows, which a stacked call would
        # compute beside the full rows: they run in the sequential schedule.
        stack = self.stack and not batch.random and batch.public is not None and not self.replayed
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
        # upper bound on the norm of what is summed (ghost_norm.ghost_slack).
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
