r"""Convolutions (``nn.Conv1d/2d/3d``): a linear map on unfolded patches, per group.

Per sample and group the weight gradient is :math:`G^\top A` with the patches as the rows
of ``A`` (:func:`conv_patches`), so the rule is a
:class:`~maskdp.engines.ghost.linear.LinearForm`; overlapping windows instantiate by one
grouped weight-gradient convolution instead (:func:`conv_weight_grads`).
"""

from __future__ import annotations

import math
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from maskdp.engines.ghost.linear import LinearForm, linear_form_rule


def _conv_padding(module: nn.modules.conv._ConvNd) -> list[tuple[int, int]]:
    """(left, right) padding per spatial dimension, as ``F.conv*``/``F.pad`` apply it."""
    if module.padding == "valid":
        return [(0, 0)] * len(module.kernel_size)
    if module.padding == "same":
        pads = []
        for k, dil in zip(module.kernel_size, module.dilation, strict=True):
            total = dil * (k - 1)
            pads.append((total // 2, total - total // 2))
        return pads
    return [(p, p) for p in module.padding]


def _pad(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """The input as the convolution sees it after padding (any padding mode)."""
    pads = _conv_padding(module)
    if not any(left or right for left, right in pads):
        return x
    flat = [v for pair in reversed(pads) for v in pair]
    mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
    return F.pad(x, flat, mode=mode)


def conv_patches(module: nn.modules.conv._ConvNd, x: Tensor) -> Tensor:
    """Unfold ``x`` (n, C, *spatial) into patches (n, L, C * prod(kernel)).

    Patch entries are ordered (channel, kernel offsets), matching ``weight.view(O, -1)``. A
    tubelet embedding (stride == kernel, no padding) is a pure reshape of the input.
    """
    x = _pad(module, x)
    nd = len(module.kernel_size)
    for i, (k, s, dil) in enumerate(
        zip(module.kernel_size, module.stride, module.dilation, strict=True)
    ):
        x = x.unfold(2 + i, dil * (k - 1) + 1, s)
        if dil > 1:
            x = x[..., ::dil]
    # (n, C, *out, *kernel) -> (n, *out, C, *kernel)
    x = x.permute(0, *range(2, 2 + nd), 1, *range(2 + nd, 2 + 2 * nd))
    return x.reshape(x.shape[0], math.prod(x.shape[1 : 1 + nd]), -1)


def conv_weight_grads(module: nn.modules.conv._ConvNd, x: Tensor, g: Tensor) -> Tensor:
    """Per-sample weight gradients (n, *weight.shape) of a convolution, by one grouped
    weight-gradient convolution with the batch folded into the groups (no unfolding)."""
    n, weight = x.shape[0], module.weight
    x = _pad(module, x)
    shape = (n * weight.shape[0], *weight.shape[1:])
    stacked = weight.detach().expand(n, *weight.shape).reshape(shape)
    zeros = [0] * len(module.kernel_size)
    _, grads, _ = torch.ops.aten.convolution_backward(
        g.reshape(1, -1, *g.shape[2:]),
        x.reshape(1, -1, *x.shape[2:]),
        stacked,
        None,
        list(module.stride),
        zeros,
        list(module.dilation),
        False,
        zeros,
        n * module.groups,
        [False, True, False],
    )
    return grads.view(n, *weight.shape)


def _is_tubelet(module: nn.modules.conv._ConvNd) -> bool:
    """Non-overlapping windows without padding: patches are a reshape of the input."""
    return (
        tuple(module.stride) == tuple(module.kernel_size)
        and all(d == 1 for d in module.dilation)
        and not any(left or right for left, right in _conv_padding(module))
    )


def _conv_form(module: nn.Module) -> LinearForm:
    """``nn.Conv1d/2d/3d``: a linear map on unfolded patches, per group."""
    k, out_channels = module.groups, module.out_channels
    d = module.in_channels // k * math.prod(module.kernel_size)
    p = out_channels // k

    def rows_a(x: Tensor) -> Tensor:
        patches = conv_patches(module, x)  # (n, L, C * K)
        n, length = patches.shape[:2]
        return patches.view(n, length, k, d).transpose(1, 2).reshape(n * k, length, d)

    def rows_g(g: Tensor) -> Tensor:
        n = g.shape[0]
        return g.reshape(n, k, p, -1).transpose(2, 3).reshape(n * k, -1, p)

    return LinearForm(
        rows_a=rows_a,
        rows_g=rows_g,
        bias_of=lambda g: g.reshape(g.shape[0], out_channels, -1).sum(2),
        rows=lambda pass_: max(1, math.prod(pass_.grad.shape[2:])),
        groups=k,
        weight_shape=tuple(module.weight.shape),
        d=d,
        p=p,
        direct=None if _is_tubelet(module) else partial(conv_weight_grads, module),
    )


#: ``nn.Conv1d``, ``nn.Conv2d`` and ``nn.Conv3d``.
CONV_RULE = linear_form_rule(_conv_form)
