"""Virtual batches: micro-batches accumulated before one step equal the single big batches.

For every engine, one logical step (a private batch and an independent public batch of
another size) split into micro-batches (several sizes, erased records included) gives the
same noisy update as one backward on the whole batches with the same (seeded, test-only)
noise (1e-6), the same mean public loss, and the ledger records exactly one step.
"""

from __future__ import annotations

import math

import pytest
import torch
from helpers import random_clips, tiny_vit, wrap
from maskdp.accounting.ledger import PrivacyLedger
from torch import nn

from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureSeededRandomness
from maskdp.training.batching import backward_in_micro_batches, iterate_micro_batches
from maskdp.training.optimizer import MaskDPOptimizer

ENGINES = ("reference", "vmap", "hooks", "ghost")
N, N_PUB = 7, 5

pytestmark = pytest.mark.filterwarnings(
    "ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning"
)


def data(n: int = N, seed: int = 11):
    return random_clips(n, seed=seed)


def vit_optimizer(engine: str, protect_labels: bool = False) -> MaskDPOptimizer:
    """A seeded MaskDP-SGD optimizer on a tiny VideoViT (the same start every call), B = 4,
    FillView(0.0)."""
    model = tiny_vit(dtype=torch.float32)
    inner = torch.optim.SGD(model.parameters(), lr=0.3)
    return wrap(
        model, inner, noise_multiplier=0.9, max_grad_norm=0.1, sample_rate=0.2, engine=engine,
        protect_labels=protect_labels, randomness=InsecureSeededRandomness(5),
    )  # fmt: skip


def step(
    engine: str,
    micro: int | None,
    present: torch.Tensor | None = None,
    n: int = N,
    n_pub: int = N_PUB,
    protect_labels: bool = False,
):
    optimizer = vit_optimizer(engine, protect_labels)
    model = optimizer.model
    x, m, y = data(n)
    public = None if protect_labels else data(n_pub, seed=12)
    if micro is None:
        loss = optimizer.backward(x, m, y, public=public, present=present)
    else:
        loss = backward_in_micro_batches(
            optimizer, x, m, y, max_physical_batch_size=micro, public=public, present=present
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
            assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)  # the public loss
            # one logical step: one ledger entry, whatever the number of micro-batches
            assert small["steps"] == 1
            expected = PrivacyLedger()
            expected.record(0.2, 0.9, 1)
            assert small["ledger"].to_dict() == expected.to_dict()


def test_the_loss_is_the_mean_public_loss_of_the_whole_public_batch() -> None:
    """Brute force: cross-entropy of the model on the public views of the public batch."""
    model = tiny_vit(dtype=torch.float32)  # vit_optimizer's start
    ux, um, uy = data(N_PUB, seed=12)
    with torch.no_grad():
        expected = float(nn.functional.cross_entropy(model(ux.masked_fill(um[:, None], 0)), uy))
    for micro in (None, 2, 3):
        assert step("reference", micro)["loss"] == pytest.approx(expected, rel=1e-5)
    # micro-batches of the private batch alone: the public batch is split alongside
    assert step("reference", 2, n=1)["loss"] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize(("n", "n_pub"), [(0, 0), (0, 4), (4, 0)])
def test_an_empty_batch_is_one_step_with_noise(n: int, n_pub: int) -> None:
    big, small = step("reference", None, n=n, n_pub=n_pub), step("reference", 3, n=n, n_pub=n_pub)
    for name, ref in big["grads"].items():
        torch.testing.assert_close(small["grads"][name], ref, atol=1e-6, rtol=0)
        assert ref.abs().sum() > 0  # the noise of an empty step is still there
    assert small["steps"] == 1
    if n_pub == 0:  # no public record: no public loss
        assert math.isnan(big["loss"]) and math.isnan(small["loss"])
    else:
        assert small["loss"] == pytest.approx(big["loss"], rel=1e-5)


def test_micro_batches_without_public_batch_under_protect_labels() -> None:
    big = step("reference", None, protect_labels=True)
    small = step("reference", 3, protect_labels=True)
    for name, ref in big["grads"].items():
        torch.testing.assert_close(small["grads"][name], ref, atol=1e-6, rtol=0)
        assert ref.abs().sum() > 0, name  # clipped private sum plus noise: never zero
    assert math.isnan(small["loss"]) and small["steps"] == 1


def test_micro_batches_need_the_public_batch() -> None:
    optimizer = vit_optimizer("reference")
    with pytest.raises(InvalidInputError, match="public="):
        backward_in_micro_batches(optimizer, *data(), max_physical_batch_size=3)


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
