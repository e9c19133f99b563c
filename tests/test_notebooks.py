"""The notebooks in docs/notebooks run from top to bottom and draw their figures.

Each notebook is executed with nbclient on the ``python3`` kernel of this interpreter, in
its own folder, with ``MASKDP_DOCS_IMG`` pointing at a temporary folder so that the test
leaves the committed figures in docs/img alone. A cell that raises fails the test with the
cell's traceback. The committed copies must be executed (outputs included) and error-free.
To refresh them: ``python docs/build.py notebooks``.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = ROOT / "docs" / "notebooks"
IMG = ROOT / "docs" / "img"
CELL_TIMEOUT = 300  # seconds per cell; both notebooks take about 1-3 minutes in all

FIGURES = {
    "accounting.ipynb": (
        "accounting_epsilon_vs_epochs.png",
        "accounting_noise_calibration.png",
        "accounting_attack_risk.png",
        "accounting_closed_form_gap.png",
    ),
    "maskdp_training.ipynb": (
        "training_views.png",
        "training_accuracy_and_epsilon.png",
        "training_accuracy_vs_epsilon.png",
        "training_gradient_split.png",
        "training_clip_factors.png",
    ),
}
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"

_MISSING = [
    name
    for name in ("nbclient", "nbformat", "ipykernel", "matplotlib")
    if not importlib.util.find_spec(name)
]
needs_jupyter = pytest.mark.skipif(
    bool(_MISSING),
    reason=f"{', '.join(_MISSING)} not importable: pip install -e '.[notebook]' to run the notebooks",
)


def _load_build():
    spec = importlib.util.spec_from_file_location("docs_build", ROOT / "docs" / "build.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


def _errors(notebook) -> list[str]:
    return [
        f"{output.get('ename')}: {output.get('evalue')}"
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
        if output.get("output_type") == "error"
    ]


def test_every_notebook_is_listed() -> None:
    assert sorted(p.name for p in NOTEBOOKS.glob("*.ipynb")) == sorted(FIGURES)


@needs_jupyter
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_committed_notebook_is_executed_without_errors(name: str) -> None:
    import nbformat

    notebook = nbformat.read(NOTEBOOKS / name, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(cell.get("execution_count") for cell in code), (
        f"{name} is not fully executed: run `python docs/build.py notebooks`"
    )
    assert not _errors(notebook), _errors(notebook)
    images = sum(
        "image/png" in output.get("data", {}) for cell in code for output in cell.get("outputs", [])
    )
    assert images >= len(FIGURES[name]), f"{name} shows {images} figures"
    for figure in FIGURES[name]:
        assert (IMG / figure).read_bytes().startswith(PNG_MAGIC), f"docs/img/{figure}"


@pytest.mark.slow  # executes the notebook in a kernel
@needs_jupyter
@pytest.mark.parametrize("name", sorted(FIGURES))
def test_notebook_executes_and_draws_its_figures(name: str, tmp_path: Path) -> None:
    build = _load_build()
    notebook = build.execute_notebook(
        NOTEBOOKS / name, timeout=CELL_TIMEOUT, env={"MASKDP_DOCS_IMG": str(tmp_path)}
    )
    assert not _errors(notebook), _errors(notebook)
    for figure in FIGURES[name]:
        path = tmp_path / figure
        assert path.exists(), f"{name} did not write {figure}"
        assert path.read_bytes().startswith(PNG_MAGIC) and path.stat().st_size > 5_000
