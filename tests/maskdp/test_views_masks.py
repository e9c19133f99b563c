"""Masks (against brute-force loops), public views, and the masked-adjacency predicates."""

from __future__ import annotations

import itertools

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from maskdp.errors import InvalidInputError
from maskdp.mechanism.adjacency import Record, are_adjacent, erase, stack, substitute
from maskdp.mechanism.gradient import masked_gradient
from maskdp.mechanism.masks import (
    boxes_to_mask,
    check_pixel_mask,
    dilate_pixel_mask,
    pixel_to_token_mask,
    token_to_pixel_mask,
)
from maskdp.mechanism.texture_view import TextureFillView
from maskdp.mechanism.views import (
    CallableView,
    DropView,
    FillView,
    ModelInput,
    RandomFillView,
    as_view,
    with_absent,
)
from maskdp.models import SmallVideoCNN, VideoViT

# --------------------------------------------------------------------------- masks


def brute_tokens(mask: Tensor, tubelet: tuple[int, int, int], dilation: int) -> Tensor:
    """Token i is sensitive iff a pixel of some token within distance ``dilation`` is."""
    t, h, w = tubelet
    n, frames, height, width = mask.shape
    grid = (frames // t, height // h, width // w)
    pooled = torch.zeros(n, *grid, dtype=torch.bool)
    for b, a, i, j in itertools.product(range(n), *(range(g) for g in grid)):
        block = mask[b, a * t : (a + 1) * t, i * h : (i + 1) * h, j * w : (j + 1) * w]
        pooled[b, a, i, j] = bool(block.any())
    out = torch.zeros_like(pooled)
    for b, a, i, j in itertools.product(range(n), *(range(g) for g in grid)):
        for da, di, dj in itertools.product(range(-dilation, dilation + 1), repeat=3):
            aa, ii, jj = a + da, i + di, j + dj
            if 0 <= aa < grid[0] and 0 <= ii < grid[1] and 0 <= jj < grid[2]:
                out[b, a, i, j] |= bool(pooled[b, aa, ii, jj])
    return out


@settings(max_examples=25, deadline=None, derandomize=True)
@given(
    n=st.integers(0, 2),
    tubelet=st.tuples(st.sampled_from([1, 2]), st.sampled_from([1, 2, 4]), st.sampled_from([1, 3])),
    grid=st.tuples(st.integers(1, 3), st.integers(1, 3), st.integers(1, 3)),
    dilation=st.integers(0, 2),
    density=st.sampled_from([0.0, 0.05, 0.3, 1.0]),
    seed=st.integers(0, 1000),
)
def test_pixel_to_token_mask_matches_brute_force(n, tubelet, grid, dilation, density, seed):
    shape = (n, *(g * s for g, s in zip(grid, tubelet, strict=True)))
    gen = torch.Generator().manual_seed(seed)
    mask = torch.rand(shape, generator=gen) < density
    tokens = pixel_to_token_mask(mask, tubelet, dilation=dilation)
    assert torch.equal(tokens, brute_tokens(mask, tubelet, dilation))
    flat = pixel_to_token_mask(mask, tubelet, dilation=dilation, flatten=True)
    assert torch.equal(flat, tokens.flatten(1))
    # Pooling is conservative: every sensitive pixel lies in a sensitive token.
    assert not (mask & ~token_to_pixel_mask(tokens, tubelet)).any()


def test_token_to_pixel_round_trip():
    tokens = torch.rand(2, 2, 3, 4) < 0.5
    assert torch.equal(
        pixel_to_token_mask(token_to_pixel_mask(tokens, (2, 4, 4)), (2, 4, 4)), tokens
    )


@settings(max_examples=15, deadline=None, derandomize=True)
@given(radius=st.integers(0, 3), seed=st.integers(0, 1000))
def test_dilate_pixel_mask_matches_brute_force(radius, seed):
    mask = torch.rand(2, 3, 7, 9, generator=torch.Generator().manual_seed(seed)) < 0.05
    grown = dilate_pixel_mask(mask, radius)
    want = torch.zeros_like(mask)
    for b, t, i, j in zip(*torch.nonzero(mask, as_tuple=True), strict=True):
        want[b, t, max(0, i - radius) : i + radius + 1, max(0, j - radius) : j + radius + 1] = True
    assert torch.equal(grown, want)


def test_boxes_round_outward_and_clip_to_the_frame():
    mask = boxes_to_mask(
        [(1, 1.2, 2.7, 3.1, 4.0), (0, -2.0, 5.5, 2.0, 99.0)], frames=2, height=8, width=6
    )
    want = torch.zeros(2, 8, 6, dtype=torch.bool)
    want[1, 2:4, 1:4] = True  # y in [floor 2.7, ceil 4.0), x in [floor 1.2, ceil 3.1)
    want[0, 5:8, 0:2] = True
    assert torch.equal(mask, want)
    assert not boxes_to_mask([], frames=2, height=4, width=4).any()


@pytest.mark.parametrize(
    "boxes, match",
    [
        ([(0, 0, 0, 1)], "shape"),
        ([(5, 0, 0, 1, 1)], "frame"),
        ([(0.5, 0, 0, 1, 1)], "frame"),
        ([(0, 3, 0, 1, 1)], "x1 < x0"),
        ([(0, 0, 0, float("nan"), 1)], "finite"),
    ],
)
def test_bad_boxes_are_refused(boxes, match):
    with pytest.raises(InvalidInputError, match=match):
        boxes_to_mask(boxes, frames=2, height=4, width=4)


@pytest.mark.parametrize(
    "mask, match",
    [
        (torch.zeros(2, 4, 8, 8), "dtype torch.bool"),
        (torch.zeros(2, 8, 8, dtype=torch.bool), r"\(N, T, H, W\)"),
        (torch.zeros(2, 4, 8, 9, dtype=torch.bool), "does not match"),
        (torch.zeros(3, 4, 8, 8, dtype=torch.bool), "does not match"),
        (torch.zeros(2, 4, 8, 8, dtype=torch.bool, device="meta"), "device|on meta"),
        ([[True]], "torch.Tensor"),
    ],
)
def test_bad_masks_are_refused(mask, match):
    with pytest.raises(InvalidInputError, match=match):
        check_pixel_mask(mask, torch.zeros(2, 3, 4, 8, 8))


def test_token_pooling_errors():
    mask = torch.zeros(1, 4, 8, 8, dtype=torch.bool)
    with pytest.raises(InvalidInputError, match="divisible"):
        pixel_to_token_mask(mask, (3, 8, 8))
    with pytest.raises(InvalidInputError, match="tubelet_size"):
        pixel_to_token_mask(mask, (0, 8, 8))
    with pytest.raises(InvalidInputError, match="dilation"):
        pixel_to_token_mask(mask, 2, dilation=-1)


# --------------------------------------------------------------------------- views


def clips(n: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.rand(n, 3, 4, 16, 16, generator=gen)
    mask = torch.rand(n, 4, 16, 16, generator=gen) < 0.3
    return x, mask


def test_fill_view_per_channel():
    x, mask = clips()
    public = FillView([1.0, 2.0, 3.0]).public(x, mask).inputs
    for c, value in enumerate([1.0, 2.0, 3.0]):
        assert torch.all(public[:, c][mask] == value)
        assert torch.equal(public[:, c][~mask], x[:, c][~mask])
    assert torch.equal(FillView(0.5).full(x, mask).inputs, x)
    with pytest.raises(InvalidInputError, match="channel"):
        FillView([1.0, 2.0]).public(x, mask)


def test_random_fill_is_seeded_in_range_and_resumable():
    x, mask = clips()
    a, b, c = (
        RandomFillView(-1, 1, seed=3),
        RandomFillView(-1, 1, seed=3),
        RandomFillView(-1, 1, seed=4),
    )
    pa, pb, pc = (v.public(x, mask).inputs for v in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    sensitive = mask[:, None].expand_as(x)
    assert torch.all((pa[sensitive] >= -1) & (pa[sensitive] < 1))
    assert torch.equal(pa[~sensitive], x[~sensitive])
    state = a.state_dict()
    nxt = a.public(x, mask).inputs
    b.load_state_dict(state)
    assert torch.equal(b.public(x, mask).inputs, nxt)
    with pytest.raises(InvalidInputError):
        RandomFillView(1.0, 1.0)


def vit() -> VideoViT:
    torch.manual_seed(0)
    return VideoViT(num_classes=3, frames=4, image_size=16, dim=16, depth=2, heads=2).double()


def kept_tokens_by_hand(model: VideoViT, x: Tensor, keep: Tensor) -> Tensor:
    """One clip run on its kept tokens only: embed, slice, blocks, norm, mean, head."""
    tokens = model.embed(x[None])[:, keep]
    for block in model.blocks:
        tokens = block(tokens)
    return model.head(model.norm(tokens).mean(1))[0]


def test_drop_view_equals_running_on_the_kept_tokens_only():
    model = vit()
    x, _ = clips(4)
    x = x.double()
    mask = torch.zeros(4, 4, 16, 16, dtype=torch.bool)  # a 2 x 2 x 2 token grid
    mask[0, 0, 3, 3] = True  # one pixel: one token dropped
    mask[1, :2, :8, :] = True  # first frame pair, top half: 2 tokens dropped
    mask[2] = True  # every token dropped
    view = DropView.for_model(model)
    public = view.public(x, mask)
    drop = public.kwargs["drop_tokens"]
    assert torch.equal(drop, pixel_to_token_mask(mask, model.tubelet_size, flatten=True))
    assert drop.sum(1).tolist() == [1, 2, 8, 0]
    out = public(model)
    for i in (0, 1, 3):
        torch.testing.assert_close(out[i], kept_tokens_by_hand(model, public.inputs[i], ~drop[i]))
    assert torch.isfinite(out[2]).all()  # no kept token: a finite output, no NaN
    # Pixels of dropped tokens do not matter at all.
    noise = torch.randn_like(x) * 1e3
    dropped_pixels = token_to_pixel_mask(drop.view(-1, *model.grid), model.tubelet_size)
    other = torch.where(dropped_pixels[:, None], noise, x)
    assert torch.equal(model(other, drop_tokens=drop), model(x, drop_tokens=drop))
    # The full pass keeps every token.
    full = view.full(x, mask)
    assert not full.kwargs["drop_tokens"].any() and torch.equal(full.inputs, x)


def test_drop_view_needs_a_token_model():
    with pytest.raises(InvalidInputError, match="token-drop"):
        DropView.for_model(SmallVideoCNN(num_classes=2))


def test_with_absent_shows_erased_records_their_public_view():
    x, mask = clips()
    view = DropView((2, 8, 8))
    public, full = view.public(x, mask), view.full(x, mask)
    mixed = with_absent(full, public, torch.tensor([True, False, True]))
    assert torch.equal(mixed.inputs[1], public.inputs[1]) and torch.equal(mixed.inputs[0], x[0])
    assert torch.equal(mixed.kwargs["drop_tokens"][1], public.kwargs["drop_tokens"][1])
    with pytest.raises(InvalidInputError, match="present"):
        with_absent(full, public, torch.tensor([1, 0, 1]))


def test_as_view_resolution():
    default = as_view(None)
    assert isinstance(default, TextureFillView) and default.seed == 0
    assert isinstance(as_view(lambda x, m: x), CallableView)
    with pytest.raises(InvalidInputError):
        as_view(3)
    assert isinstance(ModelInput(torch.zeros(2, 1)).select(0), ModelInput)


# --------------------------------------------------------------------------- adjacency


def records(n: int = 3, seed: int = 0) -> list[Record]:
    x, mask = clips(n, seed)
    return [Record(x[i], mask[i], torch.tensor(i % 2)) for i in range(n)]


def test_erase_and_substitute_neighbours_are_adjacent():
    d = records()
    d_erased = [d[0], erase(d[1]), d[2]]
    assert are_adjacent(d, d_erased) and are_adjacent(d_erased, d)
    assert not are_adjacent(d, d_erased, "substitute")
    other = torch.rand(d[1].inputs.shape, generator=torch.Generator().manual_seed(5))
    d_sub = [d[0], substitute(d[1], other), d[2]]
    assert are_adjacent(d, d_sub, "substitute")
    assert not are_adjacent(d, d_sub, "erase")
    # The substitute neighbour keeps public pixels, mask and label.
    assert torch.equal(d_sub[1].inputs[~d[1].sensitive], d[1].inputs[~d[1].sensitive])


def test_non_neighbours():
    d = records()
    assert not are_adjacent(d, list(d))  # identical
    assert not are_adjacent(d, [erase(d[0]), erase(d[1]), d[2]])  # two indices differ
    assert not are_adjacent(d, d[:2])  # sizes differ
    public_change = d[1].inputs.clone()
    public_change[~d[1].sensitive] += 1.0
    assert not are_adjacent(
        d, [d[0], Record(public_change, d[1].mask, d[1].target), d[2]], "substitute"
    )
    assert not are_adjacent(
        d, [d[0], Record(d[1].inputs, d[1].mask, torch.tensor(7)), d[2]], "substitute"
    )
    grown = d[1].mask.clone()
    grown[0, 0, 0] = ~grown[0, 0, 0]
    assert not are_adjacent(d, [d[0], Record(d[1].inputs, grown, d[1].target), d[2]], "substitute")
    # An absent record's sensitive content is not part of it.
    erased = erase(d[1])
    noisy = Record(erased.inputs + d[1].sensitive * 5.0, d[1].mask, d[1].target, present=False)
    assert not are_adjacent([d[0], erased, d[2]], [d[0], noisy, d[2]])
    with pytest.raises(InvalidInputError, match="relation"):
        are_adjacent(d, d, "swap")


def test_record_validation():
    x, mask = clips(1)
    with pytest.raises(InvalidInputError, match="bool"):
        Record(x[0], mask[0].float(), 0)
    with pytest.raises(InvalidInputError, match="does not match"):
        Record(x[0], mask[0, :2], 0)
    with pytest.raises(InvalidInputError, match="C, T, H, W"):
        Record(x, mask, 0)
    with pytest.raises(InvalidInputError, match="shape"):
        substitute(Record(x[0], mask[0], 0), torch.zeros(3))
    with pytest.raises(InvalidInputError):
        stack([])


def test_stacked_erase_neighbour_has_zero_private_term():
    d = records(3)
    inputs, mask, targets, present = stack([d[0], erase(d[1]), d[2]])
    assert inputs.shape == (3, 3, 4, 16, 16) and mask.shape == (3, 4, 16, 16)
    assert present.tolist() == [True, False, True] and targets.tolist() == [0, 1, 0]
    model = SmallVideoCNN(num_classes=2, width=4)
    public = stack(records(2, seed=1))[:3]  # an independent public batch
    out = masked_gradient(
        model,
        nn.CrossEntropyLoss(),
        inputs,
        mask,
        targets,
        max_grad_norm=1.0,
        public=public,
        present=present,
        engine="reference",
    )
    assert out.norms[1] == 0 and out.norms[0] > 0 and out.norms[2] > 0
    assert out.clip_factors[1] == 1 and out.public_count == 2
