r"""Per-layer reduction of the ghost engine, inside the backward, for both schedules.

:class:`Reducer` is the capture's callback: as soon as a layer's output gradients ``G``
arrive it turns ``(A, G)`` into per-sample squared norms (and certified rounding slack)
and what the clipped sum :math:`\sum_i c_i \Delta_i` needs, by the layer's rule
(:func:`~maskdp.engines.ghost.rules.layer_result`). *Stacked*: one ``2n`` pass per layer.
*Sequential*: the full pass first, then the public pass completes each layer.
:class:`Workspace` keeps the buffers of per-sample gradients from one call to the next.
"""

from __future__ import annotations

import torch
from torch import Tensor

from maskdp.engines.base import MaskedBatch, accumulation_dtype
from maskdp.engines.ghost.capture import FIX, Call, Capture, Layer, batch_dims_of
from maskdp.engines.ghost.rules import (
    LayerResult,
    Mode,
    Pair,
    Pass,
    combine,
    layer_result,
    uses_ghost,
)
from maskdp.errors import UnsupportedModelError

#: Names of the recorded passes: the full view, the public view, or both as one call.
FULL, PUBLIC, STACKED = "full", "public", "stacked"


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


class Reducer:
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
        layer, calls = self.layers[index], self._calls()[index]
        # Full precision whatever the forward ran in: the norms bound the released sums.
        with torch.no_grad(), torch.autocast(self.device.type, enabled=False):
            if STACKED in calls:
                self._stacked(index, layer, calls[STACKED])
            elif PUBLIC in calls:
                self._second(index, layer, calls)
            else:
                self._first(index, layer, calls)

    def _calls(self) -> list[dict[str, Call]]:
        """The capture's calls per layer; the capture must be attached before any pass."""
        if self.capture is None:
            raise RuntimeError("the ghost reducer ran before its capture was attached")
        return self.capture.calls

    def _result(self, layer: Layer, pair: Pair, mode: Mode) -> LayerResult:
        return layer_result(layer.rule, layer.module, pair, frozenset(layer.names), mode)

    def _stacked(self, index: int, layer: Layer, call: Call) -> None:
        if call.replay is not None:  # pragma: no cover - GhostEngine never stacks them
            raise RuntimeError(f"{layer.label}: a replayed layer must run sequentially")
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
        public = self._pass(layer, calls[PUBLIC], self.n, public_from=0)
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
        self._calls()[index] = {}
        self.sq_norms += result.sq_norms
        if result.sq_slack is not None:
            self.sq_slack += result.sq_slack
        if result.slack is not None:
            self.slack += result.slack
        self.results[index] = result

    def flush(self, name: str) -> None:
        """After a pass's backward: layers whose output never reached the loss get ``G = 0``."""
        for index, calls in enumerate(self._calls()):
            call = calls.get(name)
            if call is not None and call.grad is None:
                shape, dtype, device = call.output
                call.grad = torch.zeros(shape, dtype=dtype, device=device)
                if all(c.grad is not None for c in calls.values()):
                    self(index)

    def check_complete(self) -> None:
        """Every layer that ran in the full pass must have run in the public pass too."""
        for index, calls in enumerate(self._calls()):
            if index in self.partial or calls:
                raise self._one_pass(self.layers[index])

    @staticmethod
    def _one_pass(layer: Layer) -> UnsupportedModelError:
        return UnsupportedModelError(
            f"{layer.label} ran in only one of the two passes; the ghost engine needs the "
            f"same layers in the full and public passes; {FIX}"
        )

    def _pass(self, layer: Layer, call: Call, size: int, public_from: int | None = None) -> Pass:
        """The call as a :class:`Pass`; low-precision activations (autocast) are upcast to
        the parameters' dtype promoted to float32, so that norms and sums are computed in
        float32 or wider whatever the model's dtype. ``public_from``: the first row of
        public content, whose recorded output a replaying rule checks itself against
        (:func:`~maskdp.engines.ghost.functional.check_reproduced`); None for the full pass,
        whose output is never compared (nothing may raise on sensitive content)."""
        if call.grad is None:
            raise RuntimeError(f"{layer.label}: reduced before its output gradient arrived")
        in_dims, out_dim = batch_dims_of(call.replay, len(call.inputs))
        for t, d in zip((*call.inputs, call.grad), (*in_dims, out_dim), strict=True):
            if d is not None and (t.dim() <= d or t.shape[d] != size):
                raise UnsupportedModelError(
                    f"{layer.label}: expected tensors with {size} samples in dimension {d}, "
                    f"got shape {tuple(t.shape)}; {FIX}"
                )
        dtype = accumulation_dtype(layer.dtype)
        inputs = tuple(
            t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t for t in call.inputs
        )
        grad = call.grad if call.grad.dtype == dtype else call.grad.to(dtype)
        node = call.edge.node if call.edge is not None else None
        result = None
        if public_from is not None and call.result is not None:
            result = (public_from, call.result.narrow(out_dim, public_from, size - public_from))
        return Pass(inputs, grad, node, self.workspace, call.replay, result)
