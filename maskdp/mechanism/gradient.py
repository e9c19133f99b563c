r"""``masked_gradient``: the deterministic core of MaskDP-SGD (no noise).

One step of DESIGN.md section 3 uses two batches drawn independently of each other:

- the **private** Poisson batch :math:`P`: for each record the full gradient :math:`g_i`
  and the public gradient :math:`h_i` give :math:`\Delta_i = g_i - h_i`, clipped to
  :math:`c_i \Delta_i` (an engine, :mod:`maskdp.engines`); only
  :math:`\sum_{i \in P} c_i \Delta_i` leaves this module, never a sum of the :math:`h_i`
  of :math:`P` (it would reveal which records were sampled);
- the **public** batch :math:`U`: :math:`\sum_{j \in U} h_j`, one ordinary backward over
  the public views (:func:`public_gradient`). It depends on public content and on
  sampling randomness independent of :math:`P` only, so releasing it is post-processing.

Nothing here raises or branches on the content of the private batch: a record whose
:math:`\Delta_i` is not finite contributes zero (:func:`maskdp.engines.base.clip_factors`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from maskdp.checks import check_max_grad_norm
from maskdp.engines.base import (
    MaskedBatch,
    PerSampleLoss,
    accumulation_dtype,
    build_engine,
    trainable_parameters,
)
from maskdp.engines.probe import ModelGuard
from maskdp.engines.validate import validate_model
from maskdp.errors import InvalidInputError
from maskdp.mechanism.masks import check_pixel_mask
from maskdp.mechanism.views import PublicView, ViewArg, as_view, with_absent

Records = Sequence[Tensor]  # (inputs (N, C, T, H, W), mask (N, T, H, W), targets (N,))


@dataclass(frozen=True)
class MaskedGradient:
    r"""The two sums of one step before noise.

    ``public``: :math:`\sum_{j \in U} h_j` over the public batch (zeros without one);
    ``private``: :math:`\sum_{i \in P} c_i \Delta_i`; ``norms`` and ``clip_factors``:
    :math:`\lVert \Delta_i \rVert` and :math:`c_i` of the private batch (float64; computed
    from sensitive content without noise: for tests and debugging, never to be shown);
    ``public_loss``: the summed public-view loss over :math:`U` (public), and
    ``public_count`` = :math:`|U|`.
    """

    public: dict[str, Tensor]
    private: dict[str, Tensor]
    norms: Tensor
    clip_factors: Tensor
    public_loss: Tensor
    public_count: int

    def total(self) -> dict[str, Tensor]:
        r""":math:`\sum_U h_j + \sum_P c_i \Delta_i` per parameter (equal batch divisors)."""
        return {name: self.public[name] + self.private[name] for name in self.private}


def check_batch(inputs: Tensor, mask: Tensor, targets: Tensor) -> None:
    """Shapes and dtypes of one batch; raises :class:`InvalidInputError`.

    Values are never inspected: whether a private record's content is finite must not
    change what the code does (a non-finite record contributes zero instead).
    """
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


def as_records(batch: Records | None, name: str) -> tuple[Tensor, Tensor, Tensor] | None:
    """``(inputs, mask, targets)`` from a 3-sequence of tensors (a collated batch), checked."""
    if batch is None:
        return None
    if isinstance(batch, Tensor) or not isinstance(batch, Sequence) or len(batch) != 3:
        raise InvalidInputError(
            f"{name} must be a batch (inputs, mask, targets) of three tensors, got "
            f"{type(batch).__name__}"
        )
    inputs, mask, targets = batch
    check_batch(inputs, mask, targets)
    return inputs, mask, targets


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
    full_term: bool = False,
    present: Tensor | None = None,
    guard: ModelGuard | None = None,
) -> MaskedBatch:
    """The full and public passes of a private batch (``present[i] = False`` erases record i).

    With ``protect_labels`` the whole record is the privacy unit, so an erased record is
    removed from the batch; otherwise it stays and is seen as its public view. With
    ``full_term`` the private term is :math:`g_i` on full clips (:mod:`maskdp.mechanism.subset`):
    there is no public pass, and an erased record, whose sensitive content is absent,
    contributes nothing, so it leaves the batch too. ``guard`` probes the model on the
    batch's public view: it refuses buffers that change and tells whether the model draws
    random numbers (without a guard the engines assume it does).
    """
    check_batch(inputs, mask, targets)
    no_public_pass = protect_labels or full_term
    if no_public_pass and present is not None:
        # An erased record is simply not in the private batch (add/remove of its term).
        keep = _present_rows(present, len(inputs))
        inputs, mask, targets, present = inputs[keep], mask[keep], targets[keep], None
    public = view.public(inputs, mask)
    full = with_absent(view.full(inputs, mask), public, present)
    random = True
    if guard is not None and len(inputs):
        random = guard.check(public)
        if not no_public_pass:
            guard.refuse_unshared_randomness(full, public)
    return MaskedBatch(
        full=full, public=None if no_public_pass else public, targets=targets, random=random
    )


def public_gradient(
    model: nn.Module,
    loss_fn: PerSampleLoss,
    view: PublicView,
    batch: tuple[Tensor, Tensor, Tensor],
) -> tuple[dict[str, Tensor], Tensor, int]:
    r""":math:`\sum_{j \in U} h_j` per trainable parameter, the summed loss and :math:`|U|`.

    One forward and backward over the public views of the public batch; its sampling must be
    independent of the private batch's. Public content only, so a non-finite result is an
    error in the public data (raised), never a privacy event.
    """
    inputs, mask, targets = batch
    params = trainable_parameters(model)
    dtype = {n: accumulation_dtype(p.dtype) for n, p in params.items()}
    if len(inputs) == 0:
        zeros = {
            n: torch.zeros(p.shape, dtype=dtype[n], device=p.device) for n, p in params.items()
        }
        return zeros, torch.zeros((), device=inputs.device), 0
    with torch.enable_grad():
        losses = loss_fn(view.public(inputs, mask)(model), targets)
        total = losses.sum()
        grads = torch.autograd.grad(total, list(params.values()), allow_unused=True)
    out = {
        n: torch.zeros(p.shape, dtype=dtype[n], device=p.device) if g is None else g.to(dtype[n])
        for (n, p), g in zip(params.items(), grads, strict=True)
    }
    if not torch.isfinite(total) or not all(torch.isfinite(g).all() for g in out.values()):
        raise InvalidInputError(
            "the public batch gives a non-finite loss or gradient: its public content (or the "
            "view's output) holds NaN, inf or values too large for the model"
        )
    return out, total.detach(), len(inputs)


def masked_gradient(
    model: nn.Module,
    loss_fn: nn.Module | PerSampleLoss,
    inputs: Tensor,
    mask: Tensor,
    targets: Tensor,
    *,
    max_grad_norm: float,
    public: Records | None = None,
    view: ViewArg = None,
    engine: str = "auto",
    protect_labels: bool = False,
    present: Tensor | None = None,
) -> MaskedGradient:
    r"""Public sum :math:`\sum_{j \in U} h_j` and clipped private sum :math:`\sum_{i \in P} c_i \Delta_i`.

    ``(inputs, mask, targets)`` is the private batch :math:`P` (``mask`` a bool pixel mask
    (N, T, H, W), ``True`` = sensitive); ``public`` the independent public batch :math:`U`
    (required unless ``protect_labels``, where there is no public term and the full gradient
    is clipped: plain DP-SGD). ``view`` defaults to ``TextureFillView()`` (:func:`~maskdp.mechanism.views.as_view`). ``present`` (bool, N)
    marks private records whose sensitive content exists; an absent record is the ``erase``
    neighbour and contributes :math:`\Delta_i = 0` (tests and the audit). Adds no noise.
    """
    validate_model(model)
    clip = check_max_grad_norm(max_grad_norm)
    public_batch = check_public_batch(public, protect_labels)  # no noise: any batch may do
    view = as_view(view)
    guard = ModelGuard(model)
    batch = make_batch(
        view, inputs, mask, targets, protect_labels=protect_labels, present=present, guard=guard
    )
    engine_impl = build_engine(engine, model, loss_fn)
    with guard.watch():
        try:
            clipped = engine_impl.compute(batch, max_grad_norm=clip)
        finally:
            engine_impl.close()
        if public_batch is None:
            public_sum = {n: torch.zeros_like(v) for n, v in clipped.private.items()}
            loss, count = torch.zeros((), device=inputs.device), 0
        else:
            public_sum, loss, count = public_gradient(
                model, engine_impl.loss_fn, view, public_batch
            )
    return MaskedGradient(
        public=public_sum,
        private=clipped.private,
        norms=clipped.norms,
        clip_factors=clipped.clip_factors,
        public_loss=loss,
        public_count=count,
    )


def _same_storage(a: Tensor, b: Tensor) -> bool:
    """Whether two non-empty tensors are views of the same memory (the same batch)."""
    return (
        a.numel() > 0
        and b.numel() > 0
        and a.untyped_storage().data_ptr() == (b.untyped_storage().data_ptr())
    )


def check_public_batch(
    public: Records | None, protect_labels: bool, private_inputs: Tensor | None = None
) -> tuple[Tensor, Tensor, Tensor] | None:
    """The checked public batch; refuse a missing one (MaskDP), a given one (DP-SGD), or
    the private batch's own storage passed again as the public batch."""
    if protect_labels:
        if public is not None:
            raise InvalidInputError(
                "protect_labels=True has no public term: do not pass public= (labels and "
                "public content are private too)"
            )
        return None
    if public is None:
        raise InvalidInputError(
            "the public term needs its own batch: pass public=(inputs, mask, targets) drawn "
            "independently of the private Poisson batch (make_private's loader yields it as "
            "the second item of each step); a sum of public gradients over the private batch "
            "would reveal which records were sampled"
        )
    records = as_records(public, "public")
    if (
        records is not None
        and private_inputs is not None
        and _same_storage(records[0], private_inputs)
    ):
        raise InvalidInputError(
            "public= holds the private batch itself: the public batch must be drawn "
            "independently of the private one (a public term over the private batch "
            "reveals which records were sampled); use the second item of make_private's "
            "loader"
        )
    return records
