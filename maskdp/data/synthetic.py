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

from maskdp.errors import InvalidInputError

ACTIONS: tuple[str, ...] = ("right", "left", "down", "up", "circle", "zoom")
SCENARIOS: tuple[str, ...] = ("avatar", "person")
MASK_KINDS: tuple[str, ...] = ("exact", "box", "track")

# Tags that keep the seeded streams apart (numpy pads short entropy lists with zeros, so
# every stream uses four words with a distinct first word).
_ITEM, _LABELS, _WORLD = 1, 2, 3


@dataclass(frozen=True, eq=False)
class Texture:
    """Stripes ``colour + amplitude * weights * cos(2 pi f (u cos t + v sin t) + phase)``.

    ``frequency`` is in cycles per pixel; ``colour`` and ``weights`` have one entry per
    channel.
    """

    colour: np.ndarray
    weights: np.ndarray
    theta: float
    frequency: float
    amplitude: float

    def draw(self, u: np.ndarray, v: np.ndarray, phase: float) -> np.ndarray:
        """Texture values (C, *u.shape) at pixel offsets ``u`` (x) and ``v`` (y)."""
        arg = u * math.cos(self.theta) + v * math.sin(self.theta)
        wave = np.cos(2.0 * math.pi * self.frequency * arg + phase).astype(np.float32)
        shape = (-1,) + (1,) * wave.ndim
        return self.colour.reshape(shape) + self.amplitude * self.weights.reshape(shape) * wave


# Colour and stripe-amplitude ranges per role: actors are brighter than backgrounds on
# average, so the actor stands out with a consistent sign of contrast (a first-order motion
# signal) whatever the identity.
ROLES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "background": ((0.15, 0.5), (0.12, 0.2)),
    "actor": ((0.6, 0.9), (0.08, 0.12)),
}


