"""The ghost engine: per-layer rules against brute-force autograd, the engine against the
ReferenceEngine, refusals, and the model left untouched.

Independent truths: for a rule, per-sample gradients from one autograd call per sample
through the module itself (given the output gradient); for the engine, the per-sample loop
of :class:`~maskdp.engines.reference.ReferenceEngine`. Float64 throughout, so agreement is
to ~1e-10 and any algebra slip shows.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from helpers import random_clips
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from maskdp.engines.base import ClippedSum, MaskedBatch, resolve_engine
from maskdp.engines.ghost.conv import conv_patches
from maskdp.engines.ghost.engine import GhostEngine, plan_layers
from maskdp.engines.ghost.registry import RULES, rule_for
from maskdp.engines.ghost.rules import Pair, Pass, layer_result, zero_dropped
from maskdp.engines.reference import ReferenceEngine
from maskdp.errors import UnsupportedModelError
from maskdp.mechanism.gradient import make_batch, masked_gradient
from maskdp.mechanism.views import DropView, FillView, ModelInput
from maskdp.models import SmallVideoCNN, VideoViT
from maskdp.models.vit import PositionalEmbedding

RTOL = 1e-10
CLIP = 0.5

# ----------------------------------------------------------------------------- rules


def _per_sample(module: nn.Module, inputs: Tensor, grad: Tensor) -> dict[str, Tensor]:
    """One autograd call per sample through the module: the brute-force truth."""
    params = dict(module.named_parameters())
    out = {k: [] for k in params}
    for i in range(inputs.shape[0]):
        y = module(inputs[i : i + 1])
        grads = torch.autograd.grad(y, list(params.values()), grad[i : i + 1], allow_unused=True)
        for k, g in zip(params, grads, strict=True):
            out[k].append(torch.zeros_like(params[k]) if g is None else g)
    return {k: torch.stack(v) for k, v in out.items()}


def _truth(module, xf, gf, xp, gp, factors):
    full = _per_sample(module, xf, gf)
    if xp is None:
        deltas = full
    else:
        pub = _per_sample(module, xp, gp)
        deltas = {k: full[k] + pub[k] for k in full}
    sq = sum(d.flatten(1).square().sum(1) for d in deltas.values())
    private = {k: torch.einsum("i,i...->...", factors, d) for k, d in deltas.items()}
    return sq, private


def _pair(xf, gf, xp, gp, stacked: bool) -> Pair:
    if xp is None:
        return Pair(Pass((xf,), gf), None)
    if not stacked:
        return Pair(Pass((xf,), gf), Pass((xp,), gp))
    n = xf.shape[0]
    x, g = torch.cat([xf, xp]), torch.cat([gf, gp])
    return Pair(Pass((x[:n],), g[:n]), Pass((x[n:],), g[n:]), stacked=Pass((x,), g))


def _check_rule(module: nn.Module, xf: Tensor, xp: Tensor | None, mode: str, stacked: bool):
    gen = torch.Generator().manual_seed(3)
    module = module.double()
    gf = torch.randn(module(xf).shape, generator=gen, dtype=torch.float64)
    gp = None if xp is None else torch.randn(module(xp).shape, generator=gen, dtype=torch.float64)
    factors = torch.rand(xf.shape[0], generator=gen, dtype=torch.float64)
    sq, private = _truth(module, xf, gf, xp, gp, factors)
    names = frozenset(k for k, _ in module.named_parameters())
    result = layer_result(RULES[type(module)], module, _pair(xf, gf, xp, gp, stacked), names, mode)
    assert not hasattr(result, "public")  # no public sum over the private batch
    torch.testing.assert_close(result.sq_norms.double(), sq, rtol=RTOL, atol=1e-12)
    got = result.private(factors)
    assert got.keys() == private.keys()
    for k in private:  # results may come flattened: compare values in the parameter's shape
        torch.testing.assert_close(
            got[k].reshape(private[k].shape), private[k], rtol=RTOL, atol=1e-12
        )


def _x(*shape: int, seed: int = 0) -> Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def _ids(*shape: int, vocab: int, seed: int = 0) -> Tensor:
    return torch.randint(0, vocab, shape, generator=torch.Generator().manual_seed(seed))


LAYER_CASES: dict[str, tuple[Callable[[], nn.Module], Callable[[int], Tensor]]] = {
    "linear_2d": (lambda: nn.Linear(5, 3), lambda s: _x(3, 5, seed=s)),
    "linear_3d": (lambda: nn.Linear(5, 4), lambda s: _x(3, 6, 5, seed=s)),
    "linear_4d_nobias": (lambda: nn.Linear(4, 3, bias=False), lambda s: _x(2, 3, 2, 4, seed=s)),
    "conv3d_tubelet": (
        lambda: nn.Conv3d(2, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4)),
        lambda s: _x(3, 2, 4, 8, 8, seed=s),
    ),
    "conv3d_pad_stride_dilation": (
        lambda: nn.Conv3d(
            2, 4, kernel_size=3, stride=(1, 2, 2), padding=(1, 2, 1), dilation=(1, 2, 1)
        ),
        lambda s: _x(2, 2, 4, 7, 6, seed=s),
    ),
    "conv3d_groups": (
        lambda: nn.Conv3d(4, 6, kernel_size=3, padding=1, groups=2),
        lambda s: _x(2, 4, 3, 5, 5, seed=s),
    ),
    "conv2d_same_reflect": (
        lambda: nn.Conv2d(3, 4, kernel_size=(2, 3), padding="same", padding_mode="reflect"),
        lambda s: _x(3, 3, 6, 5, seed=s),
    ),
    "conv2d_depthwise": (
        lambda: nn.Conv2d(3, 3, kernel_size=3, stride=2, groups=3),
        lambda s: _x(2, 3, 7, 7, seed=s),
    ),
    "conv1d": (lambda: nn.Conv1d(3, 4, kernel_size=3, padding=1), lambda s: _x(3, 3, 9, seed=s)),
    "layer_norm": (lambda: nn.LayerNorm(6), lambda s: _x(3, 4, 6, seed=s)),
    "layer_norm_2d_shape": (lambda: nn.LayerNorm((3, 4)), lambda s: _x(2, 5, 3, 4, seed=s)),
    "group_norm": (lambda: nn.GroupNorm(2, 4), lambda s: _x(3, 4, 2, 3, 3, seed=s)),
    "embedding": (lambda: nn.Embedding(7, 3), lambda s: _ids(3, 5, vocab=7, seed=s)),
    "embedding_padding_idx": (
        lambda: nn.Embedding(5, 3, padding_idx=0),
        lambda s: _ids(3, 6, vocab=5, seed=s),
    ),
    "positional": (lambda: PositionalEmbedding(5, 3), lambda s: _x(3, 5, 3, seed=s)),
}
if hasattr(nn, "RMSNorm"):
    LAYER_CASES["rms_norm"] = (lambda: nn.RMSNorm(6), lambda s: _x(3, 4, 6, seed=s))


@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
@pytest.mark.parametrize("pairing", ["stacked", "two_calls", "protect_labels"])
@pytest.mark.parametrize("case", sorted(LAYER_CASES))
def test_rule_matches_per_sample_autograd(case, pairing, mode):
    torch.manual_seed(0)
    make_module, make_input = LAYER_CASES[case]
    xf = make_input(1)
    xp = None if pairing == "protect_labels" else make_input(2)
    _check_rule(make_module(), xf, xp, mode, stacked=pairing == "stacked")


@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
@pytest.mark.parametrize(
    "module, xf, xp",
    [
        (nn.Linear(4, 3), _x(3, 6, 4, seed=1), _x(3, 2, 4, seed=2)),
        (nn.Embedding(6, 2), _ids(3, 5, vocab=6, seed=1), _ids(3, 2, vocab=6, seed=2)),
        (nn.LayerNorm(4), _x(3, 5, 4, seed=1), _x(3, 3, 4, seed=2)),
    ],
    ids=["linear", "embedding", "layer_norm"],
)
def test_rule_with_fewer_public_rows(module, xf, xp, mode):
    """DropView run as two calls: the public pass has fewer rows (tokens) per sample."""
    torch.manual_seed(0)
    _check_rule(module, xf, xp, mode, stacked=False)


@settings(max_examples=25, deadline=None)
@given(
    n=st.integers(1, 4),
    rows=st.integers(1, 5),
    d=st.integers(1, 6),
    p=st.integers(1, 6),
    mode=st.sampled_from(["auto", "ghost", "instantiate"]),
    stacked=st.booleans(),
)
def test_linear_rule_any_shape(n, rows, d, p, mode, stacked):
    torch.manual_seed(n * 1000 + rows * 100 + d * 10 + p)
    _check_rule(nn.Linear(d, p), _x(n, rows, d, seed=1), _x(n, rows, d, seed=2), mode, stacked)


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
@pytest.mark.parametrize("case", ["linear_3d", "conv3d_tubelet", "embedding", "layer_norm"])
def test_non_finite_sample_with_zero_factor_adds_nothing(case, mode, stacked):
    """A sample whose output gradient is NaN has a non-finite squared norm; with c_i = 0 it
    adds exact zeros to the weighted sum (never 0 * NaN), which then equals the truth over
    the other samples."""
    torch.manual_seed(0)
    make_module, make_input = LAYER_CASES[case]
    module = make_module().double()
    xf, xp = make_input(1), make_input(2)
    gen = torch.Generator().manual_seed(3)
    gf = torch.randn(module(xf).shape, generator=gen, dtype=torch.float64)
    gp = torch.randn(module(xp).shape, generator=gen, dtype=torch.float64)
    gf[1] = float("nan")
    factors = torch.rand(xf.shape[0], generator=gen, dtype=torch.float64)
    factors[1] = 0.0
    keep = torch.tensor([i for i in range(xf.shape[0]) if i != 1])
    sq, private = _truth(module, xf[keep], gf[keep], xp[keep], gp[keep], factors[keep])
    names = frozenset(k for k, _ in module.named_parameters())
    result = layer_result(RULES[type(module)], module, _pair(xf, gf, xp, gp, stacked), names, mode)
    assert not torch.isfinite(result.sq_norms[1])
    torch.testing.assert_close(result.sq_norms[keep].double(), sq, rtol=RTOL, atol=1e-12)
    got = result.private(factors)
    assert got.keys() == private.keys()
    for k in private:
        torch.testing.assert_close(
            got[k].reshape(private[k].shape), private[k], rtol=RTOL, atol=1e-12
        )


def test_zero_dropped_zeroes_whole_rows_of_dropped_samples():
    rows = _x(6, 4)
    rows[2, 1] = float("inf")
    rows[3, 0] = float("nan")
    factors = torch.tensor([0.5, 0.0, 1.0], dtype=torch.float64)  # groups of 2 rows
    out = zero_dropped(rows, factors, groups=2)
    assert torch.equal(out[2:4], torch.zeros(2, 4, dtype=torch.float64))
    assert torch.equal(out[[0, 1, 4, 5]], rows[[0, 1, 4, 5]])
    assert zero_dropped(rows, torch.ones(3, dtype=torch.float64), groups=2) is rows


def test_ghost_norm_of_identical_passes_is_exactly_zero():
    """An erased record's two passes agree: the difference form gives 0 without cancellation."""
    layer = nn.Linear(8, 5).double()
    x = _x(2, 7, 8)
    g = _x(2, 7, 5, seed=1)
    for mode in ("ghost", "instantiate"):
        pair = _pair(x, g, x.clone(), -g, stacked=True)
        result = layer_result(RULES[nn.Linear], layer, pair, frozenset({"weight", "bias"}), mode)
        assert torch.equal(result.sq_norms, torch.zeros(2, dtype=torch.float64))


