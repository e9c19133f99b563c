"""The ``maskdp train`` main job: build, train, checkpoint, resume and evaluate one run.

A run directory (:mod:`maskdp.trainer.rundir`) holds ``config.json``, ``checkpoint.pt`` and
``metrics.json`` (the :class:`~maskdp.trainer.result.TrainResult`). Every file is written
atomically, so a crash at any moment leaves the previous complete version.

The run is built on :func:`maskdp.training.private.make_private`: each step takes a private Poisson
batch and an independent public batch, and the noise and the private sampling draw from the
OS entropy pool. The config's ``seed`` fixes only public things (the synthetic data, the
initial weights, a random-fill view); no seed determines the noise or the sampling, so none
is written anywhere, and the checkpoint holds no generator state. A resumed run draws fresh
secret batches, which is what an uninterrupted run does too. Evaluating and exporting a
stored run: :mod:`maskdp.trainer.artifacts`; building its parts: :mod:`maskdp.trainer.build`.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from maskdp.errors import InvalidInputError
from maskdp.inference import accuracy
from maskdp.io import atomic_write_json, remove_temporaries
from maskdp.mechanism.subset import public_side, resolve_private_parameters
from maskdp.trainer.build import build_datasets, build_model, build_view, make_plan, resolve_device
from maskdp.trainer.config import TrainConfig
from maskdp.trainer.result import TrainResult
from maskdp.trainer.rundir import CHECKPOINT, CONFIG, METRICS, check_run_dir, new_run_dir
from maskdp.training.checkpoint import load_checkpoint, save_checkpoint
from maskdp.training.distributed import DistributedContext, from_env, sum_gradients

__all__ = ["CHECKPOINT", "CONFIG", "METRICS", "Run", "TrainResult", "train"]


Batch = tuple[Tensor, Tensor, Tensor]
#: The default public batch is this many times the private one: the public term costs no
#: privacy, and a larger batch lowers its variance (on the real-footage task, VideoViT,
#: epsilon 1, three seeds: 0.746 accuracy with a public batch of 256 against 0.631 with 64).
PUBLIC_BATCH_FACTOR = 4


def _param_groups(model: nn.Module, config: TrainConfig) -> list[dict[str, Any]]:
    """One AdamW group at ``lr``; with ``private_branch``, the branch in a second group at
    ``private_branch_lr``."""
    if not config.uses_private_branch:
        return [{"params": list(model.parameters())}]
    return [
        {"params": list(model.public.parameters())},
        {"params": list(model.residual.parameters()), "lr": config.private_branch_lr},
    ]


class Run:
    """One training run bound to a run directory."""

    def __init__(
        self, config: TrainConfig, run_dir: Path, *, dist: DistributedContext | None = None
    ) -> None:
        self.config = config
        self.run_dir = Path(run_dir)
        self.dist = dist  # torchrun: this rank's place; None for one process
        self.device = resolve_device(config.device)
        torch.manual_seed(config.seed)  # public: data, initial weights, dropout draws
        self.train_set, self.test_set, num_classes = build_datasets(config)
        clip_shape = tuple(self.train_set[0][0].shape)  # (C, T, H, W) of the data
        self.model = build_model(config, num_classes, clip_shape).to(self.device)
        self.plan = make_plan(config, len(self.train_set))
        #: The parameters that get the private term (the branch, with ``private_branch``).
        self.private_names = resolve_private_parameters(
            self.model, config.private_parameter_names()
        )
        self.inner = torch.optim.AdamW(
            _param_groups(self.model, config), lr=config.lr, weight_decay=config.weight_decay
        )
        self.view = build_view(config, self.model)
        #: Expected public batch size: the config's, or 4 x the private one (at most N).
        self.public_batch_size = config.public_batch_size or min(
            PUBLIC_BATCH_FACTOR * config.batch_size, len(self.train_set)
        )
        # DDP broadcasts rank 0's parameters; MaskDPOptimizer then all-reduces the sums and
        # noises them once (maskdp.training.distributed); the loaders yield this rank's shard.
        self.ddp = nn.parallel.DistributedDataParallel(self.model) if dist is not None else None
        self.optimizer, self.loader = self._private_setup()
        self.step = 0

    def _private_setup(self) -> tuple[Any, Any]:
        """The optimizer (None when non-private) and the loader of (private, public) pairs."""
        from torch.utils.data import DataLoader

        from maskdp.training.private import make_private

        config = self.config
        base = DataLoader(self.train_set, batch_size=config.batch_size)
        model = self.ddp if self.ddp is not None else self.model
        _, optimizer, loader = make_private(
            model,
            self.inner,
            base,
            noise_multiplier=self.plan.noise_multiplier,
            max_grad_norm=config.max_grad_norm,
            loss_fn=nn.CrossEntropyLoss(),
            view=self.view,
            engine=config.engine,
            protect_labels=config.mode == "dpsgd",
            private_weight=config.private_weight,
            shrinkage=None if config.shrinkage == "none" else config.shrinkage,
            private_parameters=config.private_parameter_names(),
            private_term="full" if config.uses_private_branch else "difference",
            public_batch_size=self.public_batch_size,
            accountant=config.accountant,
            relation=config.relation,
        )
        if config.mode == "nonprivate":
            optimizer.close()
            return None, loader
        return optimizer, loader

    # -- persistence ---------------------------------------------------------------------
    def save(self) -> None:
        """Checkpoint the model, optimizer (with its ledger), loader and step, atomically."""
        if self.dist is not None and not self.dist.is_main:
            return  # rank 0 alone writes the run directory
        save_checkpoint(
            self.run_dir / CHECKPOINT,
            model=self.model,
            optimizer=self.optimizer if self.optimizer is not None else self.inner,
            loader=self.loader if self.optimizer is not None else None,
            extra={"step": self.step},
        )

    def load(self) -> None:
        """Restore the run's checkpoint, ledger and step included."""
        if not (self.run_dir / CHECKPOINT).exists():
            raise InvalidInputError(f"no checkpoint to resume in {self.run_dir}")
        extra = load_checkpoint(
            self.run_dir / CHECKPOINT,
            model=self.model,
            optimizer=self.optimizer if self.optimizer is not None else self.inner,
            loader=self.loader if self.optimizer is not None else None,
        )
        step = extra.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise InvalidInputError(f"checkpoint in {self.run_dir} has no valid step")
        self.step = step

    # -- training ------------------------------------------------------------------------
    def epsilon(self) -> float:
        """The privacy spent so far at the config's delta (inf when non-private)."""
        if self.optimizer is None:
            return math.inf
        return float(self.optimizer.epsilon(self.config.delta))

    def _on_device(self, batch: Any) -> Batch:
        x, m, y = batch
        if self.config.mode == "dpsgd":
            m = torch.ones_like(m)
        return x.to(self.device), m.to(self.device), y.to(self.device)

    def _batches(self) -> Iterator[tuple[Batch, Batch | None]]:
        """(private, public) pairs, pass after pass of the loader."""
        while True:
            for private, public in self.loader:
                yield (
                    self._on_device(private),
                    None if public is None else self._on_device(public),
                )

    def _plain_step(self, x: Tensor, y: Tensor, model_input: Any, divisor: int) -> float:
        """A non-private step on ``model_input`` (public views, or full clips when
        non-private): no noise, divided by the expected batch size ``divisor``."""
        self.inner.zero_grad()
        loss = math.nan
        if len(y):
            total = nn.functional.cross_entropy(model_input(self.model), y, reduction="sum")
            (total / divisor).backward()
            loss = float(total.detach()) / len(y)
        self._inner_step(len(y))
        return loss

    def _public_step(self, public: Batch) -> float:
        """Warm-up on public views of the public batch only: no privacy cost. A private
        branch stays as built (it learns from the private term alone)."""
        x, m, y = public
        with public_side(self.model, self.private_names, self.config.uses_private_branch):
            return self._plain_step(x, y, self.view.public(x, m), self.public_batch_size)

    def _inner_step(self, count: int) -> None:
        """The inner optimizer's step on a non-empty (global) batch; ranks sum gradients."""
        params = list(self.model.parameters())
        if sum_gradients(params, self.dist, count):
            self.inner.step()

    def _private_step(self, private: Batch, public: Batch | None) -> float:
        """One step; the loss returned is the public-view loss (nothing un-noised)."""
        if self.optimizer is None:  # non-private: full clips, no noise
            x, _, y = private
            return self._plain_step(x, y, lambda model: model(x), self.config.batch_size)
        loss = self.optimizer.backward(*private, public=public)
        self.optimizer.step()
        return float(loss)

    def steps(self) -> Iterator[tuple[int, float]]:
        """Run the remaining steps, yielding (step, public loss); checkpoints about once an
        epoch and at the end."""
        every = max(1, round(1 / self.plan.sample_rate))
        batches = self._batches()
        while self.step < self.plan.total_steps:
            private, public = next(batches)
            if self.step < self.plan.public_steps:
                loss = self._public_step(public if public is not None else private)
            else:
                loss = self._private_step(private, public)
            self.step += 1
            if self.step % every == 0 or self.step == self.plan.total_steps:
                self.save()
            yield self.step, loss

    def _masked_accuracy(self) -> float | None:
        """Accuracy on test clips through a fresh copy of the training view (MaskDP runs)."""
        if self.config.mode != "maskdp":
            return None
        view = build_view(self.config, self.model)
        return accuracy(self.model, self.test_set, masked=True, view=view)

    def metrics(self) -> dict[str, Any]:
        """Privacy spent, schedule and test accuracy at the current step."""
        epsilon = self.epsilon()
        return {
            "mode": self.config.mode,
            "epsilon": epsilon if math.isfinite(epsilon) else None,
            "delta": self.config.delta if self.optimizer is not None else None,
            "steps": self.step,
            "private_steps": max(0, self.step - self.plan.public_steps),
            "noise_multiplier": self.plan.noise_multiplier,
            "sample_rate": self.plan.sample_rate,
            "accuracy": accuracy(self.model, self.test_set),
            "masked_accuracy": self._masked_accuracy(),
            "accountant": self.config.accountant if self.optimizer is not None else None,
            "relation": self.config.relation if self.optimizer is not None else None,
            # The engine that computes the private steps (engine="auto": the one it chose).
            "engine": self.optimizer.engine.name if self.optimizer is not None else None,
        }


