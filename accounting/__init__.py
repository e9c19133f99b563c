"""Privacy accounting for MaskDP: numpy/scipy only, never torch.

Names are loaded lazily (PEP 562) so that ``import accounting`` costs almost nothing and
the ``maskdp epsilon`` command starts fast.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS: dict[str, str] = {
    "AccountingError": "accounting.errors",
    "InvalidParameterError": "accounting.errors",
    "CalibrationError": "accounting.errors",
    "PoissonGaussianEvent": "accounting.events",
    "DEFAULT_ORDERS": "accounting.rdp",
    "rdp_poisson_gaussian": "accounting.rdp",
    "rdp_of_events": "accounting.rdp",
    "EpsilonResult": "accounting.conversions",
    "rdp_to_epsilon": "accounting.conversions",
    "rdp_to_delta": "accounting.conversions",
    "epsilon_from_events": "accounting.conversions",
    "PRVResult": "accounting.prv",
    "prv_epsilon": "accounting.prv",
    "prv_delta": "accounting.prv",
    "Relation": "accounting.relations",
    "substitute_epsilon": "accounting.relations",
    "PrivacyLedger": "accounting.ledger",
    "calibrate_noise": "accounting.calibration",
    "max_steps": "accounting.calibration",
    "RiskResult": "accounting.risk",
    "attack_risk": "accounting.risk",
    "tpr_bound_from_profile": "accounting.risk",
    "compute_epsilon": "accounting.api",
    "compute_noise": "accounting.api",
    "compute_steps": "accounting.api",
    "compute_risk": "accounting.api",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'accounting' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return __all__
