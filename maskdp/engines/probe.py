r"""The model probe: find, by behaviour, what a model does in its forward pass.

MaskDP's guarantee needs two properties of the model that no list of classes can certify:

- **No state from the data.** A forward pass must not change the model's buffers or
  parameters (running statistics, an EMA codebook, ``torch.ao`` observers): such state is
  released with the weights without clipping or noise. The probe compares every buffer's
  value and every tensor's identity, storage and version counter before and after, and
  :class:`ModelGuard` re-checks identity, storage and version counters around *every*
  engine call (cheap: no copies), so state changed only for some batches is caught too.
- **Replayable randomness.** The full and public passes of a record must see the same
  random draws (:class:`~maskdp.engines.base.RngSnapshot` restores torch's generator
  between them). The probe runs the forward twice from one generator state: a module
  whose output differs between the two runs draws randomness the engines cannot replay
  (a generator of its own) and is refused; a module that advanced torch's generator is
  *random* (the engines then keep the passes apart and replay the generator).

Probes run on the public view of (at most four records of) the first private batch, inside
the private side's own random stream (:func:`maskdp.mechanism.randomness.private_scope`), and again
whenever any module's train/eval mode changes. What they change is restored.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from maskdp.engines.base import RngSnapshot
from maskdp.errors import UnsafeModelError
from maskdp.mechanism.views import ModelInput

PROBE_RECORDS = 4


@dataclass(frozen=True)
class ModelBehaviour:
    """What the probe saw: modules that drew from torch's generator, modules whose output a
    replayed generator did not reproduce, and state (``path.name``) that changed."""

    modes: tuple[bool, ...]
    random_modules: tuple[str, ...]
    unreplayable_modules: tuple[str, ...]
    changed_state: tuple[str, ...]

    @property
    def training(self) -> bool:
        return self.modes[0]


def _label(model: nn.Module, path: str) -> str:
    module = model.get_submodule(path) if path else model
    return f"{path or '<root>'} ({type(module).__name__})"


def _innermost(paths: set[str]) -> list[str]:
    """The paths that contain no other path of the set (the modules whose own code did it)."""
    return sorted(
        p for p in paths if not any(q != p and (not p or q.startswith(f"{p}.")) for q in paths)
    )


def _tensors(model: nn.Module) -> dict[str, Tensor]:
    return {**dict(model.named_parameters()), **dict(model.named_buffers())}


def state_signature(model: nn.Module) -> dict[str, tuple[int, int, int]]:
    """``name -> (id, storage pointer, version)`` of every parameter and buffer: changes on
    any in-place write, ``.data`` swap or reassignment, at no copying cost."""
    return {
        name: (id(t), t.untyped_storage().data_ptr(), t._version)
        for name, t in _tensors(model).items()
    }


def _outputs(out: Any) -> list[Tensor]:
    if isinstance(out, Tensor):
        return [out.detach()]
    if isinstance(out, (list, tuple)):
        return [t for o in out for t in _outputs(o)]
    if isinstance(out, dict):
        return [t for o in out.values() for t in _outputs(o)]
    return []


@contextmanager
def _recording(model: nn.Module, device: torch.device) -> Iterator[tuple[set[str], dict]]:
    """Forward hooks noting which modules advanced torch's generator and their outputs."""
    drew: set[str] = set()
    outputs: dict[str, list[tuple[list[Tensor], list[Tensor]]]] = {}
    starts: dict[str, RngSnapshot] = {}
    handles = []
    for path, module in model.named_modules():

        def pre(mod: nn.Module, args: Any, p: str = path) -> None:
            starts[p] = RngSnapshot(device)

        def post(mod: nn.Module, args: Any, out: Any, p: str = path) -> None:
            start = starts.pop(p, None)
            if start is not None and not start.unchanged():
                drew.add(p)
            calls = outputs.setdefault(p, [])
            calls.append(([t.clone() for t in _outputs(args)], [t.clone() for t in _outputs(out)]))

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield drew, outputs
    finally:
        for handle in handles:
            handle.remove()


