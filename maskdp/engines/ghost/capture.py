r"""Capture for the ghost engine: what each layer saw in the forward, and its output gradient.

During :meth:`GhostEngine.compute` only, a forward hook on every module owning trainable
parameters records per call its tensor inputs ``A`` (detached: the same storage autograd
keeps anyway) and registers a tensor hook on its output that receives ``G`` during the one
backward. As soon as every pass of a layer has its ``G``, the engine's callback reduces the
layer to norms and sums, and the layer's ``A`` and ``G`` are released: the working set stays
close to an ordinary backward's.

The autograd graph of the forward is also checked (:func:`analyse_graph`): every node that
consumes a tracked parameter must lie inside a call of the parameter's owner, otherwise a
rule, which sees only its own module's input and output, would compute too small a norm.
The same walk finds the *entry* layers (no other layer upstream of them): asking the
backward for their output gradients alone makes it run through every layer without
computing any parameter gradient and without holding every ``G`` until it returns.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import torch
from torch import Tensor, nn
from torch.autograd.graph import GradientEdge, Node, get_gradient_edge

from maskdp.engines.ghost.functional import Replay, first_tensor, is_replaying
from maskdp.engines.ghost.rules import FIX, LayerRule
from maskdp.errors import UnsupportedModelError

__all__ = ["FIX", "Call", "Capture", "Layer", "analyse_graph", "batch_dims_of", "read_call"]


@dataclass(frozen=True)
class Layer:
    """A module owning trainable parameters, its rule, and local -> model parameter names."""

    path: str
    module: nn.Module
    rule: LayerRule
    names: dict[str, str]
    params: dict[str, nn.Parameter]

    @property
    def label(self) -> str:
        return f"{self.path or '<root>'} ({type(self.module).__name__})"

    @property
    def dtype(self) -> torch.dtype:
        """The dtype of the layer's parameters: norms and sums are computed in it."""
        return next(iter(self.params.values())).dtype


@dataclass
class Call:
    """One call of a layer in one pass: detached inputs, output edge, and later ``G``."""

    inputs: tuple[Tensor, ...]
    versions: tuple[int, ...]
    edge: GradientEdge | None
    input_nodes: tuple[Node, ...]
    output: tuple[tuple[int, ...], Any, Any]  # shape, dtype, device of the output
    grad: Tensor | None = None
    replay: Replay | None = None  # the call's structure, for rules that replay it
    result: Tensor | None = None  # its (first) output, detached, for rules that replay it


def read_call(
    layer: Layer, module: nn.Module, args: tuple, kwargs: dict, output: Any
) -> tuple[Replay | None, tuple[Tensor, ...], Any, list[Tensor]]:
    """One call of a layer as its rule sees it: the replay (rules that replay the call, else
    None), the tensor inputs, the output (a replayed module's first tensor) and the other
    tensors a replayed module returned."""
    if not layer.rule.replays:
        tensors = tuple(t for t in (*args, *kwargs.values()) if isinstance(t, Tensor))
        return None, tensors, output, []
    replay, tensors = Replay.of_call(module, args, kwargs, layer.label)
    first, others = first_tensor(output)
    return replay, tensors, first, others


def batch_dims_of(replay: Replay | None, inputs: int) -> tuple[tuple[int | None, ...], int]:
    """Batch dimension of each of ``inputs`` captured tensors and of the output: 0 unless the
    call's replay declares others."""
    if replay is not None:
        return replay.in_dims, replay.out_dim
    return tuple(0 for _ in range(inputs)), 0


@dataclass
class Capture:
    """Forward hooks recording each layer's calls; ``on_ready(index)`` fires in the backward
    once every recorded pass of layer ``index`` has its output gradient."""

    layers: list[Layer]
    on_ready: Callable[[int], None]
    current: str = "full"
    calls: list[dict[str, Call]] = field(default_factory=list)
    handles: list[Any] = field(default_factory=list)

    def __enter__(self) -> Capture:
        self.calls = [{} for _ in self.layers]
        for index, layer in enumerate(self.layers):
            hook = partial(self._forward_hook, index)
            self.handles.append(layer.module.register_forward_hook(hook, with_kwargs=True))
        return self

    def __exit__(self, *exc: object) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles.clear()

    def _forward_hook(
        self, index: int, module: nn.Module, args: tuple, kwargs: dict, output: Any
    ) -> None:
        if is_replaying():  # a per-module rule calling the module again: not a pass
            return
        layer, calls = self.layers[index], self.calls[index]
        if self.current in calls:
            raise UnsupportedModelError(
                f"{layer.label} is called more than once per forward pass (weight sharing "
                f"or reuse); the ghost engine needs one call per module; {FIX}"
            )
        replay, tensors, output, others = read_call(layer, module, args, kwargs, output)
        for other in others:
            if other.requires_grad:
                other.register_hook(partial(self._unused_output, layer))
        inputs = tuple(t.detach() for t in tensors)
        expected = layer.rule.inputs
        if expected is not None and len(tensors) != expected:
            raise UnsupportedModelError(
                f"{layer.label} was called with {len(tensors)} tensor inputs, its ghost rule "
                f"expects {expected}; {FIX}"
            )
        if not isinstance(output, Tensor):
            raise UnsupportedModelError(
                f"{layer.label} returned {type(output).__name__}, the ghost engine needs a "
                f"tensor output; {FIX}"
            )
        edge = None
        if output.requires_grad:
            edge = get_gradient_edge(output)
            output.register_hook(partial(self._grad_hook, index, self.current))
        calls[self.current] = Call(
            inputs=inputs,
            versions=tuple(t._version for t in inputs),
            edge=edge,
            input_nodes=tuple(get_gradient_edge(t).node for t in tensors if t.requires_grad),
            output=(tuple(output.shape), output.dtype, output.device),
            replay=replay,
            result=output.detach() if replay is not None else None,
        )

    @staticmethod
    def _unused_output(layer: Layer, grad: Tensor) -> None:
        raise UnsupportedModelError(
            f"{layer.label}: the loss uses an output other than its first (e.g. attention "
            f"weights); the per-module rule differentiates the first output only; {FIX}"
        )

    def _grad_hook(self, index: int, name: str, grad: Tensor) -> None:
        calls = self.calls[index]
        calls[name].grad = grad
        if all(call.grad is not None for call in calls.values()):
            self.on_ready(index)

    def check_versions(self) -> None:
        """Refuse a captured input that the forward modified in place after the layer ran."""
        for layer, calls in zip(self.layers, self.calls, strict=True):
            for call in calls.values():
                if any(t._version != v for t, v in zip(call.inputs, call.versions, strict=True)):
                    raise UnsupportedModelError(
                        f"{layer.label}: its input was modified in place after the layer used "
                        f"it (e.g. `x.mul_(...)` or an in-place activation on it); make that "
                        f"operation out of place or {FIX}"
                    )