def test_conv_patches_match_unfold():
    conv = nn.Conv2d(3, 2, kernel_size=(3, 2), stride=(2, 1), padding=(1, 0), dilation=(1, 2))
    x = _x(2, 3, 7, 6).float()
    want = F.unfold(x, (3, 2), dilation=(1, 2), padding=(1, 0), stride=(2, 1)).transpose(1, 2)
    torch.testing.assert_close(conv_patches(conv, x), want)


def test_auto_mode_chooses_by_cost():
    """Few rows, wide layer: ghost; many rows, narrow layer: instantiate."""
    from maskdp.engines.ghost.rules import uses_ghost

    rule = RULES[nn.Linear]
    wide = Pass((_x(2, 1, 64),), _x(2, 1, 64, seed=1))
    assert uses_ghost(rule, nn.Linear(64, 64), wide, 2, "auto")
    narrow = Pass((_x(2, 9, 2),), _x(2, 9, 2, seed=1))
    assert not uses_ghost(rule, nn.Linear(2, 2), narrow, 2, "auto")
    assert not uses_ghost(RULES[nn.LayerNorm], nn.LayerNorm(2), narrow, 2, "ghost")


# ----------------------------------------------------------------------------- engine


def small_vit() -> nn.Module:
    torch.manual_seed(0)
    return VideoViT(
        num_classes=3, frames=4, image_size=16, tubelet_size=(2, 8, 8), dim=16, depth=1, heads=2
    ).double()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallVideoCNN(num_classes=3, width=8).double()


