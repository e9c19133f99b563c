"""Builders shared by the maskdp tests: tiny models, seeded batches, an optimizer with test
defaults and the tiny ``maskdp train`` config (tests import this module by name, like
``support``)."""

from __future__ import annotations

import torch
from torch import nn

from maskdp.mechanism.views import FillView
from maskdp.models import SmallVideoCNN, VideoViT
from maskdp.training.optimizer import MaskDPOptimizer

#: The smallest ``maskdp train`` run: one epoch of 32 synthetic clips (4 frames, 16x16),
#: no public warm-up. Tests add the options they are about.
TINY_TRAIN = dict(
    train_size=32,
    test_size=16,
    epochs=1.0,
    batch_size=8,
    frames=4,
    image_size=16,
    public_epochs=0.0,
)


def tiny_vit(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    """A one-block VideoViT for (3, 4, 16, 16) clips and 3 classes, initialised from ``seed``."""
    torch.manual_seed(seed)
    return VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2).to(dtype)


def tiny_cnn(seed: int = 0, dtype: torch.dtype = torch.float64) -> nn.Module:
    torch.manual_seed(seed)
    return SmallVideoCNN(num_classes=3, width=4).to(dtype)


def random_clips(
    n: int,
    *,
    seed: int,
    frames: int = 4,
    size: int = 16,
    p: float = 0.4,
    classes: int = 3,
    uniform: bool = False,
    dtype: torch.dtype = torch.float32,
):
    """``n`` random clips (3, frames, size, size), Gaussian or (``uniform``) in [0, 1), masks
    with a fraction ``p`` of sensitive pixels and labels in range(classes), drawn in that
    order from one generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    draw = torch.rand if uniform else torch.randn
    x = draw(n, 3, frames, size, size, generator=gen, dtype=dtype)
    mask = torch.rand(n, frames, size, size, generator=gen) < p
    y = torch.randint(0, classes, (n,), generator=gen)
    return x, mask, y


def batch(n: int, *, seed: int = 1, mask: str = "random", dtype=torch.float64):
    """``n`` Gaussian clips (3, 4, 16, 16), their masks (``random``: 40% sensitive pixels;
    ``all``; ``none``) and labels in range(3), from a generator seeded with ``seed``."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, 4, 16, 16, generator=gen).to(dtype)
    if mask == "random":
        m = torch.rand(n, 4, 16, 16, generator=gen) < 0.4
    else:
        m = torch.full((n, 4, 16, 16), mask == "all", dtype=torch.bool)
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, m, y


def public_batch(n: int = 3, *, seed: int = 100, mask: str = "random", dtype=torch.float64):
    """A public batch, drawn independently of the private ones (other seeds)."""
    return batch(n, seed=seed, mask=mask, dtype=dtype)


def wrap(model: nn.Module, inner=None, **kw) -> MaskDPOptimizer:
    """MaskDPOptimizer on ``inner`` (default: SGD, lr 0.1) with the test defaults: no noise,
    C = 1, B = 4, q = 0.1, FillView(0.0), the reference engine; ``kw`` overrides them."""
    args = dict(
        model=model,
        loss_fn=nn.CrossEntropyLoss(),
        noise_multiplier=0.0,
        max_grad_norm=1.0,
        expected_batch_size=4,
        sample_rate=0.1,
        view=FillView(0.0),
        engine="reference",
    )
    args.update(kw)
    inner = inner if inner is not None else torch.optim.SGD(model.parameters(), lr=0.1)
    return MaskDPOptimizer(inner, **args)


def replayed_noise(like: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """The standard normal draws of ``InsecureSeededRandomness(seed)``, one tensor per entry of
    ``like`` in its order (float64): the noise a seeded optimizer adds to those tensors."""
    gen = torch.Generator().manual_seed(seed)
    return {n: torch.randn(t.shape, generator=gen).double() for n, t in like.items()}


def assert_same_release(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> None:
    """Two released gradients agree on every parameter (float64 rounding only)."""
    assert got.keys() == expected.keys()
    for name in got:
        torch.testing.assert_close(got[name], expected[name], rtol=1e-8, atol=1e-12, msg=name)


def release_distance(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], names) -> float:
    """The Euclidean distance of two releases over ``names``."""
    return float(torch.sqrt(sum(((a[n] - b[n]) ** 2).sum() for n in names)))
