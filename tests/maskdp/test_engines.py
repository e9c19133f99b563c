"""One contract, every engine: each registered engine equals the brute-force ReferenceEngine.

The engines are read from the registry, so a new engine is tested as soon as it registers.
An engine may refuse a model (``check_support`` or ``compute`` raising
UnsupportedModelError): the case is then skipped, except for ``vmap``, which must support
every model here. Independent truths: the per-sample loop (ReferenceEngine), an ordinary
backward of the summed loss (all-public masks: the private term vanishes, and
``public_gradient`` over the batch is the plain gradient), a per-record loop for
``public_gradient``, and Opacus's DPOptimizer clipping (all-sensitive masks with protected
labels, i.e. plain DP-SGD).
"""

from __future__ import annotations

import copy
import dataclasses

import pytest
import torch
from helpers import random_clips
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from support import supported_engines
from torch import Tensor, nn

from maskdp.engines.base import (
    ENGINES,
    ClippedSum,
    MaskedBatch,
    accumulation_dtype,
    engine_names,
    per_sample_loss,
    resolve_engine,
    trainable_parameters,
)
from maskdp.engines.vmap import VmapEngine
from maskdp.errors import InvalidInputError, UnsupportedModelError
from maskdp.mechanism.gradient import MaskedGradient, make_batch, masked_gradient, public_gradient
from maskdp.mechanism.views import DropView, FillView, ModelInput, RandomFillView
from maskdp.models import SmallVideoCNN, VideoViT

ENGINE_NAMES = [n for n in engine_names() if n not in ("auto", "reference")]
CLIP = 0.5
RTOL = 1e-5


def small_vit(**kw) -> nn.Module:
    torch.manual_seed(0)
    args = dict(num_classes=3, frames=4, image_size=16, tubelet_size=(2, 8, 8), dim=16, depth=1)
    return VideoViT(**{**args, "heads": 2, **kw}).double()


def small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallVideoCNN(num_classes=3, width=8).double()


def clip_batch(n: int, frames: int = 4, size: int = 16, p: float = 0.3, seed: int = 1):
    return random_clips(n, seed=seed, frames=frames, size=size, p=p, dtype=torch.float64)


def compute(engine: str, model: nn.Module, batch, clip: float = CLIP) -> ClippedSum:
    """Run one engine; a refusal fails the test (tests/maskdp/support.py: which engine
    must support which model; the tests only run supported pairs)."""
    impl = resolve_engine(engine, model)(model, nn.CrossEntropyLoss())
    try:
        result = impl.compute(batch, max_grad_norm=clip)
    finally:
        impl.close()
    # Only the clipped private sum: no public sum over the private batch, no loss.
    assert isinstance(result, ClippedSum) and not hasattr(result, "public")
    return result


def reference(model: nn.Module, batch, clip: float = CLIP) -> ClippedSum:
    impl = resolve_engine("reference", model)(model, nn.CrossEntropyLoss())
    return impl.compute(batch, max_grad_norm=clip)


def assert_dicts_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = RTOL):
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max()) if want[name].numel() else 0.0
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=rtol * scale + 1e-12, msg=name
        )


def assert_matches(got: ClippedSum, want: ClippedSum, rtol: float = RTOL) -> None:
    """Private sums, norms and clip factors agree; norms and factors are float64."""
    assert got.norms.dtype == got.clip_factors.dtype == torch.float64
    assert_dicts_close(got.private, want.private, rtol)
    torch.testing.assert_close(got.norms, want.norms, rtol=rtol, atol=1e-10)
    torch.testing.assert_close(got.clip_factors, want.clip_factors, rtol=rtol, atol=1e-10)


