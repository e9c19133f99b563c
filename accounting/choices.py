"""The names a caller chooses between, each spelled once: accountants, conversions, relations.

Every other module imports these literals (and the tuples of their values) from here:

- :data:`Accountant`: ``"rdp"`` (Renyi DP, Mironov 2017, :mod:`maskdp.accounting.rdp`) or
  ``"prv"`` (privacy random variables, Gopi et al. 2021, :mod:`maskdp.accounting.prv`);
  :func:`maskdp.accounting.ledger.account` maps each name to its accountant;
- :data:`Conversion`: how an RDP curve becomes an (epsilon, delta) guarantee,
  ``"hypothesis-test"`` (Balle et al. 2020, Thm. 21) or ``"classic"`` (Mironov 2017,
  Prop. 3); see :mod:`maskdp.accounting.conversions`;
- :data:`RelationName`: the neighbouring relation, ``"erase"`` or ``"substitute"``, the
  values of :class:`maskdp.accounting.relations.Relation`.

Standard library only: the CLI's parameter models (:mod:`maskdp.accounting.params`) use
these names before any numerical module (numpy) is loaded, which keeps ``maskdp epsilon``
fast to start.
"""

from __future__ import annotations

from typing import Literal, get_args

__all__ = [
    "ACCOUNTANTS",
    "CONVERSIONS",
    "RELATIONS",
    "Accountant",
    "Conversion",
    "RelationName",
]

Accountant = Literal["rdp", "prv"]
"""The accountant that turns a run into a guarantee."""

Conversion = Literal["hypothesis-test", "classic"]
"""The RDP-to-(epsilon, delta) conversion."""

RelationName = Literal["erase", "substitute"]
"""The neighbouring relation a guarantee refers to (the values of ``Relation``)."""

ACCOUNTANTS: tuple[Accountant, ...] = get_args(Accountant)
CONVERSIONS: tuple[Conversion, ...] = get_args(Conversion)
RELATIONS: tuple[RelationName, ...] = get_args(RelationName)
