"""Write a :class:`~maskdp.data.folder.ClipFolder`: clips, masks and the labels CSV.

Everything is checked before the first file is written, and every file is written
atomically (:func:`maskdp.io.atomic_write_bytes`), the CSV last: a folder with a CSV is
complete.
"""

from __future__ import annotations

import io
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from maskdp.data.folder import COLUMNS, check_clip, check_mask
from maskdp.errors import InvalidInputError
from maskdp.io import atomic_write_bytes


def write_clip_folder(
    root: str | os.PathLike[str],
    clips: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    masks: Tensor | np.ndarray | Sequence[Tensor | np.ndarray],
    labels: Tensor | np.ndarray | Sequence[int],
    *,
    fmt: str = "npy",
    labels_file: str = "labels.csv",
    overwrite: bool = False,
) -> Path:
    """Write ``root/clips/*.{fmt}``, ``root/masks/*.{fmt}`` and ``root/labels.csv``.

    Everything is checked before the first file is written; each file is written to a
    temporary file and renamed (atomic on one filesystem), the CSV last, so a folder with
    a CSV is complete. Refuses to replace an existing CSV unless ``overwrite``.
    """
    if fmt not in ("npy", "pt"):
        raise InvalidInputError(f"fmt must be 'npy' or 'pt', got {fmt!r}")
    root = Path(root)
    csv_path = root / labels_file
    if csv_path.exists() and not overwrite:
        raise InvalidInputError(f"{csv_path} already exists; pass overwrite=True to replace it")
    clip_list, mask_list = list(clips), list(masks)
    label_list = list(labels.tolist() if hasattr(labels, "tolist") else labels)
    for i, label in enumerate(label_list):
        if isinstance(label, bool) or not isinstance(label, (int, np.integer)) or label < 0:
            raise InvalidInputError(f"item {i}: label {label!r} is not an integer >= 0")
    if not (len(clip_list) == len(mask_list) == len(label_list)) or not clip_list:
        raise InvalidInputError(
            f"clips, masks and labels must have the same non-zero length, got "
            f"{len(clip_list)}, {len(mask_list)}, {len(label_list)}"
        )
    checked = []
    for i, (clip, mask) in enumerate(zip(clip_list, mask_list, strict=True)):
        where = f"item {i}"
        clip_t = check_clip(clip, f"clips[{i}]", where)
        mask_t = check_mask(mask, f"masks[{i}]", where)
        if tuple(mask_t.shape) != tuple(clip_t.shape[1:]):
            raise InvalidInputError(
                f"item {i}: mask shape {tuple(mask_t.shape)} does not match clip shape "
                f"{tuple(clip_t.shape)}"
            )
        checked.append((clip_t, mask_t))
    rows = []
    for i, (clip_t, mask_t) in enumerate(checked):
        clip_rel, mask_rel = f"clips/{i:06d}.{fmt}", f"masks/{i:06d}.{fmt}"
        atomic_write_bytes(root / clip_rel, _serialise(clip_t, fmt))
        atomic_write_bytes(root / mask_rel, _serialise(mask_t, fmt))
        rows.append((clip_rel, mask_rel, label_list[i]))
    lines = [",".join(COLUMNS)] + [f"{c},{m},{y}" for c, m, y in rows]
    atomic_write_bytes(csv_path, ("\n".join(lines) + "\n").encode("utf-8"))  # the CSV last
    return root


def _serialise(tensor: Tensor, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "npy":
        np.save(buffer, tensor.numpy(), allow_pickle=False)
    else:
        torch.save(tensor.contiguous().clone(), buffer)
    return buffer.getvalue()
