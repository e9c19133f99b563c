"""make_private / make_private_with_epsilon: three values, a Poisson loader, a working loop."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import maskdp
from accounting.calibration import calibrate_noise
from accounting.events import PoissonGaussianEvent
from accounting.ledger import PrivacyLedger
from maskdp.data import PoissonDataLoader
from maskdp.errors import InvalidInputError, PrivacyBudgetExceeded
from maskdp.models import VideoViT
from maskdp.optimizer import MaskDPOptimizer
from maskdp.privacy import make_private, make_private_with_epsilon


def tiny_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=1, heads=2)


def dataset(n: int = 24) -> TensorDataset:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 4, 16, 16, generator=gen)
    m = torch.rand(n, 4, 16, 16, generator=gen) < 0.3
    y = torch.randint(0, 3, (n,), generator=gen)
    return TensorDataset(x, m, y)


def setup(seed: int = 0, **kw):
    model = tiny_vit()
    loader = DataLoader(dataset(), batch_size=4, shuffle=True)
    args = dict(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="reference",
        generator=torch.Generator().manual_seed(seed),
    )
    args.update(kw)
    return make_private(model, torch.optim.AdamW(model.parameters(), lr=1e-3), loader, **args)


def train(model, optimizer, loader):
    for x, m, y in loader:
        optimizer.zero_grad()
        loss = optimizer.backward(x, m, y)
        optimizer.step()
        assert torch.isfinite(loss)


def test_make_private_returns_model_wrapper_and_poisson_loader():
    result = setup()
    assert isinstance(result, tuple) and len(result) == 3
    model, optimizer, loader = result
    keys = list(model.state_dict())
    assert isinstance(optimizer, MaskDPOptimizer) and isinstance(loader, PoissonDataLoader)
    assert optimizer.sample_rate == loader.sample_rate == pytest.approx(4 / 24)
    assert optimizer.expected_batch_size == 4 and len(loader) == 6
    train(model, optimizer, loader)
    assert optimizer.steps == 6
    assert optimizer.ledger == PrivacyLedger([PoissonGaussianEvent(4 / 24, 1.0, 6)])
    assert 0 < optimizer.epsilon(1e-5) < float("inf")
    assert list(model.state_dict()) == keys and type(model) is VideoViT


def test_make_private_loader_is_poisson():
    """Batch sizes over many batches: mean qN, variance qN(1 - q), some empty."""
    n, b = 20, 2
    data = TensorDataset(torch.zeros(n, 1), torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n))
    model = tiny_vit()
    _, optimizer, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        DataLoader(data, batch_size=b, shuffle=True),
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="reference",
        generator=torch.Generator().manual_seed(0),
    )
    q = optimizer.sample_rate
    sizes = torch.tensor([len(x) for _ in range(200) for x, _, _ in loader], dtype=torch.float64)
    mean, var = n * q, n * q * (1 - q)
    assert q == b / n and len(sizes) == 2000
    assert abs(float(sizes.mean()) - mean) < 5 * (var / len(sizes)) ** 0.5
    assert abs(float(sizes.var()) / var - 1) < 0.15
    assert (sizes == 0).any() and sizes.max() > 2 * b


def test_make_private_is_reproducible_from_its_generator():
    runs = []
    for _ in range(2):
        model, optimizer, loader = setup(seed=5)
        train(model, optimizer, loader)
        runs.append([p.detach().clone() for p in model.parameters()])
    for a, b in zip(*runs, strict=True):
        assert torch.equal(a, b)


def test_make_private_accepts_a_poisson_loader_and_keeps_its_rate():
    poisson = PoissonDataLoader(dataset(), sample_rate=0.25, steps=3)
    model = tiny_vit()
    _, optimizer, loader = make_private(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        poisson,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="reference",
    )
    assert optimizer.sample_rate == loader.sample_rate == 0.25
    assert optimizer.expected_batch_size == 6 and len(loader) == 3


def test_make_private_refuses_a_loader_without_batch_size():
    model = tiny_vit()
    loader = DataLoader(dataset(), batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(InvalidInputError, match="batch_size"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            loader,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            loss_fn=nn.CrossEntropyLoss(),
        )


def test_make_private_with_epsilon_calibrates_and_guards_the_budget():
    model = tiny_vit()
    data_loader = DataLoader(dataset(), batch_size=4)
    target, delta, epochs = 4.0, 1e-5, 2
    _, optimizer, loader = make_private_with_epsilon(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader,
        target_epsilon=target,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="reference",
    )
    steps = epochs * len(data_loader)
    assert optimizer.noise_multiplier == calibrate_noise(
        target, delta, sample_rate=4 / 24, steps=steps, accountant="rdp"
    )
    for _ in range(steps):  # empty steps: the accounting does not depend on the data
        optimizer.zero_grad()
        optimizer.step()
    assert optimizer.epsilon() <= target
    with pytest.raises(PrivacyBudgetExceeded):
        optimizer.step()


def test_top_level_exports():
    assert maskdp.make_private is make_private
    assert maskdp.FillView is not None