def clips(n: int, seed: int = 1, p: float = 0.3, dtype=torch.float64):
    return random_clips(n, seed=seed, p=p, dtype=dtype)


def run(engine, model, batch: MaskedBatch, clip: float = CLIP) -> ClippedSum:
    result = engine(model, nn.CrossEntropyLoss()).compute(batch, max_grad_norm=clip)
    assert isinstance(result, ClippedSum)
    return result


def no_draws(batch: MaskedBatch) -> MaskedBatch:
    """The batch as the model probe marks a model that draws no random numbers: the two
    passes may then be stacked into one call."""
    return dataclasses.replace(batch, random=False)


def ghost(**kw):
    return lambda model, loss: GhostEngine(model, loss, **kw)


def assert_matches(got, want, rtol: float = RTOL) -> None:
    """Norms, clip factors (float64) and private sums of ``got`` agree with ``want``."""
    assert got.norms.dtype == got.clip_factors.dtype == torch.float64
    torch.testing.assert_close(got.norms, want.norms, rtol=rtol, atol=1e-12)
    torch.testing.assert_close(got.clip_factors, want.clip_factors, rtol=rtol, atol=1e-12)
    assert list(got.private) == list(want.private)
    for name in want.private:
        g, w = got.private[name], want.private[name]
        scale = float(w.abs().max()) or 1.0
        torch.testing.assert_close(g, w, rtol=rtol, atol=rtol * scale, msg=name)


