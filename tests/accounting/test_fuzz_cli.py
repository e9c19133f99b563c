"""Fuzzing the accounting commands of the ``maskdp`` CLI, and a stress grid of the accountant.

CLI (in process, ``maskdp.accounting.cli.run(maskdp.cli.app.app, argv)``, stdout/stderr captured):
hypothesis draws argument vectors for ``epsilon``, ``noise``, ``steps`` and ``risk``, mixing
plausible values with nan, inf, -0, 1e308, huge integers, unicode digits and words, and
missing, duplicated, unknown and contradictory options. Every run must

- exit with 0 or 2 (never 1, an internal error, never an exception escaping ``run``);
- print no traceback; on exit 2, exactly one line on stderr, starting with ``Error:``
  (warnings are one ``Warning:`` line each);
- print no ``nan``/``inf``/``Infinity`` unless echoing a token the user typed;
- with ``--json`` and exit 0, print exactly one JSON object that a strict parser (no NaN,
  no Infinity) accepts, whose numbers are finite.

About half of the vectors are well formed (their values may still be out of reach), a
third are well-formed vectors with one to three mutations, the rest anything. The PRV
accountant runs only for ``epsilon`` and ``risk`` with explicit step counts (at most 10^3
in the default tier, 10^4 in the slow one; see ``_cheap``): PRV calibration costs about a
second per call and is not what this test is about. Examples cost about 80 ms of CPU on
average (20 ms median), so the default tier runs 300 (derandomized: the same vectors every
run) and the slow tier 2000 fresh ones.

Stress grid: 10^4 settings (q, sigma, steps, delta) over wide log ranges; the RDP of each
(q, sigma) is computed once and scaled by the step count (RDP composes additively). Every
epsilon is finite and >= 0, non-decreasing in steps and in q, non-increasing in sigma, and
equals the ledger's answer on spot checks.
"""

from __future__ import annotations

import contextlib
import io
import json
import math
import os
import re

import numpy as np
import pytest
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from maskdp.accounting.cli import run

from maskdp.cli.app import app

COMMANDS = ("epsilon", "noise", "steps", "risk")
OPTIONS = (
    "--sample-rate", "--steps", "--dataset-size", "--batch-size", "--epochs",
    "--noise-multiplier", "--target-epsilon", "--delta", "--fpr", "--accountant",
    "--conversion", "--relation",
)  # fmt: skip
UNKNOWN = ("--sample_rate", "--foo", "-q", "--", "--steps=", "--delta=0.1", "--json=1", "-")
NONFINITE = re.compile(r"\b(nan|inf|infinity)\b", re.IGNORECASE)

SPECIAL = (
    "nan", "NaN", "-nan", "inf", "-inf", "+inf", "Infinity", "-Infinity", "infinity", "1e308",
    "-1e308", "1e309", "1e-308", "5e-324", "-0", "-0.0", "0", "0.0", "1", "1.0", "-1", "2",
    "0.5", "1e-5", "1e5", "1e12", "1e13", "99999999999999999999999999", "-99999999999999",
    "0x10", "1_000", " 3 ", "", " ", "abc", "1/2", "True", "False", "None", "null",
    "\u0661\u0662", "\U0001d7d9", "1e", "e5", ".", "--", "3.0.0", "10000000000000000000.5",
)  # fmt: skip


def _log_uniform(low: float, high: float) -> st.SearchStrategy[str]:
    return st.floats(math.log10(low), math.log10(high)).map(lambda e: f"{10**e:.6g}")


