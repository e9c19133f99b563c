"""Unsafe models and bad inputs are refused with typed, one-line errors that say how to fix.

Also the behaviour probe (``probe_model``, ``ModelGuard``): buffers that change in a forward
pass are refused with the module's path, modules that draw random numbers are found (and a
random model with a token-drop view is refused). A non-finite *private* record is not an
error (nothing branches on private content: the record contributes zero); a non-finite
*public* batch is.
"""

from __future__ import annotations

import pytest
import torch
from helpers import random_clips
from torch import nn

from maskdp.engines.probe import ModelGuard, probe_model
from maskdp.engines.validate import validate_model
from maskdp.errors import InvalidInputError, UnsafeModelError, UnsupportedModelError
from maskdp.mechanism.gradient import masked_gradient
from maskdp.mechanism.views import DropView, FillView, ModelInput
from maskdp.models import SmallVideoCNN, VideoViT


def batch(n: int = 2, seed: int = 0):
    return random_clips(n, seed=seed, size=8, p=0.5, classes=2, uniform=True)


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
    if not kw.get("protect_labels"):
        kw.setdefault("public", batch(3, seed=1))
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
    assert out.norms.shape == (2,) and out.public_count == 3


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"mask": torch.zeros(2, 4, 8, 7, dtype=torch.bool)}, "does not match"),
        ({"mask": torch.zeros(1, 4, 8, 8, dtype=torch.bool)}, "does not match"),
        ({"mask": torch.zeros(2, 4, 8, 8)}, "dtype torch.bool"),
        ({"mask": torch.zeros(2, 4, 8, 8, dtype=torch.uint8)}, "dtype torch.bool"),
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
        ({"public": None}, "public term needs its own batch"),
        ({"public": batch(3)[:2]}, "public must be a batch"),
        ({"public": (torch.zeros(3, 3, 4, 8, 8), torch.zeros(3, 4, 8, 8))}, "public must be"),
        ({"public": (*batch(3)[:2], torch.zeros(2, dtype=torch.long))}, "one entry per clip"),
        ({"public": (batch(3)[0], torch.zeros(3, 4, 8, 8), batch(3)[2])}, "dtype torch.bool"),
        ({"public": batch(3), "protect_labels": True}, "no public term"),
        (
            {"public": (torch.full((3, 3, 4, 8, 8), float("nan")), *batch(3)[1:])},
            "public batch gives a non-finite",
        ),
        (
            {"public": (torch.full((3, 3, 4, 8, 8), float("inf")), *batch(3)[1:])},
            "NaN, inf",
        ),
    ],
)
def test_bad_inputs_raise_typed_errors(kwargs, match):
    with pytest.raises(InvalidInputError, match=match) as info:
        call(**kwargs)
    assert "\n" not in str(info.value)  # one-line messages


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_non_finite_private_records_are_not_refused_and_contribute_zero(value):
    """Whether private content is finite must not change what the code does: no error,
    c_i = 0 for those records and a finite private sum equal to that without them."""
    x, mask, y = batch(3)
    mask[:, 0, 0, 0] = True  # every record has a sensitive pixel
    bad = x.clone()
    bad[1] = torch.where(mask[1][None], value, x[1])  # sensitive pixels of record 1 only
    bad[2] = value  # record 2: every pixel, public ones too (its h_i is not finite either)
    fixed = {"engine": "reference", "view": FillView(0.5)}  # the same view of record 0 in both
    out = call(x=bad, mask=mask, y=y, **fixed)
    assert not torch.isfinite(out.norms[1:]).any() and torch.all(out.clip_factors[1:] == 0)
    assert torch.isfinite(out.norms[0]) and out.clip_factors[0] > 0
    alone = call(x=x[:1], mask=mask[:1], y=y[:1], **fixed)
    for name, value_sum in out.private.items():
        assert torch.isfinite(value_sum).all(), name
        torch.testing.assert_close(value_sum, alone.private[name], rtol=1e-5, atol=1e-7)
    assert all(torch.equal(out.public[k], alone.public[k]) for k in out.public)


