r"""The record-independence probe of the ghost engine: rows are records, and never mix.

Every ghost rule computes record :math:`i`'s part of :math:`\Delta_i` from row :math:`i` of
its layer's inputs and output gradient (dimension 0, or the dimension a replayed module
declares, :mod:`maskdp.engines.ghost.functional`). That is right only if row :math:`i`
depends on record :math:`i` alone. No list of classes certifies it: a hand-written batch
statistic mixes records, and a sequence-first layer (``(T, B, D)``: PyTorch's default for
``nn.TransformerEncoderLayer``) passes every shape check whenever a Poisson batch happens
to hold exactly ``T`` records, and then each "record" would get the norm of one time step
of the whole batch. A wrong norm breaks the clipping bound, so it is probed.

:func:`probe_record_independence` runs the model twice, without gradient, on
:data:`PROBE_RECORDS` random clips (a fixed seed: data-independent) that differ in record 0
alone (token ids: 0, and 1 in record 0), and requires of every layer that its tensors have :data:`PROBE_RECORDS` rows in their
batch dimension and that no row but row 0 moves. torch's generator is replayed between the
two runs (dropout draws the same masks) and restored afterwards. Whether it raises depends
on the model's structure and the public structure of the batch (its shape and keyword
tensors), never on sensitive content. Its cost: two forward passes of three clips, once.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from maskdp.engines.base import RngSnapshot
from maskdp.engines.ghost.capture import Layer, batch_dims_of, read_call
from maskdp.engines.ghost.rules import FIX
from maskdp.errors import UnsupportedModelError

PROBE_RECORDS = 3
#: Rows other than the changed record's may move by this much relative to the tensor's
#: scale (run-to-run rounding of non-deterministic kernels); a record-mixing layer moves
#: them by the order of the change itself.
PROBE_RTOL = 1e-6

Seen = dict[int, tuple[tuple[Tensor, ...], tuple[int | None, ...]]]


def probe_record_independence(model: nn.Module, layers: list[Layer], model_input: Any) -> None:
    """Refuse a layer whose rows are not records (module docstring).

    ``model_input``: a :class:`~maskdp.mechanism.views.ModelInput`; only its shapes, dtype
    and keyword tensors (public structure, e.g. ``DropView``'s dropped tokens) are used.
    """
    inputs = model_input.inputs
    rows = torch.arange(PROBE_RECORDS) % len(model_input)
    kwargs = {k: v[rows.to(v.device)] for k, v in model_input.kwargs.items()}
    shape = (PROBE_RECORDS, *inputs.shape[1:])
    if inputs.is_floating_point():
        gen = torch.Generator().manual_seed(0)
        clips = torch.randn(shape, generator=gen, dtype=torch.float64).to(inputs)
        changed = clips.clone()
        changed[0] = torch.randn(shape[1:], generator=gen, dtype=torch.float64).to(inputs)
    else:  # token ids: 0 everywhere, 1 in record 0 (valid for any vocabulary of two)
        clips = torch.zeros(shape, dtype=inputs.dtype, device=inputs.device)
        changed = clips.clone()
        changed[0] = 1

    runs: list[Seen] = []
    handles = [
        layer.module.register_forward_hook(_recorder(index, layer, runs), with_kwargs=True)
        for index, layer in enumerate(layers)
    ]
    snapshot = RngSnapshot(inputs.device)
    try:
        for batch in (clips, changed):
            runs.append({})
            snapshot.restore()
            with torch.no_grad():
                model(batch, **kwargs)
    except UnsupportedModelError:
        raise
    except Exception as err:  # noqa: BLE001 - the model's own error, reported with the fix
        raise UnsupportedModelError(
            f"the ghost engine's record-independence probe could not run the model on "
            f"{PROBE_RECORDS} random clips shaped like the batch ({type(err).__name__}: "
            f"{err}); {FIX}"
        ) from err
    finally:
        snapshot.restore()
        for handle in handles:
            handle.remove()
    for index, (before, dims) in runs[0].items():
        after = runs[1].get(index)
        if after is None:
            continue
        for a, b, d in zip(before, after[0], dims, strict=True):
            if d is not None:
                _check_rows(layers[index].label, a, b, d)


def _recorder(index: int, layer: Layer, runs: list[Seen]) -> Any:
    """A forward hook recording the layer's tensors (inputs, then output) and batch dims."""

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        replay, found, output, _ = read_call(layer, module, args, kwargs, output)
        in_dims, out_dim = batch_dims_of(replay, len(found))
        if isinstance(output, Tensor):
            runs[-1][index] = (tuple(t.detach() for t in (*found, output)), (*in_dims, out_dim))

    return hook


def _check_rows(label: str, before: Tensor, after: Tensor, dim: int) -> None:
    if before.shape != after.shape or before.dim() <= dim or before.shape[dim] != PROBE_RECORDS:
        raise UnsupportedModelError(
            f"{label}: with {PROBE_RECORDS} records its tensors have shape "
            f"{tuple(before.shape)}, without the records in dimension {dim} (time folded "
            f"into the batch, or a sequence-first layer); {FIX}"
        )
    if not before.is_floating_point():
        return
    moved = (after.double() - before.double()).abs().movedim(dim, 0).flatten(1)
    scale = float(before.abs().max()) if before.numel() else 0.0
    others = float(moved[1:].max()) if moved[1:].numel() else 0.0
    if others > PROBE_RTOL * max(scale, float(moved[0].max())):
        raise UnsupportedModelError(
            f"{label}: changing one record changes other records' rows of its tensors (it "
            f"mixes records, or dimension {dim} does not hold them, e.g. a sequence-first "
            f"layer); {FIX}"
        )
