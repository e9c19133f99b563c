"""TextureFillView: seeded, data-independent, a 1/f^alpha spectrum, an exact pan, and a
texture that rides with the sensitive region (centroids against a by-hand loop);
CoverageView: the per-clip choice against a by-hand one."""

from __future__ import annotations

import math

import pytest
import torch

from maskdp.errors import InvalidInputError
from maskdp.mechanism.coverage_view import CoverageView
from maskdp.mechanism.randomness import InsecureSeededRandomness, private_scope
from maskdp.mechanism.texture_view import TextureFillView, _moving_fields, region_offsets
from maskdp.mechanism.views import DropView, FillView


def clips(n: int = 3, frames: int = 4, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    x = torch.rand((n, 3, frames, size, size), generator=gen)
    mask = torch.rand((n, frames, size, size), generator=gen) < 0.4
    return x, mask


def test_seeded_in_range_public_pixels_kept_and_resumable():
    x, mask = clips()
    a, b, c = (
        TextureFillView(-1, 1, seed=3),
        TextureFillView(-1, 1, seed=3),
        TextureFillView(-1, 1, seed=4),
    )
    pa, pb, pc = (v.public(x, mask).inputs for v in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    sensitive = mask[:, None].expand_as(x)
    assert torch.equal(pa[~sensitive], x[~sensitive])
    assert torch.all((pa[sensitive] >= -1) & (pa[sensitive] <= 1))
    state = a.state_dict()
    following = a.public(x, mask).inputs
    b.load_state_dict(state)
    assert torch.equal(b.public(x, mask).inputs, following)


def test_the_fill_does_not_depend_on_the_data():
    """Same seed, different clips (values, dtype): the sensitive pixels get the same texture."""
    x, mask = clips()
    one = TextureFillView(seed=5).replacement(x)
    other = TextureFillView(seed=5).replacement(torch.full_like(x, float("nan")).double())
    assert other.dtype == torch.float64
    torch.testing.assert_close(one.double(), other, rtol=0, atol=1e-7)


def test_each_clip_gets_its_own_texture_with_natural_contrast():
    fill = TextureFillView(seed=1).replacement(torch.zeros(8, 3, 4, 32, 32))
    per_clip_mean = fill.mean(dim=(1, 2, 3, 4))
    assert per_clip_mean.std() > 0.05  # brightness drawn per clip
    per_clip_std = fill.std(dim=(2, 3, 4))
    assert torch.all((per_clip_std > 0.02) & (per_clip_std < 0.35))


def draws(n: int, height: int, width: int, *, alpha: float, velocity: tuple[float, float]):
    gen = torch.Generator().manual_seed(2)
    return {
        "white": torch.randn((n, 4, height, width), generator=gen),
        "alpha": torch.full((n,), alpha),
        "velocity": torch.tensor([velocity] * n),
    }


def test_integer_pan_is_an_exact_periodic_shift():
    """Frame t is frame 0 shifted by v t pixels (rows, columns), wrapping around."""
    fields = _moving_fields(
        draws(2, 12, 10, alpha=1.0, velocity=(1.0, -2.0)), 4, 12, 10, device=torch.device("cpu")
    )
    for t in range(4):
        expected = torch.roll(fields[:, 0], shifts=(t, -2 * t), dims=(-2, -1))
        torch.testing.assert_close(fields[:, t], expected, rtol=0, atol=1e-5)


def moving_box(n: int, frames: int, size: int, step: tuple[int, int]) -> torch.Tensor:
    """A 4 x 5 box whose top-left corner moves ``step`` pixels (rows, columns) a frame."""
    mask = torch.zeros((n, frames, size, size), dtype=torch.bool)
    for t in range(frames):
        top, left = 3 + step[0] * t, 2 + step[1] * t
        mask[:, t, top : top + 4, left : left + 5] = True
    return mask


def test_the_texture_rides_with_the_sensitive_region():
    """No pan (max_speed 0): the pixels inside a box moving by (1, 2) a frame are frame 0's
    box pixels, so the texture moves with the box; without following, they stay put."""
    x, mask = torch.rand(2, 3, 4, 24, 24), moving_box(2, 4, 24, (1, 2))
    ride = TextureFillView(max_speed=0.0, seed=3).public(x, mask).inputs
    still = TextureFillView(max_speed=0.0, follow_region=False, seed=3).public(x, mask).inputs
    box = lambda v, t: v[:, :, t, 3 + t : 7 + t, 2 + 2 * t : 7 + 2 * t]  # noqa: E731
    for t in range(1, 4):
        torch.testing.assert_close(box(ride, t), box(ride, 0), rtol=0, atol=1e-5)
        assert (box(still, t) - box(still, 0)).abs().max() > 0.01


def test_region_offsets_against_a_by_hand_loop():
    """Centroid displacement per frame; empty frames take the last (or first) centroid."""
    gen = torch.Generator().manual_seed(1)
    mask = torch.rand((3, 6, 9, 7), generator=gen) < 0.3
    mask[0, 2] = False  # an empty frame in the middle
    mask[1, :2] = False  # leading empty frames
    mask[2] = False  # no sensitive pixel at all
    want = torch.zeros(3, 6, 2)
    for i in range(3):
        centres = []
        for t in range(6):
            where = mask[i, t].nonzero().float()
            centres.append(where.mean(0) if len(where) else None)
        known = [c for c in centres if c is not None]
        last = known[0] if known else torch.zeros(2)
        for t in range(6):
            last = centres[t] if centres[t] is not None else last
            centres[t] = last
        want[i] = torch.stack(centres) - centres[0]
    torch.testing.assert_close(region_offsets(mask), want, rtol=0, atol=1e-5)


def test_follow_region_must_be_a_bool():
    with pytest.raises(InvalidInputError, match="follow_region"):
        TextureFillView(follow_region="yes")


@pytest.mark.parametrize("alpha", [0.8, 1.5])
def test_power_spectrum_falls_as_f_to_the_minus_two_alpha(alpha):
    """The radially averaged power spectrum's log-log slope, fitted over the mid band,
    against the closed form -2 alpha."""
    size = 64
    fields = _moving_fields(
        draws(16, size, size, alpha=alpha, velocity=(0.0, 0.0)), 1, size, size,
        device=torch.device("cpu"),
    )  # fmt: skip
    power = torch.fft.fft2(fields[:, 0].double()).abs().pow(2).mean(dim=(0, 1))
    f = torch.fft.fftfreq(size, dtype=torch.float64)
    radius = torch.sqrt(f[:, None] ** 2 + f[None, :] ** 2)
    band = (radius > 2 / size) & (radius < 0.4)
    slope = torch.linalg.lstsq(
        torch.stack([radius[band].log(), torch.ones(int(band.sum()), dtype=torch.float64)], 1),
        power[band].log()[:, None],
    ).solution[0, 0]
    assert math.isclose(float(slope), -2 * alpha, abs_tol=0.15)


@pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")
def test_private_side_does_not_advance_the_view_generator():
    x, mask = clips()
    view, twin = TextureFillView(seed=7), TextureFillView(seed=7)
    with private_scope(InsecureSeededRandomness(1), torch.device("cpu")):
        view.public(x, mask)
    assert torch.equal(view.public(x, mask).inputs, twin.public(x, mask).inputs)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"low": 1.0, "high": 1.0}, "low < high"),
        ({"low": float("nan")}, "low < high"),
        ({"alpha": (2.0, 1.0)}, "alpha"),
        ({"alpha": (-1.0, 1.0)}, "alpha"),
        ({"max_speed": -1.0}, "max_speed"),
        ({"chroma": float("inf")}, "chroma"),
    ],
)
def test_bad_settings_are_refused(kwargs, match):
    with pytest.raises(InvalidInputError, match=match):
        TextureFillView(**kwargs)


