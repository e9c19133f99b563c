"""Mixed precision: bf16 autocast forwards on CPU keep the clipping bound and fp32 noise.

- Every autocast-safe engine (reference, vmap, hooks), on a ViT and a CNN under CPU bf16
  autocast: the contribution of each record to the released sum, measured as the change of
  the clipped sum when the record is erased (the erase relation itself) and as the clipped
  sum of the record alone, has norm <= C (1 + 1e-5); norms and clip factors are float64,
  sums fp32; autocast really ran (the norms differ from the fp32 ones, by under 5%).
- The ghost engine (which upcasts captured activations and reduces with autocast off)
  meets the same bound; the optimizer refuses autocast with any engine that does not
  declare ``autocast_safe``.
- Regression: the hooks engine's consistency check no longer refuses an fp32 CNN whose
  conv bias (followed by GroupNorm) has an exact gradient of 0 (rows of rounding noise).
- MaskDPOptimizer(autocast=bf16): p.grad is fp32 and equals the public gradient of the
  public batch (one backward under the same autocast) / B_pub + (the engine's clipped sum +
  an fp32 Gaussian draw from the same seed) / B.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_clips, tiny_cnn, tiny_vit, wrap
from torch import nn

from maskdp.engines.base import per_sample_loss, resolve_engine
from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.mechanism.gradient import make_batch, public_gradient
from maskdp.mechanism.randomness import InsecureRandomnessWarning, InsecureSeededRandomness
from maskdp.mechanism.views import FillView

SAFE = ("reference", "vmap", "hooks")
C = 0.05  # below every record's norm: every record is clipped
N = 4
BF16 = torch.bfloat16


def make_model(kind: str) -> nn.Module:
    return (tiny_vit if kind == "vit" else tiny_cnn)(dtype=torch.float32)


def data(n: int = N, seed: int = 3):
    return random_clips(n, seed=seed)


def norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


def compute(engine, x, m, y, present=None, autocast=True):
    batch = make_batch(FillView(0.0), x, m, y, present=present)
    with torch.autocast("cpu", dtype=BF16, enabled=autocast):
        return engine.compute(batch, max_grad_norm=C)


def contribution_ratios(engine) -> tuple[list[float], list[float]]:
    """||contribution of record i|| / C: by erasing it, and alone in a batch."""
    x, m, y = data()
    whole = compute(engine, x, m, y)
    by_erasure, alone = [], []
    for i in range(N):
        present = torch.ones(N, dtype=torch.bool)
        present[i] = False
        rest = compute(engine, x, m, y, present=present)
        diff = {k: whole.private[k] - rest.private[k] for k in whole.private}
        by_erasure.append(norm(diff) / C)
        one = compute(engine, x[i : i + 1], m[i : i + 1], y[i : i + 1])
        alone.append(norm(one.private) / C)
    return by_erasure, alone


@pytest.mark.parametrize("kind", ["vit", "cnn"])
@pytest.mark.parametrize("name", SAFE)
def test_contributions_stay_bounded_under_bf16_autocast(name: str, kind: str) -> None:
    model = make_model(kind)
    engine = resolve_engine(name, model)(model, nn.CrossEntropyLoss())
    x, m, y = data()
    low, full = compute(engine, x, m, y), compute(engine, x, m, y, autocast=False)
    assert low.norms.dtype == low.clip_factors.dtype == torch.float64
    assert all(t.dtype == torch.float32 for t in low.private.values())
    assert (low.norms > C).all()  # every record is clipped: the bound is exercised
    assert not torch.equal(low.norms, full.norms)  # autocast did run in bf16 ...
    torch.testing.assert_close(low.norms, full.norms, rtol=5e-2, atol=0)  # ... and is close
    by_erasure, alone = contribution_ratios(engine)
    assert max(by_erasure) <= 1 + 1e-5, by_erasure
    assert max(alone) <= 1 + 1e-5, alone
    assert min(alone) >= 1 - 1e-5  # clipped exactly to C, not below
    engine.close()


def test_optimizer_refuses_autocast_with_an_unsafe_engine(monkeypatch) -> None:
    from maskdp.engines.ghost.engine import GhostEngine

    monkeypatch.setattr(GhostEngine, "autocast_safe", False)
    model = make_model("vit")
    with pytest.raises(UnsupportedModelError, match="autocast"):
        wrap(model, noise_multiplier=1.0, max_grad_norm=C, engine="ghost", autocast=BF16)


@pytest.mark.parametrize("kind", ["vit", "cnn"])
def test_ghost_contributions_under_bf16_autocast(kind: str) -> None:
    model = make_model(kind)
    engine = resolve_engine("ghost", model)(model, nn.CrossEntropyLoss())
    by_erasure, alone = contribution_ratios(engine)
    assert max(by_erasure + alone) <= 1 + 1e-5, (by_erasure, alone)
    assert min(alone) >= 1 - 1e-5
    engine.close()


@pytest.mark.parametrize("dtype", [torch.float64, torch.int8, "bf16"])
def test_autocast_option_is_validated(dtype) -> None:
    model = make_model("vit")
    with pytest.raises(InvalidInputError, match="autocast"):
        wrap(model, noise_multiplier=1.0, max_grad_norm=C, engine="hooks", autocast=dtype)


def test_optimizer_noise_and_division_stay_fp32_under_autocast() -> None:
    sigma, batch_size, public_size = 2.0, 4, 6
    model = make_model("vit")
    with pytest.warns(InsecureRandomnessWarning):
        randomness = InsecureSeededRandomness(9)
    optimizer = wrap(
        model,
        torch.optim.SGD(model.parameters(), lr=0.0),
        noise_multiplier=sigma,
        max_grad_norm=C,
        expected_batch_size=batch_size,
        expected_public_batch_size=public_size,
        view=FillView(0.0),  # the view of compute() below
        engine="vmap",
        randomness=randomness,
        autocast=BF16,
    )
    assert optimizer.autocast is BF16
    x, m, y = data()
    public = data(5, seed=4)
    loss = optimizer.backward(x, m, y, public=public)
    optimizer.step()
    # The same clipped sum from the engine under autocast, the public sum of one backward
    # under the same autocast, and fp32 noise from the same seed.
    engine = resolve_engine("vmap", model)(model, nn.CrossEntropyLoss())
    clipped = compute(engine, x, m, y).private
    with torch.autocast("cpu", dtype=BF16):
        public_sum, public_loss, count = public_gradient(
            model, per_sample_loss(nn.CrossEntropyLoss()), FillView(0.0), public
        )
    assert count == 5
    torch.testing.assert_close(loss, public_loss / 5, atol=0, rtol=0)
    gen = torch.Generator().manual_seed(9)
    for name, p in model.named_parameters():
        assert p.grad.dtype == torch.float32
        assert public_sum[name].dtype == clipped[name].dtype == torch.float32
        noise = torch.randn(p.shape, generator=gen, dtype=torch.float32) * (sigma * C)
        expected = public_sum[name] / public_size + (clipped[name] + noise) / batch_size
        torch.testing.assert_close(p.grad, expected, atol=1e-6, rtol=0)