def brute_public_sum(model: nn.Module, view, x, mask, y) -> tuple[dict[str, Tensor], Tensor]:
    """Sum over records of h_j and of the public loss, one record at a time (plain autograd)."""
    params = trainable_parameters(model)
    sums = {n: torch.zeros_like(p) for n, p in params.items()}
    loss_sum = torch.zeros((), dtype=x.dtype)
    public = view.public(x, mask)
    for j in range(len(x)):
        loss = nn.functional.cross_entropy(public.select(j)(model), y[j : j + 1], reduction="sum")
        for n, g in zip(params, torch.autograd.grad(loss, list(params.values())), strict=True):
            sums[n] += g
        loss_sum += loss.detach()
    return sums, loss_sum


def views(model: nn.Module):
    return {
        "fill": FillView(0.25),
        "random": RandomFillView(-1.0, 1.0, seed=5),
        "drop": DropView.for_model(model),
    }


class DropoutCNN(nn.Module):
    """A small convolutional model with dropout between its two layers (draws in forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.drop = nn.Dropout(0.5)
        self.head = nn.Linear(4 * 2 * 4 * 4, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.drop(torch.tanh(self.conv(x))).flatten(1))


def dropout_cnn() -> nn.Module:
    torch.manual_seed(0)
    return DropoutCNN().double()


def test_every_registered_engine_is_under_test():
    assert "vmap" in ENGINE_NAMES and "hooks" in ENGINE_NAMES
    assert set(ENGINE_NAMES) == set(ENGINES) - {"reference"}


@pytest.mark.parametrize("model_fn", [small_vit, small_cnn], ids=["vit", "cnn"])
def test_vmap_supports_every_model(model_fn):
    VmapEngine.check_support(model_fn())


@pytest.mark.parametrize("engine", ENGINE_NAMES)
class TestEngineContract:
    @pytest.mark.parametrize("view_name", ["fill", "random", "drop"])
    @pytest.mark.parametrize("protect_labels", [False, True])
    def test_vit_matches_reference(self, engine, view_name, protect_labels):
        model = small_vit()
        x, mask, y = clip_batch(4)
        present = torch.tensor([True, False, True, True])  # record 1 is erased
        batch = make_batch(
            views(model)[view_name], x, mask, y, protect_labels=protect_labels, present=present
        )
        want = reference(model, batch)
        got = compute(engine, model, batch)
        assert_matches(got, want)
        if not protect_labels:
            assert got.norms[1] <= 1e-10 * float(want.norms.max())  # erased: Delta = 0

    @pytest.mark.parametrize("protect_labels", [False, True])
    def test_cnn_matches_reference(self, engine, protect_labels):
        model = small_cnn()
        x, mask, y = clip_batch(3)
        batch = make_batch(FillView([0.1, 0.2, 0.3]), x, mask, y, protect_labels=protect_labels)
        assert_matches(compute(engine, model, batch, clip=0.05), reference(model, batch, 0.05))

    def test_some_clipped_some_not(self, engine):
        model = small_vit()
        x, mask, y = clip_batch(4)
        batch = make_batch(FillView(0.0), x, mask, y)
        norms = reference(model, batch).norms
        clip = float(norms.median())  # half the records clipped
        got, want = compute(engine, model, batch, clip), reference(model, batch, clip)
        assert (want.clip_factors < 1).any() and (want.clip_factors == 1).any()
        assert_matches(got, want)

    def test_empty_batch(self, engine):
        model = small_vit()
        x, mask, y = clip_batch(0)
        got = compute(engine, model, make_batch(FillView(0.0), x, mask, y))
        assert got.norms.shape == (0,) and got.clip_factors.shape == (0,)
        assert got.norms.dtype == got.clip_factors.dtype == torch.float64
        assert got.private.keys() == trainable_parameters(model).keys()
        for name, p in trainable_parameters(model).items():
            assert got.private[name].dtype == accumulation_dtype(p.dtype)
            assert torch.equal(got.private[name], torch.zeros_like(p))

    def test_single_record(self, engine):
        model = small_vit()
        x, mask, y = clip_batch(1)
        batch = make_batch(DropView.for_model(model), x, mask, y)
        assert_matches(compute(engine, model, batch), reference(model, batch))

    @settings(
        max_examples=6,
        deadline=None,
        suppress_health_check=[HealthCheck.function_scoped_fixture],
        derandomize=True,
    )
    @given(
        n=st.integers(0, 3),
        frames=st.sampled_from([2, 4]),
        size=st.sampled_from([8, 16]),
        p=st.sampled_from([0.0, 0.2, 1.0]),
        seed=st.integers(0, 2**16),
    )
    def test_shapes_match_reference(self, engine, n, frames, size, p, seed):
        model = small_vit(frames=frames, image_size=size)
        x, mask, y = clip_batch(n, frames, size, p, seed)
        batch = make_batch(DropView.for_model(model), x, mask, y)
        assert_matches(compute(engine, model, batch), reference(model, batch))

    @pytest.mark.parametrize("model_fn", [small_vit, small_cnn], ids=["vit", "cnn"])
    def test_all_public_is_plain_training(self, engine, model_fn):
        """No sensitive pixel: private = 0, and the public sum over the same records (through
        masked_gradient with this engine) is the ordinary gradient of the summed loss."""
        model = model_fn()
        x, _, y = clip_batch(3)
        mask = torch.zeros(3, 4, 16, 16, dtype=torch.bool)
        got = compute(engine, model, make_batch(FillView(0.0), x, mask, y))
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        params = trainable_parameters(model)
        plain = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        for name, value in got.private.items():
            assert value.abs().max() <= 1e-10 * (1 + plain[name].abs().max()), name
        assert got.norms.max() <= 1e-10
        both = masked_gradient(
            model, nn.CrossEntropyLoss(), x, mask, y, max_grad_norm=CLIP, engine=engine,
            view=FillView(0.0), public=(x, mask, y),
        )  # fmt: skip
        assert_dicts_close(both.public, plain)
        assert_dicts_close(both.total(), plain)
        torch.testing.assert_close(both.public_loss, loss.detach(), rtol=RTOL, atol=1e-12)
        assert both.public_count == 3

    @pytest.mark.filterwarnings("ignore:Full backward hook is firing")
    @pytest.mark.parametrize("model_fn", [small_vit, small_cnn], ids=["vit", "cnn"])
    def test_all_sensitive_protected_labels_is_opacus_dpsgd(self, engine, model_fn):
        """All-sensitive masks with protected labels: plain DP-SGD, checked against Opacus."""
        from opacus.grad_sample import GradSampleModule
        from opacus.optimizers import DPOptimizer

        import maskdp.engines.hooks  # noqa: F401  (registers PositionalEmbedding's grad sampler)

        model = model_fn()
        x, _, y = clip_batch(4)
        mask = torch.ones(4, 4, 16, 16, dtype=torch.bool)
        clip = 0.05
        got = compute(
            engine, model, make_batch(FillView(0.0), x, mask, y, protect_labels=True), clip
        )

        twin = copy.deepcopy(model).train()
        gsm = GradSampleModule(twin, loss_reduction="sum")
        optimizer = DPOptimizer(
            torch.optim.SGD(twin.parameters(), lr=0.0),
            noise_multiplier=0.0,
            max_grad_norm=clip,
            expected_batch_size=4,
            loss_reduction="sum",
        )
        nn.functional.cross_entropy(gsm(x), y, reduction="sum").backward()
        optimizer.clip_and_accumulate()
        opacus_sum = {n: p.summed_grad for n, p in twin.named_parameters()}
        # Opacus divides by (norm + 1e-6) where maskdp divides by norm: 1e-6 relative.
        assert_dicts_close(got.private, opacus_sum, rtol=1e-4)
        assert (got.clip_factors < 1).all()

    def test_passes_that_do_not_stack(self, engine):
        """A view whose public pass has another input shape (here: the last frames cut)."""

        class CutFrames:
            def public(self, inputs, mask):
                keep = inputs[:, :, :2]
                return ModelInput(torch.where(mask[:, None, :2], torch.zeros_like(keep), keep))

            def full(self, inputs, mask):
                return ModelInput(inputs)

        model = small_cnn()
        x, mask, y = clip_batch(3)
        batch = make_batch(CutFrames(), x, mask, y)
        assert_matches(compute(engine, model, batch), reference(model, batch))

    def test_leaves_model_untouched(self, engine):
        """Same state_dict keys and values, no new attributes, no hooks, param.grad untouched."""
        model = small_vit()
        marker = {n: torch.full_like(p, 7.0) for n, p in model.named_parameters()}
        for n, p in model.named_parameters():
            p.grad = marker[n].clone()
        before_state = {k: v.clone() for k, v in model.state_dict().items()}
        module_attrs = {name: set(vars(m)) for name, m in model.named_modules()}
        param_attrs = {name: set(vars(p)) for name, p in model.named_parameters()}
        x, mask, y = clip_batch(2)
        compute(engine, model, make_batch(FillView(0.0), x, mask, y))
        state = model.state_dict()
        assert state.keys() == before_state.keys()
        assert all(torch.equal(state[k], before_state[k]) for k in state)
        for name, m in model.named_modules():
            assert set(vars(m)) == module_attrs[name], name
            assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
        for name, p in model.named_parameters():
            assert set(vars(p)) == param_attrs[name], name
            assert torch.equal(p.grad, marker[name]), name

    def test_masked_gradient_entry_point(self, engine):
        """Private part as the reference engine; public part = per-record brute force over
        the independent public batch (another size, other records)."""
        model = small_vit()
        x, mask, y = clip_batch(3)
        public = clip_batch(5, seed=7)
        present = torch.tensor([True, True, False])

        def run(name: str) -> MaskedGradient:
            return masked_gradient(
                model,
                nn.CrossEntropyLoss(),
                x,
                mask,
                y,
                max_grad_norm=CLIP,
                public=public,
                engine=name,
                view=DropView.for_model(model),
                present=present,
            )

        got = run(engine)
        assert isinstance(got, MaskedGradient)
        assert_matches(got, run("reference"))
        assert got.norms[2] == 0  # erased
        sums, loss_sum = brute_public_sum(model, DropView.for_model(model), *public)
        assert_dicts_close(got.public, sums)
        torch.testing.assert_close(got.public_loss, loss_sum, rtol=RTOL, atol=1e-12)
        assert got.public_count == 5
        total = got.total()
        for name in sums:
            torch.testing.assert_close(total[name], got.public[name] + got.private[name])

    def test_masked_gradient_protect_labels_has_no_public_term(self, engine):
        model = small_vit()
        x, mask, y = clip_batch(3)
        kw = dict(max_grad_norm=CLIP, engine=engine, view=FillView(0.0), protect_labels=True)
        got = masked_gradient(model, nn.CrossEntropyLoss(), x, mask, y, **kw)
        want = masked_gradient(
            model, nn.CrossEntropyLoss(), x, mask, y, **{**kw, "engine": "reference"}
        )
        assert_matches(got, want)
        assert got.public_count == 0 and float(got.public_loss) == 0.0
        assert all(torch.equal(v, torch.zeros_like(v)) for v in got.public.values())
        assert got.public.keys() == got.private.keys()
        with pytest.raises(InvalidInputError, match="no public term"):
            masked_gradient(model, nn.CrossEntropyLoss(), x, mask, y, public=(x, mask, y), **kw)

    @pytest.mark.parametrize("random", [False, True], ids=["stacked", "separate"])
    @pytest.mark.parametrize("view_name", ["fill", "drop"])
    def test_both_schedules_match_reference(self, engine, view_name, random):
        """``random=False`` lets hooks/ghost stack the two passes; ``True`` runs them apart."""
        model = small_vit()
        x, mask, y = clip_batch(4)
        present = torch.tensor([True, True, False, True])
        batch = make_batch(views(model)[view_name], x, mask, y, present=present)
        batch = dataclasses.replace(batch, random=random)
        want = reference(model, batch)
        got = compute(engine, model, batch)
        assert_matches(got, want)
        assert got.norms[2] == 0 and got.clip_factors[2] == 1  # erased: Delta = 0 exactly

    @pytest.mark.parametrize("value", [float("nan"), float("inf")])
    def test_non_finite_record_contributes_exactly_zero(self, engine, value):
        """A record whose Delta is not finite gets c_i = 0 and adds nothing: the sum equals
        the reference's over the other records, and stays finite."""
        model = small_vit()
        x, mask, y = clip_batch(4)
        x[1] = torch.where(mask[1][None], value, x[1])  # sensitive pixels only
        batch = make_batch(FillView(0.0), x, mask, y)
        got = compute(engine, model, batch)
        assert not torch.isfinite(got.norms[1]) and got.clip_factors[1] == 0
        keep = torch.tensor([0, 2, 3])
        rest = MaskedBatch(batch.full.select(keep), batch.public.select(keep), y[keep])
        want = reference(model, rest)
        for v in got.private.values():
            assert torch.isfinite(v).all()
        assert_dicts_close(got.private, want.private)
        torch.testing.assert_close(got.norms[keep], want.norms, rtol=RTOL, atol=1e-10)
        torch.testing.assert_close(got.clip_factors[keep], want.clip_factors, rtol=RTOL, atol=0)

    def test_random_model_gives_both_passes_the_same_draws(self, engine):
        """Dropout in train mode: an erased record's two passes see the same draws, so its
        Delta is exactly 0; the other records' Delta are not (dropout changes with content)."""
        model = dropout_cnn().train()
        x, mask, y = clip_batch(4)
        present = torch.tensor([True, False, True, False])
        batch = make_batch(FillView(0.0), x, mask, y, present=present)
        assert batch.random
        torch.manual_seed(3)
        got = compute(engine, model, batch)
        assert got.norms[1] == 0 and got.norms[3] == 0
        assert (got.norms[[0, 2]] > 0).all()
        assert torch.isfinite(got.norms).all()
        # Without dropout (eval) the engine matches the reference.
        model.eval()
        batch = make_batch(FillView(0.0), x, mask, y, present=present)
        assert_matches(compute(engine, model, batch), reference(model, batch))


