"""The leak test (DESIGN.md section 6): sensitive content reaches the output only through
the clipped private sum.

For every engine and view, two worlds differ only in the sensitive content of some records
(random noise, huge values, non-finite values, or another record's content). Every public
quantity must be bit-identical (``torch.equal``): the public view tensors, each per-sample
public gradient :math:`h_i` (computed one record at a time, independently of the engines),
and the public sum :math:`\\sum_{j \\in U} h_j` and public loss that ``masked_gradient``
returns for a public batch :math:`U` drawn from the same changed records. The private sum
may move by at most :math:`2C` per changed record, and by at most :math:`C` per record when
one world erases it (an erased record has :math:`\\Delta_i = 0` exactly, whatever its absent
content). A record whose :math:`\\Delta_i` is not finite contributes exactly zero.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_clips
from torch import Tensor, nn

from maskdp.engines.base import ClippedSum, engine_names, resolve_engine, trainable_parameters
from maskdp.errors import InvalidInputError
from maskdp.mechanism.coverage_view import CoverageView
from maskdp.mechanism.gradient import MaskedGradient, make_batch, masked_gradient, public_gradient
from maskdp.mechanism.texture_view import TextureFillView
from maskdp.mechanism.views import (
    CallableView,
    DropView,
    FillView,
    InpaintView,
    ModelInput,
    RandomFillView,
)
from maskdp.models import SmallVideoCNN, VideoViT

ENGINES = [n for n in engine_names() if n != "auto"]
CLIP = 0.1
CHANGED = [0, 2]  # records whose sensitive content differs between the two worlds


def public_mean_fill(inputs: Tensor, mask: Tensor) -> Tensor:
    """A valid custom view: sensitive pixels get the per-channel mean of the public pixels."""
    public = ~mask[:, None].expand_as(inputs)
    zeroed = torch.where(public, inputs, torch.zeros_like(inputs))
    count = public.sum(dim=(2, 3, 4), keepdim=True).clamp_min(1)
    mean = zeroed.sum(dim=(2, 3, 4), keepdim=True) / count
    return torch.where(public, inputs, mean.expand_as(inputs))


VIEWS = {
    "fill": lambda model: FillView([0.1, -0.2, 0.3]),
    "random": lambda model: RandomFillView(-2.0, 2.0, seed=11),  # same seed in both worlds
    "texture": lambda model: TextureFillView(-1.0, 1.0, seed=11),
    # threshold between the records' sensitive fractions: both branches are used
    "coverage": lambda model: CoverageView(
        TextureFillView(-1.0, 1.0, seed=11), FillView(0.2), threshold=0.38
    ),
    "drop": lambda model: DropView.for_model(model),
    "callable": lambda model: CallableView(public_mean_fill),
    # temporal fill, with the per-frame public mean and the constant as fallbacks
    "inpaint": lambda model: InpaintView("temporal", fallback=0.3),
}


def vit() -> nn.Module:
    torch.manual_seed(0)
    return VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=2, heads=2)


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallVideoCNN(num_classes=3, width=8)


def cnn_centered() -> nn.Module:
    """As ``maskdp train --model cnn`` builds its public model: temporal centering on."""
    torch.manual_seed(0)
    return SmallVideoCNN(num_classes=3, width=8, temporal_centering=True)


def cnn_avgmax() -> nn.Module:
    """As ``maskdp train --model cnn`` builds its private branch: average and max pooling."""
    torch.manual_seed(0)
    return SmallVideoCNN(num_classes=3, width=8, pool="avgmax")


def world_a(n: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    x, mask, y = random_clips(n, seed=3, p=0.3, uniform=True)
    mask[:, :2, :8, :8] = True  # every record has a sensitive token
    return x, mask, y


def perturbed(x: Tensor, mask: Tensor, how: str) -> Tensor:
    """World B: only sensitive pixels of records CHANGED differ."""
    gen = torch.Generator().manual_seed(99)
    if how == "noise":
        other = x + 3.0 * torch.randn(x.shape, generator=gen)
    elif how == "huge":
        other = torch.where(torch.rand(x.shape, generator=gen) < 0.5, 1e6, -1e6)
    elif how == "other_record":
        other = torch.rand(x.shape, generator=gen).roll(1, dims=0)
    elif how == "nan":
        other = torch.full_like(x, float("nan"))
    elif how == "inf":
        other = torch.where(torch.rand(x.shape, generator=gen) < 0.5, torch.inf, -torch.inf)
    else:
        raise ValueError(how)
    rows = torch.zeros(x.shape[0], dtype=torch.bool)
    rows[CHANGED] = True
    sensitive = mask[:, None].expand_as(x) & rows.view(-1, 1, 1, 1, 1)
    out = torch.where(sensitive, other, x)
    assert not torch.equal(out, x)
    return out


def per_sample_public_grads(model: nn.Module, public: ModelInput, y: Tensor) -> list[list[Tensor]]:
    """h_i one record at a time, by plain autograd (independent of every engine)."""
    params = list(trainable_parameters(model).values())
    grads = []
    for i in range(len(public)):
        loss = nn.functional.cross_entropy(public.select(i)(model), y[i : i + 1], reduction="sum")
        grads.append(list(torch.autograd.grad(loss, params)))
    return grads


def run(engine: str, model: nn.Module, batch) -> ClippedSum:
    """One engine call; a refusal fails the test (tests/maskdp/support.py)."""
    impl = resolve_engine(engine, model)(model, nn.CrossEntropyLoss())
    try:
        return impl.compute(batch, max_grad_norm=CLIP)
    finally:
        impl.close()


def step_sums(engine: str, view_name: str, model: nn.Module, x, mask, y, present, public):
    """``masked_gradient`` of one step: private batch (x, mask, y, present), public batch U.

    A fresh view per world (RandomFillView: the same seed, so the same fills in both), and
    the same torch generator state (models that draw random numbers)."""
    torch.manual_seed(5)
    return masked_gradient(
        model, nn.CrossEntropyLoss(), x, mask, y, max_grad_norm=CLIP, public=public,
        view=VIEWS[view_name](model), engine=engine, present=present,
    )  # fmt: skip


def private_distance(a: ClippedSum | MaskedGradient, b: ClippedSum | MaskedGradient) -> float:
    squares = sum(((a.private[k].double() - b.private[k].double()) ** 2).sum() for k in a.private)
    return float(torch.sqrt(squares))


def worlds(how: str, *, erase: bool = False):
    """World A and world B: B perturbs (or erases) the sensitive content of records CHANGED.

    When B erases them, their absent content in B's tensors is ``how``'s perturbation
    (anything: it must not matter), or A's content for ``how=""``."""
    x, mask, y = world_a()
    xb = perturbed(x, mask, how) if how else x
    if not erase:
        return (x, None), (xb, None), mask, y
    present = torch.ones(len(x), dtype=torch.bool)
    present[CHANGED] = False
    return (x, None), (xb, present), mask, y


