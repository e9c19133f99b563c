r"""Normalisation layers: ``nn.LayerNorm``, ``nn.GroupNorm``, ``nn.RMSNorm``.

Their per-sample gradients are cheap (one value per channel): the weight gradient is
:math:`\sum G \odot \hat x` over a sample's rows and the bias gradient :math:`\sum G`, so
they are always instantiated. :math:`\hat x` reuses the statistics autograd saved in the
forward when it can.
"""

from __future__ import annotations

from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from maskdp.engines.ghost.rules import LayerRule, Pass, sum_rows


def _saved(node: Any, kind: str, names: tuple[str, ...]) -> tuple[Tensor, ...] | None:
    """Statistics autograd saved for the forward's normalisation node, if still there.

    Reusing them avoids recomputing a mean and variance per row; any surprise (another
    node type, freed buffers) falls back to recomputation.
    """
    if node is None or type(node).__name__ != kind:
        return None
    try:
        return tuple(getattr(node, name) for name in names)
    except (AttributeError, RuntimeError):
        return None


def _layer_norm_hat(module: nn.Module, pass_: Pass, shape: tuple[int, ...]) -> Tensor:
    r""":math:`\hat x = (x - \mu) / \sqrt{\sigma^2 + \epsilon}` per row."""
    x = pass_.inputs[0]
    saved = _saved(pass_.node, "NativeLayerNormBackward0", ("_saved_result1", "_saved_result2"))
    stats_shape = tuple(x.shape[: x.dim() - len(shape)]) + (1,) * len(shape)
    if saved is not None and all(tuple(t.shape) == stats_shape for t in saved):
        mean, rstd = saved
        return (x - mean) * rstd
    return F.layer_norm(x, shape, eps=module.eps)


def _group_norm_hat(module: nn.Module, pass_: Pass) -> Tensor:
    r""":math:`\hat x` of GroupNorm: normalised per sample and group."""
    x, groups = pass_.inputs[0], module.num_groups
    saved = _saved(pass_.node, "NativeGroupNormBackward0", ("_saved_result1", "_saved_result2"))
    if saved is not None and all(tuple(t.shape) == (x.shape[0], groups) for t in saved):
        mean, rstd = (t.view(x.shape[0], groups, 1) for t in saved)
        return ((x.reshape(x.shape[0], groups, -1) - mean) * rstd).view_as(x)
    return F.group_norm(x, groups, eps=module.eps)


def _layer_norm(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r"""``nn.LayerNorm``: weight grad :math:`\sum_{rows} G \odot \hat x`, bias :math:`\sum G`."""
    shape, g = tuple(module.normalized_shape), pass_.grad
    out = {}
    if "weight" in names:
        out["weight"] = sum_rows(g * _layer_norm_hat(module, pass_, shape), shape)
    if "bias" in names:
        out["bias"] = sum_rows(g, shape)
    return out


def _rms_norm(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r"""``nn.RMSNorm``: weight grad :math:`\sum_{rows} G \odot x / \mathrm{rms}(x)`."""
    shape = tuple(module.normalized_shape)
    x_hat = F.rms_norm(pass_.inputs[0], shape, eps=module.eps)
    return {"weight": sum_rows(pass_.grad * x_hat, shape)}


def _group_norm(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
    r"""``nn.GroupNorm``: weight grad :math:`\sum_{positions} G \odot \hat x` per channel."""
    g, n, channels = pass_.grad, pass_.n, module.num_channels
    out = {}
    if "weight" in names:
        out["weight"] = (g * _group_norm_hat(module, pass_)).reshape(n, channels, -1).sum(2)
    if "bias" in names:
        out["bias"] = g.reshape(n, channels, -1).sum(2)
    return out


#: ``nn.LayerNorm``.
LAYER_NORM_RULE = LayerRule(_layer_norm, frozenset({"weight", "bias"}))
#: ``nn.GroupNorm``.
GROUP_NORM_RULE = LayerRule(_group_norm, frozenset({"weight", "bias"}))
#: ``nn.RMSNorm`` (registered where torch has it).
RMS_NORM_RULE = LayerRule(_rms_norm, frozenset({"weight"}))
