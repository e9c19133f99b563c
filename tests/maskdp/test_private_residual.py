"""The full private term on a private residual branch (maskdp.mechanism.subset,
maskdp.models.PrivateResidual).

Against a brute-force computation independent of the engines: per-record gradients of the
branch by plain autograd on full clips, clipped by their own norm, noise replayed from a
test-only seed on the branch alone, and the public term alone (no private term) on the public
model. Every engine must agree; the public model must come out bit-identical when only
sensitive content changes; an erased record must leave the private sum.
"""

from __future__ import annotations

import copy

import pytest
import torch
from helpers import (
    TINY_TRAIN,
    assert_same_release,
    random_clips,
    release_distance,
    replayed_noise,
    tiny_cnn,
    tiny_vit,
    wrap,
)
from torch import nn

from maskdp.engines.base import engine_names
from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureSeededRandomness
from maskdp.mechanism.texture_view import TextureFillView
from maskdp.mechanism.views import DropView, FillView, InpaintView, RandomFillView
from maskdp.models import AdaptiveAvgMaxPool3d, PrivateResidual

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")
ENGINES = [n for n in engine_names() if n != "auto"]
SIGMA, CLIP, B, B_PUB = 0.7, 0.05, 4, 3


def pair() -> nn.Module:
    # zero_init=False: the branch's gradients then reach every one of its parameters
    return PrivateResidual(tiny_vit(seed=0), tiny_vit(seed=1), zero_init=False)


def data(seed: int, n: int):
    return random_clips(n, seed=seed, uniform=True, dtype=torch.float64)


VIEWS = {
    "fill": lambda model: FillView(0.0),
    "random": lambda model: RandomFillView(-2.0, 2.0, seed=11),
    "texture": lambda model: TextureFillView(-1.0, 1.0, seed=11),
    "drop": lambda model: DropView.for_model(model),  # the public model's protocol
    "inpaint": lambda model: InpaintView("temporal", fallback=0.3),
}


def released(
    engine: str, private: tuple, public: tuple, present=None, view: str = "fill"
) -> dict[str, torch.Tensor]:
    model = pair()
    opt = wrap(
        model, noise_multiplier=SIGMA, max_grad_norm=CLIP, expected_batch_size=B,
        expected_public_batch_size=B_PUB, randomness=InsecureSeededRandomness(123),
        engine=engine, private_parameters=PrivateResidual.PRIVATE, private_term="full",
        view=VIEWS[view](model),
    )  # fmt: skip
    opt.backward(*private, public=public, present=present)
    opt.pre_step()
    opt.close()
    assert all(p.requires_grad for p in model.parameters()), "the freeze must be undone"
    return {name: p.grad.clone() for name, p in model.named_parameters()}


def brute_force(private: tuple, public: tuple, present=None) -> dict[str, torch.Tensor]:
    model = pair()
    names = [n for n, _ in model.named_parameters()]
    branch = [n for n in names if n.startswith("residual.")]
    params = list(model.parameters())

    def grad(x, y) -> dict[str, torch.Tensor]:
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        return dict(zip(names, torch.autograd.grad(loss, params), strict=True))

    x, m, y = private
    clipped = {n: torch.zeros_like(p) for n, p in model.named_parameters() if n in branch}
    for i in range(len(x)):
        if present is not None and not present[i]:
            continue  # an erased record contributes nothing
        g = grad(x[i : i + 1], y[i : i + 1])  # the full clip, no public baseline
        norm = torch.sqrt(sum((g[n] ** 2).sum() for n in branch))
        factor = min(1.0, CLIP / float(norm))
        for n in branch:
            clipped[n] += factor * g[n]
    px, pm, py = public  # the public model alone fits the public views
    public_loss = nn.functional.cross_entropy(
        model.public(FillView(0.0).public(px, pm).inputs), py, reduction="sum"
    )
    public_named = [(n, p) for n, p in model.named_parameters() if n not in branch]
    public_grads = torch.autograd.grad(public_loss, [p for _, p in public_named])
    public_sum = {n: g for (n, _), g in zip(public_named, public_grads, strict=True)}
    noise = replayed_noise(clipped, 123)  # the seed's draws, on the branch alone
    out = {n: public_sum[n] / B_PUB for n in names if n not in branch}
    for n in branch:
        out[n] = (clipped[n] + SIGMA * CLIP * noise[n]) / B
    return {n: out[n] for n in names}