def same_values(a: Tensor, b: Tensor) -> bool:
    """Equal shapes and values, NaN equal to NaN (a replayed NaN is reproduced)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_floating_point() or a.is_complex():
        nan_a, nan_b = torch.isnan(a), torch.isnan(b)
        zero = torch.zeros((), dtype=a.dtype, device=a.device)
        return torch.equal(nan_a, nan_b) and torch.equal(
            torch.where(nan_a, zero, a), torch.where(nan_b, zero, b)
        )
    return torch.equal(a, b)


def _same(first: list[Tensor], second: list[Tensor]) -> bool:
    return len(first) == len(second) and all(
        same_values(a, b) for a, b in zip(first, second, strict=True)
    )


def _unreplayed(first: list, second: list) -> bool:
    """Whether some call of a module gave another output from the same inputs."""
    if len(first) != len(second):
        return True
    return any(
        _same(ins_a, ins_b) and not _same(out_a, out_b)
        for (ins_a, out_a), (ins_b, out_b) in zip(first, second, strict=True)
    )


def probe_model(model: nn.Module, sample: ModelInput) -> ModelBehaviour:
    """Run ``sample`` through ``model`` twice from one generator state (module docstring).

    Restores every buffer and parameter value the forward changed before returning.
    """
    device = sample.inputs.device
    saved = {name: t.detach().clone() for name, t in _tensors(model).items()}
    signature = state_signature(model)
    snapshot = RngSnapshot(device)
    runs = []
    try:
        for _ in range(2):
            snapshot.restore()
            with _recording(model, device) as record, torch.enable_grad():
                sample(model)
            runs.append(record)
    finally:
        changed = _restore(model, saved, signature)
    (drew, first), (_, second) = runs
    differ = {
        p for p in first.keys() | second.keys() if _unreplayed(first.get(p, []), second.get(p, []))
    }
    return ModelBehaviour(
        modes=tuple(m.training for m in model.modules()),
        random_modules=tuple(_label(model, p) for p in _innermost(drew)),
        unreplayable_modules=tuple(_label(model, p) for p in _innermost(differ)),
        changed_state=tuple(changed),
    )


def _restore(
    model: nn.Module, saved: dict[str, Tensor], signature: dict[str, tuple[int, int, int]]
) -> list[str]:
    """Put back every tensor whose value or signature changed; their names."""
    now = state_signature(model)
    changed = []
    for name, t in _tensors(model).items():
        if now.get(name) != signature.get(name) or not same_values(t.detach(), saved[name]):
            changed.append(name)
            with torch.no_grad():
                owner, _, local = name.rpartition(".")
                module = model.get_submodule(owner) if owner else model
                if local in module._buffers:
                    module._buffers[local] = saved[name]
                else:
                    module._parameters[local].data = saved[name]
    return changed


def refuse(model: nn.Module, behaviour: ModelBehaviour) -> None:
    """Raise :class:`UnsafeModelError` for changed state or unreplayable randomness."""
    problems = []
    owners: dict[str, list[str]] = {}
    for name in behaviour.changed_state:
        owner, _, local = name.rpartition(".")
        owners.setdefault(owner, []).append(local)
    problems += [
        f"{_label(model, owner)} changed {', '.join(names)} during a forward pass: state "
        "computed from the data is kept without noise; call .eval() on that module, freeze "
        "it, or replace it by a module without running statistics"
        for owner, names in owners.items()
    ]
    problems += [
        f"{label} gives another output when torch's generator is replayed: it draws "
        "randomness the engines cannot give both passes of a record (a generator of its "
        "own?); draw from torch's default generator, or call .eval()"
        for label in behaviour.unreplayable_modules
    ]
    if problems:
        raise UnsafeModelError("model is not safe for MaskDP: " + "; ".join(problems))


class ModelGuard:
    """Probes a model on its first batch and whenever a module's train/eval mode changes;
    :meth:`watch` checks around every engine call that no parameter or buffer changed."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.behaviour: ModelBehaviour | None = None

    def check(self, sample: ModelInput) -> bool:
        """Refuse an unsafe model; return whether it draws random numbers."""
        modes = tuple(m.training for m in self.model.modules())
        if self.behaviour is None or self.behaviour.modes != modes:
            probe = sample.select(slice(0, PROBE_RECORDS))
            if len(probe) == 0:
                return True  # nothing to run yet: assume the model is random (the safe side)
            self.behaviour = probe_model(self.model, probe)
        refuse(self.model, self.behaviour)
        return bool(self.behaviour.random_modules)

    @contextmanager
    def watch(self) -> Iterator[None]:
        """Raise :class:`UnsafeModelError` if the block changed a parameter or buffer."""
        before = state_signature(self.model)
        yield
        after = state_signature(self.model)
        changed = sorted(n for n in before.keys() | after.keys() if before.get(n) != after.get(n))
        if changed:
            raise UnsafeModelError(
                f"the model changed {', '.join(changed)} during a forward pass (a state update "
                "the first-batch probe did not see): it now holds data without noise; discard "
                "this model, and call .eval() on or replace the module that updates it"
            )

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
