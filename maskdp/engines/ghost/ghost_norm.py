r"""Float64 ghost norms of row terms, and certified bounds on their rounding.

A layer whose per-sample gradient is :math:`G^\top A` over rows has
:math:`\lVert G^\top A\rVert_F^2 = \langle A A^\top, G G^\top\rangle` (Li et al. 2022,
"Large language models can be strong differentially private learners"): the norm without
the gradient. :func:`ghost_terms` writes a record's :math:`\Delta_i` as signed row terms,
:func:`ghost_sq_norms` their squared norms, and :func:`ghost_slack` bounds the rounding
of both the norms and the weighted sums (Higham 2002), so that the clip is certified.
"""

from __future__ import annotations

import torch
from torch import Tensor


def _gram_dot(a1: Tensor, a2: Tensor, g1: Tensor, g2: Tensor) -> Tensor:
    r""":math:`\langle A_1 A_2^\top, G_1 G_2^\top\rangle` per batch entry, in float64."""
    return (torch.bmm(a1, a2.transpose(1, 2)) * torch.bmm(g1, g2.transpose(1, 2))).sum(
        (1, 2), dtype=torch.float64
    )


Terms = list[tuple[Tensor, Tensor, float]]


def ghost_terms(af: Tensor, gf: Tensor, ap: Tensor | None, gp: Tensor | None) -> Terms:
    r""":math:`\Delta = \sum_t s_t G_t^\top A_t` as ``(A_t, G_t, s_t)`` row terms, in float64.

    Rows ``(n, R, d)`` and ``(n, R, p)``. With equal row counts the pair is rewritten as
    :math:`\Delta = dG^\top A_p - G_f^\top dA` with :math:`dA = A_p - A_f`,
    :math:`dG = G_p + G_f` (exact algebra; the public rows carry the sign), so that a record
    whose two passes nearly agree has small rows instead of large ones that cancel, and an
    erased record has exactly zero rows. Otherwise the rows are concatenated.
    """
    af, gf = af.double(), gf.double()
    if ap is None or gp is None:
        return [(af, gf, 1.0)]
    ap, gp = ap.double(), gp.double()
    if ap.shape[1] == af.shape[1]:
        return [(ap, gp + gf, 1.0), (ap - af, gf, -1.0)]
    return [(torch.cat([af, ap], 1), torch.cat([gf, gp], 1), 1.0)]


def ghost_sq_norms(terms: Terms) -> Tensor:
    r"""Per-sample :math:`\lVert \sum_t s_t G_t^\top A_t \rVert_F^2` without forming it:
    :math:`\sum_{t,t'} s_t s_{t'} \langle A_t A_{t'}^\top, G_t G_{t'}^\top\rangle`."""
    first = terms[0][0]
    sq = torch.zeros(first.shape[0], dtype=torch.float64, device=first.device)
    for i, (a1, g1, s1) in enumerate(terms):
        for j, (a2, g2, s2) in enumerate(terms[i:], start=i):
            sq += (1.0 if i == j else 2.0) * s1 * s2 * _gram_dot(a1, a2, g1, g2)
    return sq.clamp_min(0)


_U64 = 2.0**-53


def _gamma(k: int) -> float:
    r"""Higham's :math:`\gamma_k = k u / (1 - k u)` for float64: the relative error bound of a
    k-term dot product computed in any order."""
    return k * _U64 / (1 - k * _U64)


def ghost_slack(terms: Terms, *, d: int, p: int) -> tuple[Tensor, Tensor]:
    r"""Per-row-group bounds ``(sq_slack, slack)`` on the rounding of the ghost branch.

    With :math:`S = \sum_t \sum_r \lVert a_{tr}\rVert \lVert g_{tr}\rVert` over the rows of
    the terms, the float64 Gram computation of :math:`\lVert\Delta\rVert^2` errs by at most
    :math:`(2\gamma_k + \gamma_k^2 + 4u) S^2` (:math:`k = \max(d, p)`: each Gram entry is a
    k-term dot product, then one product and a float64 sum; Higham 2002, Thm. 3.5) and the
    float64 weighted sum of the record's rows, and the rounding of the rows themselves, by
    at most :math:`(\gamma_{m+2} + 2u) S` (:math:`m` its rows). Without such a bound, rows
    with large values that cancel could give a computed norm of 0 while the summed
    contribution is large. Relative to :math:`\lVert\Delta\rVert` the slack is about
    :math:`10^{-16} m S / \lVert\Delta\rVert`: invisible unless the rows cancel; zero for an
    erased record (its terms have zero rows).
    """
    s = sum((a.norm(dim=2) * g.norm(dim=2)).sum(1) for a, g, _ in terms)
    rows = sum(a.shape[1] for a, _, _ in terms)
    k = max(d, p)
    sq_slack = (2 * _gamma(k) + _gamma(k) ** 2 + 4 * _U64) * s.square()
    return sq_slack, (_gamma(rows + 2) + 2 * _U64) * s
