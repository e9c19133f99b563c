r"""Masked adjacency: which datasets MaskDP's guarantee compares (DESIGN.md section 2).

A :class:`Record` is a clip ``inputs`` (C, T, H, W), a bool mask (T, H, W) (``True`` =
sensitive), a label and a flag ``present`` telling whether its sensitive content exists.
Two datasets are *masked-adjacent* when they have the same size and differ at exactly one
index ``i``, where :math:`r_i` and :math:`r'_i` agree on the label, the mask and the
non-sensitive content. Two relations:

- ``"erase"`` (default): one of :math:`r_i, r'_i` is present and the other is its erased
  version (:func:`erase`). An absent record has no sensitive content; the model sees exactly
  its public view (:func:`maskdp.mechanism.views.with_absent`), so its private term is
  :math:`\Delta_i = 0`. This is dp_accounting's ``REPLACE_SPECIAL`` relation.
- ``"substitute"``: both records are present and differ only inside the mask (the sensitive
  content of one record replaced by other content). Sensitivity doubles (2C).

Records are compared exactly (``torch.equal``); the sensitive content of an absent record is
not part of the record and is ignored. :func:`stack` turns records into the arguments of
:func:`maskdp.masked_gradient` (``present=`` included).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from maskdp.accounting.choices import RELATIONS
from maskdp.accounting.choices import RelationName as Relation
from maskdp.checks import check_bool, check_choice
from maskdp.errors import InvalidInputError


@dataclass(frozen=True, eq=False)
class Record:
    """One record ``(x, m, y)`` and whether its sensitive content is present."""

    inputs: Tensor
    mask: Tensor
    target: Tensor
    present: bool = True

    def __post_init__(self) -> None:
        if not isinstance(self.inputs, Tensor) or self.inputs.dim() != 4:
            raise InvalidInputError(
                f"Record inputs must be a tensor (C, T, H, W), got "
                f"{getattr(self.inputs, 'shape', type(self.inputs).__name__)}"
            )
        if not isinstance(self.mask, Tensor) or self.mask.dtype != torch.bool:
            raise InvalidInputError("Record mask must be a bool tensor (T, H, W), True = sensitive")
        if tuple(self.mask.shape) != tuple(self.inputs.shape[1:]):
            raise InvalidInputError(
                f"Record mask shape {tuple(self.mask.shape)} does not match inputs (T, H, W) "
                f"{tuple(self.inputs.shape[1:])}"
            )
        check_bool("Record present", self.present)
        object.__setattr__(self, "target", torch.as_tensor(self.target))

    @property
    def sensitive(self) -> Tensor:
        """The mask broadcast over channels, (C, T, H, W)."""
        return self.mask[None].expand_as(self.inputs)


def erase(record: Record) -> Record:
    """The ``erase`` neighbour: the same record with its sensitive content absent.

    Sensitive pixels are set to zero (they are not part of an absent record; any value
    would do, since the model sees exactly the public view of an absent record).
    """
    public_only = torch.where(record.sensitive, torch.zeros_like(record.inputs), record.inputs)
    return Record(public_only, record.mask, record.target, present=False)


def substitute(record: Record, content: Tensor) -> Record:
    """The ``substitute`` neighbour: sensitive pixels taken from ``content`` (C, T, H, W).

    Non-sensitive pixels, mask and label are kept; the result is present.
    """
    if not isinstance(content, Tensor) or content.shape != record.inputs.shape:
        raise InvalidInputError(
            f"substitute content must be a tensor of the record's shape "
            f"{tuple(record.inputs.shape)}, got {getattr(content, 'shape', type(content).__name__)}"
        )
    mixed = torch.where(record.sensitive, content.to(record.inputs), record.inputs)
    return Record(mixed, record.mask, record.target, present=True)


def _same_public(a: Record, b: Record) -> bool:
    """Same label, mask and non-sensitive content."""
    if a.inputs.shape != b.inputs.shape or not torch.equal(a.mask, b.mask):
        return False
    if not torch.equal(a.target, b.target):
        return False
    public = ~a.sensitive
    return torch.equal(a.inputs[public], b.inputs[public])


def same_record(a: Record, b: Record) -> bool:
    """Records are equal: same public part, same presence, and (if present) same sensitive content."""
    if not _same_public(a, b) or a.present != b.present:
        return False
    return not a.present or torch.equal(a.inputs[a.sensitive], b.inputs[b.sensitive])


def are_adjacent(d1: Sequence[Record], d2: Sequence[Record], relation: Relation = "erase") -> bool:
    """Whether ``d1`` and ``d2`` are masked-adjacent under ``relation`` (module docstring).

    Same size; exactly one index differs (:func:`same_record`); there the two records agree
    on label, mask and non-sensitive content, and

    - ``"erase"``: exactly one of the two is present;
    - ``"substitute"``: both are present (so they differ inside the mask only).
    """
    check_choice("relation", relation, RELATIONS)
    if len(d1) != len(d2):
        return False
    differing = [i for i, (a, b) in enumerate(zip(d1, d2, strict=True)) if not same_record(a, b)]
    if len(differing) != 1:
        return False
    a, b = d1[differing[0]], d2[differing[0]]
    if not _same_public(a, b):
        return False
    if relation == "erase":
        return a.present != b.present
    return a.present and b.present


def stack(records: Sequence[Record]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(inputs (N, C, T, H, W), mask (N, T, H, W), targets (N,), present (N,))``.

    The private-batch arguments of ``masked_gradient(model, loss, inputs, mask, targets,
    present=present, public=...)``.
    """
    if len(records) == 0:
        raise InvalidInputError("stack needs at least one record (shapes come from the records)")
    inputs = torch.stack([r.inputs for r in records])
    mask = torch.stack([r.mask for r in records])
    targets = torch.stack([r.target for r in records])
    present = torch.tensor([r.present for r in records], dtype=torch.bool, device=mask.device)
    return inputs, mask, targets, present
