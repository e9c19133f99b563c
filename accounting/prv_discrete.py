r"""A discretised privacy loss random variable: building it, and reading delta and epsilon.

Gopi, Lee, Wutschitz 2021, Sec. 5: a PRV truncated to :math:`[t_{min}, t_{max}]` is put on a
regular mesh, cell-centred, and shifted so that its mean is the truncated continuous mean;
delta and epsilon are read from two reverse cumulative sums of the discrete law. Used by
:mod:`maskdp.accounting.prv`.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from maskdp.accounting.errors import AccountingError
from maskdp.accounting.loss_pairs import LossPair

_CHUNK = 1 << 20  # nodes discretised at once (bounds the temporaries of the CDF)


class DiscretePRV:
    r"""A discrete PRV (nodes ``ts``, masses ``pmf``) with the tail sums that answer queries:
    :math:`D_1(i) = \sum_{j \ge i} p_j`, :math:`D_2(i) = \sum_{j \ge i} p_j e^{-t_j}`, so
    that :math:`\delta(\varepsilon) = D_1(i) - e^{\varepsilon} D_2(i)` for
    :math:`t_{i-1} < \varepsilon \le t_i`."""

    def __init__(self, ts: np.ndarray, pmf: np.ndarray, rounding: float = 0.0) -> None:
        self.ts = ts
        self.rounding = rounding  # bound on the round-off in any delta read from this law
        self.d1 = _tail_sums(pmf)
        self.d2 = _tail_sums(pmf * np.exp(-ts))

    def _delta_at_node(self, i: int) -> float:
        with np.errstate(over="ignore", invalid="ignore"):
            return float(self.d1[i] - math.exp(min(float(self.ts[i]), 700.0)) * self.d2[i])

    def delta(self, epsilon: Any) -> Any:
        e = np.asarray(epsilon, dtype=float)
        i = np.searchsorted(self.ts, e, side="left")
        with np.errstate(over="ignore", invalid="ignore"):
            out = self.d1[i] - np.exp(e) * self.d2[i]
        return np.nan_to_num(out, nan=1.0) if out.ndim else float(np.nan_to_num(out, nan=1.0))

    def epsilon(self, delta: float) -> float:
        # The first node whose delta is at most ``delta`` (delta decreases along the nodes,
        # up to FFT round-off): bisection, O(log n) node evaluations.
        lo, hi = 0, self.ts.size
        while lo < hi:
            mid = (lo + hi) // 2
            if self._delta_at_node(mid) <= delta:
                hi = mid
            else:
                lo = mid + 1
        i = lo
        if i >= self.ts.size:
            raise AccountingError(
                "the PRV grid is too narrow for this delta (epsilon beyond its domain); "
                "use the rdp accountant"
            )
        if i == 0:  # delta reached at the grid's left edge: epsilon is at most that node
            return float(self.ts[0])
        mass, weight = self.d1[i] - delta, self.d2[i]
        if not (mass > 0 and weight > 0):  # round-off noise only: the bounds' slack covers it
            raise AccountingError(
                f"delta={delta:g} lies in the PRV grid's round-off noise; raise delta or use "
                "the rdp accountant"
            )
        return float(math.log(mass / weight))


def _tail_sums(values: np.ndarray) -> np.ndarray:
    """``out[i] = sum(values[i:])`` for i = 0..n (``out[n] = 0``)."""
    out = np.zeros(values.size + 1)
    np.cumsum(values[::-1], out=out[-2::-1])
    return out


def discretise(pair: LossPair, t_min: float, mesh: float, size: int) -> tuple[np.ndarray, float]:
    """Cell-centred masses of the PRV truncated to [t_min, t_max], renormalised, and the shift
    that makes the discrete mean equal the truncated continuous mean (Gopi et al. Sec. 5).

    Each cell edge is mapped through the inverse loss once; a cell's mass is the difference
    of the CDF at its edges below the median and of the survival function above it."""
    t_max = t_min + (size - 1) * mesh
    split = pair.median()
    pmf = np.empty(size)
    for start in range(0, size, _CHUNK):
        stop = min(size, start + _CHUNK)
        edges = t_min + mesh * (np.arange(start, stop + 1) - 0.5)
        np.clip(edges, t_min, t_max, out=edges)
        x = pair.inverse_loss(edges)
        cut = int(np.searchsorted(edges[:-1], split))  # cells from `cut` on lie above it
        below = pair.at(x[: cut + 1], upper=False)
        above = pair.at(x[cut:], upper=True)
        pmf[start : start + cut] = np.diff(below)
        pmf[start + cut : stop] = -np.diff(above)
    np.maximum(pmf, 0.0, out=pmf)
    remaining = pmf.sum()
    if not remaining > 0:
        raise AccountingError("the PRV grid holds no probability mass (report this as a bug)")
    pmf /= remaining
    mean_discrete = float(np.dot(t_min + mesh * np.arange(size), pmf))
    shift = pair.truncated_mean(t_min, t_max) - mean_discrete
    if not abs(shift) < mesh / 2.0:
        raise AccountingError(
            f"the discretised PRV's mean is off by {shift:.3g} (mesh {mesh:.3g}); pass another "
            "eps_error or use the rdp accountant"
        )
    return pmf, shift


def round_off_bound(steps: int, size: int, dtype: Any) -> float:
    r"""Bound on the round-off in a delta read from ``steps`` composed steps on ``size`` nodes.

    Each spectrum coefficient carries a relative FFT error of order
    :math:`\log_2(n)\,u`; its N-th power carries N times that, and the inverse FFT spreads
    it over the law. We charge :math:`(N + 2) \log_2(n)\, \epsilon_{mach}` in delta (twice
    the unit round-off per operation), plus :math:`n\, \epsilon_{mach}` for the tail sums.
    An error model, not a theorem: against the exact Gaussian (q = 1) at up to 10^7 steps
    the round-off measured against a long double composition on the same grid stays 30 to
    300 times below it (tests/accounting/test_prv.py).
    """
    eps = float(np.finfo(dtype).eps)
    return ((steps + 2) * math.log2(max(size, 2)) + size) * eps


def fft_size(nodes: int) -> int:
    """The smallest even length >= ``nodes`` whose FFT is fast (5-smooth)."""
    from scipy.fft import next_fast_len

    size = next_fast_len(nodes, real=True)
    while size % 2:
        size = next_fast_len(size + 1, real=True)
    return size
