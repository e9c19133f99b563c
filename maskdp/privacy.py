r"""``make_private``: turn (model, optimizer, loader) into a MaskDP training setup.

Always returns three values ``(model, optimizer, data_loader)``:

- the model, unchanged (engines hook it; its names and state_dict keys stay the user's);
- a :class:`~maskdp.optimizer.MaskDPOptimizer` around the optimizer;
- a :class:`~maskdp.data.poisson.PoissonDataLoader` over the loader's dataset. The loader's
  sampler is always replaced: shuffled fixed-size batches are not Poisson, and the
  accounting is only valid for Poisson batches.

The sampling rate is :math:`q = B / N` with :math:`B` the loader's ``batch_size`` and
:math:`N` the dataset size, so the expected batch size (the divisor of each step) is exactly
:math:`B`; an epoch keeps ``len(data_loader)`` steps. (Opacus uses ``1 / len(data_loader)``,
which equals :math:`B / N` when :math:`B` divides :math:`N`.)
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.utils.data import DataLoader

from maskdp.data.poisson import PoissonDataLoader
from maskdp.engines.base import PerSampleLoss
from maskdp.errors import InvalidInputError
from maskdp.optimizer import MaskDPOptimizer, check_delta, check_target_epsilon
from maskdp.views import PublicView

ViewArg = PublicView | Callable[[Tensor, Tensor], Tensor] | None


def _poisson(
    data_loader: DataLoader, generator: torch.Generator | None
) -> tuple[PoissonDataLoader, float, int]:
    """The Poisson loader, its rate q = B / N and the expected batch size B."""
    if not isinstance(data_loader, DataLoader):
        raise InvalidInputError(
            f"data_loader must be a torch DataLoader, got {type(data_loader).__name__}"
        )
    if isinstance(data_loader, PoissonDataLoader):
        rate = data_loader.sample_rate
        expected = max(1, round(data_loader.expected_batch_size))
    else:
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
        rate = expected / n
    loader = PoissonDataLoader.from_data_loader(data_loader, sample_rate=rate, generator=generator)
    return loader, rate, expected


def make_private(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    loss_fn: nn.Module | PerSampleLoss,
    view: ViewArg = None,
    engine: str = "auto",
    protect_labels: bool = False,
    target_epsilon: float | None = None,
    target_delta: float | None = None,
    accountant: str = "rdp",
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, MaskDPOptimizer, PoissonDataLoader]:
    """(model, :class:`MaskDPOptimizer`, Poisson loader); see the module docstring.

    ``generator`` (a CPU ``torch.Generator``) seeds both the Poisson sampling and the noise
    (the optimizer's :meth:`~MaskDPOptimizer.state_dict` then saves both; noise for CUDA
    parameters is drawn on the CPU and moved); ``None`` uses torch's global generators. Other arguments are those of :class:`MaskDPOptimizer`.
    """
    loader, rate, expected = _poisson(data_loader, generator)
    private_optimizer = MaskDPOptimizer(
        optimizer,
        model=model,
        loss_fn=loss_fn,
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        expected_batch_size=expected,
        sample_rate=rate,
        view=view,
        engine=engine,
        protect_labels=protect_labels,
        target_epsilon=target_epsilon,
        target_delta=target_delta,
        accountant=accountant,
        noise_generator=generator,
    )
    return model, private_optimizer, loader


def make_private_with_epsilon(
    model: nn.Module,
    optimizer: Optimizer,
    data_loader: DataLoader,
    *,
    target_epsilon: float,
    target_delta: float,
    epochs: int,
    max_grad_norm: float,
    loss_fn: nn.Module | PerSampleLoss,
    view: ViewArg = None,
    engine: str = "auto",
    protect_labels: bool = False,
    accountant: str = "rdp",
    generator: torch.Generator | None = None,
) -> tuple[nn.Module, MaskDPOptimizer, PoissonDataLoader]:
    """:func:`make_private` with the smallest noise that keeps ``epochs`` epochs within budget.

    The noise multiplier comes from :func:`accounting.calibration.calibrate_noise` for
    ``steps = epochs * len(data_loader)`` at the Poisson rate (its epsilon is at most the
    target: the safe side). The budget guard is armed with the same target, so a step past
    the planned ones raises :class:`~maskdp.errors.PrivacyBudgetExceeded`.
    """
    from accounting.calibration import calibrate_noise

    target = check_target_epsilon(target_epsilon)
    delta = check_delta(target_delta, "target_delta")
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise InvalidInputError(f"epochs must be an int >= 1, got {epochs!r}")
    loader, rate, _ = _poisson(data_loader, generator)
    steps = epochs * len(loader)
    sigma = calibrate_noise(target, delta, sample_rate=rate, steps=steps, accountant=accountant)
    if not math.isfinite(sigma):  # pragma: no cover - calibrate_noise raises instead
        raise InvalidInputError(f"no noise multiplier reaches epsilon {target} in {steps} steps")
    return make_private(
        model,
        optimizer,
        data_loader,
        noise_multiplier=sigma,
        max_grad_norm=max_grad_norm,
        loss_fn=loss_fn,
        view=view,
        engine=engine,
        protect_labels=protect_labels,
        target_epsilon=target,
        target_delta=delta,
        accountant=accountant,
        generator=generator,
    )
