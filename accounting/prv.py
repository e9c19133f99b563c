r"""Tight numerical accounting: the privacy loss random variable (PRV), composed by FFT.

Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy" (NeurIPS), the
algorithm of prv-accountant written for our two dominating pairs (erase and substitute,
:mod:`maskdp.accounting.loss_pairs`) in float64 numpy:

1. the PRV of one step is truncated to :math:`[-L, L']`, :math:`L' \ge L` (:math:`L` from
   an RDP bound, their Remark 5.6; :math:`L'` rounds the grid up to a fast FFT length) and
   discretised on a mesh :math:`h = \varepsilon_e / \sqrt{(N/2) \log(12/\delta_e)}`
   (Thm. 5.5), cell-centred, then shifted so that its mean equals the truncated
   continuous mean;
2. the composition of :math:`N` steps is the inverse FFT of the product of the steps'
   spectra (a circular convolution: :math:`L` is wide enough that the wrap-around is
   covered by the error budget);
3. :math:`\delta(\varepsilon) = \sum_{t \ge \varepsilon} p_t (1 - e^{\varepsilon - t})`
   is read from two reverse cumulative sums, and Thm. 5.5 turns the discrete answer into a
   *lower bound*, an *estimate* and an *upper bound* on the true epsilon (within
   :math:`2\varepsilon_e` of each other); the upper bound is the guarantee.

Floating point is part of the budget. Raising the spectrum to the N-th power multiplies its
round-off by N, so the bounds add :func:`~maskdp.accounting.prv_discrete.round_off_bound` to
``delta_error``, and a query whose delta that would crowd out is composed in long double.

The mesh is chosen from the error to meet: :func:`default_eps_error` asks for 0.4% of the
answer, so a long run with a large epsilon gets a coarser absolute mesh and stays affordable
(10^7 steps in seconds). Grids above ``MAX_NODES`` (about 2 GB of work arrays) are refused
with a message that says what to change. Negative values (possible for tiny privacy loss)
are clamped at 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
from maskdp.accounting import _validate
from maskdp.accounting.errors import AccountingError, InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent, merge_events
from maskdp.accounting.loss_pairs import LossPair
from maskdp.accounting.prv_discrete import DiscretePRV, discretise, fft_size, round_off_bound
from maskdp.accounting.prv_grid import MAX_NODES, default_eps_error, safe_half_width
from maskdp.accounting.relations import Relation, parse_relation


@dataclass(frozen=True)
class PRVResult:
    """Epsilon of a composition at a given delta, with its numerical error bars.

    Attributes:
        epsilon_lower: lower bound on the true epsilon.
        epsilon_estimate: the discretised value (neither bound).
        epsilon_upper: upper bound on the true epsilon: the guarantee.
        delta: the delta they refer to.
    """

    epsilon_lower: float
    epsilon_estimate: float
    epsilon_upper: float
    delta: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_errors(
    eps_error: float, delta_error: float | None, default: float
) -> tuple[float, float]:
    ee = _validate.positive("eps_error", eps_error)
    de = default if delta_error is None else _validate.open_unit("delta_error", delta_error)
    return ee, de


class PRVCurve:
    """The composed PRV of fixed mechanisms, queried at several deltas or epsilons.

    ``max_steps`` may exceed the steps of the events: the grid is then sized for
    ``max_steps`` and :meth:`epsilon` can be asked about any step counts up to it (the error
    bounds hold for every count up to the maximum). Internal helper of this package.
    """

    def __init__(
        self,
        mechanisms: Sequence[tuple[float, float]],
        max_steps: Sequence[int],
        *,
        eps_error: float,
        delta_error: float,
        relation: Relation | str = Relation.ERASE,
    ) -> None:
        self.eps_error = eps_error
        self.delta_error = delta_error
        self.max_steps = tuple(int(n) for n in max_steps)
        self.relation = parse_relation(relation)
        pairs = [LossPair(q, s, self.relation) for q, s in mechanisms]
        total = sum(self.max_steps)
        half_width = safe_half_width(
            pairs, self.max_steps, eps_error=eps_error, delta_error=delta_error
        )
        mesh = eps_error / math.sqrt(total / 2.0 * math.log(12.0 / delta_error))
        k = math.ceil(half_width / mesh)
        # Nodes -k .. size - 1 - k, aligned with 0: at least 2k + 2 of them, more if that
        # makes the FFT faster (each step's law is then cut further right than L: only safer).
        size = fft_size(2 * k + 2)
        if size * len(pairs) > MAX_NODES:
            raise AccountingError(
                f"the PRV accountant would need {len(pairs)} grid(s) of {size:.3g} nodes (limit "
                f"{MAX_NODES:.3g} in all) for {total} steps at eps_error={eps_error:g}; pass a "
                "larger eps_error (the grid shrinks linearly with it), merge segments, or use "
                "the rdp accountant"
            )
        self.mesh, self.size, self._k = mesh, size, k
        self._pmfs, self._shifts = [], []
        for pair in pairs:
            pmf, shift = discretise(pair, -k * mesh, mesh, size)
            self._pmfs.append(pmf)
            self._shifts.append(shift)
        self._check_drift(half_width)
        self._spectra: dict[Any, list[Any]] = {}
        self._cache: tuple[tuple[tuple[int, ...], Any], DiscretePRV] | None = None

    def _check_drift(self, half_width: float) -> None:
        r"""Refuse a mesh so coarse that the composition leaves its grid.

        The FFT composes the steps' laws *on the grid*, before their mean-correcting shifts
        (:func:`~maskdp.accounting.prv_discrete.discretise`): the sum of N cell indices has
        mean :math:`\sum_i N_i \bar t_i` (:math:`\bar t_i` the unshifted discrete mean).
        With a fine mesh that is about the composed mean, well inside :math:`[-L, L]`; with
        a mesh coarse against one step's losses (10^9 steps at an eps_error in the
        thousands) each step's rounding bias adds up past :math:`L`, the circular
        convolution wraps around, and the answer would be meaningless (it read 0).
        """
        grid = (np.arange(self.size) - self._k) * self.mesh
        drift = sum(
            n * float(np.dot(grid, pmf)) for n, pmf in zip(self.max_steps, self._pmfs, strict=True)
        )
        if abs(drift) > half_width - 3.0:
            raise AccountingError(
                f"the PRV grid's mesh ({self.mesh:.3g}, from eps_error={self.eps_error:g}) is "
                f"too coarse for {sum(self.max_steps)} steps: their rounding drifts by "
                f"{drift:.3g}, past the grid's half-width {half_width:.3g}; pass a smaller "
                "eps_error or use the rdp accountant"
            )

    def _key(self, steps: Sequence[int] | None) -> tuple[int, ...]:
        key = self.max_steps if steps is None else tuple(int(n) for n in steps)
        if len(key) != len(self.max_steps) or any(
            n < 0 or n > m for n, m in zip(key, self.max_steps, strict=True)
        ):
            raise AccountingError(f"steps {key} exceed the grid's maximum {self.max_steps}")
        return key

    def _precision(self, steps: tuple[int, ...], delta: float | None) -> Any:
        """float64, or long double when float64's round-off would take more than 1% of
        ``delta`` (long runs at small delta: :func:`~maskdp.accounting.prv_discrete.
        round_off_bound`)."""
        if delta is None or round_off_bound(sum(steps), self.size, np.float64) <= 0.01 * delta:
            return np.float64
        return np.longdouble

    def _composed(self, steps: Sequence[int] | None, delta: float | None = None) -> DiscretePRV:
        key = self._key(steps)
        dtype = self._precision(key, delta)
        if self._cache is None or self._cache[0] != (key, dtype):
            from scipy.fft import irfft, rfft

            if dtype not in self._spectra:
                self._spectra[dtype] = [rfft(np.asarray(p, dtype)) for p in self._pmfs]
            spectrum = None
            for f, n in zip(self._spectra[dtype], key, strict=True):
                if n:
                    spectrum = f**n if spectrum is None else spectrum * f**n
            if spectrum is None:  # no steps: the law of 0
                spectrum = np.ones_like(self._spectra[dtype][0])
            circular = irfft(spectrum, self.size)
            del spectrum
            total = sum(key)
            # Index i of the circular result holds the sum t_min * N + i h; on the base grid
            # that is index i - (N - 1) k: a rotation, written into one float64 array.
            pmf = np.empty(self.size)
            turn = (-(total - 1) * self._k) % self.size
            pmf[turn:] = circular[: self.size - turn]
            pmf[:turn] = circular[self.size - turn :]
            del circular
            shift = sum(n * s for n, s in zip(key, self._shifts, strict=True))
            ts = (np.arange(self.size) - self._k) * self.mesh + shift
            rounding = round_off_bound(total, self.size, dtype)
            self._cache = ((key, dtype), DiscretePRV(ts, pmf, rounding))
        return self._cache[1]

    def epsilon(
        self, delta: float, steps: Sequence[int] | None = None
    ) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon at ``delta`` after ``steps`` (default: the maximum).

        The delta budget of the bounds is ``delta_error`` plus the round-off bound of the
        composition (:func:`~maskdp.accounting.prv_discrete.round_off_bound`)."""
        if delta <= self.delta_error:
            raise AccountingError(
                f"delta ({delta:g}) must exceed delta_error ({self.delta_error:g})"
            )
        f_n = self._composed(steps, delta)
        slack = self.delta_error + f_n.rounding
        if slack >= 0.5 * delta:
            raise AccountingError(
                f"delta={delta:g} is too small for {sum(self._key(steps))} steps on a grid of "
                f"{self.size} nodes: floating-point round-off ({f_n.rounding:.2g}) would "
                "dominate (raise delta or eps_error, or use the rdp accountant)"
            )
        if delta >= f_n.delta(-self.eps_error) + slack:
            return 0.0, 0.0, 0.0  # delta at least an upper bound on delta(0): epsilon 0 holds
        upper = f_n.epsilon(delta - slack) + self.eps_error
        lower = f_n.epsilon(delta + slack) - self.eps_error
        estimate = f_n.epsilon(delta)
        return max(0.0, lower), max(0.0, estimate), max(0.0, upper)

    def delta(
        self, epsilon: float, steps: Sequence[int] | None = None
    ) -> tuple[float, float, float]:
        """(lower, estimate, upper) delta at ``epsilon`` (each clamped to [0, 1]); the bounds
        include ``delta_error`` and the composition's round-off bound."""
        f_n = self._composed(steps)
        slack = self.delta_error + f_n.rounding
        lower = f_n.delta(epsilon + self.eps_error) - slack
        estimate = f_n.delta(epsilon)
        upper = f_n.delta(epsilon - self.eps_error) + slack
        return tuple(min(1.0, max(0.0, float(x))) for x in (lower, estimate, upper))  # type: ignore[return-value]

    def upper_deltas(self, epsilons: Any, steps: Sequence[int] | None = None) -> Any:
        r"""Upper bounds on delta at many epsilons at once (each clamped to [0, 1]): the same
        value as :meth:`delta`'s upper, :math:`\hat\delta(\varepsilon - \varepsilon_e) +
        \delta_e` plus the round-off bound."""
        f_n = self._composed(steps)
        e = np.asarray(epsilons, dtype=float) - self.eps_error
        return np.clip(f_n.delta(e) + self.delta_error + f_n.rounding, 0.0, 1.0)


