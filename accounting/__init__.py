"""Privacy accounting for MaskDP: numpy/scipy only, never torch.

Names are loaded lazily (PEP 562) so that ``import maskdp.accounting`` costs almost nothing and
the ``maskdp epsilon`` command starts fast.
"""

from __future__ import annotations

from maskdp._lazy import lazy_exports

_EXPORTS: dict[str, str] = {
    "AccountingError": "maskdp.accounting.errors",
    "InvalidParameterError": "maskdp.accounting.errors",
    "CalibrationError": "maskdp.accounting.errors",
    "PoissonGaussianEvent": "maskdp.accounting.events",
    "DEFAULT_ORDERS": "maskdp.accounting.rdp",
    "rdp_poisson_gaussian": "maskdp.accounting.rdp",
    "rdp_of_events": "maskdp.accounting.rdp",
    "rdp_substitute": "maskdp.accounting.rdp_substitute",
    "EpsilonResult": "maskdp.accounting.conversions",
    "rdp_to_epsilon": "maskdp.accounting.conversions",
    "rdp_to_delta": "maskdp.accounting.conversions",
    "epsilon_from_events": "maskdp.accounting.conversions",
    "PRVResult": "maskdp.accounting.prv",
    "prv_epsilon": "maskdp.accounting.prv",
    "prv_delta": "maskdp.accounting.prv",
    "Relation": "maskdp.accounting.relations",
    "substitute_epsilon": "maskdp.accounting.relations",
    "PrivacyLedger": "maskdp.accounting.ledger",
    "calibrate_noise": "maskdp.accounting.calibration",
    "max_steps": "maskdp.accounting.calibration",
    "RiskResult": "maskdp.accounting.risk",
    "attack_risk": "maskdp.accounting.risk",
    "tpr_bound_from_profile": "maskdp.accounting.risk",
    "compute_epsilon": "maskdp.accounting.api",
    "compute_noise": "maskdp.accounting.api",
    "compute_steps": "maskdp.accounting.api",
    "compute_risk": "maskdp.accounting.api",
}

__getattr__, __dir__, __all__ = lazy_exports("maskdp.accounting", _EXPORTS, globals())