def test_an_empty_batch_gets_an_empty_fill():
    x, mask = clips(0)
    assert TextureFillView().public(x, mask).inputs.shape == x.shape


def test_refuses_non_clip_inputs():
    with pytest.raises(InvalidInputError, match="clips"):
        TextureFillView().replacement(torch.zeros(2, 3, 8, 8))


# ------------------------------------------------------------------------- CoverageView


def test_coverage_view_picks_per_clip_by_the_sensitive_fraction():
    """Clip 0 mostly sensitive (a scene), clip 1 barely (an object): by hand."""
    x = torch.rand(2, 3, 2, 8, 8, generator=torch.Generator().manual_seed(1))
    mask = torch.zeros(2, 2, 8, 8, dtype=torch.bool)
    mask[0, :, :, :6] = True  # 75% sensitive
    mask[1, :, :2, :2] = True  # 6% sensitive
    view = CoverageView(TextureFillView(seed=4), FillView(0.5), threshold=0.5)
    out = view.public(x, mask).inputs
    texture = TextureFillView(seed=4).public(x, mask).inputs
    assert torch.equal(out[0], texture[0])
    assert torch.equal(out[1], FillView(0.5).public(x, mask).inputs[1])
    assert torch.equal(view.full(x, mask).inputs, x)


def test_coverage_view_state_round_trip_and_refusals():
    x, mask = clips()
    view, twin = CoverageView(seed=2), CoverageView(seed=2)
    state = view.state_dict()
    following = view.public(x, mask).inputs
    twin.load_state_dict(state)
    assert torch.equal(twin.public(x, mask).inputs, following)
    with pytest.raises(InvalidInputError, match="keys"):
        twin.load_state_dict({"small": {}})
    with pytest.raises(InvalidInputError, match="pixel view"):
        CoverageView(large=DropView((1, 4, 4)))
    with pytest.raises(InvalidInputError, match="threshold"):
        CoverageView(threshold=1.5)
