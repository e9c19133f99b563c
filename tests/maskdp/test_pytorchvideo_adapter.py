"""pytorchvideo models through maskdp.models.from_pytorchvideo: tiny random-init X3D and
SlowFast, float64; every engine ``auto`` ends on must equal the per-sample reference loop,
and the adapted model must compute the original's function (up to its head softmax)."""

from __future__ import annotations

import warnings

import pytest
import torch
from helpers import random_clips
from torch import nn

from maskdp.engines.base import build_engine
from maskdp.engines.reference import ReferenceEngine
from maskdp.errors import InvalidInputError
from maskdp.mechanism.gradient import make_batch
from maskdp.mechanism.views import FillView
from maskdp.models import PyTorchVideo, from_pytorchvideo, prepare
from maskdp.models.adapters import slowfast_pathways

pytest.importorskip(
    "pytorchvideo", reason="pytorchvideo is not installed (pip install 'maskdp[test]')"
)
with warnings.catch_warnings():  # pytorchvideo calls torch.jit.script at import
    warnings.simplefilter("ignore", FutureWarning)
    from pytorchvideo.models.slowfast import create_slowfast
    from pytorchvideo.models.x3d import create_x3d


def x3d() -> nn.Module:
    """X3D with its default softmax head and Swish activations, 4 x 32 x 32 clips."""
    torch.manual_seed(0)
    return create_x3d(input_clip_length=4, input_crop_size=32, model_num_class=3, dropout_rate=0.0)


def slowfast() -> nn.Module:
    """SlowFast-R18 at width 16/2, 8 x 32 x 32 clips (the slow pathway sees 2 frames)."""
    torch.manual_seed(0)
    return create_slowfast(
        model_num_class=3, model_depth=18, stem_dim_outs=(16, 2), dropout_rate=0.0,
        head_pool_kernel_sizes=((2, 1, 1), (8, 1, 1)),
    )  # fmt: skip


# model -> (build, frames, alpha, the engines that must match the reference loop)
MODELS = {"x3d": (x3d, 4, None, ("auto", "vmap")), "slowfast": (slowfast, 8, 4, ("auto",))}


@pytest.mark.parametrize("name", sorted(MODELS))
def test_pytorchvideo_model_matches_the_reference_loop(name):
    build, frames, alpha, engines = MODELS[name]
    model = from_pytorchvideo(build(), alpha=alpha).double().eval()
    x, mask, y = random_clips(3, seed=1, p=0.3, dtype=torch.float64, frames=frames, size=32)
    assert model(x).shape == (3, 3)
    batch = make_batch(FillView(0.0), x, mask, y)
    want = ReferenceEngine(model, nn.CrossEntropyLoss()).compute(batch, max_grad_norm=1e-3)
    for engine_name in engines:
        engine = build_engine(engine_name, model, nn.CrossEntropyLoss())
        got = engine.compute(batch, max_grad_norm=1e-3)
        if engine_name == "auto":
            assert engine.name == "ghost", engine.reasons
        torch.testing.assert_close(got.norms, want.norms, rtol=1e-9, atol=0)
        scale = max(float(v.abs().max()) for v in want.private.values())
        for key, value in want.private.items():
            torch.testing.assert_close(got.private[key], value, rtol=1e-9, atol=1e-9 * scale)


def test_the_adapted_x3d_returns_the_logits_of_the_prepared_original():
    """softmax(adapter(x)) is the prepared model's output, Swish and softmax head kept."""
    original = x3d()
    adapted = from_pytorchvideo(original).double().eval()
    reference = prepare(original).model.double().eval()
    x = random_clips(2, seed=2, dtype=torch.float64, frames=4, size=32)[0]
    logits = adapted(x)
    torch.testing.assert_close(logits.softmax(dim=1), reference(x), rtol=1e-12, atol=1e-12)
    assert not torch.allclose(logits.sum(dim=1), torch.ones(2, dtype=torch.float64))
    assert any("Swish -> SiLU" in c for c in adapted.changes)
    assert any("Softmax head activation removed" in c for c in adapted.changes)
    assert any("BatchNorm3d" in c and "GroupNorm" in c for c in adapted.changes)
    # the user's model is untouched, and parameters keep their names under model.
    assert isinstance(original.blocks[-1].activation, nn.Softmax)
    assert {f"model.{n}" for n, _ in x3d().named_parameters()} == {
        n for n, _ in adapted.named_parameters()
    }


def test_slowfast_gets_its_pathways_from_one_clip():
    model = from_pytorchvideo(slowfast(), alpha=4).double().eval()
    assert isinstance(model, PyTorchVideo) and model.alpha == 4
    x = random_clips(2, seed=3, dtype=torch.float64, frames=8, size=32)[0]
    slow, fast = slowfast_pathways(x, 4)
    assert torch.equal(fast, x) and torch.equal(slow, x[:, :, [0, 7]])  # linspace(0, 7, 2)
    torch.testing.assert_close(model(x), model.model([x[:, :, [0, 7]], x]), rtol=0, atol=0)


@pytest.mark.parametrize(
    ("call", "match"),
    [(lambda: from_pytorchvideo(slowfast()), "has 2 pathways .*pass alpha"),
     (lambda: from_pytorchvideo(x3d(), alpha=4), "alpha is for multi-pathway models"),
     (lambda: from_pytorchvideo(slowfast(), alpha=0), "alpha"),
     (lambda: from_pytorchvideo("x3d"), "must be a torch.nn.Module"),
     (lambda: from_pytorchvideo(x3d())(torch.zeros(3, 4, 32, 32)), r"\(N, C, T, H, W\)"),
     (lambda: from_pytorchvideo(slowfast(), alpha=4)(torch.zeros(1, 3, 2, 32, 32)),
      "needs at least 4 frames")],
)  # fmt: skip
def test_bad_input_is_refused_with_a_clear_error(call, match):
    with pytest.raises(InvalidInputError, match=match):
        call()
