"""Refuse models whose layers would break the MaskDP guarantee.

A layer that mixes samples (BatchNorm's batch statistics) or keeps running statistics of the
data in buffers (BatchNorm, InstanceNorm with ``track_running_stats``) releases information
about sensitive content without clipping or noise. Such models are refused with one message
per offending module: its path, the reason and the fix (Opacus ``validators/`` style).

Beyond the known sample-mixing layers, a model is *probed* by its behaviour
(:mod:`maskdp.engines.probe`): state that changes in a forward pass and randomness that cannot be
replayed are refused there.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from maskdp.errors import UnsafeModelError


def model_problems(model: nn.Module) -> list[str]:
    """One line per module that would break the guarantee (empty when the model is safe)."""
    problems = []
    for path, module in model.named_modules():
        name = path or type(model).__name__
        if isinstance(module, _BatchNorm):
            problems.append(
                f"{name} ({type(module).__name__}): batch statistics mix samples and its running "
                "statistics store data without noise; replace it with nn.GroupNorm "
                "(maskdp.models.prepare(model) does this)"
            )
        elif isinstance(module, _InstanceNorm) and module.track_running_stats:
            problems.append(
                f"{name} ({type(module).__name__}): running statistics store data without noise; "
                "build it with track_running_stats=False"
            )
    return problems


def validate_model(model: nn.Module) -> None:
    """Raise :class:`UnsafeModelError` listing every module that would break the guarantee."""
    if not isinstance(model, nn.Module):
        raise UnsafeModelError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    problems = model_problems(model)
    if problems:
        raise UnsafeModelError("model is not safe for MaskDP: " + "; ".join(problems))
    if not any(p.requires_grad for p in model.parameters()):
        raise UnsafeModelError("model has no trainable parameters")
