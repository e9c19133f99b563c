"""Refuse models whose layers would break the MaskDP guarantee.

A layer that mixes samples (BatchNorm's batch statistics) or keeps running statistics of the
data in buffers (BatchNorm, InstanceNorm with ``track_running_stats``) releases information
about sensitive content without clipping or noise. Such models are refused with one message
per offending module: its path, the reason and the fix (Opacus ``validators/`` style).

Beyond the known sample-mixing layers, a model is *probed* on its first batch
(:class:`ModelGuard`): any module whose buffers change during a forward pass is refused
(running statistics of any kind, ``torch.ao`` fake-quantisation observers, a custom
running mean), and modules that draw random numbers are found so that the engines give the
full and public passes of each record the same draws.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from maskdp.errors import UnsafeModelError
from maskdp.views import ModelInput


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


# ----------------------------------------------------------------------- behaviour probe


@dataclass(frozen=True)
class ModelBehaviour:
    """What one train-mode forward showed: modules that drew random numbers from torch's
    generator, and buffers (``path.name``) that changed."""

    training: bool
    random_modules: tuple[str, ...]
    changed_buffers: tuple[str, ...]


def _generator_state(device: torch.device) -> tuple[Tensor, ...]:
    states = [torch.get_rng_state()]
    if device.type == "cuda":
        states.append(torch.cuda.get_rng_state(device))
    return tuple(states)


def _label(model: nn.Module, path: str) -> str:
    module = model.get_submodule(path) if path else model
    return f"{path or '<root>'} ({type(module).__name__})"


def probe_model(model: nn.Module, sample: ModelInput) -> ModelBehaviour:
    """Run ``sample`` through ``model`` once, watching torch's generator and every buffer.

    Found by behaviour, not by a list of classes: a module is *random* if its own forward
    (not only a child's) advanced torch's generator; a buffer *changed* if its value or its
    tensor changed. Changed buffers are restored before returning, so the probe leaves the
    model as it found it.
    """
    device = sample.inputs.device
    before = {name: buf.detach().clone() for name, buf in model.named_buffers()}
    identity = {name: id(buf) for name, buf in model.named_buffers()}
    drew: set[str] = set()
    states: dict[int, tuple[Tensor, ...]] = {}
    handles = []
    for path, module in model.named_modules():

        def pre(mod: nn.Module, args: Any, key: int = id(module)) -> None:
            states[key] = _generator_state(device)

        def post(mod: nn.Module, args: Any, out: Any, key: int = id(module), p: str = path) -> None:
            start = states.pop(key, None)
            if start is not None and any(
                not torch.equal(a, b) for a, b in zip(start, _generator_state(device), strict=True)
            ):
                drew.add(p)

        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.enable_grad():
            sample(model)
    finally:
        for handle in handles:
            handle.remove()
    changed = []
    for name, buf in model.named_buffers():
        old = before.get(name)
        if old is None or id(buf) != identity[name] or not torch.equal(buf, old):
            changed.append(name)
    for name in changed:
        if name in before:
            owner, _, local = name.rpartition(".")
            (model.get_submodule(owner) if owner else model)._buffers[local] = before[name]
    # Report the modules whose own code drew: drop those that only contain a drawing child.
    own = sorted(p for p in drew if not any(q.startswith(f"{p}.") or (not p and q) for q in drew))
    return ModelBehaviour(
        training=model.training,
        random_modules=tuple(_label(model, p) for p in own),
        changed_buffers=tuple(changed),
    )


def refuse_changed_buffers(model: nn.Module, behaviour: ModelBehaviour) -> None:
    """Raise :class:`UnsafeModelError` naming every module whose buffers changed."""
    if not behaviour.changed_buffers:
        return
    owners: dict[str, list[str]] = {}
    for name in behaviour.changed_buffers:
        owner, _, local = name.rpartition(".")
        owners.setdefault(owner, []).append(local)
    problems = [
        f"{_label(model, owner)} changed its buffer(s) {', '.join(names)} during a forward "
        "pass: state computed from the data is kept without noise; call .eval() on that "
        "module, freeze it, or replace it by a module without running statistics"
        for owner, names in owners.items()
    ]
    raise UnsafeModelError("model is not safe for MaskDP: " + "; ".join(problems))


class ModelGuard:
    """Probes a model on its first batch (and again whenever its train/eval mode changes).

    :meth:`check` refuses changed buffers and returns whether the model draws random numbers
    (the engines must then give the full and public passes the same draws).
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.behaviour: ModelBehaviour | None = None

    def check(self, sample: ModelInput) -> bool:
        if self.behaviour is None or self.behaviour.training != self.model.training:
            probe = sample.select(slice(0, 2))
            if len(probe) == 0:
                return True  # nothing to run yet: assume the model is random (the safe side)
            self.behaviour = probe_model(self.model, probe)
        refuse_changed_buffers(self.model, self.behaviour)
        return bool(self.behaviour.random_modules)

    def refuse_unshared_randomness(self, full: ModelInput, public: ModelInput) -> None:
        """Refuse a random model when the two passes differ in shape or keyword tensors
        (a token-dropping view): they would not see the same draws."""
        if self.behaviour is None or not self.behaviour.random_modules:
            return
        same = full.inputs.shape == public.inputs.shape and not full.kwargs and not public.kwargs
        if not same:
            raise UnsafeModelError(
                f"{', '.join(self.behaviour.random_modules)} draw(s) random numbers in the "
                "forward pass, and the view changes what the model sees (dropped tokens), so "
                "the full and public passes of a record cannot share the draws and an erased "
                "record would leak; call model.eval(), set the dropout rates to 0, or use a "
                "pixel view (FillView, RandomFillView, InpaintView)"
            )
