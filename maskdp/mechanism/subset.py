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

**The full private term** (``private_term="full"``: a public model plus a private residual
branch, :class:`maskdp.models.PrivateResidual`). :math:`S` learns from the private term
alone, computed on full clips, and the other parameters from the public term alone:

.. math:: G_S = \frac{w}{B}\, s\Big(\sum_{i \in P} c_i\, g_{i,S} + N(0, \sigma^2 C^2 I_S)\Big),
          \qquad G_{\bar S} = \frac{1}{B_{pub}} \sum_{j \in U} h_{j,\bar S},

with :math:`c_i = \min(1, C / \lVert g_{i,S} \rVert)`. Why: with the difference term and
heavy clipping the update on :math:`S` is about :math:`(1 - c)\,h + c\,g`, mostly the
public-view objective, which teaches the model to ignore the sensitive region; where the
label depends on that region (a scene behind the actor) the private term never wins. On
:math:`S` alone the private term is DP-SGD's, with nothing pulling the other way.

Why it is private: an erased record (its sensitive content absent) contributes nothing to
the private sum (it leaves the private batch, as under ``protect_labels``), and a present
one contributes :math:`c_i g_{i,S}` of norm at most :math:`C`: the sensitivity is :math:`C`
and :math:`Z_S` is the same subsampled Gaussian mechanism (same accountant, same epsilon). The
public sum over :math:`U` trains only :math:`\bar S`, from public views of a batch drawn
independently of :math:`P`, so it is the same in both worlds. In the erased world the model
sees the record's public view only, through the public term: the relation is the same
``erase`` relation. The label is used by :math:`g_{i,S}` as by :math:`\Delta_i`: public
unless ``protect_labels``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import TYPE_CHECKING

from torch import nn

from maskdp.errors import InvalidInputError

if TYPE_CHECKING:
    from maskdp.settings import PrivacySettings

__all__ = [
    "PRIVATE_TERMS",
    "check_private_parameters",
    "check_private_term",
    "is_full_term",
    "private_subset",
    "public_side",
    "resolve_private_parameters",
]

#: The private term on the private parameters: :math:`\Delta_i = g_i - h_i` (they learn from
#: the public term too) or :math:`g_i` on full clips (they learn from it alone).
PRIVATE_TERMS = ("difference", "full")


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


def check_private_term(value: str) -> str:
    """One of :data:`PRIVATE_TERMS`."""
    if value not in PRIVATE_TERMS:
        raise InvalidInputError(f"private_term must be one of {list(PRIVATE_TERMS)}, got {value!r}")
    return value


def is_full_term(model: nn.Module, private: frozenset[str], settings: PrivacySettings) -> bool:
    """Whether ``settings`` ask for the full term (checked: it needs parameters on both
    sides, the private set trained by the full term alone and the rest by the public term
    alone, which ``protect_labels`` removes)."""
    if settings.private_term != "full":
        return False
    if settings.protect_labels:
        raise InvalidInputError(
            "private_term='full' trains the other parameters on the public term, which "
            "protect_labels=True removes: pass one or the other"
        )
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    if private >= trainable:
        raise InvalidInputError(
            "private_term='full' trains private_parameters on full clips and the other "
            "parameters on public views; name the private branch in private_parameters (e.g. "
            "maskdp.models.PrivateResidual's 'residual'), or use protect_labels=True for "
            "DP-SGD on every parameter"
        )
    return True


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


@contextmanager
def public_side(model: nn.Module, private: frozenset[str], full_term: bool) -> Iterator[None]:
    """The public pass: every parameter, or with the full term all but the ``private`` ones,
    through the model's ``public_pass()`` where it has one
    (:class:`~maskdp.models.PrivateResidual`: the public model alone)."""
    if not full_term:
        yield
        return
    trainable = frozenset(n for n, p in model.named_parameters() if p.requires_grad)
    public_only = getattr(model, "public_pass", None)
    with private_subset(model, trainable - private):
        with public_only() if callable(public_only) else nullcontext():
            yield
