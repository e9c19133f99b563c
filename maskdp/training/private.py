r"""``make_private``: turn (model, optimizer, loader) into a MaskDP training setup.

Always returns three values ``(model, optimizer, data_loader)``:

- the model, unchanged (engines hook it; its names and state_dict keys stay the user's);
- a :class:`~maskdp.training.optimizer.MaskDPOptimizer` around the optimizer;
- a :class:`~maskdp.data.poisson.MaskDPDataLoader` over the loader's dataset, whose items
  are ``(private, public)``: a Poisson batch at rate :math:`q` drawn from secret randomness
  and a public batch drawn independently at rate :math:`q_{pub}` (default :math:`q`). The
  loader's own sampler is always replaced: shuffled fixed-size batches are not Poisson, and
  the accounting is only valid for Poisson batches.

The sampling rate is :math:`q = B / N` with :math:`B` the loader's ``batch_size`` and
:math:`N` the dataset size, so the expected batch size (the divisor of the private term) is
exactly :math:`B`; an epoch is :math:`\lceil 1/q \rceil` steps
(:func:`~maskdp.mechanism.sampling.steps_per_epoch`).

Under ``DistributedDataParallel`` (``model`` is a DDP module) every rank's loader yields its
shard of each global batch (record ``i`` belongs to rank ``i mod W``): each sampled record
enters the global batch once, and every rank divides by the global expected sizes.

The loop::

    for private, public in loader:
        optimizer.backward(*private, public=public)
        optimizer.step()
"""

from __future__ import annotations

from typing import Any

from torch import nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from maskdp.accounting.choices import RELATIONS
from maskdp.accounting.ledger import ACCOUNTANTS
from maskdp.checks import check_batch_size, check_choice, check_delta, check_target_epsilon
from maskdp.data.poisson import MaskDPDataLoader, PoissonDataLoader, check_data_loader
from maskdp.engines.base import PerSampleLoss
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import Randomness, SecretRandomness
from maskdp.mechanism.sampling import epochs_to_steps
from maskdp.settings import PrivacySettings
from maskdp.training.distributed import is_ddp
from maskdp.training.optimizer import MaskDPOptimizer


def _shard(model: nn.Module) -> tuple[int, int]:
    """(rank, world size) for a DDP model, (0, 1) otherwise."""
    if not is_ddp(model):
        return 0, 1
    import torch.distributed as dist

    return dist.get_rank(), dist.get_world_size()


def _rate(data_loader: DataLoader) -> tuple[float, int, int]:
    """The private rate q = B / N, the expected batch size B and N."""
    check_data_loader(data_loader)
    if isinstance(data_loader, PoissonDataLoader):
        n = len(data_loader.dataset)  # type: ignore[arg-type]
        return data_loader.sample_rate, max(1, round(data_loader.expected_batch_size)), n
    batch_size = data_loader.batch_size
    if batch_size is None:
        raise InvalidInputError(
            "data_loader needs a batch_size (the expected batch size of Poisson sampling); "
            "build it with DataLoader(dataset, batch_size=B)"
        )
    n = len(data_loader.dataset)  # type: ignore[arg-type]
    if n < 1:
        raise InvalidInputError("data_loader's dataset is empty")
    expected = min(batch_size, n)
    return expected / n, expected, n


def _public_size(public_batch_size: int | None, expected: int, n: int) -> int:
    if public_batch_size is None:
        return expected
    size = check_batch_size(public_batch_size, "public_batch_size")
    if size > n:
        raise InvalidInputError(f"public_batch_size {size} exceeds the dataset size {n}")
    return size