@SEEDED
@pytest.mark.parametrize("engine", ENGINES)
def test_release_matches_the_brute_force_residual_mechanism(engine):
    private, public = data(1, 5), data(2, 3)
    got, expected = released(engine, private, public), brute_force(private, public)
    assert_same_release(got, expected)


@SEEDED
@pytest.mark.parametrize("engine", ENGINES)
def test_an_erased_record_leaves_the_private_sum(engine):
    private, public = data(1, 5), data(2, 3)
    present = torch.tensor([True, False, True, True, False])
    got = released(engine, private, public, present)
    assert_same_release(got, brute_force(private, public, present))
    # and the erased world is within C per erased record of the present one
    full = released(engine, private, public)
    assert 0 < release_distance(full, got, got) * B <= 2 * CLIP * (1 + 1e-9)


@SEEDED
@pytest.mark.parametrize("view", VIEWS)
@pytest.mark.parametrize("engine", ENGINES)
def test_the_public_model_never_sees_sensitive_content(engine, view):
    private, public = data(1, 5), data(2, 3)
    x, m, y = private
    other = torch.where(m[:, None], torch.full_like(x, 1e6), x)
    a = released(engine, private, public, view=view)
    b = released(engine, (other, m, y), public, view=view)
    outside = [n for n in a if n.startswith("public.")]
    assert outside and all(torch.equal(a[n], b[n]) for n in outside)
    inside = [n for n in a if n.startswith("residual.")]
    assert 0 < release_distance(a, b, inside) * B <= 2 * CLIP * len(x) * (1 + 1e-9)


def test_every_parameter_private_is_refused():
    with pytest.raises(InvalidInputError, match="name the private branch"):
        wrap(tiny_vit(), private_term="full")


def test_full_term_with_protect_labels_is_refused():
    with pytest.raises(InvalidInputError, match="protect_labels"):
        wrap(pair(), private_parameters=PrivateResidual.PRIVATE, private_term="full",
             protect_labels=True)  # fmt: skip


def test_an_unknown_private_term_is_refused():
    with pytest.raises(InvalidInputError, match="private_term must be one of"):
        wrap(tiny_vit(), private_term="half")


def test_the_branch_starts_as_the_public_model_and_public_pass_drops_it():
    public, branch = tiny_cnn(seed=0), tiny_cnn(seed=1)
    model = PrivateResidual(public, branch)
    x = random_clips(3, seed=4, dtype=torch.float64)[0]
    torch.testing.assert_close(model(x), public(x), rtol=0, atol=0)
    moved = PrivateResidual(tiny_cnn(seed=0), tiny_cnn(seed=1), zero_init=False)
    assert not torch.equal(moved(x), public(x))
    with moved.public_pass():
        assert torch.equal(moved(x), public(x))
    assert not torch.equal(moved(x), public(x))


@pytest.mark.parametrize(
    ("public", "residual", "match"),
    [("model", "model", "two models"), ("x", "model", "nn.Module"),
     ("model", "nolinear", "no nn.Linear")],
)  # fmt: skip
def test_bad_pairs_are_refused(public, residual, match):
    model = tiny_vit()
    pick = {"model": model, "x": "x", "nolinear": nn.Conv3d(3, 3, 1)}
    with pytest.raises(InvalidInputError, match=match):
        PrivateResidual(pick[public], pick[residual] if residual != "model" else model)


# ---------------------------------------------------------------------------- maskdp train


def test_private_branch_run_trains_the_branch_privately_and_the_model_publicly(tmp_path):
    from maskdp.trainer.config import build_config
    from maskdp.trainer.run import Run

    config = build_config(**{**TINY_TRAIN, "public_epochs": 1.0}, private_branch=True)
    run = Run(config, tmp_path)
    assert isinstance(run.model, PrivateResidual)
    branch = {id(p) for p in run.model.residual.parameters()}
    groups = [({id(p) for p in g["params"]}, g["lr"]) for g in run.inner.param_groups]
    assert groups[1] == (branch, config.private_branch_lr) and groups[0][1] == config.lr
    assert not groups[0][0] & branch and len(groups) == 2
    assert run.optimizer.private_term == "full"
    assert run.optimizer.private_parameters == PrivateResidual.PRIVATE
    initial = {k: v.clone() for k, v in run.model.residual.state_dict().items()}
    public_before = {k: v.clone() for k, v in run.model.public.state_dict().items()}
    steps = run.steps()
    for _ in range(run.plan.public_steps):
        next(steps)
    # the warm-up trains the public model and leaves the branch as built (zero last layer)
    now = run.model.residual.state_dict()
    assert all(torch.equal(initial[k], now[k]) for k in initial)
    assert any(
        not torch.equal(public_before[k], v) for k, v in run.model.public.state_dict().items()
    )
    for _ in steps:
        pass
    assert any(not torch.equal(initial[k], v) for k, v in run.model.residual.state_dict().items())
    assert run.optimizer.ledger.steps == run.plan.private_steps


