r"""Real footage: decode a window of a video file, and load its masks from what tools export.

A clip is cut from a source of :math:`F` frames by a start frame :math:`s`, a length
:math:`T` and a stride :math:`k`: it holds source frames :math:`s, s + k, \dots,
s + (T - 1) k` (:class:`FrameWindow`). The same window cuts the mask, whatever its format:

- a video file (``.mp4``, ``.avi``, ``.mov``, ``.mkv``, ``.webm``): decoded with PyAV, whose
  wheels carry FFmpeg (no system library; torchvision's own decoders are deprecated and
  torchcodec needs a system FFmpeg). Decoding stops after the window's last frame;
- a mask array (``.npy``, ``.pt``/``.pth``) of shape (F, H, W): non-zero = sensitive;
- a folder of per-frame mask images (``.png``), sorted by name, one per source frame;
- boxes per frame, as segmentation and tracking tools export them: a CSV with the header
  ``frame,x0,y0,x1,y1`` or a JSON list of ``{"frame": f, "box": [x0, y0, x1, y1]}``; several
  boxes may share a frame, a frame without a box has no sensitive pixel (pixels, source
  frame numbers from 0; see :func:`maskdp.mechanism.masks.boxes_to_mask`).

Every failure is an :class:`~maskdp.errors.InvalidInputError` naming the file.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from maskdp.checks import check_count
from maskdp.errors import InvalidInputError
from maskdp.mechanism.masks import boxes_to_mask

VIDEO_SUFFIXES: tuple[str, ...] = (".mp4", ".avi", ".mov", ".mkv", ".webm")
BOX_SUFFIXES: tuple[str, ...] = (".csv", ".json")
BOX_COLUMNS: tuple[str, ...] = ("frame", "x0", "y0", "x1", "y1")


@dataclass(frozen=True)
class FrameWindow:
    """Source frames ``start, start + stride, ...``: ``frames`` of them, or all to the end
    of the source when ``frames`` is None."""

    start: int = 0
    frames: int | None = None
    stride: int = 1

    def __post_init__(self) -> None:
        check_count("start", self.start, 0)
        check_count("stride", self.stride, 1)
        if self.frames is not None:
            check_count("frames", self.frames, 1)

    def indices(self, total: int, path: Path) -> list[int]:
        """The source frame numbers of the window in a source of ``total`` frames."""
        available = range(self.start, total, self.stride)
        wanted = len(available) if self.frames is None else self.frames
        if wanted < 1 or len(available) < wanted:
            raise InvalidInputError(
                f"{path} has {total} frames; the clip needs {wanted or 1} from frame "
                f"{self.start} with stride {self.stride} (up to frame "
                f"{self.start + ((wanted or 1) - 1) * self.stride})"
            )
        return list(available[:wanted])

    def last(self) -> int | None:
        """The last source frame the window needs, None if it runs to the end."""
        return None if self.frames is None else self.start + (self.frames - 1) * self.stride


def _av() -> Any:
    try:
        import av
    except ImportError:  # pragma: no cover - av is a dependency of the video extra
        raise InvalidInputError(
            "reading video files needs PyAV: pip install 'maskdp[video]'"
        ) from None
    return av


def iter_frames(path: str | Path, last: int | None = None) -> Iterator[np.ndarray]:
    """RGB frames (H, W, 3) uint8 of the video at ``path`` in order, up to source frame
    ``last`` (all if None), decoded one at a time."""
    av, source = _av(), Path(path)
    try:
        with av.open(str(source)) as container:
            if not container.streams.video:
                raise InvalidInputError(f"{source} holds no video stream")
            for index, frame in enumerate(container.decode(video=0)):
                yield frame.to_ndarray(format="rgb24")
                if last is not None and index >= last:
                    return
    except InvalidInputError:
        raise
    except FileNotFoundError:
        raise InvalidInputError(f"video file {source} does not exist") from None
    except Exception as err:  # FFmpeg's errors: a corrupt or foreign file
        raise InvalidInputError(f"cannot decode video file {source}: {err}") from None


def read_video(path: str | Path, window: FrameWindow | None = None) -> tuple[Tensor, list[int]]:
    """The clip (3, T, H, W) float32 in [0, 1] of ``window`` (default: every frame) in the
    video at ``path``, and the source frame numbers it holds (to cut its mask alike)."""
    source, window = Path(path), window or FrameWindow()
    kept: dict[int, np.ndarray] = {}  # only the window's frames stay in memory
    total = 0
    for index, frame in enumerate(iter_frames(source, window.last())):
        total = index + 1
        if index >= window.start and (index - window.start) % window.stride == 0:
            kept[index] = frame
    chosen = window.indices(total, source)
    clip = torch.from_numpy(np.stack([kept[i] for i in chosen]))
    return clip.permute(3, 0, 1, 2).float() / 255.0, chosen


def _mask_images(folder: Path) -> list[np.ndarray]:
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() == ".png")
    if not files:
        raise InvalidInputError(f"mask folder {folder} holds no .png frames")
    images = []
    for file in files:
        frames = list(iter_frames(file, 0))
        if len(frames) != 1:
            raise InvalidInputError(f"mask image {file} is not one image")
        images.append(frames[0].max(axis=2) > 0)  # any channel non-zero = sensitive
    shapes = {image.shape for image in images}
    if len(shapes) != 1:
        raise InvalidInputError(f"mask images in {folder} differ in size: {sorted(shapes)}")
    return images


def _box_rows(path: Path) -> list[tuple[float, ...]]:
    """``(frame, x0, y0, x1, y1)`` rows of a box CSV or JSON file."""
    try:
        if path.suffix.lower() == ".csv":
            with path.open(newline="", encoding="utf-8-sig") as handle:
                reader = csv.DictReader(handle, skipinitialspace=True)
                header = [f.strip() for f in reader.fieldnames or []]
                if header[:5] != list(BOX_COLUMNS):
                    raise InvalidInputError(
                        f"box file {path} needs the header {','.join(BOX_COLUMNS)}, got "
                        f"{','.join(header) or 'nothing'}"
                    )
                return [tuple(float(row[c]) for c in BOX_COLUMNS) for row in reader]
        items = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(items, list):
            raise ValueError("expected a list of {'frame': f, 'box': [x0, y0, x1, y1]}")
        return [(float(item["frame"]), *map(float, item["box"])) for item in items]
    except InvalidInputError:
        raise
    except FileNotFoundError:
        raise InvalidInputError(f"box file {path} does not exist") from None
    except (ValueError, KeyError, TypeError) as err:
        raise InvalidInputError(f"box file {path} is malformed: {err}") from None


def _window_boxes(
    rows: list[tuple[float, ...]], chosen: list[int], path: Path
) -> list[tuple[float, ...]]:
    """The rows on the window's frames, renumbered to clip frames 0..T-1."""
    position = {frame: t for t, frame in enumerate(chosen)}
    kept = []
    for frame, *box in rows:
        if frame != int(frame) or frame < 0:
            raise InvalidInputError(f"box file {path}: frame {frame} is not an int >= 0")
        if int(frame) in position:
            kept.append((float(position[int(frame)]), *box))
    return kept


def read_mask(path: str | Path, frames: list[int], *, height: int, width: int) -> Tensor:
    """The mask (T, H, W) bool of the source frames ``frames`` from a per-frame image folder
    or a box file at ``path`` (module docstring), for a clip of ``height x width``."""
    source = Path(path)
    if source.suffix.lower() in BOX_SUFFIXES:
        boxes = _window_boxes(_box_rows(source), frames, source)
        try:
            return boxes_to_mask(boxes, frames=len(frames), height=height, width=width)
        except InvalidInputError as err:
            raise InvalidInputError(f"box file {source}: {err}") from None
    if not source.is_dir():
        raise InvalidInputError(f"mask source {source} is neither a box file nor a folder")
    images = _mask_images(source)
    return torch.from_numpy(np.stack(images))[select(frames, len(images), source)]


def select(frames: list[int], total: int, path: Path) -> list[int]:
    """``frames`` if every one is below ``total`` (the frames of the source at ``path``)."""
    if frames and max(frames) >= total:
        raise InvalidInputError(
            f"{path} has {total} frames; the clip needs frame {max(frames)} (frames start at 0)"
        )
    return frames
