"""What every benchmark script does before it imports torch or the packages it measures.

The scripts run as ``python benchmarks/<name>.py``: Python puts this folder first on the
import path, so ``import _common`` finds this file; the script then calls :func:`setup`
and imports the rest (hence their ``# noqa: E402``).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
THREAD_VARIABLES = (
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
)


def setup() -> None:
    """Pin the numerical libraries to one thread (read when they are first imported) and put
    the repository's packages ahead of this folder on the import path.

    ``benchmarks/accounting.py`` is named like the ``accounting`` package it measures: this
    folder leaves the front of the path so that ``import accounting`` finds the package (the
    repository root goes first instead), and comes back last, for ``results_file``, where
    it shadows no package.
    """
    for variable in THREAD_VARIABLES:
        os.environ[variable] = "1"
    sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
    sys.path.insert(0, str(HERE.parent))
    sys.path.append(str(HERE))
