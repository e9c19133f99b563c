r"""The ghost rule registry: which :class:`~maskdp.engines.ghost.rules.LayerRule` each
module type gets.

Rules are registered in :data:`RULES`, keyed by module type; :func:`rule_for` also accepts
subclasses that keep the base class's forward, and falls back to Opacus's grad samplers.

To add a layer rule: write it in the module of its family (:mod:`.linear` for layers
whose per-sample weight gradient is :math:`G^\top A` over rows, via
:class:`~maskdp.engines.ghost.linear.LinearForm`; :mod:`.conv`, :mod:`.norm`,
:mod:`.embedding`), or in a new module for a new family, following the contract of
:mod:`maskdp.engines.ghost.rules`; then add its module type to :data:`RULES` here.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import Tensor, nn

from maskdp.engines.ghost.conv import CONV_RULE
from maskdp.engines.ghost.embedding import EMBEDDING_RULE, POSITIONAL_RULE
from maskdp.engines.ghost.linear import LINEAR_RULE
from maskdp.engines.ghost.norm import GROUP_NORM_RULE, LAYER_NORM_RULE, RMS_NORM_RULE
from maskdp.engines.ghost.rules import LayerRule, Pass
from maskdp.models.vit import PositionalEmbedding

# ------------------------------------------------------------------- opacus fallback


def opacus_samplers() -> dict[type, Callable]:
    """Opacus's per-sample gradient functions by module type (imported lazily: ~5 s)."""
    try:
        from opacus.grad_sample import GradSampleModule
    except ImportError:  # pragma: no cover - opacus is a dependency
        return {}
    return dict(GradSampleModule.GRAD_SAMPLERS)


def _opacus_rule(sampler: Callable) -> LayerRule:
    """A rule materialising per-sample gradients with an Opacus grad sampler."""

    def per_sample(module: nn.Module, pass_: Pass, names: frozenset[str]) -> dict[str, Tensor]:
        params = dict(module.named_parameters(recurse=False))
        grads = sampler(module, list(pass_.inputs), pass_.grad)
        return {k: grads[params[k]] for k in names}

    # Any parameter names and inputs: Opacus's sampler decides what it handles.
    return LayerRule(per_sample, None, inputs=None)


RULES: dict[type[nn.Module], LayerRule] = {
    nn.Linear: LINEAR_RULE,
    nn.Conv1d: CONV_RULE,
    nn.Conv2d: CONV_RULE,
    nn.Conv3d: CONV_RULE,
    nn.LayerNorm: LAYER_NORM_RULE,
    nn.GroupNorm: GROUP_NORM_RULE,
    nn.Embedding: EMBEDDING_RULE,
    PositionalEmbedding: POSITIONAL_RULE,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = RMS_NORM_RULE

#: Methods a subclass must not override to inherit its base class's rule.
_FORWARD_METHODS = ("forward", "_conv_forward")


def _inherits_forward(module_type: type, base: type) -> bool:
    return all(
        getattr(module_type, name, None) is getattr(base, name, None) for name in _FORWARD_METHODS
    )


def _lookup(module_type: type, table: dict[type, Any]) -> tuple[type, Any] | None:
    for base in module_type.__mro__:
        if base in table:
            return base, table[base]
    return None


def rule_for(module_type: type) -> LayerRule | None:
    """The rule for a module type: its own, or a base class's when the subclass keeps the
    base's forward (e.g. torchvision's ``Conv3DSimple``); else Opacus's grad sampler, if any
    (Opacus is imported only then)."""
    found = _lookup(module_type, RULES)
    if found is not None:
        base, rule = found
        return rule if _inherits_forward(module_type, base) else None
    found = _lookup(module_type, opacus_samplers())
    if found is not None and _inherits_forward(module_type, found[0]):
        return _opacus_rule(found[1])
    return None
