r"""The per-module rule: per-sample gradients of a module's own parameters by ``torch.func``.

A module may own trainable parameters that no layer rule covers: a raw ``nn.Parameter``
used in its forward (a cls token concatenated, a positional table added, a relative-position
bias table gathered by index) or ``nn.MultiheadAttention``'s packed input projection. The
part of :math:`\Delta_i` on those parameters :math:`\theta` is, for each pass, the
vector-Jacobian product of the module's forward as a function of :math:`\theta` alone, at
the record's captured inputs :math:`a_i`, with the record's output gradient :math:`G_i`:

.. math:: S_i = \Big(\frac{\partial M_\theta(a_i)}{\partial \theta}\Big)^\top G_i .

This is exact: the module's inputs do not depend on its own parameters, its children keep
their own rules (their parameters are constants here), and records never mix
(:func:`maskdp.engines.validate.validate_model`), so :math:`G_i` is the gradient of record
:math:`i`'s loss alone. All records are done at once by ``vmap(vjp)`` over the captured
call, each record's inputs given a batch dimension of one, so the module's own code runs
unchanged (the ``torch.func`` per-sample-gradient recipe, on this module only).

Cost: one more forward and backward of this module, mapped over the batch; of the module,
not of the model. So the rule is for modules below the model's root: raw parameters in the
root's own forward would replay the whole model, which is the ``vmap`` engine's job.

The two premises, records that never mix and the batch in the declared dimension, are
properties of the model that no list of classes certifies: the engine probes them for every
layer before the first step (:mod:`maskdp.engines.ghost.independence`).

Refused at the first step, naming the module: a forward that draws random numbers (the
replay would not see the original draws; ``vmap``'s ``randomness="error"``), one that
``vmap`` cannot map (data-dependent control flow), a loss that uses any output but the
first (only the first is differentiated), and gradient reaching the module's insides other
than through that output (an intermediate kept on ``self`` and used by a parent;
:func:`maskdp.engines.ghost.capture.analyse_graph`).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.func import functional_call, vjp, vmap
from torch.utils._pytree import tree_flatten, tree_unflatten

from maskdp.engines.ghost.rules import FIX, LayerRule, Pass
from maskdp.engines.vmap import _FALLBACK_WARNING
from maskdp.errors import UnsupportedModelError

#: Batch dimension of each tensor input (``None``: shared by the batch) and of the output.
BatchDims = tuple[tuple[int | None, ...], int]


@dataclass(frozen=True)
class Replay:
    """How to call the module again: the call's argument tree with its tensor leaves taken
    out (``slots`` marks them), their batch dimensions and the output's."""

    spec: Any
    leaves: tuple[Any, ...]
    slots: tuple[bool, ...]
    in_dims: tuple[int | None, ...]
    out_dim: int
    label: str  # the module's path and type, for messages

    @classmethod
    def of_call(
        cls, module: nn.Module, args: tuple, kwargs: dict, label: str
    ) -> tuple[Replay, tuple[Tensor, ...]]:
        """The replay of one call and its tensor inputs, in order."""
        leaves, spec = tree_flatten((args, kwargs))
        slots = tuple(isinstance(x, Tensor) for x in leaves)
        tensors = tuple(x for x, s in zip(leaves, slots, strict=True) if s)
        in_dims, out_dim = batch_dims(module, args, kwargs, label)
        if len(in_dims) != len(tensors):  # pragma: no cover - batch_dims covers every tensor
            raise RuntimeError(f"{label}: {len(in_dims)} batch dims for {len(tensors)} inputs")
        kept = tuple(None if s else x for x, s in zip(leaves, slots, strict=True))
        return cls(spec, kept, slots, in_dims, out_dim, label), tensors

    def call(self, module: nn.Module, params: dict[str, Tensor], tensors: tuple) -> Any:
        """The module's forward with ``params`` in place of its own parameters."""
        it = iter(tensors)
        leaves = [next(it) if s else x for x, s in zip(self.leaves, self.slots, strict=True)]
        args, kwargs = tree_unflatten(leaves, self.spec)
        return functional_call(module, params, tuple(args), dict(kwargs))


def first_tensor(output: Any) -> tuple[Tensor | None, list[Tensor]]:
    """The module's primary output (its first tensor) and every other tensor it returned."""
    tensors = [x for x in tree_flatten(output)[0] if isinstance(x, Tensor)]
    return (tensors[0] if tensors else None), tensors[1:]


def batch_dims(module: nn.Module, args: tuple, kwargs: dict, label: str) -> BatchDims:
    """Batch dimension of each tensor input and of the output: 0 for everything, except
    ``nn.MultiheadAttention`` (sequence first unless ``batch_first``; a 2-D ``attn_mask``
    is shared by the batch)."""
    tensors = [x for x in tree_flatten((args, kwargs))[0] if isinstance(x, Tensor)]
    if not isinstance(module, nn.MultiheadAttention):
        return tuple(0 for _ in tensors), 0
    return _attention_dims(module, args, kwargs, label)


