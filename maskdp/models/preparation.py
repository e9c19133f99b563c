"""Make an off-the-shelf model safe and engine-friendly for MaskDP: ``prepare(model)``.

BatchNorm mixes samples through batch statistics and stores data in its running statistics
without noise, so MaskDP refuses it (:mod:`maskdp.engines.validate`). ``prepare`` returns a deep copy
of the model in which

- every ``BatchNorm{1,2,3}d`` (any ``_BatchNorm``, SyncBatchNorm included) becomes a
  ``GroupNorm`` over the same channels, with the largest group count <= 32 dividing the
  channels (or ``groups``), the same ``eps`` and, when BatchNorm is affine, its affine
  parameters initialised to BatchNorm's ``weight`` and ``bias``;
- every ``InstanceNorm`` with ``track_running_stats=True`` becomes one without running
  statistics (same affine parameters);
- every activation or dropout built with ``inplace=True`` is switched to out-of-place:
  Opacus's backward hooks (the ``hooks`` engine) refuse a module output modified in place.

The user's model is left untouched. GroupNorm normalises each sample on its own, so a model
pretrained with BatchNorm changes function and needs fine-tuning: ``prepare`` is a
structural fix, not a conversion of the pretrained statistics.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from maskdp.checks import check_count
from maskdp.errors import InvalidInputError

MAX_GROUPS = 32


@dataclass(frozen=True)
class PrepareReport:
    """The prepared model (a new module) and one human-readable line per change.

    Unpacks as ``model, changes = prepare(model)``.
    """

    model: nn.Module
    changes: tuple[str, ...]

    def __iter__(self) -> Iterator[object]:
        yield self.model
        yield list(self.changes)


def group_count(channels: int, groups: int | None = None) -> int:
    """The GroupNorm group count for ``channels``: ``groups`` if given, else the largest
    divisor of ``channels`` that is at most 32."""
    if groups is not None:
        check_count("groups", groups, 1)
        if channels % groups:
            raise InvalidInputError(
                f"groups={groups} does not divide {channels} channels; pass groups=None to "
                f"use the largest divisor <= {MAX_GROUPS}"
            )
        return groups
    return max(g for g in range(1, min(MAX_GROUPS, channels) + 1) if channels % g == 0)


def _group_norm(bn: _BatchNorm, groups: int | None) -> nn.GroupNorm:
    channels = bn.num_features
    ref = bn.weight if bn.weight is not None else bn.running_mean
    factory = {} if ref is None else {"device": ref.device, "dtype": ref.dtype}
    gn = nn.GroupNorm(
        group_count(channels, groups), channels, eps=bn.eps, affine=bn.affine, **factory
    )
    if bn.affine:
        gn.weight.data.copy_(bn.weight.data)
        gn.bias.data.copy_(bn.bias.data)
        gn.weight.requires_grad_(bn.weight.requires_grad)
        gn.bias.requires_grad_(bn.bias.requires_grad)
    gn.train(bn.training)
    return gn


def _instance_norm(norm: _InstanceNorm) -> _InstanceNorm:
    fresh = copy.deepcopy(norm)
    fresh.track_running_stats = False
    for buffer in ("running_mean", "running_var", "num_batches_tracked"):
        if buffer in fresh._buffers:
            del fresh._buffers[buffer]
        setattr(fresh, buffer, None)
    return fresh


def _replacement(module: nn.Module, groups: int | None) -> nn.Module | None:
    if isinstance(module, _BatchNorm):
        return _group_norm(module, groups)
    if isinstance(module, _InstanceNorm) and module.track_running_stats:
        return _instance_norm(module)
    return None


def prepare(model: nn.Module, *, groups: int | None = None) -> PrepareReport:
    """A deep copy of ``model`` without BatchNorm or in-place activations, and the changes.

    ``groups`` fixes the GroupNorm group count (it must divide every replaced layer's
    channels); by default each layer gets the largest divisor of its channels <= 32. A model
    with nothing to change is returned as an unchanged copy with an empty change list.
    """
    if not isinstance(model, nn.Module):
        raise InvalidInputError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if groups is not None:
        group_count(groups, groups)  # validates the type and sign once, up front
    prepared = copy.deepcopy(model)
    changes: list[str] = []
    replaced: dict[int, nn.Module] = {}  # shared modules stay shared
    root_name = type(model).__name__
    for path, module in list(prepared.named_modules(remove_duplicate=False)):
        new = replaced.get(id(module))
        if new is None:
            new = _replacement(module, groups)
            if new is None:
                continue
            replaced[id(module)] = new
            changes.append(f"{path or root_name}: {module!r} -> {new!r}")
        if not path:
            prepared = new
            continue
        parent_path, _, child = path.rpartition(".")
        setattr(prepared.get_submodule(parent_path), child, new)
    for path, module in prepared.named_modules():
        if getattr(module, "inplace", False) is True:
            before = repr(module)
            module.inplace = False
            after = repr(module)
            if "\n" in before:  # a container (pytorchvideo's MultiPathWayWithFuse): no repr
                before, after = (f"{type(module).__name__}(inplace={v})" for v in (True, False))
            changes.append(f"{path or root_name}: {before} -> {after}")
    return PrepareReport(model=prepared, changes=tuple(changes))
