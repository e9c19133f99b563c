"""PoissonGaussianEvent: an invalid event never exists; merge_events combines equal ones."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
from maskdp.accounting.errors import InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent, merge_events

BAD_FLOATS = [float("nan"), float("inf"), -float("inf"), 0.0, -1.0, True, None, "0.5"]


def test_valid_event_and_round_trip():
    e = PoissonGaussianEvent(0.01, 1.1, 10)
    assert e.to_dict() == {"sample_rate": 0.01, "noise_multiplier": 1.1, "steps": 10}
    assert PoissonGaussianEvent.from_dict(e.to_dict()) == e
    assert PoissonGaussianEvent(1.0, 1000.0).steps == 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        e.steps = 3  # type: ignore[misc]


def test_numpy_scalars_are_normalised():
    e = PoissonGaussianEvent(np.float32(0.5), np.float64(2.0), np.int64(7))
    assert type(e.sample_rate) is float and type(e.steps) is int
    assert e == PoissonGaussianEvent(0.5, 2.0, 7) and hash(e) == hash(
        PoissonGaussianEvent(0.5, 2.0, 7)
    )


@pytest.mark.parametrize("q", [*BAD_FLOATS, 1.0000001, 2.0])
def test_bad_sample_rate(q):
    with pytest.raises(InvalidParameterError, match=r"sample_rate must be a number in \(0, 1\]"):
        PoissonGaussianEvent(q, 1.0, 1)


@pytest.mark.parametrize("sigma", BAD_FLOATS)
def test_bad_noise_multiplier(sigma):
    with pytest.raises(InvalidParameterError, match="noise_multiplier must be a finite number > 0"):
        PoissonGaussianEvent(0.1, sigma, 1)


@pytest.mark.parametrize("steps", [0, -1, 1.0, 2.5, True, False, "3", None, float("nan")])
def test_bad_steps(steps):
    with pytest.raises(InvalidParameterError, match="steps must be an integer >= 1"):
        PoissonGaussianEvent(0.1, 1.0, steps)


def test_message_names_the_value():
    with pytest.raises(InvalidParameterError) as info:
        PoissonGaussianEvent(0.1, float("nan"), 1)
    assert str(info.value) == "noise_multiplier must be a finite number > 0, got nan"


def test_from_dict_validates():
    with pytest.raises(InvalidParameterError, match="missing"):
        PoissonGaussianEvent.from_dict({"sample_rate": 0.1})
    with pytest.raises(InvalidParameterError, match="unexpected"):
        PoissonGaussianEvent.from_dict({"sample_rate": 0.1, "noise_multiplier": 1.0, "sigma": 2})
    with pytest.raises(InvalidParameterError, match="dict"):
        PoissonGaussianEvent.from_dict([0.1, 1.0])  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="steps"):
        PoissonGaussianEvent.from_dict({"sample_rate": 0.1, "noise_multiplier": 1.0, "steps": 1.5})


A, B = (0.01, 1.0), (0.02, 0.8)


def test_merge_events_sums_equal_mechanisms_in_first_seen_order():
    events = [PoissonGaussianEvent(*A, 2), PoissonGaussianEvent(*B, 3), PoissonGaussianEvent(*A, 4)]
    assert merge_events(events) == (PoissonGaussianEvent(*A, 6), PoissonGaussianEvent(*B, 3))
    assert merge_events(iter(events)) == merge_events(events)
    assert merge_events([]) == ()


def test_merge_events_adjacent_only_keeps_the_history_order():
    events = [
        PoissonGaussianEvent(*A, 2),
        PoissonGaussianEvent(*A, 1),
        PoissonGaussianEvent(*B, 3),
        PoissonGaussianEvent(*A, 4),
    ]
    assert merge_events(events, adjacent_only=True) == (
        PoissonGaussianEvent(*A, 3),
        PoissonGaussianEvent(*B, 3),
        PoissonGaussianEvent(*A, 4),
    )


def test_merge_events_rejects_other_objects_naming_the_sequence():
    with pytest.raises(InvalidParameterError, match="events must be PoissonGaussianEvent"):
        merge_events([PoissonGaussianEvent(*A), (0.01, 1.0, 1)])  # type: ignore[list-item]
    with pytest.raises(InvalidParameterError, match="segments must be PoissonGaussianEvent"):
        merge_events([{"sample_rate": 0.1}], name="segments")  # type: ignore[list-item]
