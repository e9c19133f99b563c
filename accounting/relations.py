r"""Neighbouring relations of MaskDP and how their accounting differs.

``erase`` (default): the sensitive content of one record is present or absent (the model sees
only the record's public view). This is dp_accounting's REPLACE_SPECIAL relation, "replace
with the zero record": for the Poisson-subsampled Gaussian it has exactly the same privacy
curve as add/remove-one, so every accountant of this package applies unchanged.

``substitute``: the sensitive content of one record is replaced by arbitrary other content
(replace-one restricted to the mask). The accountants use its exact one-step worst case, the
antipodal pair of :mod:`maskdp.accounting.loss_pairs` (proof in docs/privacy.md, "The
substitute relation: the antipodal pair"): PRV tightly, RDP through the pair's Renyi
divergence (:mod:`maskdp.accounting.rdp_substitute`).

Group privacy gives a looser bound from any erase profile; :func:`substitute_epsilon`
computes it, for profiles that come from elsewhere (and the benchmark shows the gap).

**Claim.** If a mechanism :math:`M` is :math:`(\varepsilon, d)`-DP for ``erase``, it is
:math:`(2\varepsilon, (1 + e^{\varepsilon})\, d)`-DP for ``substitute``.

**Proof.** Let :math:`D \sim_{sub} D'` differ in the sensitive content of record :math:`i`,
and let :math:`E` be :math:`D` with the sensitive content of record :math:`i` erased. The
erased record depends only on the record's public part (its non-sensitive content, mask and
label), which :math:`D` and :math:`D'` share, so :math:`E` is also :math:`D'` with record
:math:`i` erased: :math:`D \sim_{erase} E \sim_{erase} D'`. For every measurable set
:math:`S`, applying the erase guarantee twice,

.. math::

    P[M(D) \in S] \le e^{\varepsilon} P[M(E) \in S] + d
                  \le e^{\varepsilon}\big(e^{\varepsilon} P[M(D') \in S] + d\big) + d
                  = e^{2\varepsilon} P[M(D') \in S] + (1 + e^{\varepsilon})\, d.

The relation is symmetric, which gives the other direction. :math:`\square`

This holds for every erase guarantee :math:`(\varepsilon(d), d)` of the privacy profile,
so for a target substitute delta :math:`\delta` we may pick any erase delta :math:`d` with
:math:`(1 + e^{\varepsilon(d)}) d \le \delta` and report :math:`2\varepsilon(d)`;
:func:`substitute_epsilon` searches for the largest such :math:`d` (which gives the smallest
reported epsilon). The result is an *upper bound*, far above the antipodal pair's (3.90
against 2.49 at q = 0.01, sigma = 1.1, 1000 steps, delta = 1e-5).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from enum import Enum

from maskdp.accounting import _validate
from maskdp.accounting.choices import RELATIONS
from maskdp.accounting.errors import AccountingError

__all__ = ["RELATIONS", "Relation", "parse_relation", "substitute_epsilon"]

_D_MIN = 1e-300


class Relation(str, Enum):
    """The neighbouring relation a guarantee refers to."""

    ERASE = "erase"
    SUBSTITUTE = "substitute"


def parse_relation(relation: Relation | str) -> Relation:
    """``Relation`` from a member or its value; InvalidParameterError otherwise."""
    return Relation(_validate.choice("relation", relation, RELATIONS))


def substitute_epsilon(
    erase_epsilon_at: Callable[[float], float], delta: float
) -> tuple[float, float]:
    r"""Substitute epsilon at ``delta`` from the erase privacy profile (group privacy, k = 2).

    Finds an erase delta :math:`d` with :math:`(1 + e^{\varepsilon(d)})\, d \le \delta` by
    bisection in :math:`\log d` (only points that satisfy the inequality are ever returned,
    so the result is valid even if the profile is noisy) and returns
    :math:`(2\varepsilon(d), d)`: an upper bound on the substitute epsilon at ``delta``
    (module docstring for the proof).

    Returns ``(inf, 0.0)`` when no erase delta down to 1e-300 qualifies (erase epsilons in
    the hundreds), rather than a bound we could not certify.

    Args:
        erase_epsilon_at: erase epsilon (an upper bound) as a function of the erase delta,
            non-increasing in it.
        delta: the target substitute delta, in (0, 1).
    """
    target = _validate.open_unit("delta", delta)

    def excess(d: float) -> tuple[float, float]:
        eps = float(erase_epsilon_at(d))
        if math.isnan(eps) or eps < 0:
            raise AccountingError(
                f"the erase profile returned an invalid epsilon {eps!r} at delta {d:g}"
            )
        # log((1 + e^eps) d) - log(delta), without overflow for large eps.
        return eps, math.log(d) + eps + math.log1p(math.exp(-eps)) - math.log(target)

    hi = target / 2.0  # (1 + e^eps) >= 2, so every feasible d is <= delta / 2
    eps_hi, gap_hi = excess(hi)
    if gap_hi <= 0:
        return 2.0 * eps_hi, hi
    lo, step = hi, math.exp(-max(gap_hi, 1.0))
    while True:
        lo *= step
        if lo < _D_MIN:  # only for absurd epsilons (hundreds): no finite bound certified
            return math.inf, 0.0
        eps_lo, gap_lo = excess(lo)
        if gap_lo <= 0:
            break
    # Invariant: lo feasible, hi infeasible; stop at 1e-6 relative width.
    for _ in range(100):
        if math.log(hi / lo) <= 1e-6:
            break
        mid = math.exp(0.5 * (math.log(lo) + math.log(hi)))  # sqrt(lo * hi) underflows
        eps_mid, gap_mid = excess(mid)
        if gap_mid <= 0:
            lo, eps_lo = mid, eps_mid
        else:
            hi = mid
    return 2.0 * eps_lo, lo
