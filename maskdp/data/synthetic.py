r"""Synthetic private actions: clips whose class is a motion and whose secret is an identity.

Each clip shows one *actor* (a square, disc or diamond, drawn per clip) moving over a
textured *background*; actors are brighter than backgrounds on average. Two independent
labels are drawn per clip:

- the **action** (the class a model learns): how the actor moves over the clip: right,
  left, down, up (crossing 60-100% of the frame), a clockwise circle, or staying in place
  while growing (zoom);
- the **identity** (what an attacker could learn): a per-identity texture (base colour,
  stripe orientation, stripe frequency, per-channel stripe weights) drawn in the sensitive
  region, with a random phase, colour jitter and contrast per clip so that it is not a
  constant. Identities come in pairs sharing colours and differing in stripe orientation,
  so colour statistics tell at most the pair.

Two scenarios decide which region is sensitive and carries the identity:

- ``"avatar"`` (the seed paper's setting, Schneider et al. 2024): the actor is an avatar
  that already replaced the person (a flat colour drawn per clip, public); the real
  background is sensitive and carries the identity. Public-only signal: all of the action
  (the avatar's motion); the sensitive background tells nothing about the action.
- ``"person"``: the actor is the sensitive person and carries the identity in its
  appearance (a texture that moves with it); the background is a public texture drawn per
  clip, independent of both labels. Public-only signal: the mask itself (public metadata)
  moves with the actor, so the action stays visible through the mask's outline with
  ``"exact"`` and ``"box"`` masks; ``"track"`` masks leave only the axis of motion.

Masks (``True`` = sensitive) cover every identity-carrying pixel, for every kind:

- ``"exact"``: the segmentation: the background (avatar) or the actor's silhouette
  (person). A mask derived from sensitive content leaks its shape: a silhouette reveals the
  person's outline. Boxes mitigate it.
- ``"box"``: per frame, person: the actor's bounding box grown by ``box_margin`` pixels;
  avatar: everything except the largest axis-aligned box inside the avatar (the avatar's
  outline is hidden, the box loses a little public signal).
- ``"track"`` (person only): one box around the actor's whole trajectory, the same in every
  frame: it hides the outline and the motion inside the box (the box's extent still tells
  the axis of motion, not its direction).

Pixels are :math:`\mathrm{clamp}(\text{scene} + \epsilon, 0, 1)` with :math:`\epsilon` zero-mean
uniform noise of standard deviation ``noise``, independent per pixel and frame.
Generation is lazy and deterministic: item ``i`` is drawn from its own generator seeded by
``(seed, train/test, i)``; labels are a seeded permutation of a balanced grid, so every
(action, identity) pair occurs equally often (up to one) and the identity carries no
information about the action. Train and test sets (``train=False``) use disjoint streams
from the same distribution; the identity prototypes come from ``world_seed``, shared by
both.

Textures live in :mod:`maskdp.data.textures`, the geometry (paths, silhouettes, masks) in
:mod:`maskdp.data.scenes`; this module draws and composes them.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskdp.checks import check_bool, check_choice, check_count, check_finite, check_int_in
from maskdp.data.scenes import sensitive_mask, silhouette, trajectory
from maskdp.data.textures import ROLES, Texture, random_texture
from maskdp.errors import InvalidInputError

__all__ = [
    "ACTIONS",
    "MASK_KINDS",
    "SCENARIOS",
    "RenderedClip",
    "SyntheticPrivateActions",
    "identity_textures",
]

ACTIONS: tuple[str, ...] = ("right", "left", "down", "up", "circle", "zoom")
SCENARIOS: tuple[str, ...] = ("avatar", "person")
MASK_KINDS: tuple[str, ...] = ("exact", "box", "track")

# Tags that keep the seeded streams apart (numpy pads short entropy lists with zeros, so
# every stream uses four words with a distinct first word).
_ITEM, _LABELS, _WORLD = 1, 2, 3


def identity_textures(
    num_identities: int,
    *,
    channels: int,
    image_size: int,
    role: str = "background",
    world_seed: int = 0,
) -> list[Texture]:
    """The identity prototypes: one texture per identity, in the colour range of ``role``.

    Identities ``k`` and ``k + ceil(K / 2)`` share colours, stripe weights and frequency and
    differ only in stripe orientation (spread over [0, pi), about pi / 2 apart for such a
    pair), so colour statistics alone tell at most a pair apart: recognising an identity
    needs its texture.
    """
    rng = np.random.default_rng([_WORLD, world_seed, channels, image_size])
    families = [
        random_texture(rng, channels, image_size, role) for _ in range(-(-num_identities // 2))
    ]
    textures = []
    for k in range(num_identities):
        family = families[k % len(families)]
        theta = math.pi * (k + float(rng.uniform(-0.2, 0.2))) / num_identities
        textures.append(
            Texture(family.colour, family.weights, theta, family.frequency, family.amplitude)
        )
    return textures


@dataclass(frozen=True)
class RenderedClip:
    """One generated clip with its ground truth.

    ``clip`` (C, T, H, W) float32 in [0, 1]; ``mask`` (T, H, W) bool, True = sensitive;
    ``actor`` (T, H, W) bool, the actor's exact silhouette; ``action`` and ``identity``.
    """

    clip: Tensor
    mask: Tensor
    actor: Tensor
    action: int
    identity: int


@dataclass(frozen=True, eq=False)
class _Draws:
    """Every random draw of one clip. :meth:`draw` makes them in a fixed order whatever the
    labels, so that changing the identity changes nothing else."""

    shape_kind: int
    cx: np.ndarray
    cy: np.ndarray
    radius: np.ndarray
    id_phase: float
    id_shift: np.ndarray
    id_contrast: float
    plain_colour: np.ndarray
    public_texture: Texture
    public_phase: float
    unit_noise: np.ndarray  # uniform in [0, 1), (C, T, H, W)

    @classmethod
    def draw(
        cls, rng: np.random.Generator, action: str, *, channels: int, frames: int, size: int
    ) -> _Draws:
        shape_kind = int(rng.integers(3))
        cx, cy, radius = trajectory(rng, action, frames=frames, size=size)
        id_phase = float(rng.uniform(0.0, 2.0 * math.pi))
        id_shift = rng.normal(0.0, 0.06, channels).astype(np.float32)
        id_contrast = float(rng.uniform(0.7, 1.3))
        (c_lo, c_hi), _ = ROLES["actor"]
        plain_colour = rng.uniform(c_lo, c_hi, channels).astype(np.float32)
        public_texture = random_texture(rng, channels, size, "background")
        public_phase = float(rng.uniform(0.0, 2.0 * math.pi))
        unit_noise = rng.random((channels, frames, size, size), dtype=np.float32)
        return cls(
            shape_kind,
            cx,
            cy,
            radius,
            id_phase,
            id_shift,
            id_contrast,
            plain_colour,
            public_texture,
            public_phase,
            unit_noise,
        )


def _add_noise(scene: np.ndarray, unit_noise: np.ndarray, std: float) -> np.ndarray:
    """``clamp(scene + eps, 0, 1)`` with eps zero-mean uniform of standard deviation ``std``
    (``sqrt(12) * std * (u - 1/2)``, cheaper than Gaussian), in place in both arrays."""
    unit_noise -= 0.5
    unit_noise *= std * math.sqrt(12.0)
    scene += unit_noise
    return np.clip(scene, 0.0, 1.0, out=scene)


class SyntheticPrivateActions(Dataset):
    """Generated clips ``(clip (C, T, H, W) float32, mask (T, H, W) bool, action int64)``.

    See the module docstring for the design. ``identities`` (N,) holds the identity of every
    item and ``labels`` (N,) its action; ``render(i, identity=j)`` redraws item ``i`` with
    another identity and changes only pixels inside its mask.
    """

    def __init__(
        self,
        *,
        size: int,
        scenario: str = "avatar",
        num_classes: int = 4,
        num_identities: int = 8,
        frames: int = 8,
        image_size: int = 32,
        channels: int = 3,
        seed: int = 0,
        train: bool = True,
        noise: float = 0.05,
        mask_kind: str = "exact",
        box_margin: int = 1,
        world_seed: int = 0,
    ) -> None:
        self.size = check_count("size", size, 0)
        self.scenario = check_choice("scenario", scenario, SCENARIOS)
        self.num_classes = check_int_in("num_classes", num_classes, 2, len(ACTIONS))
        self.num_identities = check_count("num_identities", num_identities, 1)
        self.frames = check_count("frames", frames, 2)
        self.image_size = check_count("image_size", image_size, 16)
        self.channels = check_count("channels", channels, 1)
        self.seed = check_count("seed", seed, 0)
        self.world_seed = check_count("world_seed", world_seed, 0)
        self.box_margin = check_count("box_margin", box_margin, 0)
        self.mask_kind = check_choice("mask_kind", mask_kind, MASK_KINDS)
        if self.mask_kind == "track" and self.scenario != "person":
            raise InvalidInputError(
                'mask_kind="track" hides a sensitive actor\'s motion and needs scenario="person"'
            )
        self.train = check_bool("train", train)
        self.noise = check_finite("noise", noise)
        self.action_names = ACTIONS[: self.num_classes]
        self.textures = identity_textures(
            self.num_identities,
            channels=self.channels,
            image_size=self.image_size,
            role="background" if self.scenario == "avatar" else "actor",
            world_seed=self.world_seed,
        )
        self.labels, self.identities = self._balanced_labels()
        grid = np.arange(self.image_size, dtype=np.float32)
        self._ys, self._xs = grid[None, :, None], grid[None, None, :]

    @classmethod
    def train_test(
        cls, *, train_size: int, test_size: int, **kwargs: Any
    ) -> tuple[SyntheticPrivateActions, SyntheticPrivateActions]:
        """A train set and a test set from disjoint streams of the same distribution."""
        if "train" in kwargs or "size" in kwargs:
            raise InvalidInputError("train_test sets size and train itself; pass the other options")
        train = cls(size=train_size, train=True, **kwargs)
        return train, cls(size=test_size, train=False, **kwargs)

    def _balanced_labels(self) -> tuple[Tensor, Tensor]:
        cells = self.num_classes * self.num_identities
        rng = np.random.default_rng([_LABELS, self.seed, int(not self.train), 0])
        # Whole blocks of every (action, identity) cell, the last block a random subset.
        blocks = [rng.permutation(cells) for _ in range(-(-self.size // cells))]
        grid = rng.permutation(np.concatenate(blocks or [np.zeros(0, np.int64)])[: self.size])
        actions = torch.from_numpy(grid % self.num_classes).to(torch.int64)
        identities = torch.from_numpy(grid // self.num_classes).to(torch.int64)
        return actions, identities

    def __len__(self) -> int:
        return self.size

    def identity(self, index: int) -> int:
        """The identity of item ``index``."""
        return int(self.identities[self._index(index)])

    def _index(self, index: int) -> int:
        try:
            index = operator.index(index)  # ints, numpy ints, 0-dim integer tensors
        except TypeError:
            raise InvalidInputError(f"index must be an int, got {index!r}") from None
        if not -self.size <= index < self.size:
            raise IndexError(f"index {index} out of range for a dataset of size {self.size}")
        return int(index) % self.size

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        item = self.render(index)
        return item.clip, item.mask, torch.tensor(item.action, dtype=torch.int64)

    def tensors(self, indices: Any = None) -> tuple[Tensor, Tensor, Tensor]:
        """Stacked ``(clips (N, C, T, H, W), masks (N, T, H, W), actions (N,))``."""
        order = range(self.size) if indices is None else [int(i) for i in indices]
        items = [self.render(i) for i in order]
        if not items:
            s, t = self.image_size, self.frames
            return (
                torch.zeros(0, self.channels, t, s, s),
                torch.zeros(0, t, s, s, dtype=torch.bool),
                torch.zeros(0, dtype=torch.int64),
            )
        return (
            torch.stack([it.clip for it in items]),
            torch.stack([it.mask for it in items]),
            torch.tensor([it.action for it in items], dtype=torch.int64),
        )

    def render(self, index: int, *, identity: int | None = None) -> RenderedClip:
        """Item ``index``, optionally with ``identity`` in place of its own.

        Every random draw happens in the same order whatever the labels, so changing the
        identity changes only the identity texture, which lies inside the mask.
        """
        index = self._index(index)
        action = int(self.labels[index])
        if identity is None:
            identity = int(self.identities[index])
        identity = check_int_in("identity", identity, 0, self.num_identities - 1)
        rng = np.random.default_rng([_ITEM, self.seed, int(not self.train), index])
        draws = _Draws.draw(
            rng, ACTIONS[action], channels=self.channels, frames=self.frames, size=self.image_size
        )
        dx = np.abs(self._xs - draws.cx[:, None, None])  # (T, 1, W)
        dy = np.abs(self._ys - draws.cy[:, None, None])  # (T, H, 1)
        actor, inner = silhouette(draws.shape_kind, dx, dy, draws.radius[:, None, None])
        clip = _add_noise(self._scene(draws, identity, actor), draws.unit_noise, self.noise)
        mask = sensitive_mask(
            actor,
            dx,
            dy,
            inner,
            scenario=self.scenario,
            mask_kind=self.mask_kind,
            box_margin=self.box_margin,
        )
        return RenderedClip(
            clip=torch.from_numpy(clip),
            mask=torch.from_numpy(mask),
            actor=torch.from_numpy(np.ascontiguousarray(actor)),
            action=action,
            identity=identity,
        )

    def _scene(self, draws: _Draws, identity: int, actor: np.ndarray) -> np.ndarray:
        """The noiseless clip (C, T, H, W): the identity texture on the sensitive region (the
        background for an avatar, the actor for a person), public content elsewhere."""
        texture = self.textures[identity].jittered(draws.id_shift, draws.id_contrast)
        if self.scenario == "avatar":
            background = texture.draw(self._xs[0], self._ys[0], draws.id_phase)[:, None]
            foreground = draws.plain_colour.reshape(-1, 1, 1, 1)
        else:
            public = draws.public_texture
            background = public.draw(self._xs[0], self._ys[0], draws.public_phase)[:, None]
            u, v = self._xs - draws.cx[:, None, None], self._ys - draws.cy[:, None, None]
            foreground = texture.draw(u, v, draws.id_phase)
        return np.where(actor[None], foreground, background).astype(np.float32, copy=False)

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (
            f"SyntheticPrivateActions(size={self.size}, scenario={self.scenario!r}, "
            f"num_classes={self.num_classes}, num_identities={self.num_identities}, "
            f"mask_kind={self.mask_kind!r}, seed={self.seed}, {split})"
        )