def curve_for(
    events: Sequence[PoissonGaussianEvent],
    *,
    eps_error: float,
    delta_error: float,
    relation: Relation = Relation.ERASE,
) -> PRVCurve | None:
    """The PRV curve of ``events`` (None when there are no events); events with equal
    (q, sigma) become one self-composition (:func:`~maskdp.accounting.events.merge_events`)."""
    merged = merge_events(events)
    if not merged:
        return None
    relation = parse_relation(relation)
    return PRVCurve(
        [(e.sample_rate, e.noise_multiplier) for e in merged],
        [e.steps for e in merged],
        eps_error=eps_error,
        delta_error=delta_error,
        relation=relation,
    )


def prv_epsilon(
    events: Sequence[PoissonGaussianEvent],
    delta: float,
    *,
    eps_error: float | None = None,
    delta_error: float | None = None,
    relation: Relation | str = Relation.ERASE,
) -> PRVResult:
    r"""Epsilon of the composition at ``delta`` with PRV error bars (Gopi et al. 2021).

    ``epsilon_upper`` is an upper bound on the true epsilon (the guarantee), within
    ``2 * eps_error`` of the lower bound. ``eps_error`` defaults to
    :func:`default_eps_error`, ``delta_error`` to ``delta / 1000``. ``relation``: ``erase``
    or ``substitute`` (the antipodal pair, :mod:`maskdp.accounting.loss_pairs`).
    """
    d = _validate.open_unit("delta", delta)
    rel = parse_relation(relation)
    if eps_error is None:
        eps_error = default_eps_error(events, d, rel)
    ee, de = _check_errors(eps_error, delta_error, d / 1000.0)
    if de >= d:
        raise InvalidParameterError(f"delta_error must be < delta ({d:g}), got {de!r}")
    curve = curve_for(events, eps_error=ee, delta_error=de, relation=rel)
    if curve is None:
        return PRVResult(0.0, 0.0, 0.0, d)
    lower, estimate, upper = curve.epsilon(d)
    return PRVResult(lower, estimate, upper, d)


def prv_delta(
    events: Sequence[PoissonGaussianEvent],
    epsilon: float,
    *,
    eps_error: float = 0.01,
    delta_error: float | None = None,
    relation: Relation | str = Relation.ERASE,
) -> tuple[float, float, float]:
    r"""(lower, estimate, upper) delta of the composition at ``epsilon``, each in [0, 1].

    The upper value is an upper bound on the true delta (Gopi et al. 2021): the estimate at
    ``epsilon - eps_error`` plus ``delta_error`` (default 1e-10).
    """
    eps = _validate.non_negative("epsilon", epsilon)
    rel = parse_relation(relation)
    ee, de = _check_errors(eps_error, delta_error, 1e-10)
    curve = curve_for(events, eps_error=ee, delta_error=de, relation=rel)
    if curve is None:
        return (0.0, 0.0, 0.0)
    return curve.delta(eps)