PLAUSIBLE: dict[str, st.SearchStrategy[str]] = {
    "--sample-rate": st.one_of(_log_uniform(1e-7, 1.0), st.just("1")),
    "--steps": st.one_of(st.integers(1, 1000).map(str), st.integers(1, 10**7).map(str)),
    "--dataset-size": st.integers(1, 10**8).map(str),
    "--batch-size": st.integers(1, 10**4).map(str),
    "--epochs": _log_uniform(1e-4, 1e3),
    "--noise-multiplier": _log_uniform(0.01, 1000.0),
    "--target-epsilon": _log_uniform(1e-4, 1e4),
    "--delta": _log_uniform(1e-300, 0.99),
    "--fpr": _log_uniform(1e-12, 0.999999),
    "--accountant": st.sampled_from(["rdp", "rdp", "rdp", "prv", "all"]),
    "--conversion": st.sampled_from(["hypothesis-test", "classic"]),
    "--relation": st.sampled_from(["erase", "substitute"]),
}
WILD = st.one_of(
    st.sampled_from(SPECIAL),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.integers(-(10**40), 10**40).map(str),
    st.text(max_size=8),
    st.sampled_from(["RDP", "pld", "exact", "replace", "hypothesis_test", "all,rdp", "1e3"]),
)
REQUIRED = {
    "epsilon": ("--noise-multiplier",),
    "noise": ("--target-epsilon",),
    "steps": ("--noise-multiplier", "--target-epsilon"),
    "risk": ("--noise-multiplier", "--fpr"),
}
OPTIONAL = {
    "epsilon": ("--delta", "--accountant", "--conversion", "--relation"),
    "noise": ("--delta", "--accountant", "--conversion", "--relation"),
    "steps": ("--delta", "--accountant", "--conversion", "--relation"),
    "risk": ("--delta", "--accountant"),
}


@st.composite
def valid_argv(draw: st.DrawFn) -> list[str]:
    """A well-formed vector (its values may still be out of reach, e.g. no noise fits)."""
    command = draw(st.sampled_from(COMMANDS))
    pairs: list[tuple[str, str]] = []
    if draw(st.booleans()):
        pairs.append(("--sample-rate", draw(PLAUSIBLE["--sample-rate"])))
    else:
        n = draw(st.integers(1, 10**8))
        pairs += [("--dataset-size", str(n)), ("--batch-size", str(draw(st.integers(1, n))))]
    if command != "steps":
        length = draw(st.sampled_from(["--steps", "--epochs"]))
        pairs.append((length, draw(PLAUSIBLE[length])))
    pairs += [(name, draw(PLAUSIBLE[name])) for name in REQUIRED[command]]
    for name in OPTIONAL[command]:
        if draw(st.booleans()):
            pairs.append((name, draw(PLAUSIBLE[name])))
    if draw(st.booleans()):
        pairs.append(("--json", ""))
    args = [command]
    for name, value in draw(st.permutations(pairs)):
        if name == "--json":
            args.append(name)
        else:
            args += [f"{name}={value}"] if draw(st.integers(0, 4)) == 0 else [name, value]
    return args


@st.composite
def mutated_argv(draw: st.DrawFn) -> list[str]:
    """A valid vector with one to three mutations: wild values, missing, duplicated,
    unknown or contradictory options, a dangling option, another command."""
    args = draw(valid_argv())
    for _ in range(draw(st.integers(1, 3))):
        kind = draw(st.integers(0, 7))
        options = [i for i, a in enumerate(args) if a.startswith("--") and "=" not in a]
        if kind == 0 and options:  # a wild value
            i = draw(st.sampled_from(options))
            if i + 1 < len(args) and args[i] != "--json":
                args[i + 1] = draw(WILD)
        elif kind == 1 and options:  # drop an option and its value
            i = draw(st.sampled_from(options))
            del args[i : i + (1 if args[i] == "--json" else 2)]
        elif kind == 2 and options:  # duplicate an option with another value
            name = args[draw(st.sampled_from(options))]
            args += (
                [name] if name == "--json" else [name, draw(st.one_of(WILD, *PLAUSIBLE.values()))]
            )
        elif kind == 3:  # unknown option
            args.insert(draw(st.integers(1, len(args))), draw(st.sampled_from(UNKNOWN)))
        elif kind == 4:  # contradictory: both forms of a choice
            extra = draw(
                st.sampled_from(
                    [
                        "--sample-rate",
                        "--dataset-size",
                        "--steps",
                        "--epochs",
                        "--batch-size",
                        "--target-epsilon",
                        "--fpr",
                    ]
                )
            )
            args += [extra, draw(PLAUSIBLE[extra])]
        elif kind == 5:  # a dangling option at the end
            args.append(draw(st.sampled_from(OPTIONS)))
        elif kind == 6:  # another (or no, or a wrong) command
            args[0] = draw(st.sampled_from([*COMMANDS, "train-x", "EPSILON", "--json"]))
        else:  # a wild value in --name=value form
            args.append(f"{draw(st.sampled_from(OPTIONS))}={draw(WILD)}")
    return args


