"""Atomic file writes: a run directory, checkpoint or ledger is never left half-written.

Every write goes to a temporary file in the same directory, is flushed and fsynced, then
renamed over the target (``os.replace`` is atomic on POSIX), and the directory is fsynced so
the rename itself survives a crash. A reader sees either the old file or the new one. A
process killed mid-write leaves at most a hidden temporary (``.NAME.*.tmp``) next to the
target, never a torn target; :func:`remove_temporaries` clears them when a run resumes.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (temporary file, fsync, rename, fsync dir)."""
    target = Path(path)
    if not target.parent.is_dir():
        target.parent.mkdir(parents=True, exist_ok=True)
        _fsync_dir(target.parent.parent)  # the new directory's entry survives a crash too
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_umask())  # mkstemp creates 0600; give the usual mode
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(target.parent)


def atomic_write_json(path: str | os.PathLike[str], obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically; NaN and inf are refused (strict JSON)."""
    text = json.dumps(obj, indent=2, sort_keys=True, allow_nan=False) + "\n"
    atomic_write_bytes(path, text.encode())


def atomic_torch_save(obj: Any, path: str | os.PathLike[str]) -> None:
    """``torch.save`` to memory, then :func:`atomic_write_bytes`."""
    import torch

    buffer = io.BytesIO()
    torch.save(obj, buffer)
    atomic_write_bytes(path, buffer.getvalue())


def remove_temporaries(directory: str | os.PathLike[str], names: tuple[str, ...]) -> list[Path]:
    """Delete the temporaries that :func:`atomic_write_bytes` left for ``names`` in
    ``directory`` when a writer was killed (``.NAME.XXXX.tmp``); return what was removed.

    Only call it when no other process writes to ``directory``.
    """
    folder = Path(directory)
    removed = []
    for name in names:
        for tmp in folder.glob(f".{name}.*.tmp"):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    if removed:
        _fsync_dir(folder)
    return removed
