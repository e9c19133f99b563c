"""One contract, every engine: each registered engine equals the brute-force ReferenceEngine.

The engines are read from the registry, so a new engine is tested as soon as it registers.
An engine may refuse a model (``check_support`` or ``compute`` raising
UnsupportedModelError): the case is then skipped, except for ``vmap``, which must support
every model here. Independent truths: the per-sample loop (ReferenceEngine), an ordinary
backward of the summed loss (all-public masks) and Opacus's DPOptimizer clipping
(all-sensitive masks with protected labels, i.e. plain DP-SGD).
"""

from __future__ import annotations

import copy

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import Tensor, nn

from maskdp.engines.base import (
    ENGINES,
    MaskedGradient,
    engine_names,
    resolve_engine,
    trainable_parameters,
)
from maskdp.engines.vmap import VmapEngine
from maskdp.errors import UnsupportedModelError
from maskdp.functional import make_batch, masked_gradient
from maskdp.models import SmallVideoCNN, VideoViT
from maskdp.views import DropView, FillView, ModelInput, RandomFillView

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
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 3, frames, size, size, generator=gen, dtype=torch.float64)
    mask = torch.rand(n, frames, size, size, generator=gen) < p
    y = torch.randint(0, 3, (n,), generator=gen)
    return x, mask, y


def compute(engine: str, model: nn.Module, batch, clip: float = CLIP) -> MaskedGradient:
    """Run one engine; skip when it refuses the model (vmap never may)."""
    try:
        impl = resolve_engine(engine, model)(model, nn.CrossEntropyLoss())
        try:
            return impl.compute(batch, max_grad_norm=clip)
        finally:
            impl.close()
    except UnsupportedModelError as err:
        if engine == "vmap":
            raise
        pytest.skip(f"{engine} refuses {type(model).__name__}: {err}")


def reference(model: nn.Module, batch, clip: float = CLIP) -> MaskedGradient:
    impl = resolve_engine("reference", model)(model, nn.CrossEntropyLoss())
    return impl.compute(batch, max_grad_norm=clip)


def assert_dicts_close(got: dict[str, Tensor], want: dict[str, Tensor], rtol: float = RTOL):
    assert got.keys() == want.keys()
    for name in want:
        scale = float(want[name].abs().max()) if want[name].numel() else 0.0
        torch.testing.assert_close(
            got[name], want[name], rtol=rtol, atol=rtol * scale + 1e-12, msg=name
        )


def assert_matches(got: MaskedGradient, want: MaskedGradient, rtol: float = RTOL) -> None:
    assert_dicts_close(got.public, want.public, rtol)
    assert_dicts_close(got.private, want.private, rtol)
    torch.testing.assert_close(got.norms, want.norms, rtol=rtol, atol=1e-10)
    torch.testing.assert_close(got.clip_factors, want.clip_factors, rtol=rtol, atol=1e-10)
    torch.testing.assert_close(got.loss, want.loss, rtol=rtol, atol=1e-10)


def views(model: nn.Module):
    return {
        "fill": FillView(0.25),
        "random": RandomFillView(-1.0, 1.0, seed=5),
        "drop": DropView.for_model(model),
    }


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
        for name, p in trainable_parameters(model).items():
            assert torch.equal(got.public[name], torch.zeros_like(p))
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
        """No sensitive pixel: public = ordinary gradient of the summed loss, private = 0."""
        model = model_fn()
        x, _, y = clip_batch(3)
        mask = torch.zeros(3, 4, 16, 16, dtype=torch.bool)
        got = compute(engine, model, make_batch(FillView(0.0), x, mask, y))
        loss = nn.functional.cross_entropy(model(x), y, reduction="sum")
        params = trainable_parameters(model)
        plain = dict(zip(params, torch.autograd.grad(loss, list(params.values())), strict=True))
        assert_dicts_close(got.public, plain)
        for name, value in got.private.items():
            assert value.abs().max() <= 1e-10 * (1 + plain[name].abs().max()), name
        assert got.norms.max() <= 1e-10

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
        assert all(torch.equal(v, torch.zeros_like(v)) for v in got.public.values())
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
        model = small_vit()
        x, mask, y = clip_batch(3)
        present = torch.tensor([True, True, False])
        try:
            got = masked_gradient(
                model,
                nn.CrossEntropyLoss(),
                x,
                mask,
                y,
                max_grad_norm=CLIP,
                engine=engine,
                view=DropView.for_model(model),
                present=present,
            )
        except UnsupportedModelError as err:
            pytest.skip(str(err))
        want = masked_gradient(
            model,
            nn.CrossEntropyLoss(),
            x,
            mask,
            y,
            max_grad_norm=CLIP,
            engine="reference",
            view=DropView.for_model(model),
            present=present,
        )
        assert_matches(got, want)


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
    with pytest.raises(UnsupportedModelError, match="in place.*engine='vmap'"):
        masked_gradient(
            model, nn.CrossEntropyLoss(), x.float(), mask, y, max_grad_norm=1.0, engine="hooks"
        )
    assert not any(hasattr(p, "grad_sample") for p in model.parameters())
    assert not any(hasattr(m, "activations") for m in model.modules())


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_NAMES)
def test_r3d18_with_groupnorm_matches_reference(engine):
    torchvision = pytest.importorskip("torchvision")
    from maskdp.models import prepare

    torch.manual_seed(0)
    model = prepare(torchvision.models.video.r3d_18(num_classes=3)).model.double()
    x, mask, y = clip_batch(2, frames=4, size=32)
    batch = make_batch(FillView(0.0), x, mask, y)
    assert_matches(compute(engine, model, batch, clip=1.0), reference(model, batch, 1.0))


@pytest.mark.slow
@pytest.mark.parametrize("engine", ENGINE_NAMES)
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
    got = masked_gradient(
        model, nn.CrossEntropyLoss(), x.float(), mask, y, max_grad_norm=1.0, engine="vmap"
    )
    assert torch.isfinite(got.norms).all() and got.norms.shape == (2,)