class Calls:
    """Counts top-level forward calls of a model that record a graph (the passes; the
    engine's record-independence probe runs twice without gradient, before the first)."""

    def __init__(self, model: nn.Module):
        self.count = 0
        self.handle = model.register_forward_pre_hook(lambda *a: self._inc())

    def _inc(self) -> None:
        self.count += int(torch.is_grad_enabled())


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
@pytest.mark.parametrize(
    "view_name, stack, random, calls",
    [
        ("fill", True, False, 1),
        ("drop", True, False, 1),
        ("drop", False, False, 2),
        ("fill", False, False, 2),
        ("fill", True, True, 2),  # a random model never stacks: both passes need the same draws
        ("drop", True, True, 2),
    ],
)
def test_vit_matches_reference(view_name, stack, random, calls, mode):
    model = small_vit()
    x, mask, y = clips(3)
    view = FillView(0.0) if view_name == "fill" else DropView.for_model(model)
    batch = dataclasses.replace(make_batch(view, x, mask, y), random=random)
    counter = Calls(model)
    got = run(ghost(stack=stack, mode=mode), model, batch)
    counter.handle.remove()
    assert counter.count == calls
    assert_matches(got, run(ReferenceEngine, model, batch))


@pytest.mark.parametrize("mode", ["auto", "ghost", "instantiate"])
def test_cnn_matches_reference(mode):
    model = small_cnn()
    batch = make_batch(FillView(0.0), *clips(3))
    assert_matches(run(ghost(mode=mode), model, batch), run(ReferenceEngine, model, batch))