@pytest.mark.parametrize("view_name", ["fill", "random", "drop"])
def test_public_gradient_matches_per_record_loop(view_name):
    model = small_vit()
    x, mask, y = clip_batch(5, seed=4)
    sums, loss_sum = brute_public_sum(model, views(model)[view_name], x, mask, y)
    got, loss, count = public_gradient(
        model, per_sample_loss(nn.CrossEntropyLoss()), views(model)[view_name], (x, mask, y)
    )
    assert count == 5 and got.keys() == sums.keys()
    assert all(v.dtype == torch.float64 for v in got.values())
    assert_dicts_close(got, sums)
    torch.testing.assert_close(loss, loss_sum, rtol=RTOL, atol=1e-12)
    # Sensitive content does not enter it at all.
    other = torch.where(mask[:, None], torch.randn_like(x) * 1e3, x)
    again, loss_again, _ = public_gradient(
        model, per_sample_loss(nn.CrossEntropyLoss()), views(model)[view_name], (other, mask, y)
    )
    if view_name != "random":  # RandomFillView advanced its generator: other fill values
        assert all(torch.equal(again[n], got[n]) for n in got)
        assert torch.equal(loss_again, loss)


def test_public_gradient_empty_and_non_finite_batches():
    model = small_vit().float()
    loss_fn = per_sample_loss(nn.CrossEntropyLoss())
    x, mask, y = clip_batch(0)
    got, loss, count = public_gradient(model, loss_fn, FillView(0.0), (x.float(), mask, y))
    assert count == 0 and float(loss) == 0.0
    for name, p in trainable_parameters(model).items():
        assert torch.equal(got[name], torch.zeros_like(p))
    x, mask, y = clip_batch(2)
    x = x.float()
    x[0, 0, 0, 0, 0] = float("nan")
    mask[0, 0, 0, 0] = False  # a public pixel: an error in the public data
    with pytest.raises(InvalidInputError, match="non-finite"):
        public_gradient(model, loss_fn, FillView(0.0), (x, mask, y))


