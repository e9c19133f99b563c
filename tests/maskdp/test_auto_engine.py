"""``engine="auto"`` (maskdp/engines/base.py AutoEngine): the first engine that accepts the
model *and* computes a probe of its first batch (its structure, no sensitive value);
refusals that only show on a batch fall through to the next engine, with the reasons kept,
the numbers are the reference loop's, and the choice never depends on sensitive content."""

from __future__ import annotations

import pytest
import torch
from helpers import random_clips
from torch import Tensor, nn

from maskdp.engines.base import (
    AutoEngine,
    ClippedSum,
    Engine,
    MaskedBatch,
    build_engine,
    empty_result,
)
from maskdp.engines.reference import ReferenceEngine
from maskdp.errors import UnsupportedModelError
from maskdp.mechanism.gradient import make_batch
from maskdp.mechanism.views import FillView


class PerFrameCNN(nn.Module):
    """A 2D CNN applied frame by frame: time folded into the batch (N*T rows per layer)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        n, c, t, h, w = x.shape
        frames = x.transpose(1, 2).reshape(n * t, c, h, w)
        pooled = self.norm(self.conv(frames)).relu().mean((2, 3))
        return self.head(pooled.view(n, t, -1).mean(1))


def batch_of(n: int = 3) -> MaskedBatch:
    x, mask, y = random_clips(n, seed=1, p=0.3, dtype=torch.float64)
    return make_batch(FillView(0.0), x, mask, y)


def test_time_folded_into_the_batch_falls_through_to_an_engine_that_works():
    torch.manual_seed(0)
    model = PerFrameCNN().double()
    batch = batch_of()
    engine = build_engine("auto", model, nn.CrossEntropyLoss())
    got = engine.compute(batch, max_grad_norm=0.05)
    want = ReferenceEngine(model, nn.CrossEntropyLoss()).compute(batch, max_grad_norm=0.05)
    assert engine.name == "vmap"
    assert [r.split(":")[0] for r in engine.reasons] == ["ghost", "hooks"]
    assert "without the records in dimension 0" in engine.reasons[0]
    torch.testing.assert_close(got.norms, want.norms, rtol=1e-9, atol=0)
    for name, value in want.private.items():
        torch.testing.assert_close(got.private[name], value, rtol=1e-9, atol=1e-12)
    assert "chose 'vmap'" in repr(engine)
    assert not any(m._forward_hooks or m._backward_hooks for m in model.modules())


class _Scripted(Engine):
    """Raises UnsupportedModelError on the calls listed in ``fail_on`` (1-based)."""

    name = "scripted"
    fail_on: frozenset[int] = frozenset()

    def __init__(self, model: nn.Module, loss_fn: nn.Module) -> None:
        super().__init__(model, loss_fn)
        self.calls = 0

    def compute(self, batch: MaskedBatch, *, max_grad_norm: float) -> ClippedSum:
        self.calls += 1
        if self.calls in self.fail_on:
            raise UnsupportedModelError(f"{self.name} refused call {self.calls}")
        return empty_result(self.model)


def _scripted(name: str, fail_on: set[int]) -> type[Engine]:
    return type(name, (_Scripted,), {"name": name, "fail_on": frozenset(fail_on)})


def test_a_refusal_after_the_first_successful_batch_is_raised_not_hidden():
    model = nn.Linear(2, 2)
    first, second = _scripted("first", {1}), _scripted("second", {3})
    engine = AutoEngine(model, nn.CrossEntropyLoss(), [first, second])
    batch = batch_of()
    engine.compute(batch, max_grad_norm=1.0)  # first refuses the probe: second computes
    assert engine.name == "second" and engine.reasons == ["first: first refused call 1"]
    with pytest.raises(UnsupportedModelError, match="second refused call 3"):
        engine.compute(batch, max_grad_norm=1.0)  # settled: no silent switch mid-training


class GatedOutsideUse(nn.Module):
    """``lin.weight`` also used by the parent, with a weight that is zero unless the clip
    holds a value above 5: per-sample hooks miss that use only on such clips."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3 * 4 * 16 * 16, 3)

    def forward(self, x: Tensor) -> Tensor:
        gate = torch.relu(x.flatten(1).amax(1) - 5.0)[:, None]
        return self.lin(x.flatten(1)) + gate * self.lin.weight.sum(1)


def test_the_choice_depends_on_no_sensitive_value():
    """Two batches that differ only in one record's sensitive pixels (one of them set to 9,
    which trips the hooks' consistency check) get the same engine; where the hooks cannot
    compute the real batch, the step is refused, not computed by another engine."""
    from maskdp.engines.hooks import HooksEngine
    from maskdp.engines.vmap import VmapEngine

    torch.manual_seed(0)
    x, mask, y = random_clips(3, seed=1, p=0.3, dtype=torch.float64)
    tripped = x.clone()
    tripped[0][:, mask[0]] = 9.0  # sensitive pixels of record 0 only
    chosen = []
    for clips in (x, tripped):
        model = GatedOutsideUse().double()
        engine = AutoEngine(model, nn.CrossEntropyLoss(), [HooksEngine, VmapEngine])
        batch = make_batch(FillView(0.0), clips, mask, y)
        try:
            engine.compute(batch, max_grad_norm=1.0)
        except UnsupportedModelError as err:
            assert clips is tripped and "do not add up" in str(err)
        chosen.append((engine.name, engine.reasons))
    assert chosen[0] == chosen[1] == ("hooks", [])


def test_the_probe_keeps_structure_and_hides_values():
    from maskdp.engines.base import PROBE_ROWS, probe_batch
    from maskdp.mechanism.views import ModelInput

    x, mask, y = random_clips(1, seed=1, p=0.3, dtype=torch.float64)
    tokens = torch.tensor([[2, 5]])
    batch = MaskedBatch(ModelInput(x), ModelInput(x * 0, {"keep": tokens}), y)
    probe = probe_batch(batch)
    assert len(probe) == PROBE_ROWS and probe.full.inputs.shape[1:] == x.shape[1:]
    assert probe.full.inputs.dtype == x.dtype and not probe.targets.any()
    assert torch.equal(probe.public.kwargs["keep"], tokens.repeat(PROBE_ROWS, 1))
    changed = MaskedBatch(ModelInput(x + 1), ModelInput(x * 0 + 3, {"keep": tokens}), y + 1)
    again = probe_batch(changed)
    torch.testing.assert_close(again.full.inputs, probe.full.inputs, rtol=0, atol=0)
    torch.testing.assert_close(again.public.inputs, probe.public.inputs, rtol=0, atol=0)
    codes = MaskedBatch(ModelInput(torch.tensor([[4, 7]])), None, torch.tensor([1]))
    assert not probe_batch(codes).full.inputs.any()  # a clip of integer codes: zeros


def test_the_last_candidates_refusal_is_raised():
    engine = AutoEngine(nn.Linear(2, 2), nn.CrossEntropyLoss(), [_scripted("only", {1})])
    with pytest.raises(UnsupportedModelError, match="only refused call 1"):
        engine.compute(batch_of(), max_grad_norm=1.0)


def test_an_explicit_engine_is_never_replaced():
    torch.manual_seed(0)
    model = PerFrameCNN().double()
    engine = build_engine("ghost", model, nn.CrossEntropyLoss())
    assert not isinstance(engine, AutoEngine)
    with pytest.raises(UnsupportedModelError, match="conv.*without the records in dimension 0"):
        engine.compute(batch_of(), max_grad_norm=1.0)