@st.composite
def random_argv(draw: st.DrawFn) -> list[str]:
    """Anything: a command (or not) followed by random options and values."""
    command = draw(st.sampled_from([*COMMANDS, "train-x", "", "EPSILON"]))
    args = [command] if command else []
    for _ in range(draw(st.integers(0, 8))):
        kind = draw(st.integers(0, 9))
        if kind == 0:
            args.append(draw(st.sampled_from(UNKNOWN)))
        elif kind == 1:
            args.append("--json")
        elif kind == 2:
            args.append(draw(st.sampled_from(OPTIONS)))
        else:
            option = draw(st.sampled_from(OPTIONS))
            args += [option, draw(st.one_of(PLAUSIBLE[option], WILD))]
    return args


def argv() -> st.SearchStrategy[list[str]]:
    """About half valid vectors, a third mutated ones, the rest anything."""
    return st.one_of(
        valid_argv(), valid_argv(), valid_argv(), mutated_argv(), mutated_argv(), random_argv()
    )


def _option_values(args: list[str], name: str) -> list[str]:
    values = []
    for i, a in enumerate(args):
        if a == name and i + 1 < len(args):
            values.append(args[i + 1])
        elif a.startswith(name + "="):
            values.append(a.partition("=")[2])
    return values


def _cheap(args: list[str], max_prv_steps: float) -> bool:
    """Keep fuzzed PRV runs affordable: the PRV accountant only on ``epsilon`` and ``risk``
    with at most ``max_prv_steps`` explicit steps (PRV calibration costs about a second per
    run and grows with the step count; its cost is not what this test is about)."""
    accountants = _option_values(args, "--accountant")
    if not any(a in ("prv", "all") for a in accountants):
        return True
    if args[:1] not in (["epsilon"], ["risk"]) or _option_values(args, "--epochs"):
        return False
    steps = _option_values(args, "--steps")
    try:
        return bool(steps) and all(float(v) <= max_prv_steps for v in steps)
    except ValueError:
        return True  # an invalid step count fails validation before any accounting


