"""make_private / make_private_with_epsilon: three values, a paired Poisson loader, a working loop.

The loader yields ``(private, public)``: a Poisson batch at rate q and a public batch drawn
independently at rate q_pub (default q); sampling and noise are secret unless a test passes
seeded (insecure) randomness.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_clips, tiny_vit
from maskdp.accounting.calibration import calibrate_noise
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import PrivacyLedger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import maskdp
from maskdp.data import PoissonDataLoader
from maskdp.data.poisson import MaskDPDataLoader, StepBatches
from maskdp.errors import InvalidInputError, PrivacyBudgetExceeded
from maskdp.mechanism.randomness import InsecureSeededRandomness, SecretRandomness
from maskdp.models import VideoViT
from maskdp.training.optimizer import MaskDPOptimizer
from maskdp.training.private import make_private, make_private_with_epsilon

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")


def dataset(n: int = 24) -> TensorDataset:
    return TensorDataset(*random_clips(n, seed=0, p=0.3, uniform=True))


def setup(loader: DataLoader | None = None, **kw):
    """make_private on a fresh tiny ViT with AdamW, sigma = 1, C = 1 and the reference
    engine unless ``kw`` say otherwise; ``loader`` defaults to dataset() in shuffled
    batches of 4."""
    model = tiny_vit(dtype=torch.float32)
    if loader is None:
        loader = DataLoader(dataset(), batch_size=4, shuffle=True)
    args = dict(
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="reference",
    )
    args.update(kw)
    return make_private(model, torch.optim.AdamW(model.parameters(), lr=1e-3), loader, **args)


def train(model, optimizer, loader):
    for private, public in loader:
        loss = optimizer.backward(*private, public=public)
        optimizer.step()
        # the mean public loss; nan exactly when the public batch is empty
        assert loss.shape == () and bool(torch.isfinite(loss)) == (len(public[2]) > 0)


def test_make_private_returns_model_wrapper_and_paired_poisson_loader():
    result = setup()
    assert isinstance(result, tuple) and len(result) == 3
    model, optimizer, loader = result
    keys = list(model.state_dict())
    assert isinstance(optimizer, MaskDPOptimizer) and isinstance(loader, MaskDPDataLoader)
    assert isinstance(loader.private, PoissonDataLoader)
    assert isinstance(loader.public, PoissonDataLoader)
    assert loader.private is not loader.public
    assert optimizer.sample_rate == loader.sample_rate == pytest.approx(4 / 24)
    assert loader.public_sample_rate == pytest.approx(4 / 24)
    assert optimizer.expected_batch_size == optimizer.expected_public_batch_size == 4
    assert len(loader) == len(loader.private) == len(loader.public) == 6
    assert isinstance(optimizer.randomness, SecretRandomness)
    item = next(iter(loader))
    assert isinstance(item, StepBatches) and len(item) == 2
    assert [len(t) for t in item.private] == [len(item.private[0])] * 3
    assert [t.shape[1:] for t in item.public] == [t.shape[1:] for t in dataset().tensors]
    train(model, optimizer, loader)
    assert optimizer.steps == 6
    assert optimizer.ledger == PrivacyLedger([PoissonGaussianEvent(4 / 24, 1.0, 6)])
    assert 0 < optimizer.epsilon(1e-5) < float("inf")
    assert list(model.state_dict()) == keys and type(model) is VideoViT


def index_data(n: int) -> TensorDataset:
    """Records whose input is their index (to see which records each batch holds)."""
    x = torch.arange(n, dtype=torch.float32)[:, None]
    return TensorDataset(x, torch.zeros(n, 1, dtype=torch.bool), torch.zeros(n))


def test_make_private_loader_is_poisson_and_the_public_batch_independent():
    """Over many steps, both batch sizes have mean qN and variance qN(1 - q), some are
    empty, and the number of records in both batches of a step has mean N q q_pub (an
    independent draw; a public batch tied to the private one would give about qN)."""
    n, b, b_pub = 20, 2, 4
    loader = DataLoader(index_data(n), batch_size=b, shuffle=True)
    _, optimizer, loader = setup(loader, public_batch_size=b_pub)
    q, q_pub = optimizer.sample_rate, loader.public_sample_rate
    assert q == b / n and q_pub == b_pub / n and optimizer.expected_public_batch_size == b_pub
    private, public, both = [], [], []
    for _ in range(200):
        for (x, _, _), (u, _, _) in loader:
            private.append(len(x))
            public.append(len(u))
            both.append(len(set(x.flatten().tolist()) & set(u.flatten().tolist())))
    assert len(private) == 2000
    for sizes, rate in ((private, q), (public, q_pub)):
        sizes = torch.tensor(sizes, dtype=torch.float64)
        mean, var = n * rate, n * rate * (1 - rate)
        assert abs(float(sizes.mean()) - mean) < 5 * (var / len(sizes)) ** 0.5
        assert abs(float(sizes.var()) / var - 1) < 0.15
        assert (sizes == 0).any() and sizes.max() > 2 * n * rate
    both = torch.tensor(both, dtype=torch.float64)
    p = q * q_pub  # per record and step: in both batches
    mean, sd = n * p, (n * p * (1 - p) / len(both)) ** 0.5
    assert abs(float(both.mean()) - mean) < 5 * sd, (float(both.mean()), mean)


@SEEDED
def test_make_private_is_reproducible_only_with_seeded_test_randomness():
    def trained(**kw):
        model, optimizer, loader = setup(**kw)
        train(model, optimizer, loader)
        return [p.detach().clone() for p in model.parameters()]

    def seeded():
        return dict(
            randomness=InsecureSeededRandomness(5), public_randomness=InsecureSeededRandomness(6)
        )

    a, b = trained(**seeded()), trained(**seeded())
    assert all(torch.equal(x, y) for x, y in zip(a, b, strict=True))
    secret = [trained(), trained()]  # the default: fresh secret sampling and noise
    assert not torch.equal(secret[0][0], secret[1][0])
    assert not torch.equal(secret[0][0], a[0])


def test_make_private_refuses_generator_seeding():
    with pytest.raises(InvalidInputError, match="torch.Generator"):
        setup(randomness=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match="torch.Generator"):
        setup(public_randomness=torch.Generator().manual_seed(0))
    with pytest.raises(InvalidInputError, match="unknown privacy setting 'generator'"):
        setup(generator=torch.Generator().manual_seed(0))


def test_make_private_with_protect_labels_has_no_public_batch():
    model, optimizer, loader = setup(protect_labels=True)
    assert loader.public is None and loader.public_sample_rate is None
    for private, public in loader:
        assert public is None
        loss = optimizer.backward(*private)
        optimizer.step()
        assert bool(torch.isnan(loss))  # no public batch, no public loss
    assert optimizer.steps == 6


def test_public_batch_size_is_validated():
    with pytest.raises(InvalidInputError, match="public_batch_size"):
        setup(public_batch_size=25)
    with pytest.raises(InvalidInputError, match="public_batch_size"):
        setup(public_batch_size=0)


def test_make_private_accepts_a_poisson_loader_and_keeps_its_rate():
    poisson = PoissonDataLoader(dataset(), sample_rate=0.25, steps=3)
    _, optimizer, loader = setup(poisson)
    assert optimizer.sample_rate == loader.sample_rate == 0.25
    assert loader.private is not poisson and loader.private.sample_rate == 0.25
    assert loader.public_sample_rate == 0.25 and len(loader.public) == 3
    assert optimizer.expected_batch_size == 6 and len(loader) == 3


def test_make_private_refuses_a_loader_without_batch_size():
    loader = DataLoader(dataset(), batch_sampler=[[0, 1], [2, 3]])
    with pytest.raises(InvalidInputError, match="batch_size"):
        setup(loader)


def with_epsilon(model, data_loader, target, delta, epochs, **settings):
    """make_private_with_epsilon on the reference engine, SGD and cross-entropy."""
    return make_private_with_epsilon(
        model,
        torch.optim.SGD(model.parameters(), lr=0.1),
        data_loader,
        target_epsilon=target,
        target_delta=delta,
        epochs=epochs,
        max_grad_norm=1.0,
        loss_fn=nn.CrossEntropyLoss(),
        engine="reference",
        **settings,
    )


def test_make_private_with_epsilon_calibrates_and_guards_the_budget():
    model = tiny_vit(dtype=torch.float32)
    data_loader = DataLoader(dataset(), batch_size=4)
    target, delta, epochs = 4.0, 1e-5, 2
    _, optimizer, loader = with_epsilon(model, data_loader, target, delta, epochs)
    steps = epochs * len(data_loader)
    assert optimizer.noise_multiplier == calibrate_noise(
        target, delta, sample_rate=4 / 24, steps=steps, accountant="rdp"
    )
    assert isinstance(loader, MaskDPDataLoader) and len(loader) == len(data_loader)
    for _ in range(steps):  # empty steps: the accounting does not depend on the data
        optimizer.step()
    assert optimizer.ledger == PrivacyLedger(
        [PoissonGaussianEvent(4 / 24, optimizer.noise_multiplier, steps)]
    )
    assert optimizer.epsilon() <= target
    with pytest.raises(PrivacyBudgetExceeded):
        optimizer.step()


def test_top_level_exports():
    assert maskdp.make_private is make_private
    assert maskdp.FillView is not None


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_make_private_with_epsilon_under_substitute(accountant):
    """The optimizer's ledger, its budget guard and the calibration all use the substitute
    pair: more noise than erase for the same target, and the reported epsilon is the
    substitute one."""
    model = tiny_vit(dtype=torch.float32)
    target, delta, epochs = 4.0, 1e-5, 2

    def build(relation: str) -> MaskDPOptimizer:
        data_loader = DataLoader(dataset(), batch_size=4)
        return with_epsilon(
            model, data_loader, target, delta, epochs, accountant=accountant, relation=relation
        )[1]

    optimizer = build("substitute")
    erase = build("erase")
    assert optimizer.relation == "substitute"
    assert optimizer.noise_multiplier > erase.noise_multiplier
    steps = epochs * 6
    for _ in range(steps):
        optimizer.step()
    ledger = PrivacyLedger([PoissonGaussianEvent(4 / 24, optimizer.noise_multiplier, steps)])
    assert optimizer.epsilon() == ledger.epsilon(
        delta, accountant=accountant, relation="substitute"
    )
    assert ledger.epsilon(delta, accountant=accountant) < optimizer.epsilon() <= target
    with pytest.raises(PrivacyBudgetExceeded, match="substitute"):
        optimizer.step()
