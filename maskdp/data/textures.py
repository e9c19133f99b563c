r"""Striped textures of the synthetic clips: the identities' prototypes and public patterns.

A texture is :math:`c + a\, w \cos(2\pi f (u \cos\theta + v \sin\theta) + \phi)` per channel:
a base colour :math:`c`, stripes of amplitude :math:`a` with per-channel weights :math:`w`,
orientation :math:`\theta`, frequency :math:`f` (cycles per pixel) and phase :math:`\phi`.
Colours and amplitudes are drawn in a range per *role* (:data:`ROLES`): actors are brighter
than backgrounds on average. Used by :mod:`maskdp.data.synthetic`, which draws the identities'
prototypes and each clip's public texture with :func:`random_texture`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["ROLES", "Texture", "random_texture"]


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

    def jittered(self, shift: np.ndarray, contrast: float) -> Texture:
        """The same stripes with ``colour + shift`` and ``amplitude * contrast`` (one clip's
        rendering of an identity)."""
        return Texture(
            self.colour + shift,
            self.weights,
            self.theta,
            self.frequency,
            self.amplitude * contrast,
        )


# Colour and stripe-amplitude ranges per role: actors are brighter than backgrounds on
# average, so the actor stands out with a consistent sign of contrast (a first-order motion
# signal) whatever the identity.
ROLES: dict[str, tuple[tuple[float, float], tuple[float, float]]] = {
    "background": ((0.15, 0.5), (0.12, 0.2)),
    "actor": ((0.6, 0.9), (0.08, 0.12)),
}


def random_texture(rng: np.random.Generator, channels: int, size: int, role: str) -> Texture:
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
