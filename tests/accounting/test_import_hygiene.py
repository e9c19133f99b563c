"""The RDP path must not import torch, opacus, scipy or the rest of maskdp (the CLI must
start fast), and the package lives under ``maskdp.accounting``: nothing named
``accounting`` at the top level of a user's environment."""

from __future__ import annotations

import ast
import pathlib
import subprocess
import sys

import maskdp.accounting as accounting

HEAVY = ("torch", "opacus", "scipy", "prv_accountant", "dp_accounting")

SCRIPT = """
import sys
import maskdp.accounting as accounting
from maskdp.accounting.ledger import PrivacyLedger
from maskdp.accounting.conversions import rdp_to_epsilon, rdp_to_delta
from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events
from maskdp.accounting.relations import Relation
from maskdp.accounting.calibration import calibrate_noise, max_steps
ledger = accounting.PrivacyLedger()
ledger.record(0.01, 1.0, 1000)
ledger.epsilon(1e-5)
ledger.epsilon(1e-5, relation="substitute", conversion="classic")
calibrate_noise(1.0, 1e-5, sample_rate=0.01, steps=100)
max_steps(1.0, 1e-5, sample_rate=0.01, noise_multiplier=1.0)
loaded = [m for m in sys.modules if m.split(".")[0] in {heavy}]
loaded += [m for m in sys.modules if m.startswith("maskdp.")
           and not m.startswith(("maskdp.accounting", "maskdp._lazy"))]  # _lazy: stdlib only
print(",".join(sorted(loaded)))
"""


def test_rdp_path_imports_nothing_heavy():
    out = subprocess.run(
        [sys.executable, "-c", SCRIPT.format(heavy=set(HEAVY))],
        capture_output=True,
        text=True,
        check=True,
    )
    assert out.stdout.strip() == "", out.stdout


def test_package_never_imports_torch_opacus_or_the_rest_of_maskdp():
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
                assert name.split(".")[0] not in {"torch", "opacus", "accounting"}, (
                    path.name,
                    name,
                )
                if name.startswith("maskdp"):  # maskdp._lazy: the stdlib-only export helper
                    assert name.startswith(("maskdp.accounting", "maskdp._lazy")), (path.name, name)


def test_lazy_exports_resolve():
    for name in accounting.__all__:
        module = accounting._EXPORTS[name]
        if module.startswith("maskdp.accounting.api"):
            continue  # written by another module owner
        assert getattr(accounting, name) is not None


def test_a_user_module_named_accounting_does_not_shadow_the_package(tmp_path):
    """A user's own accounting.py beside their script must not break ``import maskdp``."""
    (tmp_path / "accounting.py").write_text("raise ImportError('the user module was imported')\n")
    script = (
        "import maskdp\n"
        "from maskdp.accounting import PrivacyLedger\n"
        "ledger = PrivacyLedger()\n"
        "ledger.record(0.01, 1.0, 10)\n"
        "print(round(ledger.epsilon(1e-5), 6) > 0)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, cwd=tmp_path, check=True
    )
    assert out.stdout.strip() == "True"
