r"""Virtual batches: one logical step's batches processed in micro-batches that fit in memory.

:meth:`MaskDPOptimizer.backward <maskdp.training.optimizer.MaskDPOptimizer.backward>` adds the
clipped private sum :math:`\sum_P c_i \Delta_i` and the public sum :math:`\sum_U h_j` of
each call to accumulators and :meth:`~maskdp.training.optimizer.MaskDPOptimizer.step` releases them
once: noise is added once, the divisions are by the expected batch sizes, and one step is
accounted. Clipping is per record, so the sums over micro-batches equal the sums over the
whole batches: a step over micro-batches is the step over the logical batches (up to
floating-point summation order). The private micro-batches of one step must together be
ONE Poisson sample; never call ``step`` between them::

    loss = backward_in_micro_batches(optimizer, *private, public=public,
                                     max_physical_batch_size=16)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from itertools import zip_longest
from typing import Protocol

from torch import Tensor

from maskdp.checks import check_count
from maskdp.errors import InvalidInputError


class _Accumulates(Protocol):
    def backward(
        self,
        inputs: Tensor,
        mask: Tensor,
        targets: Tensor,
        *,
        public: Sequence[Tensor] | None = None,
        present: Tensor | None = None,
    ) -> Tensor: ...


def check_max_physical_batch_size(value: int) -> int:
    """Records per forward pass: an int >= 1."""
    return check_count("max_physical_batch_size", value, 1)


def iterate_micro_batches(
    inputs: Tensor,
    mask: Tensor,
    targets: Tensor,
    *,
    max_physical_batch_size: int,
    present: Tensor | None = None,
) -> Iterator[tuple[Tensor, Tensor, Tensor, Tensor | None]]:
    """Consecutive slices ``(x, m, y, present)`` of at most ``max_physical_batch_size`` records.

    An empty batch yields itself once (so the optimizer sees the same calls as without
    splitting). Slices are views: nothing is copied.
    """
    size = check_max_physical_batch_size(max_physical_batch_size)
    n = len(inputs)
    for name, value in (("mask", mask), ("targets", targets), ("present", present)):
        if value is not None and len(value) != n:
            raise InvalidInputError(
                f"{name} has {len(value)} records but inputs has {n}; pass one per clip"
            )
    for start in range(0, max(n, 1), size):
        stop = start + size
        part = None if present is None else present[start:stop]
        yield inputs[start:stop], mask[start:stop], targets[start:stop], part


def backward_in_micro_batches(
    optimizer: _Accumulates,
    inputs: Tensor,
    mask: Tensor,
    targets: Tensor,
    *,
    max_physical_batch_size: int,
    public: Sequence[Tensor] | None = None,
    present: Tensor | None = None,
) -> Tensor:
    """``optimizer.backward`` on each micro-batch of the private and the public batch.

    Returns the mean public-view loss of the public batch (``nan`` without one): a public
    figure. Nothing computed from the private batch is returned.
    """
    private_parts = iterate_micro_batches(
        inputs, mask, targets, max_physical_batch_size=max_physical_batch_size, present=present
    )
    if public is None:
        for x, m, y, part in private_parts:
            optimizer.backward(x, m, y, present=part)
        return inputs.new_full((), float("nan"))
    px, pm, py = public
    public_parts = iterate_micro_batches(
        px, pm, py, max_physical_batch_size=max_physical_batch_size
    )
    empty_private = (inputs[:0], mask[:0], targets[:0], None)
    empty_public = (px[:0], pm[:0], py[:0], None)
    total, count = px.new_zeros(()), 0
    pairs = zip_longest(private_parts, public_parts, fillvalue=None)
    for private_part, public_part in pairs:
        x, m, y, part = empty_private if private_part is None else private_part
        ux, um, uy, _ = empty_public if public_part is None else public_part
        loss = optimizer.backward(x, m, y, public=(ux, um, uy), present=part)
        if len(uy):
            total = total + loss.detach().to(total.dtype) * len(uy)
            count += len(uy)
    return total / count if count else px.new_full((), float("nan"))
