"""PrivacyLedger: recording, heterogeneous composition, relations, JSON."""

from __future__ import annotations

import json
import warnings

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from maskdp.accounting.conversions import EpsilonResult, epsilon_from_events
from maskdp.accounting.errors import AccountingError, InvalidParameterError
from maskdp.accounting.events import PoissonGaussianEvent
from maskdp.accounting.ledger import PrivacyLedger
from maskdp.accounting.prv import PRVResult, prv_epsilon
from maskdp.accounting.relations import Relation


def test_record_merges_equal_consecutive_segments():
    ledger = PrivacyLedger()
    ledger.record(0.01, 1.0)
    ledger.record(0.01, 1.0, 4)
    ledger.record(0.02, 1.0, 2)
    ledger.record(0.01, 1.0, 3)
    assert ledger.segments == (
        PoissonGaussianEvent(0.01, 1.0, 5),
        PoissonGaussianEvent(0.02, 1.0, 2),
        PoissonGaussianEvent(0.01, 1.0, 3),
    )
    assert ledger.steps == 10
    assert PrivacyLedger(ledger.segments) == ledger
    assert PrivacyLedger([PoissonGaussianEvent(0.5, 2.0, 1)] * 3).segments == (
        PoissonGaussianEvent(0.5, 2.0, 3),
    )


def test_invalid_record_leaves_the_ledger_untouched():
    ledger = PrivacyLedger([PoissonGaussianEvent(0.01, 1.0, 5)])
    before = ledger.to_json()
    for args in [
        (0.01, 1.0, 0),
        (0.01, float("nan"), 1),
        (1.5, 1.0, 1),
        (0.01, 1.0, 2.0),
        (0.01, 1.0, True),
    ]:
        with pytest.raises(InvalidParameterError):
            ledger.record(*args)
    assert ledger.to_json() == before
    with pytest.raises(AttributeError):
        ledger.segments = ()  # type: ignore[misc]
    with pytest.raises(InvalidParameterError, match="segments"):
        PrivacyLedger([(0.01, 1.0, 5)])  # type: ignore[list-item]


def test_epsilon_matches_the_functional_core():
    ledger = PrivacyLedger()
    ledger.record(0.01, 1.0, 500)
    ledger.record(0.05, 2.0, 100)
    events = list(ledger.segments)
    rdp = ledger.report(1e-5)
    assert isinstance(rdp, EpsilonResult)
    assert rdp == epsilon_from_events(events, 1e-5)
    assert ledger.epsilon(1e-5) == rdp.epsilon
    classic = ledger.epsilon(1e-5, conversion="classic")
    assert classic >= rdp.epsilon
    prv = ledger.report(1e-5, accountant="prv")
    assert isinstance(prv, PRVResult) and prv == prv_epsilon(events, 1e-5)
    assert ledger.epsilon(1e-5, accountant="prv") == prv.epsilon_upper
    assert prv.epsilon_upper < rdp.epsilon


def test_empty_ledger_costs_nothing():
    ledger = PrivacyLedger()
    assert ledger.steps == 0 and ledger.segments == ()
    for accountant in ("rdp", "prv"):
        for relation in ("erase", "substitute"):
            assert ledger.epsilon(1e-5, accountant=accountant, relation=relation) == 0.0