def analyse_graph(
    root: Node, layers: list[Layer], calls: list[dict[str, Call]]
) -> list[GradientEdge]:
    """Check parameter uses (see module docstring) and return the entry layers' edges.

    Raises :class:`UnsupportedModelError` when a parameter is consumed by a node outside
    every call of its owner module (e.g. a tied weight used as ``x @ embed.weight.T``).
    """
    owner: dict[int, int] = {}
    accumulate = None
    for index, layer in enumerate(layers):
        for param in layer.params.values():
            owner[id(param)] = index
            accumulate = accumulate or type(get_gradient_edge(param).node)
    outputs: set[Node] = {
        call.edge.node for layer_calls in calls for call in layer_calls.values() if call.edge
    }
    consumers: dict[int, set[Node]] = {}
    # reaches[node]: node is, or leads (through next_functions) to, a layer's output node.
    reaches: dict[Node, bool] = {}
    stack: list[tuple[Node, bool]] = [(root, False)]
    while stack:
        node, expanded = stack.pop()
        if expanded:
            reaches[node] = node in outputs or any(
                reaches.get(nxt, False) for nxt, _ in node.next_functions if nxt is not None
            )
            continue
        if node in reaches:
            continue
        reaches[node] = False  # visiting; finalised when expanded
        stack.append((node, True))
        for nxt, _ in node.next_functions:
            if nxt is None:
                continue
            if type(nxt) is accumulate and id(nxt.variable) in owner:
                consumers.setdefault(owner[id(nxt.variable)], set()).add(node)
            if nxt not in reaches:
                stack.append((nxt, False))
    _check_owned(layers, calls, consumers)
    for layer, layer_calls in zip(layers, calls, strict=True):
        for call in layer_calls.values() if layer.rule.replays else ():
            _check_sealed(layer, call, reaches)
    entries = []
    for layer_calls in calls:
        for call in layer_calls.values():
            node = call.edge.node if call.edge is not None else None
            if node is not None and not any(
                reaches.get(nxt, False) for nxt, _ in node.next_functions if nxt is not None
            ):
                entries.append(call.edge)
    return entries


def _check_owned(
    layers: list[Layer], calls: list[dict[str, Call]], consumers: dict[int, set[Node]]
) -> None:
    """Refuse a parameter consumed outside every call of its owner module."""
    for index, used_by in consumers.items():
        inside: set[Node] = set()
        for call in calls[index].values():
            if call.edge is not None:
                inside |= _region(call.edge.node, set(call.input_nodes))
        if not used_by <= inside:
            raise UnsupportedModelError(
                f"{layers[index].label}: a parameter of this module is also used outside its "
                f"forward (e.g. a tied weight used as `x @ module.weight.T`); {FIX}"
            )


def _check_sealed(layer: Layer, call: Call, nodes: dict[Node, bool]) -> None:
    """Refuse a replayed module whose insides reach the loss other than through its output.

    The per-module rule differentiates the module's output alone; an intermediate kept on
    ``self`` and used by a parent (attention maps for an auxiliary loss, a cache) would
    carry gradient to its parameters that the replay never sees.
    """
    if call.edge is None:
        return
    output = call.edge.node
    region = _region(output, set(call.input_nodes))
    for node in nodes:
        if node in region:
            continue
        for nxt, _ in node.next_functions:
            if nxt is not None and nxt is not output and nxt in region:
                raise UnsupportedModelError(
                    f"{layer.label}: the loss depends on values computed inside it other "
                    f"than through its (first) output, e.g. an intermediate kept on the "
                    f"module and used by a parent; the per-module rule differentiates its "
                    f"output alone; {FIX}"
                )


def _region(start: Node, stops: set[Node]) -> set[Node]:
    """Nodes reachable from ``start`` without passing through ``stops``."""
    region, stack = {start}, [start]
    while stack:
        for nxt, _ in stack.pop().next_functions:
            if nxt is not None and nxt not in region and nxt not in stops:
                region.add(nxt)
                stack.append(nxt)
    return region
