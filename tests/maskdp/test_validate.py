"""Unsafe models and bad inputs are refused with typed, one-line errors that say how to fix."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from maskdp.errors import InvalidInputError, UnsafeModelError, UnsupportedModelError
from maskdp.functional import masked_gradient
from maskdp.models import SmallVideoCNN
from maskdp.validate import validate_model


def batch(n: int = 2):
    gen = torch.Generator().manual_seed(0)
    x = torch.rand(n, 3, 4, 8, 8, generator=gen)
    mask = torch.rand(n, 4, 8, 8, generator=gen) < 0.5
    y = torch.randint(0, 2, (n,), generator=gen)
    return x, mask, y


def cnn() -> nn.Module:
    torch.manual_seed(0)
    return SmallVideoCNN(num_classes=2, width=4)


class WithBatchNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv3d(3, 4, 3), nn.BatchNorm3d(4), nn.ReLU())
        self.head = nn.Linear(4, 2)

    def forward(self, x):
        return self.head(self.features(x).mean((2, 3, 4)))


def call(model=None, x=None, mask=None, y=None, **kw):
    bx, bm, by = batch()
    kw.setdefault("max_grad_norm", 1.0)
    return masked_gradient(
        model if model is not None else cnn(),
        nn.CrossEntropyLoss(),
        bx if x is None else x,
        bm if mask is None else mask,
        by if y is None else y,
        **kw,
    )


def test_batchnorm_is_refused_with_its_path_and_the_fix():
    with pytest.raises(UnsafeModelError, match=r"features\.1 \(BatchNorm3d\).*GroupNorm"):
        validate_model(WithBatchNorm())
    with pytest.raises(UnsafeModelError, match=r"features\.1"):
        call(WithBatchNorm())


def test_instance_norm_with_running_stats_is_refused():
    model = nn.Sequential(nn.Conv3d(3, 2, 1), nn.InstanceNorm3d(2, track_running_stats=True))
    with pytest.raises(UnsafeModelError, match=r"1 \(InstanceNorm3d\).*track_running_stats"):
        validate_model(model)


def test_model_without_trainable_parameters_is_refused():
    model = cnn().requires_grad_(False)
    with pytest.raises(UnsafeModelError, match="no trainable parameters"):
        call(model)


def test_a_safe_model_passes():
    validate_model(cnn())
    out = call(engine="reference")
    assert out.norms.shape == (2,)


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.zeros(2, 4, 8, 7, dtype=torch.bool)}, "does not match"),
        ({"mask": torch.zeros(1, 4, 8, 8, dtype=torch.bool)}, "does not match"),
        ({"mask": torch.zeros(2, 4, 8, 8)}, "dtype torch.bool"),
        ({"mask": torch.zeros(2, 4, 8, 8, dtype=torch.uint8)}, "dtype torch.bool"),
        ({"x": torch.full((2, 3, 4, 8, 8), float("nan"))}, "NaN"),
        ({"x": torch.full((2, 3, 4, 8, 8), float("inf"))}, "NaN or inf"),
        ({"x": torch.zeros(2, 3, 4, 8, 8, dtype=torch.long)}, "floating-point"),
        ({"x": torch.zeros(2, 4, 8, 8)}, r"\(N, C, T, H, W\)"),
        ({"y": torch.zeros(3, dtype=torch.long)}, "one entry per clip"),
        ({"y": [0, 1]}, "targets"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"max_grad_norm": -1.0}, "max_grad_norm"),
        ({"max_grad_norm": float("nan")}, "max_grad_norm"),
        ({"max_grad_norm": float("inf")}, "max_grad_norm"),
        ({"max_grad_norm": True}, "max_grad_norm"),
        ({"max_grad_norm": "1"}, "max_grad_norm"),
        ({"engine": "fastest"}, r"unknown engine 'fastest'.*vmap"),
        ({"present": torch.ones(2)}, "present"),
        ({"present": torch.ones(3, dtype=torch.bool)}, "present"),
        ({"view": 3}, "view must be"),
    ],
)
def test_bad_inputs_raise_typed_errors(kwargs, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        call(**kwargs)
    assert "\n" not in str(info.value)  # one-line messages


def test_loss_must_be_per_sample():
    x, mask, y = batch()
    with pytest.raises(InvalidInputError, match="one loss per sample"):
        masked_gradient(
            cnn(), lambda out, t: out.sum(), x, mask, y, max_grad_norm=1.0, engine="reference"
        )


def test_hooks_engine_refuses_what_it_cannot_do_and_names_the_alternative():
    class MHA(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(3, 8)
            self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
            self.head = nn.Linear(8, 2)

        def forward(self, x):
            tokens = self.proj(x.flatten(2).transpose(1, 2))
            return self.head(self.attn(tokens, tokens, tokens)[0].mean(1))

    with pytest.raises(UnsupportedModelError, match=r"attn.*engine='vmap'"):
        call(MHA(), engine="hooks")
    out = call(MHA(), engine="vmap")
    assert torch.isfinite(out.norms).all()
