r"""How large a PRV grid is: its half-width, and the epsilon error that sets its mesh.

Gopi, Lee, Wutschitz 2021 (Remark 5.6) bound the grid's half-width :math:`L` with an RDP
bound; the mesh is :math:`h = \varepsilon_e / \sqrt{(N/2) \log(12/\delta_e)}` (Thm. 5.5),
so a grid holds :math:`2L/h` nodes. :func:`default_eps_error` picks :math:`\varepsilon_e`
for a query that did not give one. Used by :mod:`maskdp.accounting.prv`.
"""

from __future__ import annotations

import functools
import math
import warnings
from collections.abc import Sequence

import numpy as np
from maskdp.accounting.errors import AccountingError
from maskdp.accounting.events import PoissonGaussianEvent, merge_events
from maskdp.accounting.loss_pairs import LossPair
from maskdp.accounting.rdp import rdp_of_events
from maskdp.accounting.relations import Relation, parse_relation

_SAFE_ORDERS = np.unique(
    np.concatenate(
        [
            [1.02, 1.05, 1.1, 1.2, 1.35, 1.5, 1.75],
            np.arange(2.0, 17.0),
            np.round(np.geomspace(18, 4096, 25)),
        ]
    )
)
"""Orders that size the PRV grid: few fractional ones (their quadrature is the costly part)."""


@functools.lru_cache(maxsize=256)
def _step_rdp(q: float, sigma: float, relation: Relation) -> np.ndarray:
    """One step's RDP on :data:`_SAFE_ORDERS` (read-only, cached: for the substitute pair it
    is a quadrature, and a default query needs it three times)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        out = rdp_of_events([PoissonGaussianEvent(q, sigma)], _SAFE_ORDERS, relation=relation)
    out.flags.writeable = False
    return out


def safe_half_width(
    pairs: Sequence[LossPair],
    steps: Sequence[int],
    *,
    eps_error: float,
    delta_error: float,
) -> float:
    r"""Half-width L of the PRV grid: Gopi et al. 2021, Remark 5.6, as in prv-accountant's
    ``compute_safe_domain_size``, with our RDP of the pair (on a coarse order grid: any valid
    RDP bound serves, a looser one only widens the grid).

    :math:`L = \max(\varepsilon_{RDP}(\text{all}; \delta_e/4),
    \max_i \varepsilon_{RDP}(\text{one step of } i; \delta_e/(8N)), \varepsilon_e) + 3`,
    with the hypothesis-test conversion.
    """
    from maskdp.accounting.conversions import _epsilons

    total = sum(steps)
    per_step = [_step_rdp(p.q, p.sigma, p.relation) for p in pairs]
    composed = sum(n * r for n, r in zip(steps, per_step, strict=True))
    with np.errstate(over="ignore", invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        half = float(
            np.min(
                _epsilons(_SAFE_ORDERS, composed, math.log(delta_error / 4.0), "hypothesis-test")
            )
        )
        for r in per_step:
            one = _epsilons(_SAFE_ORDERS, r, math.log(delta_error / 8.0 / total), "hypothesis-test")
            half = max(half, float(np.min(one)))
    if not math.isfinite(half):
        raise AccountingError("no finite RDP bound sizes the PRV grid (noise far too small)")
    return max(half, eps_error) + 3.0


MIN_EPS_ERROR = 2e-3
"""The smallest default epsilon error (below it the grid grows without a visible gain)."""

MAX_NODES = 1 << 25
"""Most discretisation nodes over all of a curve's grids (one per distinct (q, sigma)):
about 33 million, 2 GB of float64 work arrays at the peak of a query."""

NODE_BUDGET = 1 << 23
"""Most nodes (over all grids) a *default* epsilon error may ask for: about 8 million, under
1 GB and a few seconds (measured: 10^7 steps in 3.2 s, 0.44 GiB of arrays). Beyond it the
default error grows instead (:func:`default_eps_error`)."""


def default_eps_error(
    events: Sequence[PoissonGaussianEvent], delta: float, relation: Relation = Relation.ERASE
) -> float:
    r"""PRV epsilon error chosen from the error to meet: 0.4% of the RDP epsilon, at least
    ``MIN_EPS_ERROR``.

    The PRV error is absolute, so a fixed 0.01 is 2% of an epsilon of 0.5 and a needless
    0.04% of an epsilon of 25, whose grid it makes 25 times finer. The RDP epsilon (an upper
    bound, cheap) sets the scale, which keeps the upper bound within about 1% of the exact
    value. Gopi et al.'s mesh shrinks as :math:`1/\sqrt{N}`, so at very many steps and a
    small epsilon (10^7 steps at epsilon 0.6) that error would need tens of millions of
    nodes: the default is then the smallest error whose grid fits :data:`NODE_BUDGET`
    (:func:`affordable_eps_error`): a default query stays within a few seconds and 1 GB
    at any step count up to 10^7, and the result's bounds say how wide its band is (1.6%
    of epsilon at 10^7 steps, q = 1e-4, sigma 2; wider for a tiny epsilon). An explicit
    ``eps_error`` may ask for a finer grid, up to :data:`MAX_NODES`.
    """
    from maskdp.accounting.conversions import _minimise
    from maskdp.accounting.rdp import DEFAULT_ORDERS

    relation = parse_relation(relation)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        if relation is Relation.ERASE:
            orders = DEFAULT_ORDERS
            rdp = rdp_of_events(events, orders, relation=relation)
        else:  # the substitute pair's RDP is a quadrature: the coarse, cached grid
            orders = _SAFE_ORDERS
            rdp = sum(
                (e.steps * _step_rdp(e.sample_rate, e.noise_multiplier, relation) for e in events),
                np.zeros(len(orders)),
            )
        scale = _minimise(orders, rdp, delta, "hypothesis-test").epsilon
    if not math.isfinite(scale):
        return 0.01
    wanted = max(MIN_EPS_ERROR, 0.004 * scale)
    return max(wanted, affordable_eps_error(events, delta / 1000.0, relation))


def affordable_eps_error(
    events: Sequence[PoissonGaussianEvent], delta_error: float, relation: Relation
) -> float:
    r"""The smallest epsilon error whose grids hold at most :data:`NODE_BUDGET` nodes.

    Each grid spans :math:`2L` (:func:`safe_half_width`) with mesh
    :math:`h = \varepsilon_e / \sqrt{(N/2) \log(12/\delta_e)}`, so its node count is
    :math:`2L\sqrt{(N/2)\log(12/\delta_e)} / \varepsilon_e`: solved for :math:`\varepsilon_e`.
    """
    merged = merge_events(events)
    if not merged:
        return 0.0
    pairs = [LossPair(e.sample_rate, e.noise_multiplier, relation) for e in merged]
    steps = [e.steps for e in merged]
    half = safe_half_width(pairs, steps, eps_error=MIN_EPS_ERROR, delta_error=delta_error)
    spread = math.sqrt(sum(steps) / 2.0 * math.log(12.0 / delta_error))
    return 2.0 * half * spread * len(pairs) / NODE_BUDGET