_MHA_ARGS = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask")


def _attention_dims(
    module: nn.MultiheadAttention, args: tuple, kwargs: dict, label: str
) -> BatchDims:
    seq_dim = 0 if module.batch_first else 1
    named = {**dict(zip(_MHA_ARGS, args, strict=False)), **kwargs}
    dims: list[int | None] = []
    for name, value in named.items():
        if not isinstance(value, Tensor):
            continue
        if name in ("query", "key", "value"):
            if value.dim() != 3:
                raise UnsupportedModelError(
                    f"{label}: unbatched attention input ({value.dim()}-D {name}); pass "
                    f"(batch, sequence, features) tensors or {FIX}"
                )
            dims.append(seq_dim)
        elif name == "key_padding_mask":
            dims.append(0)
        elif name == "attn_mask" and value.dim() == 2:
            dims.append(None)
        else:
            raise UnsupportedModelError(
                f"{label}: a {value.dim()}-D {name} mixes the batch with the heads; the "
                f"per-module rule needs a 2-D attn_mask (shared) or none; {FIX}"
            )
    return tuple(dims), seq_dim


def _per_sample(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    replay = pass_.replay
    if replay is None:  # pragma: no cover - the capture records it for this rule
        raise RuntimeError("the per-module rule needs the captured call")
    dtype = pass_.grad.dtype
    params = {k: p.detach().to(dtype) for k, p in module.named_parameters() if k in names}

    def one(tensors: tuple[Tensor, ...], grad: Tensor) -> tuple[dict[str, Tensor], Tensor]:
        batched = tuple(
            t if d is None else t.unsqueeze(d) for t, d in zip(tensors, replay.in_dims, strict=True)
        )

        def forward(p: dict[str, Tensor]) -> Tensor:
            out, _ = first_tensor(replay.call(module, p, batched))
            return out.squeeze(replay.out_dim)

        out, pull = vjp(forward, params)
        return pull(grad)[0], out

    mapped: Callable = vmap(
        one, in_dims=(replay.in_dims, replay.out_dim), out_dims=(0, replay.out_dim),
        randomness="error",
    )  # fmt: skip
    try:
        with replaying(), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_FALLBACK_WARNING)
            grads, outputs = mapped(pass_.inputs, pass_.grad)
    except RuntimeError as err:
        raise UnsupportedModelError(_explain(replay.label, err)) from err
    if pass_.result is not None:
        start, recorded = pass_.result
        public = outputs.narrow(replay.out_dim, start, recorded.shape[replay.out_dim])
        check_reproduced(replay.label, public, recorded)
    return grads


def check_reproduced(label: str, replayed: Tensor, original: Tensor) -> None:
    """Refuse a module whose per-sample replay does not give its batched output back.

    The replay differentiates each record's output computed from that record alone, which
    is its gradient only if records never mix and the batch dimensions are the right ones
    (a sequence-first module read as batch-first fails here). Only rows of public content
    are compared, so whether this raises never depends on sensitive content; a structural
    fault shows on them as on any other row. Tolerance: the rounding of batched against
    per-sample kernels, wider for a forward run in 16-bit (autocast).
    """
    rtol = 1e-3 if original.dtype.itemsize >= 4 else 5e-2
    original = original.to(replayed.dtype)
    scale = float(original.abs().max()) if original.numel() else 0.0
    if replayed.shape != original.shape or not torch.allclose(
        replayed, original, rtol=rtol, atol=rtol * scale, equal_nan=True
    ):
        raise UnsupportedModelError(
            f"{label}: replayed one record at a time it does not give its "
            "output back (it mixes records, or its batch is not dimension 0 of its inputs "
            f"and output); {FIX}"
        )


def _explain(what: str, err: Exception) -> str:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    if "random" in first.lower():
        return (
            f"{what}: its forward draws random numbers (dropout), which the per-module rule "
            f"cannot replay; set its dropout to 0 or {FIX}"
        )
    return f"{what}: torch.func could not replay its forward per sample ({first}); {FIX}"


# ----------------------------------------------------------------------- replay flag

_STATE = {"replaying": 0}


class replaying:  # noqa: N801 - a context manager used like a function
    """While set, the ghost capture ignores forward calls (they are this rule's replays)."""

    def __enter__(self) -> None:
        _STATE["replaying"] += 1

    def __exit__(self, *exc: object) -> None:
        _STATE["replaying"] -= 1


def is_replaying() -> bool:
    return _STATE["replaying"] > 0


PER_MODULE_RULE = LayerRule(_per_sample, None, inputs=None, replays=True)
"""The rule of a non-root module owning parameters that no layer rule covers."""