def _loaders(
    data_loader: DataLoader,
    model: nn.Module,
    settings: PrivacySettings,
    randomness: Randomness | None,
    public_randomness: Randomness | None,
) -> MaskDPDataLoader:
    """The paired loader: private batches at rate q, public ones at B_pub / N."""
    n = len(data_loader.dataset)  # type: ignore[arg-type]
    rank, world = _shard(model)
    private = PoissonDataLoader.from_data_loader(
        data_loader,
        sample_rate=settings.sample_rate,
        randomness=randomness,
        rank=rank,
        world_size=world,
    )
    public = None
    if not settings.protect_labels:
        public = PoissonDataLoader.from_data_loader(
            data_loader,
            sample_rate=settings.expected_public_batch_size / n,
            steps=len(private),
            randomness=public_randomness if public_randomness is not None else SecretRandomness(),
            rank=rank,
            world_size=world,
        )
    return MaskDPDataLoader(private, public)


LOADER_FIXED_SETTINGS = ("sample_rate", "expected_batch_size", "expected_public_batch_size")


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    loss_fn: nn.Module | PerSampleLoss,
    public_batch_size: int | None = None,
    randomness: Randomness | None = None,
    public_randomness: Randomness | None = None,
    **settings: Any,
) -> tuple[nn.Module, MaskDPOptimizer, MaskDPDataLoader]:
    """(model, :class:`MaskDPOptimizer`, paired loader); see the module docstring.

    ``settings`` are the fields of :class:`~maskdp.settings.PrivacySettings` (at least
    ``noise_multiplier`` and ``max_grad_norm``) except the three the loader fixes:
    ``sample_rate`` :math:`= B/N`, ``expected_batch_size`` :math:`= B` and
    ``expected_public_batch_size`` (``public_batch_size``, default :math:`B`).
    ``randomness`` drives the private sampling and the noise (default: secret OS entropy);
    ``public_randomness`` the public sampling (default: its own OS entropy, independent of
    the private draws).
    """
    fixed = [name for name in LOADER_FIXED_SETTINGS if name in settings]
    if fixed:
        raise InvalidInputError(
            f"{fixed[0]} comes from data_loader (B = batch_size, q = B / N); do not pass it"
        )
    rate, expected, n = _rate(data_loader)
    privacy = PrivacySettings.build(
        sample_rate=rate,
        expected_batch_size=expected,
        expected_public_batch_size=_public_size(public_batch_size, expected, n),
        **settings,
    )
    loader = _loaders(data_loader, model, privacy, randomness, public_randomness)
    private_optimizer = MaskDPOptimizer(
        optimizer, model=model, loss_fn=loss_fn, settings=privacy, randomness=randomness
    )
    return model, private_optimizer, loader


def make_private_with_epsilon(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float,
    target_delta: float,
    epochs: float,
    accountant: str = "rdp",
    relation: str = "erase",
    **settings: Any,
) -> tuple[nn.Module, MaskDPOptimizer, MaskDPDataLoader]:
    """:func:`make_private` with the smallest noise that keeps ``epochs`` epochs within budget.

    ``steps`` is :func:`~maskdp.mechanism.sampling.epochs_to_steps` (an epoch is one pass of
    the returned loader); the noise multiplier comes from
    :func:`maskdp.accounting.calibration.calibrate_noise` for those steps at the Poisson
    rate (its epsilon is at most the target: the safe side). The budget guard is armed with
    the same target, so a step past the planned ones raises
    :class:`~maskdp.errors.PrivacyBudgetExceeded`. Other keyword arguments are those of
    :func:`make_private`.
    """
    from maskdp.accounting.calibration import calibrate_noise

    target = check_target_epsilon(target_epsilon)
    delta = check_delta(target_delta, "target_delta")
    accountant = check_choice("accountant", accountant, ACCOUNTANTS)
    relation = check_choice("relation", relation, RELATIONS)
    rate, _, _ = _rate(data_loader)
    steps = epochs_to_steps(epochs, rate)
    sigma = calibrate_noise(
        target, delta, sample_rate=rate, steps=steps, accountant=accountant, relation=relation
    )
    return make_private(
        model,
        optimizer,
        data_loader,
        noise_multiplier=sigma,
        target_epsilon=target,
        target_delta=delta,
        accountant=accountant,
        relation=relation,
        **settings,
    )