def train(
    config: TrainConfig,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    on_step: Callable[[int, int, float, Run], None] | None = None,
) -> TrainResult:
    """Train one run and return its result (also written to ``metrics.json``).

    With ``resume`` the run directory's config must equal ``config`` and training continues
    from its checkpoint with the same ledger.

    Under ``torchrun`` (``RANK``/``WORLD_SIZE`` set) every rank joins a gloo (CPU) or nccl
    (CUDA) process group, trains on its shard of each step's Poisson sample with the ranks'
    clipped sums all-reduced and noised once (:mod:`maskdp.training.distributed`), and rank 0 alone
    writes the run directory; every rank returns the same result.
    """
    with from_env(config.device) as dist:
        return _train(config, run_dir, resume=resume, on_step=on_step, dist=dist)


def _shared_run_dir(run_dir: str | Path | None, dist: DistributedContext | None) -> Path:
    """``run_dir``, or a new one; under torchrun rank 0's timestamped name for every rank."""
    path = Path(run_dir) if run_dir is not None else new_run_dir()
    if dist is not None and run_dir is None:
        shared = [str(path)]
        torch.distributed.broadcast_object_list(shared, src=0)
        path = Path(shared[0])
    return path


def _train(
    config: TrainConfig,
    run_dir: str | Path | None,
    *,
    resume: bool,
    on_step: Callable[[int, int, float, Run], None] | None,
    dist: DistributedContext | None,
) -> TrainResult:
    main = dist is None or dist.is_main
    path = _shared_run_dir(run_dir, dist)
    check_run_dir(path, config, resume=resume)
    run = Run(config, path, dist=dist)
    if dist is not None:
        dist.barrier()  # every rank has checked the directory before rank 0 writes to it
    if main:  # temporaries of a writer killed mid-write (the targets themselves are whole)
        remove_temporaries(path, (CONFIG, CHECKPOINT, METRICS))
    if resume and (path / CHECKPOINT).exists():
        run.load()
    elif main:
        atomic_write_json(path / CONFIG, config.to_dict())
    start = time.perf_counter()
    for step, loss in run.steps():
        if on_step is not None:
            on_step(step, run.plan.total_steps, loss, run)
    # The wall time is a function of the batch sizes, whose law is the same in both worlds
    # of the erase relation; timing channels are outside the guarantee (docs/privacy.md).
    seconds = round(time.perf_counter() - start, 2)
    result = TrainResult(**run.metrics(), train_seconds=seconds, run_dir=str(path))
    if main:
        atomic_write_json(path / METRICS, result.to_dict())
    return result
