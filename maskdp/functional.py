r"""``masked_gradient``: the deterministic core of MaskDP-SGD (no noise).

For records :math:`(x_i, m_i, y_i)` it returns :math:`\sum_i h_i` (public gradients) and
:math:`\sum_i c_i \Delta_i` (clipped sensitive contributions), see DESIGN.md section 3 and
:mod:`maskdp.engines.base`.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor, nn

from maskdp.engines.base import MaskedBatch, MaskedGradient, PerSampleLoss, resolve_engine
from maskdp.errors import InvalidInputError
from maskdp.masks import check_pixel_mask
from maskdp.validate import validate_model
from maskdp.views import PublicView, as_view, with_absent


def check_max_grad_norm(max_grad_norm: float) -> float:
    if (
        isinstance(max_grad_norm, bool)
        or not isinstance(max_grad_norm, (int, float))
        or not math.isfinite(max_grad_norm)
        or max_grad_norm <= 0
    ):
        raise InvalidInputError(f"max_grad_norm must be a finite number > 0, got {max_grad_norm!r}")
    return float(max_grad_norm)


def check_batch(inputs: Tensor, mask: Tensor, targets: Tensor) -> None:
    """Shapes, dtypes and finiteness of one batch; raises :class:`InvalidInputError`."""
    if not isinstance(inputs, Tensor) or not inputs.is_floating_point():
        raise InvalidInputError(
            f"inputs must be a floating-point tensor (N, C, T, H, W), got "
            f"{getattr(inputs, 'dtype', type(inputs).__name__)}"
        )
    check_pixel_mask(mask, inputs)
    if not isinstance(targets, Tensor) or targets.shape[:1] != inputs.shape[:1]:
        raise InvalidInputError(
            f"targets must be a tensor with one entry per clip ({inputs.shape[0]}), got "
            f"{getattr(targets, 'shape', type(targets).__name__)}"
        )
    if inputs.numel() and not torch.isfinite(inputs).all():
        raise InvalidInputError("inputs contain NaN or inf values")


def _present_rows(present: Tensor, size: int) -> Tensor:
    if not isinstance(present, Tensor) or present.dtype != torch.bool or present.shape != (size,):
        raise InvalidInputError(
            f"present must be a bool tensor of shape ({size},), got "
            f"{getattr(present, 'dtype', type(present).__name__)} "
            f"{tuple(getattr(present, 'shape', ()))}"
        )
    return present


def make_batch(
    view: PublicView,
    inputs: Tensor,
    mask: Tensor,
    targets: Tensor,
    *,
    protect_labels: bool = False,
    present: Tensor | None = None,
) -> MaskedBatch:
    """The full and public passes of a batch (``present[i] = False`` erases record i).

    With ``protect_labels`` the whole record is the privacy unit, so an erased record is
    removed from the batch; otherwise it stays and is seen as its public view.
    """
    check_batch(inputs, mask, targets)
    if protect_labels and present is not None:
        # Whole-record privacy: an erased record is simply not in the batch (add/remove).
        keep = _present_rows(present, len(inputs))
        inputs, mask, targets, present = inputs[keep], mask[keep], targets[keep], None
    public = view.public(inputs, mask)
    full = with_absent(view.full(inputs, mask), public, present)
    return MaskedBatch(full=full, public=None if protect_labels else public, targets=targets)


def masked_gradient(
    model: nn.Module,
    loss_fn: nn.Module | PerSampleLoss,
    inputs: Tensor,
    mask: Tensor,
    targets: Tensor,
    *,
    max_grad_norm: float,
    view: PublicView | Callable[[Tensor, Tensor], Tensor] | None = None,
    engine: str = "auto",
    protect_labels: bool = False,
    present: Tensor | None = None,
) -> MaskedGradient:
    r"""Public sum :math:`\sum_i h_i` and clipped private sum :math:`\sum_i c_i \Delta_i`.

    ``mask`` is a bool pixel mask (N, T, H, W), ``True`` = sensitive. ``view`` defaults to
    ``FillView(0.5)``. With ``protect_labels`` the public term is dropped and the full
    gradient is clipped (plain DP-SGD). ``present`` (bool, N) marks records whose sensitive
    content exists; an absent record is the ``erase`` neighbour and contributes
    :math:`\Delta_i = 0` (used by tests and the audit). Deterministic; adds no noise.
    """
    validate_model(model)
    clip = check_max_grad_norm(max_grad_norm)
    batch = make_batch(
        as_view(view), inputs, mask, targets, protect_labels=protect_labels, present=present
    )
    engine_impl = resolve_engine(engine, model)(model, loss_fn)
    try:
        return engine_impl.compute(batch, max_grad_norm=clip)
    finally:
        engine_impl.close()
