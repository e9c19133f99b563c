"""Hugging Face video classifiers through maskdp.models.from_huggingface: tiny random-init
configs, float64, every engine ``auto`` ends on must equal the per-sample reference loop."""

from __future__ import annotations

import pytest
import torch
from helpers import random_clips
from torch import nn

from maskdp.engines.base import build_engine
from maskdp.engines.reference import ReferenceEngine
from maskdp.errors import InvalidInputError
from maskdp.mechanism.gradient import make_batch
from maskdp.mechanism.views import FillView
from maskdp.models import HuggingFaceVideo, from_huggingface

transformers = pytest.importorskip(
    "transformers", reason="transformers is not installed (pip install 'maskdp[test]')"
)

SMALL = dict(
    hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    num_labels=3, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
)  # fmt: skip


def videomae() -> nn.Module:
    config = transformers.VideoMAEConfig(
        image_size=16, patch_size=8, num_frames=4, tubelet_size=2, **SMALL
    )
    return transformers.VideoMAEForVideoClassification(config)


def vivit() -> nn.Module:
    config = transformers.VivitConfig(image_size=16, tubelet_size=[2, 8, 8], num_frames=4, **SMALL)
    return transformers.VivitForVideoClassification(config)


def timesformer() -> nn.Module:
    config = transformers.TimesformerConfig(image_size=16, patch_size=8, num_frames=4, **SMALL)
    return transformers.TimesformerForVideoClassification(config)


def vjepa2() -> nn.Module:
    config = transformers.VJEPA2Config(
        patch_size=8, crop_size=16, frames_per_clip=4, tubelet_size=2, hidden_size=16,
        num_attention_heads=2, num_hidden_layers=1, mlp_ratio=2.0, num_pooler_layers=1,
        pred_hidden_size=16, pred_num_attention_heads=2, pred_num_hidden_layers=1, num_labels=3,
    )  # fmt: skip
    return transformers.VJEPA2ForVideoClassification(config)


# model -> the engine auto ends on (TimeSformer folds frames into the batch inside its
# divided attention: the ghost engine refuses it at the first batch).
MODELS = {"videomae": (videomae, "ghost"), "vivit": (vivit, "ghost"),
          "vjepa2": (vjepa2, "ghost"), "timesformer": (timesformer, "vmap")}  # fmt: skip


@pytest.mark.parametrize("name", sorted(MODELS))
def test_hugging_face_classifier_matches_the_reference_loop(name):
    build, expected = MODELS[name]
    torch.manual_seed(0)
    model = from_huggingface(build()).double().eval()
    x, mask, y = random_clips(3, seed=1, p=0.3, dtype=torch.float64)
    assert model(x).shape == (3, 3)
    batch = make_batch(FillView(0.0), x, mask, y)
    want = ReferenceEngine(model, nn.CrossEntropyLoss()).compute(batch, max_grad_norm=1e-3)
    engine = build_engine("auto", model, nn.CrossEntropyLoss())
    got = engine.compute(batch, max_grad_norm=1e-3)
    assert engine.name == expected, engine.reasons
    torch.testing.assert_close(got.norms, want.norms, rtol=1e-9, atol=0)
    assert (got.clip_factors < 1).all()
    # Relative to the whole sum: some parameters' exact gradient is 0 (rounding noise only).
    scale = max(float(v.abs().max()) for v in want.private.values())
    for key, value in want.private.items():
        torch.testing.assert_close(got.private[key], value, rtol=1e-9, atol=1e-9 * scale)


def test_parameters_keep_their_names_under_model():
    model = from_huggingface(videomae())
    assert isinstance(model, HuggingFaceVideo) and model.keyword == "pixel_values"
    names = {f"model.{n}" for n, _ in videomae().named_parameters()}
    assert {n for n, _ in model.named_parameters()} == names


def test_a_base_model_without_logits_is_refused_by_name():
    base = from_huggingface(transformers.VideoMAEModel(videomae().config))
    with pytest.raises(InvalidInputError, match="VideoMAEModel returned no .logits"):
        base(torch.zeros(1, 3, 4, 16, 16))


def test_a_module_that_is_not_a_video_classifier_is_refused():
    with pytest.raises(InvalidInputError, match="Linear.forward takes none of"):
        from_huggingface(nn.Linear(2, 2))
    with pytest.raises(InvalidInputError, match="must be a torch.nn.Module"):
        from_huggingface("videomae")  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match=r"clips must be \(N, C, T, H, W\)"):
        from_huggingface(videomae())(torch.zeros(3, 4, 16, 16))