def _random_texture(rng: np.random.Generator, channels: int, size: int, role: str) -> Texture:
    """A texture for ``role``; the same draws give the same pattern scaled to each role."""
    (c_lo, c_hi), (a_lo, a_hi) = ROLES[role]
    weights = rng.uniform(-1.0, 1.0, channels)
    weights /= max(np.abs(weights).max(), 1e-6)
    return Texture(
        colour=(c_lo + (c_hi - c_lo) * rng.uniform(0.0, 1.0, channels)).astype(np.float32),
        weights=weights.astype(np.float32),
        theta=float(rng.uniform(0.0, math.pi)),
        frequency=float(rng.uniform(3.0, 6.0)) / size,
        amplitude=a_lo + (a_hi - a_lo) * float(rng.uniform(0.0, 1.0)),
    )


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
        _random_texture(rng, channels, image_size, role) for _ in range(-(-num_identities // 2))
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


def _check_int(name: str, value: Any, low: int, high: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise InvalidInputError(f"{name} must be an int, got {value!r}")
    if value < low or (high is not None and value > high):
        bound = f">= {low}" if high is None else f"in [{low}, {high}]"
        raise InvalidInputError(f"{name} must be {bound}, got {value}")
    return int(value)


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> str:
    if value not in choices:
        raise InvalidInputError(f"{name} must be one of {list(choices)}, got {value!r}")
    return str(value)


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
        self.size = _check_int("size", size, 0)
        self.scenario = _check_choice("scenario", scenario, SCENARIOS)
        self.num_classes = _check_int("num_classes", num_classes, 2, len(ACTIONS))
        self.num_identities = _check_int("num_identities", num_identities, 1)
        self.frames = _check_int("frames", frames, 2)
        self.image_size = _check_int("image_size", image_size, 16)
        self.channels = _check_int("channels", channels, 1)
        self.seed = _check_int("seed", seed, 0)
        self.world_seed = _check_int("world_seed", world_seed, 0)
        self.box_margin = _check_int("box_margin", box_margin, 0)
        self.mask_kind = _check_choice("mask_kind", mask_kind, MASK_KINDS)
        if self.mask_kind == "track" and self.scenario != "person":
            raise InvalidInputError(
                'mask_kind="track" hides a sensitive actor\'s motion and needs scenario="person"'
            )
        if not isinstance(train, bool):
            raise InvalidInputError(f"train must be a bool, got {train!r}")
        self.train = train
        if (
            isinstance(noise, bool)
            or not isinstance(noise, (int, float))
            or not math.isfinite(noise)
            or noise < 0
        ):
            raise InvalidInputError(f"noise must be a finite number >= 0, got {noise!r}")
        self.noise = float(noise)
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
        identity = _check_int("identity", identity, 0, self.num_identities - 1)
        rng = np.random.default_rng([_ITEM, self.seed, int(not self.train), index])
        channels, frames, size = self.channels, self.frames, self.image_size

        shape_kind = int(rng.integers(3))
        cx, cy, radius = self._trajectory(rng, action)
        id_phase = float(rng.uniform(0.0, 2.0 * math.pi))
        id_shift = rng.normal(0.0, 0.06, channels).astype(np.float32)
        id_contrast = float(rng.uniform(0.7, 1.3))
        (c_lo, c_hi), _ = ROLES["actor"]
        plain_colour = rng.uniform(c_lo, c_hi, channels).astype(np.float32)
        public_texture = _random_texture(rng, channels, size, "background")
        public_phase = float(rng.uniform(0.0, 2.0 * math.pi))
        noise = rng.random((channels, frames, size, size), dtype=np.float32)

        dx = np.abs(self._xs - cx[:, None, None])  # (T, 1, W)
        dy = np.abs(self._ys - cy[:, None, None])  # (T, H, 1)
        r = radius[:, None, None]
        if shape_kind == 0:
            actor = np.maximum(dx, dy) <= r
            inner = r
        elif shape_kind == 1:
            actor = dx * dx + dy * dy <= r * r
            inner = r / math.sqrt(2.0)
        else:
            actor = dx + dy <= r
            inner = r / 2.0

        texture = self.textures[identity]
        texture = Texture(
            texture.colour + id_shift,
            texture.weights,
            texture.theta,
            texture.frequency,
            texture.amplitude * id_contrast,
        )
        if self.scenario == "avatar":
            background = texture.draw(self._xs[0], self._ys[0], id_phase)[:, None]
            foreground = plain_colour.reshape(-1, 1, 1, 1)
        else:
            background = public_texture.draw(self._xs[0], self._ys[0], public_phase)[:, None]
            foreground = texture.draw(
                self._xs - cx[:, None, None], self._ys - cy[:, None, None], id_phase
            )
        scene = np.where(actor[None], foreground, background).astype(np.float32, copy=False)
        # Zero-mean uniform noise with standard deviation `noise` (cheaper than Gaussian).
        noise -= 0.5
        noise *= self.noise * math.sqrt(12.0)
        scene += noise
        clip = np.clip(scene, 0.0, 1.0, out=scene)
        mask = self._mask(actor, dx, dy, inner)
        return RenderedClip(
            clip=torch.from_numpy(clip),
            mask=torch.from_numpy(mask),
            actor=torch.from_numpy(np.ascontiguousarray(actor)),
            action=action,
            identity=identity,
        )

    def _trajectory(
        self, rng: np.random.Generator, action: int
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Actor centre (x, y) and half-size per frame, kept inside the frame."""
        frames, size = self.frames, self.image_size
        r0 = float(rng.uniform(0.12, 0.18)) * size
        speed_frac = float(rng.uniform(0.0, 1.0))
        drift = float(rng.uniform(-0.25, 0.25)) * size / 32.0
        start = rng.uniform(0.0, 1.0, 2)
        phase = float(rng.uniform(0.0, 2.0 * math.pi))
        t = np.arange(frames, dtype=np.float64)
        radius = np.full(frames, r0)
        name = ACTIONS[action]
        if name in ("right", "left", "down", "up"):
            # The actor crosses 60-100% of the room it has along its direction.
            room = size - 3.0 - 2.0 * r0 - abs(drift) * (frames - 1)
            along = (0.6 + 0.4 * speed_frac) * room * t / (frames - 1)
            across = drift * t
            ox, oy = {
                "right": (along, across),
                "left": (-along, across),
                "down": (across, along),
                "up": (across, -along),
            }[name]
        elif name == "circle":
            ring = (0.15 + 0.08 * speed_frac) * size
            angle = phase + 2.0 * math.pi * t / frames
            ox, oy = ring * np.cos(angle), ring * np.sin(angle)
        else:  # zoom: stays (small drift) and grows
            radius = r0 * (0.7 + (0.6 + 0.4 * speed_frac) * t / (frames - 1))
            ox, oy = drift * t, drift * t * (1.0 if phase < math.pi else -1.0)
        lo_x, hi_x = np.max(radius - ox), np.min(size - 1.0 - radius - ox)
        lo_y, hi_y = np.max(radius - oy), np.min(size - 1.0 - radius - oy)
        bx = lo_x + start[0] * max(hi_x - lo_x, 0.0)
        by = lo_y + start[1] * max(hi_y - lo_y, 0.0)
        return (
            (bx + ox).astype(np.float32),
            (by + oy).astype(np.float32),
            radius.astype(np.float32),
        )

    def _mask(
        self, actor: np.ndarray, dx: np.ndarray, dy: np.ndarray, inner: np.ndarray
    ) -> np.ndarray:
        """The sensitive pixels (T, H, W) for the scenario and mask kind."""
        if self.scenario == "avatar":
            if self.mask_kind == "exact":
                return ~actor
            # The largest box inside the avatar, intersected with it so that rounding can
            # never make a background pixel public.
            return ~((np.maximum(dx, dy) <= inner) & actor)
        if self.mask_kind == "exact":
            return actor.copy()
        rows, cols = actor.any(axis=2), actor.any(axis=1)  # (T, H), (T, W)
        if self.mask_kind == "track":
            rows = np.broadcast_to(rows.any(axis=0), rows.shape)
            cols = np.broadcast_to(cols.any(axis=0), cols.shape)
        rows, cols = _grow(rows, self.box_margin), _grow(cols, self.box_margin)
        return rows[:, :, None] & cols[:, None, :]

    def __repr__(self) -> str:
        split = "train" if self.train else "test"
        return (
            f"SyntheticPrivateActions(size={self.size}, scenario={self.scenario!r}, "
            f"num_classes={self.num_classes}, num_identities={self.num_identities}, "
            f"mask_kind={self.mask_kind!r}, seed={self.seed}, {split})"
        )


def _grow(runs: np.ndarray, margin: int) -> np.ndarray:
    """Per row of ``runs`` (K, L), the interval from its first to last True, grown by margin."""
    length = runs.shape[1]
    any_true = runs.any(axis=1)
    first = np.argmax(runs, axis=1) - margin
    last = length - 1 - np.argmax(runs[:, ::-1], axis=1) + margin
    pos = np.arange(length)[None, :]
    return (pos >= first[:, None]) & (pos <= last[:, None]) & any_true[:, None]
