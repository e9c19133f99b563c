"""The leak test (DESIGN.md section 6): sensitive content reaches the output only through
the clipped private sum.

For every engine and view, two worlds differ only in the sensitive content of some records
(random noise, huge values, or another record's content). Every public quantity must be
bit-identical (``torch.equal``): the public view tensors, each per-sample public gradient
:math:`h_i` (computed one record at a time, independently of the engines) and the engine's
public sum. The private sum may move by at most :math:`2C` per changed record, and by at
most :math:`C` per record when one world erases it (an erased record has
:math:`\\Delta_i = 0` exactly).
"""

from __future__ import annotations

import pytest
import torch
from torch import Tensor, nn

from maskdp.engines.base import MaskedGradient, engine_names, resolve_engine, trainable_parameters
from maskdp.errors import InvalidInputError, UnsupportedModelError, ViewContractError
from maskdp.functional import make_batch, masked_gradient
from maskdp.models import SmallVideoCNN, VideoViT
from maskdp.views import (
    CallableView,
    DropView,
    FillView,
    InpaintView,
    ModelInput,
    RandomFillView,
)

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


def world_a(n: int = 4) -> tuple[Tensor, Tensor, Tensor]:
    gen = torch.Generator().manual_seed(3)
    x = torch.rand(n, 3, 4, 16, 16, generator=gen)
    mask = torch.rand(n, 4, 16, 16, generator=gen) < 0.3
    mask[:, :2, :8, :8] = True  # every record has a sensitive token
    y = torch.randint(0, 3, (n,), generator=gen)
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


def run(engine: str, model: nn.Module, batch) -> MaskedGradient:
    try:
        impl = resolve_engine(engine, model)(model, nn.CrossEntropyLoss())
        try:
            return impl.compute(batch, max_grad_norm=CLIP)
        finally:
            impl.close()
    except UnsupportedModelError as err:
        pytest.skip(f"{engine} refuses the model: {err}")


def private_distance(a: MaskedGradient, b: MaskedGradient) -> float:
    squares = sum(((a.private[k].double() - b.private[k].double()) ** 2).sum() for k in a.private)
    return float(torch.sqrt(squares))


def worlds(how: str, *, erase: bool = False):
    """World A and world B: B perturbs (or erases) the sensitive content of records CHANGED."""
    x, mask, y = world_a()
    if not erase:
        return (x, None), (perturbed(x, mask, how), None), mask, y
    present = torch.ones(len(x), dtype=torch.bool)
    present[CHANGED] = False
    return (x, None), (x, present), mask, y


def engine_pair(engine: str, view_name: str, model: nn.Module, how: str, erase: bool = False):
    (xa, pa), (xb, pb), mask, y = worlds(how, erase=erase)
    a = run(engine, model, make_batch(VIEWS[view_name](model), xa, mask, y, present=pa))
    b = run(engine, model, make_batch(VIEWS[view_name](model), xb, mask, y, present=pb))
    for name in a.public:
        assert torch.equal(a.public[name], b.public[name]), f"public sum of {name} differs"
    return a, b


@pytest.mark.parametrize("how", ["noise", "huge", "other_record"])
@pytest.mark.parametrize("view_name", list(VIEWS))
@pytest.mark.parametrize("model_fn", [vit, cnn], ids=["vit", "cnn"])
def test_public_view_and_per_sample_public_gradients_are_bit_identical(model_fn, view_name, how):
    model = model_fn()
    if view_name == "drop" and not getattr(model, "supports_token_drop", False):
        pytest.skip("DropView needs a token model")
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


@pytest.mark.parametrize("how", ["noise", "huge", "other_record"])
@pytest.mark.parametrize("view_name", list(VIEWS))
@pytest.mark.parametrize("engine", ENGINES)
def test_vit_sensitive_content_moves_only_the_clipped_private_sum(engine, view_name, how):
    a, b = engine_pair(engine, view_name, vit(), how)
    assert private_distance(a, b) <= 2 * CLIP * len(CHANGED) * (1 + 1e-5)
    unchanged = [i for i in range(len(a.norms)) if i not in CHANGED]
    assert torch.equal(a.norms[unchanged], b.norms[unchanged])
    assert torch.isfinite(b.norms).all()


@pytest.mark.parametrize("view_name", ["fill", "random", "callable", "inpaint"])
@pytest.mark.parametrize("engine", ENGINES)
def test_cnn_sensitive_content_moves_only_the_clipped_private_sum(engine, view_name):
    a, b = engine_pair(engine, view_name, cnn(), "huge")
    assert private_distance(a, b) <= 2 * CLIP * len(CHANGED) * (1 + 1e-5)


@pytest.mark.parametrize("view_name", list(VIEWS))
@pytest.mark.parametrize("engine", ENGINES)
def test_erase_neighbour_moves_private_sum_by_at_most_c(engine, view_name):
    a, b = engine_pair(engine, view_name, vit(), "", erase=True)
    assert torch.all(b.norms[CHANGED] == 0), "an erased record must have Delta = 0 exactly"
    assert private_distance(a, b) <= CLIP * len(CHANGED) * (1 + 1e-5)


@pytest.mark.parametrize("engine", ENGINES)
def test_erasing_every_record_gives_zero_private_sum(engine):
    model = vit()
    x, mask, y = world_a()
    present = torch.zeros(len(x), dtype=torch.bool)
    out = run(engine, model, make_batch(FillView(0.0), x, mask, y, present=present))
    assert torch.all(out.norms == 0)
    assert all(torch.equal(v, torch.zeros_like(v)) for v in out.private.values())


def test_view_reading_sensitive_content_is_refused():
    def clip_mean_fill(inputs: Tensor, mask: Tensor) -> Tensor:
        mean = inputs.mean(dim=(2, 3, 4), keepdim=True)  # reads sensitive pixels
        return torch.where(mask[:, None], mean.expand_as(inputs), inputs)

    x, mask, y = world_a()
    with pytest.raises(ViewContractError, match="sensitive"):
        CallableView(clip_mean_fill).public(x, mask)
    with pytest.raises(ViewContractError):
        masked_gradient(
            vit(),
            nn.CrossEntropyLoss(),
            x,
            mask,
            y,
            max_grad_norm=1.0,
            view=clip_mean_fill,
            engine="reference",
        )


def test_valid_custom_view_passes_the_contract_check():
    x, mask, _ = world_a()
    view = CallableView(public_mean_fill)
    view.public(x, mask)
    assert view.checked


@pytest.mark.parametrize("value", [float("nan"), float("inf"), [0.0, float("nan"), 0.0]])
def test_non_finite_fill_is_refused(value):
    with pytest.raises(InvalidInputError, match="finite"):
        FillView(value)
