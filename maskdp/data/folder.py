"""A user's masked clips as a folder: ``labels.csv`` plus one clip file and one mask file each.

Layout::

    root/labels.csv          header ``clip,mask,label`` and optionally ``start,frames,stride``
    root/clips/000000.npy    float clip (C, T, H, W), or .pt; or a video .mp4/.avi/... (PyAV)
    root/masks/000000.npy    mask (T, H, W): bool, or integers 0/1 (True/1 = sensitive); or a
                             folder of per-frame .png masks, or boxes (.csv/.json)

A row may cut its clip from a longer source: ``start`` (first source frame, default 0),
``frames`` (clip length, default: to the end) and ``stride`` (default 1); the mask is cut
alike (:mod:`maskdp.data.footage` for video files, mask images and box files).

Paths in the CSV are relative to ``root``. Nothing is silently skipped: the CSV structure
and the existence of every file are checked when the dataset is built, the content of a
clip and its mask (dtype, shape, NaN, mask values) when the item is loaded; each problem
raises :class:`~maskdp.errors.InvalidInputError` naming the file and the CSV line.
"""

from __future__ import annotations

import contextlib
import csv
import importlib.util
import os
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePath
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from maskdp.data.footage import (
    BOX_SUFFIXES,
    VIDEO_SUFFIXES,
    FrameWindow,
    read_mask,
    read_video,
    select,
)
from maskdp.errors import InvalidInputError

COLUMNS: tuple[str, ...] = ("clip", "mask", "label")
WINDOW_COLUMNS: tuple[str, ...] = ("start", "frames", "stride")
TENSOR_SUFFIXES: tuple[str, ...] = (".npy", ".pt", ".pth")

Transform = Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]


@dataclass(frozen=True)
class ClipRecord:
    """One CSV row: ``line`` is its line number in the CSV (the header is line 1)."""

    line: int
    clip: Path
    mask: Path
    label: int
    window: FrameWindow = FrameWindow()


