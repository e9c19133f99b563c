r"""The audit's training runs, each on the public training path.

Every run starts from the same initial parameters :math:`\theta_0` and is built exactly as a
user's training is: :func:`~maskdp.training.private.make_private` over a
:class:`~maskdp.data.poisson.PoissonDataLoader` of the world's records
``(inputs, mask, target, present)`` at the audited rate :math:`q`, for ``steps`` steps. Its
private batches and noise come from the audit's seeded private randomness, its public
batches from a second, independent seeded stream (:func:`audit_randomness`): every run is
replayable, and the streams run on from one run to the next, so that the runs are
independent draws of the mechanism.
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Iterable, Iterator

import numpy as np
import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from maskdp.analysis.canary import Loss, Worlds
from maskdp.analysis.config import OptimizerFn
from maskdp.data.poisson import MaskDPDataLoader, PoissonDataLoader, StepBatches
from maskdp.engines.base import trainable_parameters
from maskdp.mechanism.randomness import InsecureSeededRandomness, Randomness
from maskdp.settings import PrivacySettings
from maskdp.training.private import LOADER_FIXED_SETTINGS, make_private

BatchFn = Callable[[MaskDPDataLoader], Iterable[StepBatches]]


def step_batches(loader: MaskDPDataLoader) -> Iterator[StepBatches]:
    """One pass of make_private's loader: each step's private Poisson batch and its
    independent public batch (the subsampled audit swaps this for its comparison)."""
    return iter(loader)


def audit_randomness(seed: int) -> tuple[Randomness, Randomness]:
    """(private, public) randomness of the audit, replayable from ``seed``.

    An audit is an offline test of the mechanism, never a training run: the warning of
    seeded randomness is silenced here on purpose.
    """
    state = np.random.SeedSequence([seed]).generate_state(2, dtype=np.uint64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        private, public = (InsecureSeededRandomness(int(v >> np.uint64(1))) for v in state)
    return private, public


@dataclasses.dataclass(frozen=True)
class RunPlan:
    """What every training run of an audit shares besides the model.

    ``optimizer_fn(params)`` builds each run's fresh inner optimizer; ``batches`` turns
    make_private's loader into the steps' ``(private, public)`` batches.
    """

    settings: PrivacySettings
    loss_fn: Loss
    optimizer_fn: OptimizerFn
    steps: int
    seed: int
    batches: BatchFn = step_batches

    def private_options(self) -> dict[str, object]:
        """The keyword settings of make_private: ``settings`` less what the loader fixes."""
        fields = dataclasses.fields(self.settings)
        return {
            f.name: getattr(self.settings, f.name)
            for f in fields
            if f.name not in LOADER_FIXED_SETTINGS
        }


def world_loader(data: TensorDataset, plan: RunPlan) -> PoissonDataLoader:
    """What every run of one world hands to make_private: a Poisson loader at the audited
    rate for ``plan.steps`` steps. make_private keeps both and replaces its sampler by one
    that draws from the run's randomness."""
    return PoissonDataLoader(data, sample_rate=plan.settings.sample_rate, steps=plan.steps)


def train_run(
    model: nn.Module,
    loader: PoissonDataLoader,
    plan: RunPlan,
    randomness: tuple[Randomness, Randomness],
) -> dict[str, Tensor]:
    """``plan.steps`` MaskDP-SGD steps from wherever the model is, with the optimizer and
    paired loader :func:`make_private` builds over ``loader`` (whose records are
    ``(inputs, mask, target, present)``); the final trainable parameters."""
    private, public = randomness
    _, optimizer, pairs = make_private(
        model,
        plan.optimizer_fn(list(trainable_parameters(model).values())),
        loader,
        loss_fn=plan.loss_fn,
        public_batch_size=plan.settings.expected_public_batch_size,
        randomness=private,
        public_randomness=public,
        **plan.private_options(),
    )
    try:
        for (inputs, mask, targets, present), public_batch in plan.batches(pairs):
            optimizer.backward(
                inputs,
                mask,
                targets,
                public=None if public_batch is None else tuple(public_batch[:3]),
                present=present,
            )
            optimizer.step()
    finally:
        optimizer.close()
    return {k: p.detach().clone() for k, p in trainable_parameters(model).items()}


def run_worlds(
    model: nn.Module,
    worlds: Worlds,
    labels: tuple[Tensor, Tensor],
    plan: RunPlan,
    trials: int,
    score: Callable[[dict[str, Tensor]], float],
) -> list[list[float]]:
    """``score(final parameters)`` of ``trials`` runs of world 0, then of world 1.

    ``labels`` is ``(masks, targets)``, shared by the worlds. Each run starts from the
    model's current state (restored afterwards); torch's own generator (the model's random
    draws, e.g. dropout) is seeded with ``plan.seed`` and restored afterwards.
    """
    mask, targets = labels
    device = next(iter(trainable_parameters(model).values())).device
    initial_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    randomness = audit_randomness(plan.seed)
    scores: list[list[float]] = [[], []]
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(plan.seed)
        try:
            for world, (inputs, present) in enumerate(worlds):
                data = TensorDataset(inputs, mask, targets, present)
                loader = world_loader(data, plan)
                for _ in range(trials):
                    model.load_state_dict(initial_state)
                    scores[world].append(score(train_run(model, loader, plan, randomness)))
        finally:
            model.load_state_dict(initial_state)
    return scores