@pytest.mark.parametrize("model_fn", [small_vit, small_cnn])
def test_protect_labels_matches_reference(model_fn):
    model = model_fn()
    batch = make_batch(FillView(0.0), *clips(3), protect_labels=True)
    got = run(GhostEngine, model, batch)
    assert batch.public is None and (got.norms > 0).all()
    assert_matches(got, run(ReferenceEngine, model, batch))


def test_some_records_clipped_others_not():
    model = small_vit()
    batch = make_batch(FillView(0.0), *clips(4, p=0.5))
    want = run(ReferenceEngine, model, batch, clip=1.0)
    clip = float(want.norms.median())
    got = run(GhostEngine, model, batch, clip=clip)
    assert (got.clip_factors < 1).any() and (got.clip_factors == 1).any()
    assert_matches(got, run(ReferenceEngine, model, batch, clip=clip))


@pytest.mark.parametrize("view_name, stack", [("fill", True), ("drop", True), ("drop", False)])
@pytest.mark.parametrize("mode", ["ghost", "instantiate"])
def test_erased_record_has_zero_norm_and_no_private_part(view_name, stack, mode):
    model = small_vit()
    x, mask, y = clips(3, p=0.4)
    view = FillView(0.0) if view_name == "fill" else DropView.for_model(model)
    present = torch.tensor([True, False, True])
    batch = no_draws(make_batch(view, x, mask, y, present=present))
    got = run(ghost(stack=stack, mode=mode), model, batch)
    assert float(got.norms[1]) <= 1e-12 * float(got.norms.max())
    keep = torch.tensor([0, 2])
    sub = MaskedBatch(batch.full.select(keep), batch.public.select(keep), y[keep])
    without = run(ReferenceEngine, model, sub)
    for name, value in got.private.items():
        scale = float(value.abs().max()) or 1.0
        torch.testing.assert_close(value, without.private[name], rtol=1e-9, atol=1e-9 * scale)


def test_empty_batch():
    model = small_vit()
    x, mask, y = clips(0)
    got = run(GhostEngine, model, make_batch(FillView(0.0), x, mask, y))
    assert got.norms.shape == (0,) and got.clip_factors.shape == (0,)
    for name, param in model.named_parameters():
        assert got.private[name].shape == param.shape and not got.private[name].any()
        assert got.private[name].dtype == param.dtype


@pytest.mark.parametrize("model_fn", [small_vit, small_cnn])
def test_single_record(model_fn):
    model = model_fn()
    batch = make_batch(FillView(0.0), *clips(1))
    assert_matches(run(GhostEngine, model, batch), run(ReferenceEngine, model, batch))


def test_float32_reference_vit_close_to_float64_truth():
    """At the reference configuration in float32, ghost is as accurate as the float32 oracle."""
    torch.manual_seed(0)
    model = VideoViT(num_classes=10)
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 3, 8, 32, 32, generator=gen)
    mask = torch.zeros(3, 8, 32, 32, dtype=torch.bool)
    mask[:, :4, 8:24, 4:20] = True
    y = torch.randint(0, 10, (3,), generator=gen)
    got = run(GhostEngine, model, make_batch(FillView(0.0), x, mask, y), clip=0.1)
    model64 = copy.deepcopy(model).double()
    truth = run(ReferenceEngine, model64, make_batch(FillView(0.0), x.double(), mask, y), 0.1)
    assert got.norms.dtype == torch.float64
    torch.testing.assert_close(got.norms, truth.norms, rtol=1e-5, atol=0)
    for name, want in truth.private.items():
        assert got.private[name].dtype == torch.float32
        err = (got.private[name].double() - want).norm() / want.norm()
        assert err < 1e-4, (name, float(err))


