"""The documentation stays true: generated pages are current, links resolve, examples run.

``docs/cli.md`` and ``docs/api.md`` are rendered from the live code by ``docs/build.py``;
these tests render them again and compare, so a changed option or docstring fails here until
``python docs/build.py`` is rerun. Every relative link and ``#anchor`` of ``README.md`` and
``docs/*.md`` must resolve.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
REGENERATE = "python docs/build.py"


def _load_build():
    spec = importlib.util.spec_from_file_location("docs_build", DOCS / "build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


build = _load_build()


# --- the link checker itself (it must be able to fail) ----------------------------------------


def test_slug_follows_github_rules() -> None:
    assert build.slug("maskdp epsilon") == "maskdp-epsilon"
    assert build.slug("The `substitute` relation") == "the-substitute-relation"
    assert build.slug("What is and is not protected") == "what-is-and-is-not-protected"
    assert build.slug("maskdp.models") == "maskdpmodels"
    assert build.slug("Things that break the guarantee, and what the library does about them") == (
        "things-that-break-the-guarantee-and-what-the-library-does-about-them"
    )


def test_link_checker_reports_missing_files_and_anchors(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(build, "ROOT", tmp_path)
    (tmp_path / "other.md").write_text("# Title\n\n## A section\n\n## A section\n")
    (tmp_path / "page.md").write_text(
        "\n".join(
            [
                "# Page",
                "[ok](other.md) [ok](other.md#a-section) [dup](other.md#a-section-1)",
                "[self](#page) ![img](missing.png) [gone](nowhere.md)",
                "[bad anchor](other.md#no-such-heading) [web](https://example.com/x.md)",
                "`[in code](ignored.md)`",
                "```",
                "[in a fence](ignored.md)",
                "```",
            ]
        )
    )
    problems = build.check_links([tmp_path / "page.md"])
    assert len(problems) == 3, problems
    assert any("missing.png" in p for p in problems)
    assert any("nowhere.md" in p for p in problems)
    assert any("no-such-heading" in p for p in problems)


# --- the real docs ----------------------------------------------------------------------------


def test_no_broken_relative_links_or_anchors() -> None:
    problems = build.check_links(build.markdown_files())
    assert not problems, "broken links in the docs:\n" + "\n".join(problems)


@pytest.fixture(scope="module")
def fresh_pages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """cli.md and api.md rendered now from the live code (once for the module)."""
    out = tmp_path_factory.mktemp("generated")
    return {p.name: p.read_text(encoding="utf-8") for p in build.write_generated(out)}


@pytest.mark.parametrize("name", build.GENERATED)
def test_generated_page_is_up_to_date(name: str, fresh_pages: dict[str, str]) -> None:
    committed = DOCS / name
    assert committed.exists(), f"docs/{name} is missing: run `{REGENERATE}`"
    assert committed.read_text(encoding="utf-8") == fresh_pages[name], (
        f"docs/{name} is stale (the code changed since it was generated): run `{REGENERATE}` "
        "and commit the result"
    )


def test_cli_reference_covers_every_command(fresh_pages: dict[str, str]) -> None:
    for name in build.command_names():
        assert f"## maskdp {name}" in fresh_pages["cli.md"]
        assert f"Usage: maskdp {name}" in fresh_pages["cli.md"]


def test_api_reference_covers_every_public_name(fresh_pages: dict[str, str]) -> None:
    headings = set(re.findall(r"^### (\S+)$", fresh_pages["api.md"], flags=re.M))
    for package in build.API_PACKAGES:
        missing = set(build.public_names(package)) - headings
        assert not missing, f"{package} names missing from docs/api.md: {sorted(missing)}"


def test_check_mode_fails_on_a_stale_page(monkeypatch, capsys) -> None:
    committed = {name: (DOCS / name).read_text(encoding="utf-8") for name in build.GENERATED}
    monkeypatch.setattr(build, "render", lambda name: committed[name])
    assert build.main(["--check"]) == 0
    monkeypatch.setattr(build, "render", lambda name: committed[name] + "changed\n")
    assert build.main(["--check"]) == 1
    assert "python docs/build.py" in capsys.readouterr().err


# --- the runnable example of the quickstart ---------------------------------------------------


@pytest.mark.slow  # a training run in a subprocess
def test_quickstart_training_loop_runs(tmp_path: Path) -> None:
    """The Python block marked ``<!-- docs-test: run -->`` in quickstart.md runs as written."""
    text = (DOCS / "quickstart.md").read_text(encoding="utf-8")
    blocks = re.findall(r"<!-- docs-test: run -->\s*```python\n(.*?)```", text, flags=re.S)
    assert blocks, "quickstart.md lost its runnable example"
    script = tmp_path / "quickstart_example.py"
    script.write_text("import torch\ntorch.set_num_threads(1)\n" + blocks[0])
    done = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=600,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    epsilons = [float(x) for x in re.findall(r"epsilon ([0-9.]+)", done.stdout)]
    assert len(epsilons) == 2 and 0 < epsilons[0] < epsilons[1] <= 2.0, done.stdout
