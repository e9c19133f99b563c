r"""The private term on a subset of the parameters; the others learn from the public term alone.

With ``private_parameters`` naming a set :math:`S` of trainable parameters, one step releases

.. math:: G_S = \frac{1}{B_{pub}} \sum_{j \in U} h_{j,S}
              + \frac{w}{B}\, s\Big(\sum_{i \in P} c_i \Delta_{i,S} + N(0, \sigma^2 C^2 I_S)\Big),
          \qquad G_{\bar S} = \frac{1}{B_{pub}} \sum_{j \in U} h_{j,\bar S},

with :math:`\Delta_{i,S} = g_{i,S} - h_{i,S}` the private term's coordinates in :math:`S` and
:math:`c_i = \min(1, C / \lVert \Delta_{i,S} \rVert)` clipping their norm alone.

Why it is private: :math:`\Delta_{i,S}` is a function of record :math:`i`; an erased record
has :math:`\Delta_{i,S} = 0`, so :math:`\sum_P c_i \Delta_{i,S}` has sensitivity :math:`C`
and :math:`Z_S` is the same Poisson-subsampled Gaussian mechanism as the full private term,
on fewer coordinates (same accountant, same epsilon). The public sum over :math:`U` is
released in full as before (independent of the private batch, public content only), and
everything else is post-processing. The noise dimension falls from :math:`d` to :math:`|S|`,
so the private term's signal-to-noise ratio grows by about :math:`\sqrt{d / |S|}`.

Implementation: the private pass runs, and its engine is built, with the parameters outside
:math:`S` frozen (:func:`private_subset`), so every engine sees exactly :math:`S` as the
trainable parameters; the public pass runs outside, on all of them.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager

from torch import nn

from maskdp.errors import InvalidInputError

__all__ = ["check_private_parameters", "private_subset", "resolve_private_parameters"]


def check_private_parameters(value: Sequence[str] | None) -> tuple[str, ...] | None:
    """``None`` (every trainable parameter) or a non-empty tuple of names."""
    if value is None:
        return None
    if isinstance(value, str):
        value = (value,)
    names = tuple(value) if isinstance(value, Sequence) else ()
    if not names or not all(isinstance(n, str) and n for n in names):
        raise InvalidInputError(
            "private_parameters must be None or a non-empty sequence of parameter or module "
            f"names (as in model.named_parameters()), got {value!r}"
        )
    return names


def resolve_private_parameters(model: nn.Module, names: tuple[str, ...] | None) -> frozenset[str]:
    """The trainable parameter names that ``names`` select: a parameter's own name, or a module
    name that selects all of the module's parameters. ``None`` selects every one."""
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    if names is None:
        return frozenset(trainable)
    chosen: set[str] = set()
    for name in names:
        matched = [n for n in trainable if n == name or n.startswith(name + ".")]
        if not matched:
            raise InvalidInputError(
                f"private_parameters: {name!r} names no trainable parameter or module of the "
                f"model (parameters: {', '.join(trainable[:6])}{', ...' if len(trainable) > 6 else ''})"
            )
        chosen.update(matched)
    return frozenset(chosen)


@contextmanager
def private_subset(model: nn.Module, private: frozenset[str]) -> Iterator[None]:
    """Within the block, the trainable parameters outside ``private`` are frozen."""
    frozen = [p for n, p in model.named_parameters() if p.requires_grad and n not in private]
    for p in frozen:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in frozen:
            p.requires_grad_(True)