def test_masked_gradient_entry_point_and_auto():
    model = small_vit()
    x, mask, y = clips(2)
    public = clips(3, seed=5)
    assert resolve_engine("ghost", model) is GhostEngine
    common = {"max_grad_norm": CLIP, "public": public, "view": FillView(0.5)}
    got = masked_gradient(model, nn.CrossEntropyLoss(), x, mask, y, engine="ghost", **common)
    want = masked_gradient(model, nn.CrossEntropyLoss(), x, mask, y, engine="reference", **common)
    assert_matches(got, want)
    # The public term is one plain backward over the public batch, whatever the engine.
    params = dict(model.named_parameters())
    xs, ms, ys = public
    loss = F.cross_entropy(FillView(0.5).public(xs, ms)(model), ys, reduction="sum")
    plain = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
    assert got.public_count == 3
    torch.testing.assert_close(got.public_loss, loss.detach(), rtol=RTOL, atol=1e-12)
    for name, value in plain.items():
        torch.testing.assert_close(got.public[name], value, rtol=RTOL, atol=1e-12, msg=name)


def test_leaves_model_untouched():
    model = small_vit()
    keys = list(model.state_dict())
    attrs = {name: sorted(vars(m)) for name, m in model.named_modules()}
    before = copy.deepcopy(model.state_dict())
    head = model.head.weight
    head.grad = torch.ones_like(head)
    engine = GhostEngine(model, nn.CrossEntropyLoss())
    engine.compute(make_batch(FillView(0.0), *clips(2)), max_grad_norm=CLIP)
    engine.compute(make_batch(DropView.for_model(model), *clips(2)), max_grad_norm=CLIP)
    engine.close()
    assert list(model.state_dict()) == keys
    assert {name: sorted(vars(m)) for name, m in model.named_modules()} == attrs
    for name, value in model.state_dict().items():
        assert torch.equal(value, before[name])
    assert torch.equal(head.grad, torch.ones_like(head))
    assert all(p.grad is None for n, p in model.named_parameters() if n != "head.weight")
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())


def test_frozen_parameters_are_left_out():
    model = small_vit()
    model.patch_embed.weight.requires_grad_(False)
    model.blocks[0].norm1.requires_grad_(False)
    batch = make_batch(FillView(0.0), *clips(2))
    got = run(GhostEngine, model, batch)
    assert "patch_embed.weight" not in got.private and "patch_embed.bias" in got.private
    assert_matches(got, run(ReferenceEngine, model, batch))


