"""``PrivacySettings``: one frozen, validated object that every entry point builds or takes."""

from __future__ import annotations

import dataclasses
import math
from fractions import Fraction

import pytest
import torch
from helpers import batch, public_batch, tiny_vit
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

from maskdp.errors import InvalidInputError
from maskdp.mechanism.randomness import InsecureSeededRandomness
from maskdp.mechanism.sampling import epochs_to_steps, steps_per_epoch
from maskdp.mechanism.texture_view import TextureFillView
from maskdp.mechanism.views import FillView
from maskdp.settings import PrivacySettings
from maskdp.training.optimizer import MaskDPOptimizer
from maskdp.training.private import make_private

SEEDED = pytest.mark.filterwarnings("ignore::maskdp.mechanism.randomness.InsecureRandomnessWarning")
BASE = dict(noise_multiplier=1.0, max_grad_norm=1.0, sample_rate=0.1, expected_batch_size=4)


def test_defaults_are_normalised_and_the_object_is_frozen():
    s = PrivacySettings(**BASE)
    assert s.expected_public_batch_size == 4 and isinstance(s.view, TextureFillView)
    assert s.view.seed == 0 and s.engine == "auto" and s.accountant == "rdp"
    assert s.relation == "erase"
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.noise_multiplier = 0.0  # type: ignore[misc]
    t = s.replace(noise_multiplier=2, engine="vmap")
    assert t.noise_multiplier == 2.0 and isinstance(t.noise_multiplier, float)
    assert s.noise_multiplier == 1.0 and t.engine == "vmap"


@pytest.mark.parametrize(
    ("change", "names"),
    [
        ({"noise_multiplier": -1.0}, "noise_multiplier"),
        ({"noise_multiplier": math.nan}, "noise_multiplier"),
        ({"max_grad_norm": 0.0}, "max_grad_norm"),
        ({"sample_rate": 1.5}, "sample_rate"),
        ({"expected_batch_size": 0}, "expected_batch_size"),
        ({"expected_public_batch_size": 2.5}, "expected_public_batch_size"),
        ({"engine": "fast"}, "engine"),
        ({"protect_labels": 1}, "protect_labels"),
        ({"accountant": "gdp"}, "accountant"),
        ({"autocast": torch.float64}, "autocast"),
        ({"private_weight": -0.5}, "private_weight"),
        ({"shrinkage": "lasso"}, "shrinkage"),
        ({"target_epsilon": 1.0}, "target_delta"),
        ({"target_epsilon": -1.0, "target_delta": 1e-5}, "target_epsilon"),
        (
            {"target_epsilon": 1.0, "target_delta": 1e-5, "noise_multiplier": 0.0},
            "noise_multiplier",
        ),
        ({"colour": "red"}, "colour"),
    ],
)
def test_every_bad_setting_is_one_line_naming_it(change, names):
    with pytest.raises(InvalidInputError, match=names) as info:
        PrivacySettings.build(**{**BASE, **change})
    assert "\n" not in str(info.value)


def test_a_missing_required_setting_is_named():
    with pytest.raises(InvalidInputError, match="missing privacy setting 'max_grad_norm'"):
        PrivacySettings.build(noise_multiplier=1.0, sample_rate=0.1, expected_batch_size=4)


@SEEDED
def test_optimizer_from_settings_equals_optimizer_from_keywords():
    """Both spellings build the same mechanism: one step gives the same update."""
    updates = []
    for use_settings in (True, False):
        model = tiny_vit()
        options = dict(**BASE, view=FillView(0.0), engine="reference", private_weight=0.5)
        kw = {"settings": PrivacySettings(**options)} if use_settings else options
        opt = MaskDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            randomness=InsecureSeededRandomness(0),
            **kw,
        )
        opt.backward(*batch(3), public=public_batch(2))
        opt.step()
        updates.append([p.detach().clone() for p in model.parameters()])
        assert opt.noise_multiplier == 1.0 and opt.private_weight == 0.5
    for a, b in zip(*updates, strict=True):
        assert torch.equal(a, b)


def test_settings_and_keywords_together_are_refused():
    model = tiny_vit()
    with pytest.raises(InvalidInputError, match="either settings= or keyword"):
        MaskDPOptimizer(
            torch.optim.SGD(model.parameters(), lr=0.1),
            model=model,
            loss_fn=nn.CrossEntropyLoss(),
            settings=PrivacySettings(**BASE),
            noise_multiplier=2.0,
        )


def test_make_private_refuses_what_the_loader_fixes():
    model = tiny_vit()
    data = torch.utils.data.TensorDataset(*batch(8))
    with pytest.raises(InvalidInputError, match="sample_rate comes from data_loader"):
        make_private(
            model,
            torch.optim.SGD(model.parameters(), lr=0.1),
            torch.utils.data.DataLoader(data, batch_size=2),
            loss_fn=nn.CrossEntropyLoss(),
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            sample_rate=0.5,
        )


@given(st.integers(1, 10_000), st.integers(1, 10_000), st.fractions(0, 20, max_denominator=8))
def test_one_epoch_definition_matches_exact_rationals(batch_size, n, epochs):
    """steps_per_epoch(B/N) = ceil(N/B), epochs_to_steps = ceil(E * ceil(N/B)) (>= 1), in
    exact rational arithmetic, despite the float rate."""
    if batch_size > n or epochs == 0:
        return
    per_epoch = math.ceil(Fraction(n, batch_size))
    assert steps_per_epoch(batch_size / n) == per_epoch
    assert epochs_to_steps(float(epochs), batch_size / n) == max(1, math.ceil(epochs * per_epoch))
