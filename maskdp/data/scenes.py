"""Geometry of the synthetic clips: the actor's path, its silhouette and the sensitive mask.

Pure numpy helpers of :mod:`maskdp.data.synthetic` (whose docstring describes the design):

- :func:`trajectory`: the actor's centre and half-size per frame for an action, kept inside
  the frame;
- :func:`silhouette`: the actor's pixels (a square, disc or diamond) and the half-size of
  the largest axis-aligned box inside it;
- :func:`sensitive_mask`: the pixels the mask marks sensitive, per scenario and mask kind.
"""

from __future__ import annotations

import math

import numpy as np

__all__ = ["sensitive_mask", "silhouette", "trajectory"]


def trajectory(
    rng: np.random.Generator, action: str, *, frames: int, size: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Actor centre (x, y) and half-size per frame for ``action``, kept inside the frame.

    Draws, in order: the half-size, the speed, the drift, the start (2) and the phase.
    """
    r0 = float(rng.uniform(0.12, 0.18)) * size
    speed_frac = float(rng.uniform(0.0, 1.0))
    drift = float(rng.uniform(-0.25, 0.25)) * size / 32.0
    start = rng.uniform(0.0, 1.0, 2)
    phase = float(rng.uniform(0.0, 2.0 * math.pi))
    t = np.arange(frames, dtype=np.float64)
    radius = np.full(frames, r0)
    if action in ("right", "left", "down", "up"):
        # The actor crosses 60-100% of the room it has along its direction.
        room = size - 3.0 - 2.0 * r0 - abs(drift) * (frames - 1)
        along = (0.6 + 0.4 * speed_frac) * room * t / (frames - 1)
        across = drift * t
        ox, oy = {
            "right": (along, across),
            "left": (-along, across),
            "down": (across, along),
            "up": (across, -along),
        }[action]
    elif action == "circle":
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


def silhouette(
    shape_kind: int, dx: np.ndarray, dy: np.ndarray, r: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """The actor's pixels and the half-size of the largest box inside it.

    ``dx``, ``dy``: distances of each pixel from the centre; ``r``: the half-size. Shape 0 is
    a square (L-inf ball, inner box ``r``), 1 a disc (L2 ball, ``r / sqrt 2``), 2 a diamond
    (L1 ball, ``r / 2``).
    """
    if shape_kind == 0:
        return np.maximum(dx, dy) <= r, r
    if shape_kind == 1:
        return dx * dx + dy * dy <= r * r, r / math.sqrt(2.0)
    return dx + dy <= r, r / 2.0


def sensitive_mask(
    actor: np.ndarray,
    dx: np.ndarray,
    dy: np.ndarray,
    inner: np.ndarray,
    *,
    scenario: str,
    mask_kind: str,
    box_margin: int,
) -> np.ndarray:
    """The sensitive pixels (T, H, W) for the scenario and mask kind.

    Avatar: the background (``exact``), or everything but the largest box inside the avatar
    (``box``). Person: the silhouette (``exact``), its per-frame bounding box (``box``) or one
    box around the whole trajectory (``track``), boxes grown by ``box_margin`` pixels.
    """
    if scenario == "avatar":
        if mask_kind == "exact":
            return ~actor
        # The largest box inside the avatar, intersected with it so that rounding can
        # never make a background pixel public.
        return ~((np.maximum(dx, dy) <= inner) & actor)
    if mask_kind == "exact":
        return actor.copy()
    rows, cols = actor.any(axis=2), actor.any(axis=1)  # (T, H), (T, W)
    if mask_kind == "track":
        rows = np.broadcast_to(rows.any(axis=0), rows.shape)
        cols = np.broadcast_to(cols.any(axis=0), cols.shape)
    rows, cols = _grow(rows, box_margin), _grow(cols, box_margin)
    return rows[:, :, None] & cols[:, None, :]


def _grow(runs: np.ndarray, margin: int) -> np.ndarray:
    """Per row of ``runs`` (K, L), the interval from its first to last True, grown by margin."""
    length = runs.shape[1]
    any_true = runs.any(axis=1)
    first = np.argmax(runs, axis=1) - margin
    last = length - 1 - np.argmax(runs[:, ::-1], axis=1) + margin
    pos = np.arange(length)[None, :]
    return (pos >= first[:, None]) & (pos <= last[:, None]) & any_true[:, None]