class _TwoHeads(nn.Module):
    """Calls its body through keyword arguments and owns a module it never calls."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv3d(3, 4, kernel_size=(2, 8, 8), stride=(2, 8, 8))
        self.unused = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.relu_(self.body(input=x))  # in-place on the layer's output is fine
        return self.head(h.mean((2, 3, 4)))


def test_keyword_call_unused_module_and_inplace_output():
    torch.manual_seed(0)
    model = _TwoHeads().double()
    batch = make_batch(FillView(0.0), *clips(3))
    got = run(GhostEngine, model, batch)
    assert not got.private["unused.weight"].any()
    assert_matches(got, run(ReferenceEngine, model, batch))


def test_opacus_fallback_for_instance_norm():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4)),
        nn.Tanh(),
        nn.InstanceNorm3d(4, affine=True),
        nn.Flatten(),
        nn.Linear(4 * 2 * 4 * 4, 3),
    ).double()
    assert rule_for(nn.InstanceNorm3d) is not None
    batch = make_batch(FillView(0.0), *clips(3))
    assert_matches(run(GhostEngine, model, batch), run(ReferenceEngine, model, batch))


def test_subclass_keeping_forward_inherits_rule():
    class Conv3DSimple(nn.Conv3d):
        pass

    class ScaledLinear(nn.Linear):
        def forward(self, x: Tensor) -> Tensor:
            return 2 * super().forward(x)

    assert rule_for(Conv3DSimple) is RULES[nn.Conv3d]
    assert rule_for(ScaledLinear) is None  # replayed instead (test_ghost_replay.py)
    assert plan_layers(nn.Sequential(ScaledLinear(3, 3)))[0].rule.replays


# ----------------------------------------------------------------------------- refusals


class _RawParameter(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.scale = nn.Parameter(torch.ones(4))

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x) * self.scale


def test_raw_parameter_below_the_root_is_replayed_and_refused_at_the_root():
    layers = plan_layers(nn.Sequential(nn.Linear(4, 4), _RawParameter()))
    assert [(layer.path, layer.rule.replays) for layer in layers] == [("0", False), ("1", True)]
    assert sorted(layers[1].names.values()) == ["1.proj.bias", "1.proj.weight", "1.scale"]
    with pytest.raises(UnsupportedModelError, match=r"<root>: _RawParameter.*'scale'.*vmap"):
        GhostEngine.check_support(_RawParameter())
    with pytest.raises(UnsupportedModelError):
        resolve_engine("ghost", _RawParameter())


def test_refuses_lstm_with_path():
    model = nn.ModuleDict({"rnn": nn.LSTM(4, 4)})
    with pytest.raises(UnsupportedModelError, match=r"rnn: LSTM.*engine='vmap'"):
        GhostEngine.check_support(model)


def test_refuses_shared_parameter():
    a, b = nn.Linear(4, 4), nn.Linear(4, 4)
    b.weight = a.weight
    with pytest.raises(UnsupportedModelError, match=r"1 \(Linear\).*shared.*0 \(Linear\)"):
        GhostEngine.check_support(nn.Sequential(a, b))


def test_refuses_scale_grad_by_freq():
    with pytest.raises(UnsupportedModelError, match="scale_grad_by_freq"):
        GhostEngine.check_support(nn.Embedding(5, 3, scale_grad_by_freq=True))


def _batch_of(x: Tensor, classes: int = 3) -> MaskedBatch:
    gen = torch.Generator().manual_seed(0)
    public = torch.where(torch.rand(x.shape, generator=gen) < 0.5, 0, x)
    y = torch.randint(0, classes, (x.shape[0],), generator=gen)
    return MaskedBatch(ModelInput(x), ModelInput(public), y)


class _Reused(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.block = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.block(torch.tanh(self.block(x))))


class _FunctionalUse(nn.Module):
    """Uses a child's weight without calling the child (like nn.MultiheadAttention)."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(F.linear(x, self.proj.weight))