def test_loss_must_be_per_sample():
    x, mask, y = batch()
    with pytest.raises(InvalidInputError, match="one loss per sample"):
        masked_gradient(
            cnn(), lambda out, t: out.sum(), x, mask, y, max_grad_norm=1.0, engine="reference",
            public=batch(3, seed=1),
        )  # fmt: skip


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


# ----------------------------------------------------------------------- behaviour probe


class RunningMean(nn.Module):
    """A custom layer that keeps a running mean of its input in a buffer (no BatchNorm)."""

    def __init__(self, features: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(features))

    def forward(self, x):
        if self.training:
            self.mean.mul_(0.9).add_(0.1 * x.detach().mean(0))
        return x - self.mean


class WithRunningMean(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.stats = nn.Sequential(RunningMean(4 * 2 * 2 * 2))
        self.head = nn.Linear(4 * 2 * 2 * 2, 2)

    def forward(self, x):
        return self.head(self.stats(self.conv(x).flatten(1)))


class WithDropout(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv3d(3, 4, kernel_size=(2, 4, 4), stride=(2, 4, 4))
        self.block = nn.Sequential(nn.Tanh(), nn.Dropout(0.5))
        self.head = nn.Linear(4 * 2 * 2 * 2, 2)

    def forward(self, x):
        return self.head(self.block(self.conv(x)).flatten(1))


def test_probe_finds_changed_state_and_restores_them():
    torch.manual_seed(0)
    model = WithRunningMean().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    behaviour = probe_model(model, ModelInput(batch()[0]))
    assert behaviour.training and behaviour.random_modules == ()
    assert behaviour.changed_state == ("stats.0.mean",)
    after = model.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before)  # left as it was found


def test_buffer_changing_in_forward_is_refused_with_the_module():
    torch.manual_seed(0)
    model = WithRunningMean().train()
    validate_model(model)  # not a known sample-mixing layer: only the probe finds it
    with pytest.raises(UnsafeModelError, match=r"stats\.0 \(RunningMean\).*mean.*eval") as info:
        call(model, engine="reference")
    assert "\n" not in str(info.value)
    assert torch.equal(model.stats[0].mean, torch.zeros(32))  # the probe restored it
    model.eval()  # the buffer no longer changes: accepted
    out = call(model, engine="reference")
    assert torch.isfinite(out.norms).all()


def test_probe_finds_the_module_that_draws():
    torch.manual_seed(0)
    model = WithDropout().train()
    behaviour = probe_model(model, ModelInput(batch()[0]))
    assert behaviour.random_modules == ("block.1 (Dropout)",)
    assert behaviour.changed_state == ()
    assert probe_model(model.eval(), ModelInput(batch()[0])).random_modules == ()


def test_guard_reports_randomness_and_reprobes_when_the_mode_changes():
    torch.manual_seed(0)
    model = WithDropout().train()
    guard = ModelGuard(model)
    sample = ModelInput(batch()[0])
    assert guard.check(sample) is True
    model.eval()
    assert guard.check(sample) is False
    model.train()
    assert guard.check(sample) is True
    assert guard.check(ModelInput(batch()[0][:0])) is True  # nothing probed: assume random


def vit_with_dropout() -> nn.Module:
    torch.manual_seed(0)
    model = VideoViT(num_classes=2, frames=4, image_size=8, tubelet_size=(2, 4, 4), dim=8,
                     depth=1, heads=2)  # fmt: skip
    model.head = nn.Sequential(nn.Dropout(0.2), model.head)
    return model


def test_random_model_with_a_token_drop_view_is_refused():
    model = vit_with_dropout().train()
    with pytest.raises(UnsafeModelError, match=r"head\.0 \(Dropout\).*dropped tokens"):
        call(model, engine="reference", view=DropView.for_model(model))
    out = call(model, engine="reference", view=FillView(0.0))  # a pixel view is fine
    assert torch.isfinite(out.norms).all()
    model.eval()
    out = call(model, engine="reference", view=DropView.for_model(model))
    assert torch.isfinite(out.norms).all()
