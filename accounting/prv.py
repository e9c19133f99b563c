r"""Tight numerical accounting through prv-accountant (imported lazily; it loads scipy).

Gopi, Lee, Wutschitz 2021, "Numerical Composition of Differential Privacy" (NeurIPS):
the privacy loss random variable (PRV) of each Poisson-subsampled Gaussian step is
discretised on a mesh, the composition is an FFT convolution, and Thm. 5.5 bounds the
discretisation error by ``eps_error`` in epsilon and ``delta_error`` in delta. So every result
is a triple: a *lower bound*, an *estimate* and an *upper bound*; the upper bound is the
guarantee we report. Negative values (possible for tiny privacy loss) are clamped at 0.

Pitfalls of prv-accountant 0.2 handled here (see its ``accountant.py``, ``domain.py``,
``discrete_privacy_random_variable.py``):

* the mesh shrinks like ``eps_error / sqrt(total steps)``, so a long run with a large
  epsilon needs a huge grid (100k steps at epsilon 25: 5.7 million nodes, about a minute and
  several GB); we compute the grid size first and refuse beyond ``MAX_GRID`` nodes with a
  message that says what to change;
* it raises ``ValueError``/``RuntimeError`` when floating point dominates a tiny delta or
  the discretised mean drifts; we turn those into :class:`AccountingError`;
* identical (q, sigma) segments are merged into one self-composition, the fast path.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from maskdp.accounting import _validate
from maskdp.accounting.errors import AccountingError, InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent, merge_events

MAX_GRID = 3_000_000
"""Most PRV discretisation nodes we build, over all distinct (q, sigma): about 2 GB of
memory and 10-20 s."""


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
    ) -> None:
        from prv_accountant import PoissonSubsampledGaussianMechanism, PRVAccountant

        self.eps_error = eps_error
        self.delta_error = delta_error
        self.max_steps = tuple(int(n) for n in max_steps)
        prvs = [
            PoissonSubsampledGaussianMechanism(sampling_probability=q, noise_multiplier=s)
            for q, s in mechanisms
        ]
        total = sum(self.max_steps)
        half_width = _safe_half_width(
            mechanisms, self.max_steps, eps_error=eps_error, delta_error=delta_error
        )
        mesh = eps_error / math.sqrt(total / 2.0 * math.log(12.0 / delta_error))
        nodes = 2.0 * half_width / mesh
        if nodes * len(prvs) > MAX_GRID:
            raise AccountingError(
                f"the PRV accountant would need {len(prvs)} grid(s) of {nodes:.3g} nodes "
                f"(limit {MAX_GRID:g} in all) for {total} steps at eps_error={eps_error:g}; "
                "pass a larger eps_error (the grid shrinks linearly with it), merge segments, "
                "or use the rdp accountant"
            )
        with _translated("building the PRV grid"), warnings.catch_warnings():
            warnings.simplefilter("ignore")  # eps_max notice and overflow inside the pdf
            self._accountant = PRVAccountant(
                prvs=prvs,
                max_self_compositions=list(self.max_steps),
                eps_error=eps_error,
                delta_error=delta_error,
                eps_max=half_width,
            )
        self._cache: dict[tuple[int, ...], Any] = {}

    def _composed(self, steps: Sequence[int]) -> Any:
        key = tuple(int(n) for n in steps)
        if key not in self._cache:
            with _translated("composing the PRVs"), warnings.catch_warnings():
                warnings.simplefilter("ignore")
                self._cache = {key: self._accountant.compute_composition(list(key))}
        return self._cache[key]

    def epsilon(
        self, delta: float, steps: Sequence[int] | None = None
    ) -> tuple[float, float, float]:
        """(lower, estimate, upper) epsilon at ``delta`` after ``steps`` (default: the maximum)."""
        f_n = self._composed(self.max_steps if steps is None else steps)
        if delta <= self.delta_error:
            raise AccountingError(
                f"delta ({delta:g}) must exceed delta_error ({self.delta_error:g})"
            )
        if delta >= self.delta(0.0, steps)[2]:
            # delta is at least an upper bound on delta(0): epsilon = 0 holds (prv-accountant
            # would fail to find a crossing instead).
            return 0.0, 0.0, 0.0
        with _translated("computing epsilon"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lower, estimate, upper = f_n.compute_epsilon(delta, self.delta_error, self.eps_error)
        return max(0.0, float(lower)), max(0.0, float(estimate)), max(0.0, float(upper))

    def delta(
        self, epsilon: float, steps: Sequence[int] | None = None
    ) -> tuple[float, float, float]:
        """(lower, estimate, upper) delta at ``epsilon`` (each clamped to [0, 1])."""
        f_n = self._composed(self.max_steps if steps is None else steps)
        with _translated("computing delta"), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lower = f_n.compute_delta_estimate(epsilon + self.eps_error) - self.delta_error
            estimate = f_n.compute_delta_estimate(epsilon)
            upper = f_n.compute_delta_estimate(epsilon - self.eps_error) + self.delta_error
        return tuple(min(1.0, max(0.0, float(x))) for x in (lower, estimate, upper))  # type: ignore[return-value]

    def upper_deltas(self, epsilons: Any, steps: Sequence[int] | None = None) -> Any:
        r"""Upper bounds on delta at many epsilons at once (each clamped to [0, 1]).

        Same value as :meth:`delta`'s upper, :math:`\hat\delta(\varepsilon - \varepsilon_e)
        + \delta_e` with :math:`\hat\delta(e) = \sum_{t \ge e} p_t (1 - e^{e - t})`, from
        two tail sums of the composed PMF instead of one pass per epsilon.
        """
        import numpy as np

        f_n = self._composed(self.max_steps if steps is None else steps)
        t = f_n.domain.ts()
        p = np.asarray(f_n.pmf, dtype=t.dtype)
        tail = np.append(np.cumsum(p[::-1])[::-1], 0.0)
        tail_exp = np.append(np.cumsum((p * np.exp(-t))[::-1])[::-1], 0.0)
        e = np.asarray(epsilons, dtype=float) - self.eps_error
        k = np.searchsorted(t, e, side="left")
        with np.errstate(over="ignore", invalid="ignore"):
            estimate = tail[k] - np.exp(e.astype(t.dtype)) * tail_exp[k]
        delta_inf = 1.0 - np.exp(f_n.log_pmc_inf)
        estimate = estimate * (1.0 - delta_inf) + delta_inf
        return np.clip(np.nan_to_num(estimate.astype(float), nan=1.0) + self.delta_error, 0.0, 1.0)


def _safe_half_width(
    mechanisms: Sequence[tuple[float, float]],
    steps: Sequence[int],
    *,
    eps_error: float,
    delta_error: float,
) -> float:
    r"""Half-width L of the PRV grid: Gopi et al. 2021, Remark 5.6, as in prv-accountant's
    ``compute_safe_domain_size``, with our RDP on DEFAULT_ORDERS in place of its slower one.

    :math:`L = \max(\varepsilon_{RDP}(\text{all}; \delta_e/4),
    \max_i \varepsilon_{RDP}(\text{one step of } i; \delta_e/(8N)), \varepsilon_e) + 3`,
    with the hypothesis-test conversion. Any valid RDP bound serves; ours is never looser.
    """
    import numpy as np
    from maskdp.accounting.conversions import _epsilons
    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_poisson_gaussian

    total = sum(steps)
    per_step = [rdp_poisson_gaussian(q, s, DEFAULT_ORDERS) for q, s in mechanisms]
    composed = sum(n * r for n, r in zip(steps, per_step, strict=True))
    half = float(
        np.min(_epsilons(DEFAULT_ORDERS, composed, math.log(delta_error / 4.0), "hypothesis-test"))
    )
    for r in per_step:
        one = float(
            np.min(
                _epsilons(DEFAULT_ORDERS, r, math.log(delta_error / 8.0 / total), "hypothesis-test")
            )
        )
        half = max(half, one)
    return max(half, eps_error) + 3.0


class _translated:
    """Context manager turning prv-accountant failures into one-line AccountingErrors."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __enter__(self) -> None:
        return None

    def __exit__(self, kind: type | None, exc: BaseException | None, tb: Any) -> bool:
        if exc is None or isinstance(exc, AccountingError):
            return False
        if isinstance(
            exc, (ValueError, RuntimeError, FloatingPointError, ZeroDivisionError, MemoryError)
        ):
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise AccountingError(
                f"prv-accountant failed while {self.what}: {message} "
                "(try another eps_error, or the rdp accountant)"
            ) from exc
        return False


def curve_for(
    events: Sequence[PoissonGaussianEvent], *, eps_error: float, delta_error: float
) -> PRVCurve | None:
    """The PRV curve of ``events`` (None when there are no events); events with equal
    (q, sigma) become one self-composition (:func:`~maskdp.accounting.events.merge_events`)."""
    merged = merge_events(events)
    if not merged:
        return None
    return PRVCurve(
        [(e.sample_rate, e.noise_multiplier) for e in merged],
        [e.steps for e in merged],
        eps_error=eps_error,
        delta_error=delta_error,
    )


def default_eps_error(events: Sequence[PoissonGaussianEvent], delta: float) -> float:
    r"""PRV epsilon error scaled to the answer: 0.4% of the RDP epsilon, in [2e-3, 1e-2].

    prv-accountant's error is absolute, so a fixed 0.01 is 2% of an epsilon of 0.5. The RDP
    epsilon (an upper bound, cheap) sets the scale, which keeps the upper bound within about
    1% of the exact value while the grid stays affordable.
    """
    from maskdp.accounting.conversions import epsilon_from_events

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        scale = epsilon_from_events(events, delta).epsilon
    if not math.isfinite(scale):
        return 0.01
    return min(0.01, max(2e-3, 0.004 * scale))


def prv_epsilon(
    events: Sequence[PoissonGaussianEvent],
    delta: float,
    *,
    eps_error: float | None = None,
    delta_error: float | None = None,
) -> PRVResult:
    r"""Epsilon of the composition at ``delta`` with PRV error bars (Gopi et al. 2021).

    ``epsilon_upper`` is an upper bound on the true epsilon (the guarantee), within
    ``2 * eps_error`` of the lower bound. ``eps_error`` defaults to
    :func:`default_eps_error`, ``delta_error`` to ``delta / 1000``.
    """
    d = _validate.open_unit("delta", delta)
    if eps_error is None:
        eps_error = default_eps_error(events, d)
    ee, de = _check_errors(eps_error, delta_error, d / 1000.0)
    if de >= d:
        raise InvalidParameterError(f"delta_error must be < delta ({d:g}), got {de!r}")
    curve = curve_for(events, eps_error=ee, delta_error=de)
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
) -> tuple[float, float, float]:
    r"""(lower, estimate, upper) delta of the composition at ``epsilon``, each in [0, 1].

    The upper value is an upper bound on the true delta (Gopi et al. 2021): the estimate at
    ``epsilon - eps_error`` plus ``delta_error`` (default 1e-10).
    """
    eps = _validate.non_negative("epsilon", epsilon)
    ee, de = _check_errors(eps_error, delta_error, 1e-10)
    curve = curve_for(events, eps_error=ee, delta_error=de)
    if curve is None:
        return (0.0, 0.0, 0.0)
    return curve.delta(eps)