class _TiedHead(nn.Module):
    """Calls its embedding, then reuses the embedding matrix as the output layer."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(3, 4)
        self.mix = nn.Linear(4, 4)

    def forward(self, ids: Tensor) -> Tensor:
        return self.mix(self.embed(ids).mean(1)) @ self.embed.weight.T


class _InPlaceInput(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 3)

    def forward(self, x: Tensor) -> Tensor:
        h = torch.tanh(self.a(x))
        out = self.b(h)
        h.mul_(2.0)
        return out + h[:, :3]


@pytest.mark.parametrize(
    "model, inputs, match",
    [
        (_Reused(), _x(3, 4).float(), r"block \(Linear\) is called more than once"),
        (_FunctionalUse(), _x(3, 4).float(), r"proj \(Linear\).*used outside"),
        (_TiedHead(), _ids(3, 2, vocab=3), r"embed \(Embedding\).*used outside"),
        (_InPlaceInput(), _x(3, 4).float(), r"b \(Linear\).*modified in place"),
    ],
    ids=["reuse", "functional", "tied", "inplace_input"],
)
def test_refuses_at_compute_time_and_cleans_up(model, inputs, match):
    batch = _batch_of(inputs)
    engine = GhostEngine(model, nn.CrossEntropyLoss())
    with pytest.raises(UnsupportedModelError, match=match + ".*engine='vmap'|" + match):
        engine.compute(batch, max_grad_norm=1.0)
    assert not any(m._forward_hooks for m in model.modules())
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("stack", [True, False])
def test_no_parameter_gradient_is_computed(stack):
    """The backward asks only for layer outputs: autograd never forms a parameter gradient."""
    model = small_vit()
    fired = []
    handles = [
        p.register_hook(lambda g, name=name: fired.append(name))
        for name, p in model.named_parameters()
    ]
    batch = no_draws(make_batch(FillView(0.0), *clips(2)))
    run(ghost(stack=stack), model, batch)
    for handle in handles:
        handle.remove()
    assert fired == []


@pytest.mark.parametrize("model_fn", [small_vit, small_cnn])
def test_sequential_protect_labels_matches_reference(model_fn):
    model = model_fn()
    batch = make_batch(FillView(0.0), *clips(3), protect_labels=True)
    got = run(ghost(stack=False, mode="ghost"), model, batch)
    assert_matches(got, run(ReferenceEngine, model, batch))


def test_engine_keeps_no_tensor_between_calls_without_reuse():
    model = small_vit()
    engine = GhostEngine(model, nn.CrossEntropyLoss(), reuse_buffers=False)
    engine.compute(make_batch(FillView(0.0), *clips(2)), max_grad_norm=CLIP)
    assert engine.workspace is None
    assert not [k for k, v in vars(engine).items() if isinstance(v, Tensor)]
    assert all(
        not any(isinstance(x, Tensor) for x in vars(layer).values()) for layer in engine.layers
    )


@pytest.mark.parametrize("stack", [True, False])
def test_reused_buffers_never_leak_into_results(stack):
    """Results of one call stay intact when the next call reuses the per-sample buffers,
    including a call with a larger and then a smaller batch."""
    model = small_vit()
    engine = GhostEngine(model, nn.CrossEntropyLoss(), stack=stack)
    first_batch = make_batch(FillView(0.0), *clips(2, seed=1))
    first = engine.compute(first_batch, max_grad_norm=CLIP)
    saved = {k: v.clone() for k, v in first.private.items()}
    saved_norms = first.norms.clone()
    fresh = GhostEngine(model, nn.CrossEntropyLoss(), stack=stack, reuse_buffers=False)
    for n, seed in ((3, 2), (1, 3)):
        batch = no_draws(make_batch(FillView(0.0), *clips(n, seed=seed)))
        got = engine.compute(batch, max_grad_norm=CLIP)
        assert_matches(got, fresh.compute(batch, max_grad_norm=CLIP), rtol=1e-12)
    for k, v in first.private.items():
        assert torch.equal(v, saved[k])
    assert torch.equal(first.norms, saved_norms)
    assert engine.workspace is not None and not engine.workspace.used
    engine.close()


@pytest.mark.parametrize("stack", [True, False])
@pytest.mark.parametrize("model_fn", [small_vit, small_cnn])
def test_bf16_autocast_keeps_the_clipping_bound(model_fn, stack):
    """Under CPU bf16 autocast the reductions run in fp32 (upcast, autocast off): each
    record's private contribution alone has norm C up to fp32 rounding."""
    model = model_fn().float()
    x, mask, y = clips(3, dtype=torch.float32)
    engine = GhostEngine(model, nn.CrossEntropyLoss(), stack=stack)
    clip = 1e-3  # below every record's norm: all are clipped
    for i in range(3):
        batch = make_batch(FillView(0.0), x[i : i + 1], mask[i : i + 1], y[i : i + 1])
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = engine.compute(batch, max_grad_norm=clip)
        assert got.norms.dtype == got.clip_factors.dtype == torch.float64
        assert bool((got.norms > clip).all())
        assert all(v.dtype == torch.float32 for v in got.private.values())
        total = torch.sqrt(sum((v.double() ** 2).sum() for v in got.private.values()))
        assert abs(float(total) / clip - 1) < 1e-5