def public_batch(x: Tensor, mask: Tensor, y: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """The public batch U of a world: records 1..3 of the same dataset (changed records 2
    among them), independent of the private batch, in the world's own content."""
    rows = torch.tensor([1, 2, 3, 2])
    return x[rows], mask[rows], y[rows]


def engine_pair(engine: str, view_name: str, model: nn.Module, how: str, erase: bool = False):
    """One ``masked_gradient`` step in each world; the public sum and loss must be
    bit-identical (U holds changed records, whose sensitive content differs)."""
    (xa, pa), (xb, pb), mask, y = worlds(how, erase=erase)
    a = step_sums(engine, view_name, model, xa, mask, y, pa, public_batch(xa, mask, y))
    b = step_sums(engine, view_name, model, xb, mask, y, pb, public_batch(xb, mask, y))
    assert a.public.keys() == b.public.keys() == a.private.keys()
    for name in a.public:
        assert torch.equal(a.public[name], b.public[name]), f"public sum of {name} differs"
    assert torch.equal(a.public_loss, b.public_loss) and a.public_count == b.public_count == 4
    assert all(torch.isfinite(v).all() for v in (*a.public.values(), *b.private.values()))
    return a, b


@pytest.mark.parametrize("how", ["noise", "huge", "other_record", "nan", "inf"])
@pytest.mark.parametrize(
    ("model_fn", "view_name"),
    [(vit, v) for v in VIEWS]
    + [(c, v) for c in (cnn, cnn_centered) for v in VIEWS if v != "drop"],  # drop: tokens only
    ids=[f"vit-{v}" for v in VIEWS]
    + [f"{c}-{v}" for c in ("cnn", "cnn_centered") for v in VIEWS if v != "drop"],
)
def test_public_view_and_per_sample_public_gradients_are_bit_identical(model_fn, view_name, how):
    model = model_fn()
    (xa, _), (xb, _), mask, y = worlds(how)
    pub_a = VIEWS[view_name](model).public(xa, mask)
    pub_b = VIEWS[view_name](model).public(xb, mask)
    assert torch.equal(pub_a.inputs, pub_b.inputs), "public view inputs differ"
    assert pub_a.kwargs.keys() == pub_b.kwargs.keys()
    for key in pub_a.kwargs:
        assert torch.equal(pub_a.kwargs[key], pub_b.kwargs[key]), key
    grads_a = per_sample_public_grads(model, pub_a, y)
    grads_b = per_sample_public_grads(model, pub_b, y)
    for i, (ha, hb) in enumerate(zip(grads_a, grads_b, strict=True)):
        assert all(torch.equal(u, v) for u, v in zip(ha, hb, strict=True)), f"h_{i} differs"
    # ... and so is their sum as public_gradient computes it (one batched backward).
    loss_fn = nn.CrossEntropyLoss(reduction="none")
    sum_a, loss_a, _ = public_gradient(model, loss_fn, VIEWS[view_name](model), (xa, mask, y))
    sum_b, loss_b, _ = public_gradient(model, loss_fn, VIEWS[view_name](model), (xb, mask, y))
    assert torch.equal(loss_a, loss_b)
    assert all(torch.equal(sum_a[k], sum_b[k]) for k in sum_a)


@pytest.mark.parametrize("how", ["noise", "huge", "other_record"])
@pytest.mark.parametrize("view_name", list(VIEWS))
@pytest.mark.parametrize("engine", ENGINES)
def test_vit_sensitive_content_moves_only_the_clipped_private_sum(engine, view_name, how):
    a, b = engine_pair(engine, view_name, vit(), how)
    assert private_distance(a, b) <= 2 * CLIP * len(CHANGED) * (1 + 1e-5)
    unchanged = [i for i in range(len(a.norms)) if i not in CHANGED]
    assert torch.equal(a.norms[unchanged], b.norms[unchanged])
    assert torch.equal(a.clip_factors[unchanged], b.clip_factors[unchanged])
    assert torch.isfinite(b.norms).all()


@pytest.mark.parametrize("how", ["nan", "inf"])
@pytest.mark.parametrize("view_name", ["fill", "drop"])
@pytest.mark.parametrize("engine", ENGINES)
def test_non_finite_sensitive_content_contributes_exactly_zero(engine, view_name, how):
    """NaN/inf sensitive pixels: nothing raises or branches on them, the public side is
    bit-identical, the records get c_i = 0 and the private sum is exactly that of world A
    without them (so it moves by at most C per record)."""
    model = vit()
    a, b = engine_pair(engine, view_name, model, how)
    assert not torch.isfinite(b.norms[CHANGED]).any()
    assert torch.all(b.clip_factors[CHANGED] == 0)
    unchanged = [i for i in range(len(a.norms)) if i not in CHANGED]
    assert torch.equal(a.norms[unchanged], b.norms[unchanged])
    assert private_distance(a, b) <= CLIP * len(CHANGED) * (1 + 1e-5)
    # World B equals world A with the changed records erased (their Delta = 0).
    x, mask, y = world_a()
    present = torch.ones(len(x), dtype=torch.bool)
    present[CHANGED] = False
    erased = step_sums(engine, view_name, model, x, mask, y, present, public_batch(x, mask, y))
    for name, value in erased.private.items():
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(b.private[name], value, rtol=1e-5, atol=1e-6 * scale)


@pytest.mark.parametrize(
    "view_name", ["fill", "random", "texture", "coverage", "callable", "inpaint"]
)
@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize(
    "model_fn", [cnn, cnn_centered, cnn_avgmax], ids=["cnn", "cnn_centered", "cnn_avgmax"]
)
def test_cnn_sensitive_content_moves_only_the_clipped_private_sum(engine, view_name, model_fn):
    a, b = engine_pair(engine, view_name, model_fn(), "huge")
    assert private_distance(a, b) <= 2 * CLIP * len(CHANGED) * (1 + 1e-5)


@pytest.mark.parametrize("view_name", list(VIEWS))
@pytest.mark.parametrize("engine", ENGINES)
def test_erase_neighbour_moves_private_sum_by_at_most_c(engine, view_name):
    a, b = engine_pair(engine, view_name, vit(), "", erase=True)
    assert torch.all(b.norms[CHANGED] == 0), "an erased record must have Delta = 0 exactly"
    assert private_distance(a, b) <= CLIP * len(CHANGED) * (1 + 1e-5)


@pytest.mark.parametrize("how", ["huge", "nan"])
@pytest.mark.parametrize("view_name", ["fill", "drop"])
@pytest.mark.parametrize("engine", ENGINES)
def test_absent_content_does_not_matter(engine, view_name, how):
    """An erased record's tensors may hold anything: the step is bit-identical to the one
    where they hold the original content."""
    model = vit()
    _, b = engine_pair(engine, view_name, model, "", erase=True)
    _, c = engine_pair(engine, view_name, model, how, erase=True)
    assert torch.all(c.norms[CHANGED] == 0)
    assert torch.equal(b.norms, c.norms) and torch.equal(b.clip_factors, c.clip_factors)
    assert all(torch.equal(b.private[k], c.private[k]) for k in b.private)


@pytest.mark.parametrize("engine", ENGINES)
def test_erasing_every_record_gives_zero_private_sum(engine):
    model = vit()
    x, mask, y = world_a()
    present = torch.zeros(len(x), dtype=torch.bool)
    out = run(engine, model, make_batch(FillView(0.0), x, mask, y, present=present))
    assert torch.all(out.norms == 0)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.private.values())