def test_masked_gradient_needs_an_independent_public_batch():
    model = small_vit()
    x, mask, y = clip_batch(2)
    with pytest.raises(InvalidInputError, match="public term needs its own batch"):
        masked_gradient(model, nn.CrossEntropyLoss(), x, mask, y, max_grad_norm=CLIP)
    with pytest.raises(InvalidInputError, match="public"):
        masked_gradient(model, nn.CrossEntropyLoss(), x, mask, y, max_grad_norm=CLIP, public=x)


def test_auto_picks_a_supporting_engine():
    assert resolve_engine("auto", small_vit()).name in ENGINE_NAMES


def test_hooks_refuses_multihead_attention_with_path():
    from maskdp.engines.hooks import HooksEngine

    class WithMHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.ModuleDict({"attn": nn.MultiheadAttention(8, 2, batch_first=True)})

        def forward(self, x):
            return self.encoder["attn"](x, x, x)[0].mean(1)

    with pytest.raises(UnsupportedModelError, match=r"encoder\.attn.*engine='vmap'"):
        HooksEngine.check_support(WithMHA())
    VmapEngine.check_support(WithMHA())


def test_hooks_refuses_in_place_residual_of_torchvision_resnet():
    """r3d_18 adds its shortcut in place (`out += residual`): Opacus's hooks cannot follow."""
    torchvision = pytest.importorskip("torchvision")
    from maskdp.models import prepare

    model = prepare(torchvision.models.video.r3d_18(num_classes=3)).model
    x, mask, y = clip_batch(1, frames=2, size=16)
    x = x.float()
    with pytest.raises(UnsupportedModelError, match="in place.*engine='vmap'"):
        masked_gradient(
            model, nn.CrossEntropyLoss(), x, mask, y, max_grad_norm=1.0, engine="hooks",
            public=(x, mask, y),
        )  # fmt: skip
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("engine", [e for e in supported_engines("r3d_18") if e != "reference"])
def test_r3d18_with_groupnorm_matches_reference(engine):
    torchvision = pytest.importorskip("torchvision")
    from maskdp.models import prepare

    torch.manual_seed(0)
    model = prepare(torchvision.models.video.r3d_18(num_classes=3)).model.double()
    x, mask, y = clip_batch(2, frames=4, size=32)
    batch = make_batch(FillView(0.0), x, mask, y)
    assert_matches(compute(engine, model, batch, clip=1.0), reference(model, batch, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("engine", [e for e in supported_engines("swin3d_t") if e != "reference"])
def test_swin3d_t_matches_reference(engine):
    """torchvision's Swin3D (window attention with relative position bias; eval mode so that
    stochastic depth is off and both sides see the same function)."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.video.swin3d_t(num_classes=3).double().eval()
    x, mask, y = clip_batch(2, frames=4, size=32)
    batch = make_batch(FillView(0.0), x, mask, y)
    assert_matches(compute(engine, model, batch, clip=1.0), reference(model, batch, 1.0))


@pytest.mark.slow
def test_swin3d_t_train_mode_runs_with_vmap():
    """Stochastic depth draws an unbatched mask in place: vmap falls back to shared randomness."""
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    model = torchvision.models.video.swin3d_t(num_classes=3).train()
    x, mask, y = clip_batch(2, frames=4, size=32)
    x = x.float()
    present = torch.tensor([True, False])
    got = masked_gradient(
        model, nn.CrossEntropyLoss(), x, mask, y, max_grad_norm=1.0, engine="vmap",
        public=(x, mask, y), present=present,
    )  # fmt: skip
    assert torch.isfinite(got.norms).all() and got.norms.shape == (2,)
    assert got.norms[1] == 0  # stochastic depth: both passes of the erased record share draws
