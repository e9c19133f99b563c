r"""Virtual batches: one logical (Poisson) batch processed in micro-batches that fit in memory.

:meth:`MaskDPOptimizer.backward <maskdp.optimizer.MaskDPOptimizer.backward>` adds the
clipped sum :math:`\sum_i h_i + \sum_i c_i \Delta_i` of each call to an accumulator and
:meth:`~maskdp.optimizer.MaskDPOptimizer.step` releases the accumulated sum once: noise
:math:`N(0, \sigma^2 C^2 I)` is added once, the division is by the expected batch size, and
one step is accounted. Clipping is per record, so the sum over micro-batches equals the
sum over the whole batch: a step over micro-batches is the step over the logical batch (up
to floating-point summation order). The micro-batches of one step must together be ONE
Poisson sample; never call ``step`` between them::

    optimizer.zero_grad()
    loss = backward_in_micro_batches(optimizer, x, m, y, max_physical_batch_size=16)
    optimizer.step()
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Protocol

from torch import Tensor

from maskdp.errors import InvalidInputError


class _Accumulates(Protocol):
    def backward(
        self, inputs: Tensor, mask: Tensor, targets: Tensor, *, present: Tensor | None = None
    ) -> Tensor: ...


def check_max_physical_batch_size(value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise InvalidInputError(
            f"max_physical_batch_size must be an int >= 1 (records per forward pass), got {value!r}"
        )
    return value


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
    present: Tensor | None = None,
) -> Tensor:
    """``optimizer.backward`` on each micro-batch; the mean per-record loss of the batch.

    The loss, like :meth:`MaskDPOptimizer.backward`'s, is computed from sensitive content
    without noise: for debugging only, not private.
    """
    total, count = inputs.new_zeros(()), 0
    for x, m, y, part in iterate_micro_batches(
        inputs, mask, targets, max_physical_batch_size=max_physical_batch_size, present=present
    ):
        loss = optimizer.backward(x, m, y, present=part)
        total = total + loss.detach().to(total.dtype) * len(x)
        count += len(x)
    return total / max(count, 1)