class ClipFolder(Dataset):
    """Items ``(clip (C, T, H, W) float32, mask (T, H, W) bool, label int64)`` from a folder.

    ``transform(clip, mask) -> (clip, mask)`` is applied after the checks (a spatial
    transform must move the mask with the clip). ``labels`` (N,) holds every label and
    ``num_classes`` is the largest label plus one.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        labels: str = "labels.csv",
        transform: Transform | None = None,
    ) -> None:
        self.root = Path(root)
        if not self.root.is_dir():
            raise InvalidInputError(f"dataset folder {self.root} does not exist or is not a folder")
        self.labels_path = self.root / labels
        if not self.labels_path.is_file():
            raise InvalidInputError(
                f"labels file {self.labels_path} not found; a ClipFolder needs a CSV with the "
                f"header {','.join(COLUMNS)}"
            )
        if transform is not None and not callable(transform):
            raise InvalidInputError(f"transform must be callable, got {type(transform).__name__}")
        self.transform = transform
        self.records = _read_records(self.labels_path, self.root)
        self.labels = torch.tensor([r.label for r in self.records], dtype=torch.int64)
        self.num_classes = int(self.labels.max()) + 1

    def __len__(self) -> int:
        return len(self.records)

    def _where(self, record: ClipRecord) -> str:
        return f"{self.labels_path.name} line {record.line}"

    def __getitem__(self, index: int) -> tuple[Tensor, Tensor, Tensor]:
        record = self.records[index]
        where = self._where(record)
        clip, frames = _load_clip(record, where)
        mask = _load_mask(record, frames, clip.shape[2:], where)
        if tuple(mask.shape) != tuple(clip.shape[1:]):
            raise InvalidInputError(
                f"{where}: mask {record.mask} has shape {tuple(mask.shape)} but clip "
                f"{record.clip} has shape {tuple(clip.shape)}: expected {tuple(clip.shape[1:])}"
            )
        if self.transform is not None:
            result = self.transform(clip, mask)
            if not (isinstance(result, tuple) and len(result) == 2):
                raise InvalidInputError(
                    f"transform must return a (clip, mask) tuple, got {type(result).__name__}"
                )
            clip, mask = result
        return clip, mask, self.labels[index].clone()

    @classmethod
    def write(
        cls,
        root: str | os.PathLike[str],
        clips: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
        masks: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
        labels: Tensor | np.ndarray | Sequence[int],
        *,
        fmt: str = "npy",
        labels_file: str = "labels.csv",
        overwrite: bool = False,
    ) -> ClipFolder:
        """Write a folder with :func:`~maskdp.data.folder_writer.write_clip_folder` and open it."""
        from maskdp.data.folder_writer import write_clip_folder

        write_clip_folder(
            root, clips, masks, labels, fmt=fmt, labels_file=labels_file, overwrite=overwrite
        )
        return cls(root, labels=labels_file)

    def __repr__(self) -> str:
        return f"ClipFolder({str(self.root)!r}, {len(self)} clips, {self.num_classes} classes)"


def _read_records(path: Path, root: Path) -> list[ClipRecord]:
    name = path.name
    try:
        with path.open(newline="", encoding="utf-8-sig") as handle:
            reader = csv.DictReader(handle, skipinitialspace=True)
            if reader.fieldnames is None:
                raise InvalidInputError(
                    f"{path} is empty; it needs the header {','.join(COLUMNS)} and one row per clip"
                )
            reader.fieldnames = [f.strip() for f in reader.fieldnames]
            missing = [c for c in COLUMNS if c not in reader.fieldnames]
            if missing:
                raise InvalidInputError(
                    f"{path} lacks the column(s) {', '.join(missing)}: its header is "
                    f"{','.join(reader.fieldnames)}, expected {','.join(COLUMNS)}"
                )
            records = [_record(row, reader.line_num, name, root) for row in reader]
    except UnicodeDecodeError as exc:
        raise InvalidInputError(f"{path} is not a UTF-8 text file: {exc}") from exc
    except csv.Error as exc:
        raise InvalidInputError(f"{path} is not a valid CSV file: {exc}") from exc
    if not records:
        raise InvalidInputError(f"{path} has a header but no rows; add one row per clip")
    return records


def _record(row: dict[str | None, Any], line: int, name: str, root: Path) -> ClipRecord:
    where = f"{name} line {line}"
    if row.get(None):
        raise InvalidInputError(f"{where} has more fields than the header")
    values = {}
    for column in COLUMNS:
        value = row.get(column)
        if value is None or not value.strip():
            raise InvalidInputError(f"{where} has no value in column {column!r}")
        values[column] = value.strip()
    try:
        label = int(values["label"])
    except ValueError:
        label = -1
    if label < 0:
        raise InvalidInputError(
            f"{where}: label {values['label']!r} is not an integer >= 0 (class index)"
        )
    return ClipRecord(
        line=line,
        clip=_existing_file(root, values["clip"], "clip", where),
        mask=_existing_file(root, values["mask"], "mask", where),
        label=label,
        window=_window(row, where),
    )


def _window(row: dict[str | None, Any], where: str) -> FrameWindow:
    """The optional ``start,frames,stride`` columns of a row (empty = default)."""
    given = {}
    for column in WINDOW_COLUMNS:
        value = (row.get(column) or "").strip()
        if value:
            try:
                given[column] = int(value)
            except ValueError:
                raise InvalidInputError(f"{where}: {column} {value!r} is not an integer") from None
    with _located(where):
        return FrameWindow(**given)


@contextlib.contextmanager
def _located(where: str) -> Iterator[None]:
    """Prefix the message of an :class:`InvalidInputError` raised inside with ``where``
    (the CSV line): the footage readers name the file, the folder names the line."""
    try:
        yield
    except InvalidInputError as err:
        raise InvalidInputError(f"{where}: {err}") from None


def _load_clip(record: ClipRecord, where: str) -> tuple[Tensor, list[int]]:
    """The record's clip (C, T, H, W) and the source frames it holds."""
    if record.clip.suffix.lower() in VIDEO_SUFFIXES:
        with _located(where):
            clip, frames = read_video(record.clip, record.window)
        return check_clip(clip, record.clip, where), frames
    source = check_clip(_load(record.clip, "clip", where), record.clip, where)
    with _located(where):
        frames = record.window.indices(source.shape[1], record.clip)
    return source[:, frames], frames


def _load_mask(record: ClipRecord, frames: list[int], size: Any, where: str) -> Tensor:
    """The record's mask (T, H, W) on the clip's source ``frames``."""
    if record.mask.is_dir() or record.mask.suffix.lower() in BOX_SUFFIXES:
        with _located(where):
            mask = read_mask(record.mask, frames, height=int(size[0]), width=int(size[1]))
    else:  # _load and check_mask name the line themselves
        source = check_mask(_load(record.mask, "mask", where), record.mask, where)
        with _located(where):
            mask = source[select(frames, source.shape[0], record.mask)]
    return check_mask(mask, record.mask, where)