@settings(max_examples=25, deadline=None)
@given(
    q=st.floats(1e-3, 1.0),
    sigma=st.floats(0.5, 20.0),
    steps=st.integers(1, 10_000),
)
def test_substitute_is_never_below_erase(q, sigma, steps):
    ledger = PrivacyLedger([PoissonGaussianEvent(q, sigma, steps)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        erase = ledger.epsilon(1e-5)
        sub = ledger.report(1e-5, relation=Relation.SUBSTITUTE)
    assert sub.epsilon >= erase
    assert sub.delta == 1e-5


def test_substitute_prv():
    ledger = PrivacyLedger([PoissonGaussianEvent(0.02, 1.0, 300)])
    erase = ledger.report(1e-5, accountant="prv")
    sub = ledger.report(1e-5, accountant="prv", relation="substitute")
    assert sub.epsilon_upper >= erase.epsilon_upper
    assert sub.epsilon_lower <= sub.epsilon_estimate <= sub.epsilon_upper
    # PRV is tighter than RDP for the substitute bound too
    assert sub.epsilon_upper <= ledger.epsilon(1e-5, relation="substitute")


segment = st.builds(
    PoissonGaussianEvent,
    st.floats(1e-6, 1.0),
    st.floats(0.3, 1000.0),
    st.integers(1, 10**9),
)


@settings(max_examples=50, deadline=None)
@given(segments=st.lists(segment, max_size=6))
def test_json_round_trip(segments):
    ledger = PrivacyLedger(segments)
    text = ledger.to_json()
    data = json.loads(text)
    assert data["format"] == "maskdp-privacy-ledger" and data["version"] == 1
    back = PrivacyLedger.from_json(text)
    assert back == ledger and back.segments == ledger.segments
    assert PrivacyLedger.from_dict(ledger.to_dict()) == ledger


@settings(max_examples=15, deadline=None)
@given(
    a=st.tuples(st.floats(1e-3, 1.0), st.floats(0.5, 10.0)),
    b=st.tuples(st.floats(1e-3, 1.0), st.floats(0.5, 10.0)),
    n=st.integers(1, 1000),
    m=st.integers(1, 1000),
)
def test_grouping_of_steps_does_not_change_epsilon(a, b, n, m):
    one = PrivacyLedger()
    for _ in range(3):
        one.record(*a, steps=n)
        one.record(*b, steps=m)
    merged = PrivacyLedger([PoissonGaussianEvent(*a, 3 * n), PoissonGaussianEvent(*b, 3 * m)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert one.epsilon(1e-6) == pytest.approx(merged.epsilon(1e-6), rel=1e-12)


def test_copy_is_independent():
    ledger = PrivacyLedger([PoissonGaussianEvent(0.1, 1.0, 2)])
    clone = ledger.copy()
    clone.record(0.2, 1.0)
    assert ledger != clone and ledger.steps == 2 and clone.steps == 3
    assert ledger != "ledger"
    with pytest.raises(TypeError):
        hash(ledger)


@pytest.mark.parametrize(
    "text",
    [
        "",
        "{",
        "[]",
        "null",
        '{"format": "other", "version": 1, "segments": []}',
        '{"format": "maskdp-privacy-ledger", "version": 2, "segments": []}',
        '{"format": "maskdp-privacy-ledger", "version": 1, "segments": {}}',
        '{"format": "maskdp-privacy-ledger", "version": 1, "segments": [1]}',
        '{"format": "maskdp-privacy-ledger", "version": 1, "segments": [{"sample_rate": NaN, "noise_multiplier": 1}]}',
        '{"format": "maskdp-privacy-ledger", "version": 1, "segments": [{"sample_rate": 0.1, "noise_multiplier": 1, "steps": 1.5}]}',
        '{"format": "maskdp-privacy-ledger", "version": 1, "segments": [{"sample_rate": 2, "noise_multiplier": 1}]}',
    ],
)
def test_corrupt_json_raises_accounting_error(text):
    with pytest.raises(AccountingError):
        PrivacyLedger.from_json(text)


def test_bad_query_arguments():
    ledger = PrivacyLedger([PoissonGaussianEvent(0.1, 1.0, 2)])
    with pytest.raises(InvalidParameterError, match="delta"):
        ledger.epsilon(0.0)
    with pytest.raises(InvalidParameterError, match="accountant"):
        ledger.epsilon(1e-5, accountant="gdp")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="conversion"):
        ledger.epsilon(1e-5, conversion="bbghs")  # type: ignore[arg-type]
    with pytest.raises(InvalidParameterError, match="relation"):
        ledger.epsilon(1e-5, relation="replace")


def test_every_name_of_choices_has_one_implementation():
    """The names are spelled once (maskdp.accounting.choices); the dispatch tables match."""
    from maskdp.accounting import api, choices, ledger, relations

    assert ledger.ACCOUNTANTS is choices.ACCOUNTANTS
    assert tuple(ledger._ACCOUNTANTS) == choices.ACCOUNTANTS
    assert tuple(api._READERS) == choices.ACCOUNTANTS
    assert tuple(r.value for r in relations.Relation) == choices.RELATIONS