@pytest.mark.parametrize(
    ("options", "match"),
    [({"mode": "dpsgd"}, "MaskDP option"), ({"mode": "nonprivate"}, "MaskDP option"),
     ({"private_parameters": "head"}, "private_branch false")],
)  # fmt: skip
def test_private_branch_bad_combinations_are_refused(options, match):
    from maskdp.trainer.config import build_config

    with pytest.raises(InvalidInputError, match=match):
        build_config(private_branch=True, **options)


def test_private_branch_trains_under_the_drop_view(tmp_path):
    """DropView's protocol is the public model's; the run's update of the public model is
    bit-identical when only sensitive content changes (the branch's is noised)."""
    from maskdp.trainer.config import build_config
    from maskdp.trainer.run import train

    model = PrivateResidual(tiny_vit(seed=0), tiny_cnn(seed=1))
    assert model.supports_token_drop and DropView.for_model(model).tubelet_size == (
        model.public.tubelet_size
    )
    x, m, _ = data(1, 2)
    view = DropView.for_model(model)
    full = view.full(x, m)  # every token kept: the CNN branch gets no drop_tokens
    expected = model.public(x, **full.kwargs) + model.residual(x)
    torch.testing.assert_close(model(x, **full.kwargs), expected, rtol=0, atol=0)
    result = train(build_config(**TINY_TRAIN, view="drop"), tmp_path / "run")
    assert result.epsilon is not None and 0 < result.epsilon


@pytest.mark.parametrize("model", ["cnn", "vit"])
def test_train_centres_the_public_model_and_never_the_branch(model):
    """``temporal_centering`` reaches the public model of ``maskdp train`` (CNN and ViT);
    the branch sees clips as they are. Checked against the definition: the public model's
    logits equal an uncentred copy's on ``x - mean_t(x)``, and a static offset added to
    every frame moves the branch but not the public model."""
    from maskdp.trainer.build import build_model
    from maskdp.trainer.config import build_config

    config = build_config(model=model, image_size=16, frames=4)
    built = build_model(config, num_classes=3)
    assert built.public.temporal_centering and not built.residual.temporal_centering
    if model == "cnn":  # the branch pools by average and max, the public model by max
        assert isinstance(built.residual.pool, AdaptiveAvgMaxPool3d)
        assert isinstance(built.public.pool, nn.AdaptiveMaxPool3d)
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 16, 16)
    plain = copy.deepcopy(built.public)
    plain.temporal_centering = False
    plain.input_mean = 0.0  # the ViT subtracts input_mean only when it does not centre
    torch.testing.assert_close(built.public(x), plain(x - x.mean(dim=2, keepdim=True)))
    static = torch.rand(1, 3, 1, 16, 16)
    torch.testing.assert_close(built.public(x + static), built.public(x), atol=1e-5, rtol=0)
    nn.init.normal_(built.residual.head.weight)  # zero-initialised: make the branch respond
    assert not torch.allclose(built.residual(x + static), built.residual(x), atol=1e-3)


def test_avgmax_pool_is_the_average_and_the_max_side_by_side():
    x = torch.randn(2, 5, 3, 4, 4, dtype=torch.float64)
    pooled = AdaptiveAvgMaxPool3d()(x).flatten(1)
    brute = [[*(x[n, c].mean() for c in range(5)), *(x[n, c].max() for c in range(5))]
             for n in range(2)]  # fmt: skip
    torch.testing.assert_close(pooled, torch.tensor(brute, dtype=torch.float64))
    with pytest.raises(InvalidInputError, match="output_size must be 1"):
        AdaptiveAvgMaxPool3d(2)
