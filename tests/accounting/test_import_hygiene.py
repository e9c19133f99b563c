"""The RDP path must not import torch, opacus, scipy or maskdp (the CLI must start fast)."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import accounting

HEAVY = ("torch", "opacus", "scipy", "maskdp", "prv_accountant", "dp_accounting")

SCRIPT = """
import sys
import accounting
from accounting.ledger import PrivacyLedger
from accounting.conversions import rdp_to_epsilon, rdp_to_delta
from accounting.rdp import DEFAULT_ORDERS, rdp_of_events
from accounting.relations import Relation
from accounting.calibration import calibrate_noise, max_steps
ledger = accounting.PrivacyLedger()
ledger.record(0.01, 1.0, 1000)
ledger.epsilon(1e-5)
ledger.epsilon(1e-5, relation="substitute", conversion="classic")
calibrate_noise(1.0, 1e-5, sample_rate=0.01, steps=100)
max_steps(1.0, 1e-5, sample_rate=0.01, noise_multiplier=1.0)
print(",".join(sorted(m.split(".")[0] for m in sys.modules if m.split(".")[0] in {heavy})))
"""


def test_rdp_path_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=set(HEAVY))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", out.stdout


def test_package_never_imports_torch_opacus_or_maskdp():
    root = pathlib.Path(accounting.__file__).parent
    for path in root.glob("*.py"):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for name in names:
                assert name.split(".")[0] not in {"torch", "opacus", "maskdp"}, (path.name, name)


def test_lazy_exports_resolve():
    for name in accounting.__all__:
        module = accounting._EXPORTS[name]
        if module.startswith("accounting.api"):
            continue  # written by another module owner
        assert getattr(accounting, name) is not None
