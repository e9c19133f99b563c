"""Rewrite one ``## `` section of benchmarks/RESULTS.md, keeping every other section."""

from __future__ import annotations

from pathlib import Path

from maskdp.io import atomic_write_bytes


def replace_section(path: Path, heading: str, body: str) -> None:
    """Replace the section that starts with the line ``heading`` by ``body`` (which begins
    with that heading), or append ``body`` when the section is missing. Written atomically."""
    lines = path.read_text().splitlines() if path.exists() else ["# Benchmark results", ""]
    start = next((i for i, line in enumerate(lines) if line.strip() == heading), None)
    new = body.rstrip("\n").splitlines()
    if start is None:
        while lines and not lines[-1].strip():
            lines.pop()
        lines += ["", *new]
    else:
        end = next(
            (i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines)
        )
        lines[start:end] = [*new, ""] if end < len(lines) else new
    atomic_write_bytes(path, ("\n".join(lines).rstrip("\n") + "\n").encode())