def _existing_file(root: Path, value: str, what: str, where: str) -> Path:
    if PurePath(value).is_absolute():
        raise InvalidInputError(f"{where}: {what} path {value!r} must be relative to {root}")
    path = root / value
    if what == "mask" and path.is_dir():
        return path  # a folder of per-frame mask images
    if not path.is_file():
        raise InvalidInputError(f"{where}: {what} file {path} not found")
    suffix = path.suffix.lower()
    allowed = TENSOR_SUFFIXES + (VIDEO_SUFFIXES if what == "clip" else BOX_SUFFIXES)
    if suffix not in allowed:
        raise InvalidInputError(
            f"{where}: {what} file {path} has an unsupported extension; use one of "
            f"{', '.join(allowed)}"
        )
    if suffix in VIDEO_SUFFIXES and importlib.util.find_spec("av") is None:
        raise InvalidInputError(
            f"{where}: clip file {path} is a video; decoding it needs the 'av' package (PyAV), "
            "which is not installed: pip install 'maskdp[video]', or store the clip as .npy (C, T, H, W)"
        )
    return path


def _load(path: Path, what: str, where: str) -> Tensor:
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            data: Any = np.load(path, allow_pickle=False)
        else:
            data = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # any reader failure names the file
        raise InvalidInputError(f"{where}: cannot read {what} file {path}: {exc}") from exc
    if isinstance(data, np.ndarray):
        if data.dtype.kind not in "biuf":
            raise InvalidInputError(
                f"{where}: {what} file {path} holds an array of dtype {data.dtype}, expected "
                "numbers or bools"
            )
        return torch.from_numpy(np.ascontiguousarray(data, dtype=data.dtype.newbyteorder("=")))
    if isinstance(data, Tensor):
        return data
    raise InvalidInputError(
        f"{where}: {what} file {path} holds a {type(data).__name__}, expected one array/tensor"
    )


def _tensor(value: Any, what: str, path: Path | str, where: str, layout: str) -> Tensor:
    """``value`` (a tensor or numpy array) as a tensor with one dimension per letter of
    ``layout`` (``"CTHW"``: (C, T, H, W)), or :class:`InvalidInputError`."""
    value = torch.as_tensor(value) if isinstance(value, np.ndarray) else value
    if not isinstance(value, Tensor):
        raise InvalidInputError(f"{where}: {what} {path} is a {type(value).__name__}, not a tensor")
    if value.dim() != len(layout):
        raise InvalidInputError(
            f"{where}: {what} {path} has shape {tuple(value.shape)}, expected ({', '.join(layout)})"
        )
    return value


def check_clip(clip: Any, path: Path | str, where: str) -> Tensor:
    """A finite floating-point clip (C, T, H, W) as float32, or :class:`InvalidInputError`."""
    clip = _tensor(clip, "clip", path, where, "CTHW")
    if not clip.is_floating_point():
        raise InvalidInputError(
            f"{where}: clip {path} has dtype {clip.dtype}; clips must be floating point "
            "(convert uint8 frames with x / 255)"
        )
    clip = clip.detach().to(device="cpu", dtype=torch.float32)
    if not torch.isfinite(clip).all():
        raise InvalidInputError(f"{where}: clip {path} contains NaN or inf values")
    return clip


def check_mask(mask: Any, path: Path | str, where: str) -> Tensor:
    """A bool mask (T, H, W) from bool or 0/1 integers, or :class:`InvalidInputError`."""
    mask = _tensor(mask, "mask", path, where, "THW").detach().cpu()
    if mask.dtype == torch.bool:
        return mask
    if mask.is_floating_point() or mask.is_complex():
        raise InvalidInputError(
            f"{where}: mask {path} has dtype {mask.dtype}; masks must be bool or integer 0/1"
        )
    if mask.numel() and not ((mask == 0) | (mask == 1)).all():
        bad = sorted({int(v) for v in mask.unique().tolist()} - {0, 1})[:5]
        raise InvalidInputError(
            f"{where}: mask {path} holds values {bad} besides 0 and 1; masks must be binary"
        )
    return mask.bool()
