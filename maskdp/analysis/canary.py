r"""The audit's canary: its content, where it is planted, the two worlds and the score.

The canary is a "gradient canary" (Nasr, Song, Thakurta, Papernot, Carlini 2021; Nasr et al.
2023): at the fixed initial parameters :math:`\theta_0` its contribution to the released sum
in world 1 minus world 0 is :math:`d = (h_1 + c_1\Delta_1) - (h_0 + c_0\Delta_0)`
(:math:`= c_1\Delta_1`, of norm :math:`\le C`, for a sensitive canary), and a run's score
reads the update along :math:`\hat d = d / \lVert d \rVert` only:
:math:`s = \langle \theta_0 - \theta_T, \hat d \rangle` (:mod:`maskdp.analysis.audit`,
steps 1 to 3).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Literal

import torch
from torch import Tensor, nn

from maskdp.checks import check_choice
from maskdp.engines.base import PerSampleLoss, per_sample_loss, trainable_parameters
from maskdp.errors import InvalidInputError
from maskdp.mechanism import subset
from maskdp.mechanism.gradient import MaskedGradient, masked_gradient, public_gradient
from maskdp.settings import PrivacySettings

Region = Literal["sensitive", "public"]
REGIONS: tuple[str, ...] = ("sensitive", "public")
#: ``((inputs, present) of world 0, (inputs, present) of world 1)``.
Worlds = tuple[tuple[Tensor, Tensor], tuple[Tensor, Tensor]]
Loss = nn.Module | PerSampleLoss

# ------------------------------------------------------------------------ content, worlds


def rademacher_pattern(shape: Sequence[int], *, scale: float, seed: int) -> Tensor:
    r"""A seeded :math:`\pm` ``scale`` texture: the default canary content."""
    gen = torch.Generator().manual_seed(seed)
    signs = torch.randint(0, 2, tuple(shape), generator=gen).float() * 2 - 1
    return signs * scale


def plant_canary(inputs: Tensor, mask: Tensor, pattern: Tensor, *, region: Region) -> Tensor:
    """One clip (C, T, H, W) with ``pattern`` written into its sensitive or public pixels.

    Pixels outside ``region`` (and the mask, label) are unchanged.
    """
    check_choice("canary_region", region, REGIONS)
    where = mask if region == "sensitive" else ~mask
    if not bool(where.any()):
        raise InvalidInputError(
            f"the canary record has no {region} pixels to plant the canary in; "
            "pick another canary_index or change its mask"
        )
    if tuple(pattern.shape) != tuple(inputs.shape):
        raise InvalidInputError(
            f"canary_pattern must have the clip's shape {tuple(inputs.shape)}, "
            f"got {tuple(pattern.shape)}"
        )
    return torch.where(where[None], pattern.to(inputs), inputs)


def canary_record(
    inputs: Tensor,
    mask: Tensor,
    index: int,
    *,
    region: Region,
    pattern: Tensor,
    public_scale: float | None,
    seed: int,
) -> tuple[Tensor, Tensor]:
    r"""``(inputs, canary)``: the dataset, and record ``index`` with ``pattern`` planted.

    With ``public_scale`` the record's public pixels first become a seeded :math:`\pm`
    ``public_scale`` texture (seed ``seed + 1``) in the returned dataset and in the canary,
    so that its public gradient is large (the subsampled audit's target).
    """
    if public_scale is not None:
        texture = rademacher_pattern(inputs.shape[1:], scale=public_scale, seed=seed + 1)
        inputs = inputs.clone()
        inputs[index] = plant_canary(inputs[index], mask[index], texture, region="public")
    return inputs, plant_canary(inputs[index], mask[index], pattern, region=region)


def make_worlds(inputs: Tensor, index: int, canary: Tensor, region: str) -> Worlds:
    """``((inputs, present) of world 0, (inputs, present) of world 1)``; world 1 holds the canary.

    Sensitive: world 0 is world 1 with the canary erased (``present = False``: the model sees
    its public view). Public: world 0 is the original dataset.
    """
    present1 = torch.ones(len(inputs), dtype=torch.bool, device=inputs.device)
    inputs1 = inputs.clone()
    inputs1[index] = canary
    if region == "sensitive":
        present0 = present1.clone()
        present0[index] = False
        return (inputs1, present0), (inputs1, present1)
    return (inputs, present1), (inputs1, present1)


# ------------------------------------------------------------------------ scores


def canary_score(initial: dict[str, Tensor], final: dict[str, Tensor], direction: Tensor) -> float:
    r""":math:`\langle \theta_0 - \theta_T, \hat d \rangle` over the parameters of ``initial``."""
    diff = torch.cat([(initial[n] - final[n]).detach().double().flatten() for n in initial])
    return float(diff @ direction)


def gated_score(
    initial: dict[str, Tensor],
    final: dict[str, Tensor],
    direction: Tensor,
    gate: tuple[Tensor, float] | None,
) -> float:
    """The run's score; ``nan`` when a gate ``(direction, level)`` is given and the run's
    update along that direction does not exceed the level."""
    if gate is not None and canary_score(initial, final, gate[0]) <= gate[1]:
        return math.nan
    return canary_score(initial, final, direction)


def fill_gated(scores: list[list[float]]) -> list[list[float]]:
    """Runs that failed the gate (``nan``) get a score below every other run's."""
    finite = [v for world in scores for v in world if math.isfinite(v)]
    low = (min(finite) - 1.0 - (max(finite) - min(finite))) if finite else 0.0
    return [[v if math.isfinite(v) else low for v in world] for world in scores]


# ------------------------------------------------------------------------ directions


def _record_gradient(
    model: nn.Module,
    record: tuple[Tensor, Tensor, Tensor, Tensor],
    settings: PrivacySettings,
    loss_fn: Loss,
    *,
    public: bool,
) -> MaskedGradient:
    """:func:`masked_gradient` of one record (its public term too, when ``public``).

    The public batch is a copy of the record: here it is in both batches on purpose.
    """
    x, m, y, present = (t[None] for t in record)
    return masked_gradient(
        model,
        loss_fn,
        x,
        m,
        y,
        present=present,
        public=(x.clone(), m, y) if public else None,
        max_grad_norm=settings.max_grad_norm,
        view=settings.view,
        engine=settings.engine,
        protect_labels=settings.protect_labels,
    )


def _full_term(
    model: nn.Module,
    record: tuple[Tensor, Tensor, Tensor, Tensor],
    settings: PrivacySettings,
    loss_fn: Loss,
    ratio: float,
) -> dict[str, Tensor]:
    r"""The record's term under ``private_term="full"`` (:mod:`maskdp.mechanism.subset`):
    :math:`c\,g_S` on the private parameters (nothing when erased), :math:`h\,B/B_{pub}`
    of the public side on the others."""
    names = subset.resolve_private_parameters(model, settings.private_parameters)
    x, m, y, present = (t[None] for t in record)
    with subset.private_subset(model, names):
        private = masked_gradient(
            model, loss_fn, x, m, y, present=present, max_grad_norm=settings.max_grad_norm,
            view=settings.view, engine=settings.engine, protect_labels=True,
        ).private  # fmt: skip
    with subset.public_side(model, names, True):
        public, _, _ = public_gradient(
            model, per_sample_loss(loss_fn), settings.view, (x.clone(), m, y)
        )
    return {**{n: g * ratio for n, g in public.items()}, **private}


def _unit(model: nn.Module, terms: dict[str, Tensor]) -> tuple[Tensor, float]:
    """Float64 concatenation over the trainable parameters, normalised, and its norm."""
    v = torch.cat([terms[k].detach().double().flatten() for k in trainable_parameters(model)])
    norm = float(v.norm())
    return (v / norm if norm > 0 else v), norm


def canary_direction(
    model: nn.Module,
    worlds: Worlds,
    mask: Tensor,
    targets: Tensor,
    index: int,
    settings: PrivacySettings,
    loss_fn: Loss,
) -> tuple[Tensor, float]:
    r"""Unit :math:`\hat d` (float64, trainable parameters flattened in order) and :math:`\lVert d \rVert`.

    :math:`d` = the canary record's term in world 1 minus world 0 at the model's current
    parameters, in units of the private sum: :math:`h\,B/B_{pub} + c\Delta` when it is in
    both batches (:math:`c\,g` with protected labels).
    """
    ratio = settings.expected_batch_size / settings.expected_public_batch_size
    terms = []
    for x, present in worlds:
        record = (x[index], mask[index], targets[index], present[index])
        if settings.private_term == "full":
            terms.append(_full_term(model, record, settings, loss_fn, ratio))
            continue
        result = _record_gradient(
            model, record, settings, loss_fn, public=not settings.protect_labels
        )
        terms.append({n: result.public[n] * ratio + result.private[n] for n in result.private})
    direction, norm = _unit(model, {k: terms[1][k] - terms[0][k] for k in terms[1]})
    if not norm > 0:
        raise InvalidInputError(
            "the canary does not change the released gradient at the initial parameters; "
            "raise canary_scale, pass another canary_pattern or pick another canary_index"
        )
    return direction, norm


def public_direction(
    model: nn.Module,
    world: tuple[Tensor, Tensor],
    mask: Tensor,
    targets: Tensor,
    index: int,
    settings: PrivacySettings,
    loss_fn: Loss,
) -> tuple[Tensor, float]:
    r"""Unit :math:`\hat h` and :math:`\lVert h \rVert` of the canary record's public gradient
    at the current parameters (the same in both worlds of a sensitive canary)."""
    x, present = world
    record = (x[index], mask[index], targets[index], present[index])
    result = _record_gradient(model, record, settings, loss_fn, public=True)
    direction, norm = _unit(model, result.public)
    if not norm > 0:
        raise InvalidInputError("the canary record has no public gradient to gate on")
    return direction, norm