def invoke(args: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(app, args)
    return code, out.getvalue(), err.getvalue()


def _strict(text: str) -> object:
    def refuse(token: str) -> None:
        raise ValueError(f"non-finite JSON constant {token}")

    return json.loads(text, parse_constant=refuse)


def _finite_numbers(obj: object) -> bool:
    if isinstance(obj, float):
        return math.isfinite(obj)
    if isinstance(obj, dict):
        return all(_finite_numbers(v) for v in obj.values())
    if isinstance(obj, list):
        return all(_finite_numbers(v) for v in obj)
    return True


def check(args: list[str]) -> None:
    code, out, err = invoke(args)
    assert code in (0, 2), (args, code, err)
    assert "Traceback" not in out + err, (args, err)
    typed = set(m.lower() for a in args for m in NONFINITE.findall(a))
    for stream in (out, err):
        shown = {m.lower() for m in NONFINITE.findall(stream)}
        assert shown <= typed, (args, stream)
    lines = err.splitlines()
    if not args:  # bare ``maskdp``: click's no_args_is_help prints the help, exit code 2
        assert code == 2 and "Usage" in out and not err, (out, err)
        return
    assert all(line.startswith(("Error: ", "Warning: ")) for line in lines), (args, err)
    if code == 2:
        assert sum(line.startswith("Error: ") for line in lines) == 1, (args, err)
        assert lines[-1].startswith("Error: ")
    else:
        assert not any(line.startswith("Error: ") for line in lines), (args, err)
        json_mode = "--json" in args and "--help" not in args and out.lstrip().startswith("{")
        if json_mode:
            assert out.count("\n") == 1, (args, out)
            parsed = _strict(out)
            assert isinstance(parsed, dict) and _finite_numbers(parsed), (args, out)


_SETTINGS = dict(
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    database=None,
)


@settings(max_examples=300, **_SETTINGS)
@given(argv().filter(lambda a: _cheap(a, 1e3)))
def test_fuzz_cli_exits_0_or_2_with_one_line(args: list[str]) -> None:
    check(args)


# CI gates on a fixed seed so a clean clone passes or fails the same way each time; explore new
# inputs with ``MASKDP_FUZZ_SEED=<n> pytest -m slow tests/accounting/test_fuzz_cli.py``.
FUZZ_SEED = int(os.environ.get("MASKDP_FUZZ_SEED", "20261201"))


@pytest.mark.slow
@seed(FUZZ_SEED)
@settings(max_examples=2000, **{**_SETTINGS, "derandomize": False})
@given(argv().filter(lambda a: _cheap(a, 1e4)))
def test_fuzz_cli_many(args: list[str]) -> None:
    check(args)


@pytest.mark.parametrize(
    "args",
    [
        ["epsilon", "--sample-rate", "nan", "--steps", "10", "--noise-multiplier", "1"],
        ["epsilon", "--sample-rate", "0.01", "--steps", "1e308", "--noise-multiplier", "1"],
        ["epsilon", "--sample-rate", "0.01", "--steps", "10", "--noise-multiplier", "1e-300"],
        ["epsilon", "--sample-rate", "0.01", "--steps", str(10**30), "--noise-multiplier", "1"],
        ["noise", "--sample-rate", "1", "--steps", "1", "--target-epsilon", "1e-300"],
        ["steps", "--sample-rate", "1e-300", "--noise-multiplier", "1e300",
         "--target-epsilon", "1e300"],
        ["risk", "--sample-rate", "1", "--steps", "1", "--noise-multiplier", "1e-3", "--fpr",
         "1e-300"],
        ["risk", "--dataset-size", "1", "--batch-size", "1", "--epochs", "1",
         "--noise-multiplier", "1E-155", "--fpr=0.1"],
        ["epsilon", "--sample-rate", "0.5", "--sample-rate", "0.1", "--steps", "3",
         "--noise-multiplier", "2", "--json"],
        ["epsilon", "--dataset-size", "10", "--batch-size", "11", "--epochs", "1",
         "--noise-multiplier", "1"],
        ["epsilon", "--sample-rate", "0.1", "--dataset-size", "10", "--steps", "1",
         "--noise-multiplier", "1"],
    ],
)  # fmt: skip
def test_edge_vectors(args: list[str]) -> None:
    check(args)


# ------------------------------------------------------------------------- stress grid


def test_stress_grid_of_10k_settings_is_finite_and_monotone() -> None:
    from maskdp.accounting.conversions import rdp_to_epsilon
    from maskdp.accounting.ledger import PrivacyLedger
    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_poisson_gaussian

    qs = np.geomspace(1e-5, 1.0, 10)
    sigmas = np.geomspace(0.3, 50.0, 10)
    steps = np.unique(np.geomspace(1, 1e7, 10).round()).astype(np.int64)
    deltas = np.geomspace(1e-12, 1e-2, 10)
    assert len(qs) * len(sigmas) * len(steps) * len(deltas) >= 10**4
    eps = np.empty((len(qs), len(sigmas), len(steps), len(deltas)))
    for a, q in enumerate(qs):
        for b, sigma in enumerate(sigmas):
            one_step = rdp_poisson_gaussian(float(q), float(sigma), DEFAULT_ORDERS)
            assert np.isfinite(one_step).all() and (one_step >= 0).all(), (q, sigma)
            for c, n in enumerate(steps):
                curve = n * one_step
                for d, delta in enumerate(deltas):
                    eps[a, b, c, d] = rdp_to_epsilon(DEFAULT_ORDERS, curve, float(delta)).epsilon
    assert np.isfinite(eps).all() and (eps >= 0).all()
    slack = 1e-9 * (1 + eps)  # the optimum over orders is exact up to rounding
    assert (np.diff(eps, axis=2) >= -slack[:, :, 1:]).all(), "eps must not decrease in steps"
    assert (np.diff(eps, axis=0) >= -slack[1:]).all(), "eps must not decrease in q"
    assert (np.diff(eps, axis=1) <= slack[:, 1:]).all(), "eps must not increase in sigma"
    assert (np.diff(eps, axis=3) <= slack[:, :, :, 1:]).all(), "eps must not increase in delta"
    rng = np.random.default_rng(0)
    for _ in range(20):  # spot checks against the ledger (the path the library uses)
        a, b, c, d = (rng.integers(n) for n in eps.shape)
        ledger = PrivacyLedger()
        ledger.record(float(qs[a]), float(sigmas[b]), int(steps[c]))
        assert ledger.epsilon(float(deltas[d])) == pytest.approx(eps[a, b, c, d], rel=1e-9)
