"""The parts of a run built from its :class:`TrainConfig`: datasets, model, view, device, plan."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.utils.data import Dataset

from maskdp.errors import InvalidInputError
from maskdp.mechanism.sampling import epochs_to_steps
from maskdp.trainer.config import TrainConfig


@dataclass(frozen=True)
class Plan:
    """Derived schedule of a run: sampling rate, step counts and noise."""

    sample_rate: float
    public_steps: int
    private_steps: int
    noise_multiplier: float

    @property
    def total_steps(self) -> int:
        return self.public_steps + self.private_steps


class MemoDataset(Dataset):
    """Keeps each item of a generated dataset after its first rendering (epochs reuse it).

    Other attributes (``identities``, ``render``, ...) are those of the wrapped dataset.
    """

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self._items: dict[int, Any] = {}

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, index: int) -> Any:
        index = int(index)
        item = self._items.get(index)
        if item is None:
            item = self._items[index] = self.dataset[index]
        return item

    def __getattr__(self, name: str) -> Any:
        if name.startswith("__") or name in ("dataset", "_items"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def build_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, int]:
    """Train set, test set and number of classes."""
    if config.data == "synthetic" and config.scenario in FOOTAGE_TASKS:
        return _footage_datasets(config)
    if config.data == "synthetic":
        from maskdp.data import SyntheticPrivateActions

        train, test = SyntheticPrivateActions.train_test(
            train_size=config.train_size,
            test_size=config.test_size,
            scenario=config.scenario,
            frames=config.frames,
            image_size=config.image_size,
            seed=config.seed,
        )
        return MemoDataset(train), MemoDataset(test), train.num_classes
    from maskdp.data import ClipFolder

    root = Path(config.data)
    train, test = ClipFolder(root / "train"), ClipFolder(root / "test")
    return train, test, int(max(train.num_classes, test.num_classes))


FOOTAGE_TASKS = {
    "footage": "avatar-action",
    "footage-context": "avatar-context",
    "footage-person": "person",
}


def _footage_datasets(config: TrainConfig) -> tuple[Dataset, Dataset, int]:
    """The real-footage task of ``config.scenario`` (:mod:`maskdp.data.real_footage`)."""
    from maskdp.data.real_footage import RealFootageActions

    common = dict(
        task=FOOTAGE_TASKS[config.scenario],
        frames=config.frames,
        image_size=config.image_size,
        seed=config.seed,
    )
    train = RealFootageActions(config.train_size, train=True, **common)
    test = RealFootageActions(config.test_size, train=False, **common)
    return MemoDataset(train), MemoDataset(test), train.num_classes


def build_model(
    config: TrainConfig, num_classes: int, clip_shape: tuple[int, ...] | None = None
) -> nn.Module:
    """The config's model, freshly initialised, for clips of ``clip_shape`` (C, T, H, W)
    (default: the config's synthetic clip size): VideoViT, a 3-block SmallVideoCNN with
    global max pooling, or torchvision's r3d_18; with ``private_branch``, a
    :class:`~maskdp.models.PrivateResidual` of two of them."""
    from maskdp.models import PrivateResidual

    model = _one_model(config, num_classes, clip_shape, branch=False)
    if not config.uses_private_branch:
        return model
    return PrivateResidual(model, _one_model(config, num_classes, clip_shape, branch=True))


def _one_model(
    config: TrainConfig,
    num_classes: int,
    clip_shape: tuple[int, ...] | None,
    *,
    branch: bool,
) -> nn.Module:
    """One model of the config's kind. The private ``branch`` sees what the public model
    cannot, the sensitive region's content: never temporally centred (centering removes a
    static scene's colours), and the CNN branch pools by average and max (a scene fills
    the clip, an actor does not; benchmarks/RESULTS.md, "(cnn)" main table)."""
    from maskdp.models import SmallVideoCNN, VideoViT

    temporal_centering = config.temporal_centering and not branch
    channels, frames, height, width = clip_shape or (3, config.frames, *[config.image_size] * 2)
    if config.model == "vit":
        return VideoViT(
            num_classes=num_classes,
            in_channels=channels,
            frames=frames,
            image_size=(height, width),
            temporal_centering=temporal_centering,
        )
    if config.model == "cnn":
        return SmallVideoCNN(
            num_classes=num_classes,
            in_channels=channels,
            blocks=3,
            pool="avgmax" if branch else "max",
            temporal_centering=temporal_centering,
        )
    return _r3d_18(num_classes, channels)


def _r3d_18(num_classes: int, channels: int) -> nn.Module:
    """torchvision's r3d_18, randomly initialised, made private-trainable by ``prepare``."""
    from torchvision.models.video import r3d_18

    from maskdp.models import prepare

    if channels != 3:
        raise InvalidInputError(f"r3d_18 takes 3-channel clips, the data has {channels}")
    model, _ = prepare(r3d_18(num_classes=num_classes))
    return model


def build_view(config: TrainConfig, model: nn.Module) -> Any:
    """The public view of the masked clips named by ``config.view``."""
    from maskdp.mechanism.coverage_view import CoverageView
    from maskdp.mechanism.texture_view import TextureFillView
    from maskdp.mechanism.views import DropView, FillView, InpaintView, RandomFillView

    if config.view == "coverage":
        return CoverageView(seed=config.seed)
    if config.view in ("texture", "texture-pan"):
        return TextureFillView(seed=config.seed, follow_region=config.view == "texture")
    if config.view == "fill":
        return FillView(0.5)
    if config.view == "random":
        return RandomFillView(0.0, 1.0, seed=config.seed)
    if config.view == "inpaint":
        return InpaintView("temporal", fallback=0.5)
    return DropView.for_model(model, fill=0.5)


def make_plan(config: TrainConfig, dataset_size: int) -> Plan:
    """Sampling rate, steps and (calibrated) noise multiplier of a run."""
    if config.batch_size > dataset_size:
        raise InvalidInputError(
            f"batch_size {config.batch_size} exceeds the dataset size {dataset_size}"
        )
    q = config.batch_size / dataset_size
    private_steps = epochs_to_steps(config.epochs, q)  # the one definition of an epoch
    warm_up = config.mode == "maskdp" and config.public_epochs > 0
    public_steps = epochs_to_steps(config.public_epochs, q) if warm_up else 0
    if config.mode == "nonprivate":
        return Plan(q, public_steps, private_steps, 0.0)
    if config.noise_multiplier is not None:
        return Plan(q, public_steps, private_steps, config.noise_multiplier)
    from maskdp.accounting.calibration import calibrate_noise

    sigma = calibrate_noise(
        config.target_epsilon,
        config.delta,
        sample_rate=q,
        steps=private_steps,
        accountant=config.accountant,
        relation=config.relation,
    )
    return Plan(q, public_steps, private_steps, sigma)


def resolve_device(name: str) -> torch.device:
    """The torch device named by ``--device``; a clear error when it is not usable here."""
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise InvalidInputError(
            f"--device {name!r} is not a torch device (cpu, cuda, cuda:1)"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device {name}: CUDA is not available on this machine")
    return device