class DropoutViT(nn.Module):
    """The test ViT with dropout on its output features: it draws random numbers."""

    def __init__(self) -> None:
        super().__init__()
        self.body = vit()
        self.drop = nn.Dropout(0.3)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop(self.body(x))


@pytest.mark.parametrize("how", ["noise", "huge"])
@pytest.mark.parametrize("view_name", ["fill", "random", "texture", "inpaint"])
@pytest.mark.parametrize("engine", ENGINES)
def test_random_model_keeps_the_bounds(engine, view_name, how):
    """Dropout in train mode: the two passes of each record share their random draws, so the
    same bounds hold, and an erased record still has Delta = 0 exactly."""
    model = DropoutViT().train()
    a, b = engine_pair(engine, view_name, model, how)
    assert private_distance(a, b) <= 2 * CLIP * len(CHANGED) * (1 + 1e-5)
    _, e = engine_pair(engine, view_name, model, "", erase=True)
    assert torch.all(e.norms[CHANGED] == 0), "an erased record must have Delta = 0 exactly"
    assert (e.norms[[1, 3]] > 0).all()
    assert private_distance(a, e) <= CLIP * len(CHANGED) * (1 + 1e-5)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), 3e38, -7.0])
def test_a_custom_view_never_sees_sensitive_content(value: float) -> None:
    """A user function that reads every pixel (the clip's mean) is handed the clip with its
    sensitive pixels zeroed, so nothing sensitive (not even a NaN) reaches its output."""

    def clip_mean_fill(inputs: Tensor, mask: Tensor) -> Tensor:
        mean = inputs.mean(dim=(2, 3, 4), keepdim=True)  # reads every pixel it is given
        return torch.where(mask[:, None], mean.expand_as(inputs), inputs)

    x, mask, _ = world_a()
    poisoned = torch.where(mask[:, None], torch.full_like(x, value), x)
    clean = CallableView(clip_mean_fill).public(x, mask).inputs
    dirty = CallableView(clip_mean_fill).public(poisoned, mask).inputs
    assert torch.equal(clean, dirty) and bool(torch.isfinite(dirty).all())
    zeroed = torch.where(mask[:, None], torch.zeros_like(x), x)
    torch.testing.assert_close(clean, clip_mean_fill(zeroed, mask), rtol=0, atol=0)


def test_valid_custom_view_passes_the_contract_check():
    x, mask, _ = world_a()
    view = CallableView(public_mean_fill)
    view.public(x, mask)
    assert view.checked


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [0.0, float("nan"), 0.0]])
def test_non_finite_fill_is_refused(value):
    with pytest.raises(InvalidInputError, match="finite"):
        FillView(value)
