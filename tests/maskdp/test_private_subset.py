"""The private term on a subset of the parameters (maskdp.mechanism.subset).

Against a brute-force computation independent of the engines: per-record gradients by
plain autograd, the private term restricted to the subset and clipped by its own norm,
noise replayed from a test-only seed on the subset alone, and the public term alone on every
other parameter. Every engine must agree, and the parameters outside the subset must come
out bit-identical when only sensitive content changes.
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    assert_same_release,
    random_clips,
    release_distance,
    replayed_noise,
    tiny_vit,
    wrap,
)
from torch import nn

from maskdp.engines.base import engine_names
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureSeededRandomness
from maskdp.mechanism.views import FillView

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")
ENGINES = [n for n in engine_names() if n != "auto"]
SIGMA, CLIP, B, B_PUB = 0.7, 0.05, 4, 3
SUBSET = ("head", "blocks.0.mlp")


def data(seed: int, n: int):
    return random_clips(n, seed=seed, uniform=True, dtype=torch.float64)


def released(engine: str, private: tuple, public: tuple, subset=SUBSET) -> dict[str, torch.Tensor]:
    model = tiny_vit()
    opt = wrap(
        model, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=B,
        expected_public_batch_size=B_PUB, randomness=InsecureSeededRandomness(123),
        engine=engine, private_parameters=subset,
    )  # fmt: skip
    opt.backward(*private, public=public)
    opt.pre_step()
    opt.close()
    assert all(p.requires_grad for p in model.parameters()), "the freeze must be undone"
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def brute_force(private: tuple, public: tuple) -> dict[str, torch.Tensor]:
    model = tiny_vit()
    names = [n for n, _ in model.named_parameters()]
    chosen = [n for n in names if any(n == s or n.startswith(s + ".") for s in SUBSET)]
    params = list(model.parameters())
    view = FillView(0.0)

    def grad(x, y) -> dict[str, torch.Tensor]:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        return dict(zip(names, torch.autograd.grad(loss, params), strict=True))

    x, m, y = private
    clipped = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in chosen}
    for i in range(len(x)):
        g = grad(x[i : i + 1], y[i : i + 1])
        h = grad(view.public(x[i : i + 1], m[i : i + 1]).inputs, y[i : i + 1])
        delta = {n: g[n] - h[n] for n in chosen}
        norm = torch.sqrt(sum((d**2).sum() for d in delta.values()))
        factor = min(1.0, CLIP / float(norm))
        for n in chosen:
            clipped[n] += factor * delta[n]
    px, pm, py = public
    public_sum = grad(view.public(px, pm).inputs, py)
    noise = replayed_noise(clipped, 123)  # the seed's draws, on the subset alone
    out = {n: public_sum[n] / B_PUB for n in names}
    for n in chosen:
        out[n] = out[n] + (clipped[n] + SIGMA * CLIP * noise[n]) / B
    return out


@SEEDED
@pytest.mark.parametrize("engine", ENGINES)
def test_release_matches_the_brute_force_subset_mechanism(engine):
    private, public = data(1, 5), data(2, 3)
    got, expected = released(engine, private, public), brute_force(private, public)
    assert_same_release(got, expected)


@SEEDED
@pytest.mark.parametrize("engine", ENGINES)
def test_parameters_outside_the_subset_do_not_see_sensitive_content(engine):
    private, public = data(1, 5), data(2, 3)
    x, m, y = private
    other = torch.where(m[:, None], torch.full_like(x, 1e6), x)
    a = released(engine, private, public)
    b = released(engine, (other, m, y), public)
    names = [n for n, _ in tiny_vit().named_parameters()]
    outside = [n for n in names if not n.startswith(("head", "blocks.0.mlp"))]
    assert outside and all(torch.equal(a[n], b[n]) for n in outside)
    inside = [n for n in names if n not in outside]
    assert 0 < release_distance(a, b, inside) * B <= 2 * CLIP * len(x) * (1 + 1e-9)


@SEEDED
def test_every_parameter_is_the_default_subset():
    private, public = data(1, 5), data(2, 3)
    names = tuple(n for n, _ in tiny_vit().named_parameters())
    full, default = (
        released("reference", private, public, names),
        released("reference", private, public, None),
    )
    assert all(torch.equal(full[n], default[n]) for n in full)


@pytest.mark.parametrize(
    ("subset", "match"),
    [(("nope",), "'nope' names no trainable"), ((), "non-empty"), (("",), "non-empty"),
     ((3,), "non-empty")],
)  # fmt: skip
def test_bad_subsets_are_refused(subset, match):
    with pytest.raises(InvalidInputError, match=match):
        wrap(tiny_vit(), private_parameters=subset)


def test_a_single_name_is_accepted_as_a_string():
    assert wrap(tiny_vit(), private_parameters="head").private_parameters == ("head",)
