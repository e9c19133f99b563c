"""docs/concepts.md's package map names every subpackage and module of maskdp that exists,
and nothing that does not; and the size limits of the code hold (no module over 400 lines,
no function over 60, no ``assert`` in the library)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = [ROOT / "maskdp", ROOT / "accounting"]
MAX_MODULE_LINES, MAX_FUNCTION_LINES = 400, 60


def _modules() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in pkg.rglob("*.py"))


def test_package_map_lists_every_subpackage_and_module():
    text = (ROOT / "docs" / "concepts.md").read_text(encoding="utf-8")
    block = re.search(r"```text\nmaskdp/\n(.*?)```", text, flags=re.S)
    assert block, "docs/concepts.md lost its package map"
    mapped = block.group(1)
    for sub in sorted(p for p in (ROOT / "maskdp").iterdir() if (p / "__init__.py").exists()):
        assert f"{sub.name}/" in mapped, f"maskdp/{sub.name}/ is missing from the package map"
    for top in ("settings.py", "checks.py", "errors.py"):
        assert (ROOT / "maskdp" / top).exists() and top in mapped
    named = set(re.findall(r"\b([a-z_]+)\.py\b", mapped))
    existing = {p.stem for p in _modules()}
    assert named <= existing, f"the map names modules that do not exist: {named - existing}"


def test_no_module_over_400_lines_no_function_over_60_no_assert():
    problems = []
    for path in _modules():
        source = path.read_text(encoding="utf-8")
        name = path.relative_to(ROOT)
        if source.count("\n") > MAX_MODULE_LINES:
            problems.append(f"{name}: {source.count(chr(10))} lines")
        for node in ast.walk(ast.parse(source)):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                length = node.end_lineno - node.lineno + 1  # type: ignore[operator]
                if length > MAX_FUNCTION_LINES:
                    problems.append(f"{name}:{node.lineno} {node.name}: {length} lines")
            if isinstance(node, ast.Assert):
                problems.append(f"{name}:{node.lineno}: assert (stripped by python -O)")
    assert not problems, "\n".join(problems)
