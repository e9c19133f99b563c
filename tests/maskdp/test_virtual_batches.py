"""Virtual batches: micro-batches accumulated before one step equal the single big batch.

For every engine, one logical batch split into micro-batches (several sizes, erased
records included) gives the same noisy update as one backward on the whole batch with the
same noise seed (1e-6), and the ledger records exactly one step.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from accounting.ledger import PrivacyLedger
from maskdp.batching import backward_in_micro_batches, iterate_micro_batches
from maskdp.errors import InvalidInputError
from maskdp.models import VideoViT
from maskdp.optimizer import MaskDPOptimizer
from maskdp.views import FillView

ENGINES = ("reference", "vmap", "hooks", "ghost")
N = 7


def data(n: int = N):
    gen = torch.Generator().manual_seed(11)
    x = torch.randn(n, 3, 4, 16, 16, generator=gen)
    m = torch.rand(n, 4, 16, 16, generator=gen) < 0.4
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, m, y


def step(engine: str, micro: int | None, present: torch.Tensor | None = None, n: int = N):
    torch.manual_seed(0)
    model = VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2)
    optimizer = MaskDPOptimizer(
        torch.optim.SGD(model.parameters(), lr=0.3),
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        noise_multiplier=0.9,
        max_grad_norm=0.1,
        expected_batch_size=4,
        sample_rate=0.2,
        view=FillView(0.0),
        engine=engine,
        noise_generator=torch.Generator().manual_seed(5),
    )
    x, m, y = data(n)
    optimizer.zero_grad()
    if micro is None:
        loss = optimizer.backward(x, m, y, present=present)
    else:
        loss = backward_in_micro_batches(
            optimizer, x, m, y, max_physical_batch_size=micro, present=present
        )
    optimizer.step()
    result = {
        "params": {k: p.detach().clone() for k, p in model.named_parameters()},
        "grads": {k: p.grad.detach().clone() for k, p in model.named_parameters()},
        "loss": float(loss),
        "ledger": optimizer.ledger,
        "steps": optimizer.steps,
    }
    optimizer.close()
    return result


@pytest.mark.parametrize("engine", ENGINES)
def test_micro_batches_equal_one_big_batch(engine: str) -> None:
    present = torch.tensor([True, False, True, True, False, True, True])
    for erased in (None, present):
        big = step(engine, None, erased)
        for micro in (1, 3, N + 5):
            small = step(engine, micro, erased)
            for kind in ("grads", "params"):
                for name, ref in big[kind].items():
                    torch.testing.assert_close(
                        small[kind][name], ref, atol=1e-6, rtol=0, msg=lambda m, n=name: f"{n}: {m}"
                    )
            assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)
            # one logical step: one ledger entry, whatever the number of micro-batches
            assert small["steps"] == 1
            expected = PrivacyLedger()
            expected.record(0.2, 0.9, 1)
            assert small["ledger"].to_dict() == expected.to_dict()


def test_an_empty_batch_is_one_step_with_noise() -> None:
    big, small = step("reference", None, n=0), step("reference", 3, n=0)
    for name, ref in big["grads"].items():
        assert torch.equal(small["grads"][name], ref)
        assert ref.abs().sum() > 0  # the noise of an empty step is still there
    assert small["steps"] == 1


def test_iterate_micro_batches_slices_and_validates() -> None:
    x, m, y = data(5)
    parts = list(iterate_micro_batches(x, m, y, max_physical_batch_size=2))
    assert [len(p[0]) for p in parts] == [2, 2, 1]
    assert torch.equal(torch.cat([p[0] for p in parts]), x)
    assert all(p[3] is None for p in parts)
    empty = list(iterate_micro_batches(x[:0], m[:0], y[:0], max_physical_batch_size=2))
    assert len(empty) == 1 and len(empty[0][0]) == 0
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(InvalidInputError, match="max_physical_batch_size"):
            list(iterate_micro_batches(x, m, y, max_physical_batch_size=bad))
    with pytest.raises(InvalidInputError, match="targets has 4 records"):
        list(iterate_micro_batches(x, m, y[:4], max_physical_batch_size=2))
