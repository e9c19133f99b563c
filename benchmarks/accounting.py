"""Accounting benchmark: MaskDP's accountants side by side with Opacus and dp_accounting.

One run measures, on one pinned thread:

1. time per epsilon query: ours (RDP) vs Opacus ``RDPAccountant`` vs dp_accounting
   ``RdpAccountant``; ours (PRV) vs Opacus ``PRVAccountant``;
2. cold-start wall time of ``maskdp epsilon --accountant rdp`` vs prv-accountant's
   ``compute-dp-epsilon`` (median of several subprocess runs);
3. calibration time (noise multiplier for a target epsilon), ours vs Opacus;
4. tightness of our accountants against dp_accounting's PLD accountant on a fixed grid
   (ratio to the PLD epsilon; goal: PRV upper within 1% of PLD everywhere);
5. the substitute relation: ours (PRV and RDP of the antipodal pair) against dp_accounting's
   REPLACE_ONE PLD and the group-privacy bound we reported before;
6. long runs: PRV at 10^6 and 10^7 steps (time and peak memory), against dp_accounting's PLD.

Usage::

    python benchmarks/accounting.py                                # print the tables
    python benchmarks/accounting.py --write benchmarks/RESULTS.md  # and replace its section
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from importlib.metadata import version
from pathlib import Path

import _common

# This file is named like the package it measures: setup() puts the repository root, not
# this folder, first on the import path, so that ``import accounting`` finds the package.
_common.setup()  # before torch: one thread; the repository's packages first

from results_file import replace_section  # noqa: E402

SECTION = "## Accounting"
DELTA = 1e-5
Q, SIGMA, STEPS = 0.01, 1.1, 1000
TARGET_EPSILON = 2.0
PYCACHE = tempfile.mkdtemp(prefix="maskdp-bench-pycache-")  # bytecode of the child processes

# (q, sigma, steps, delta): a fixed grid spanning the usual DP-SGD regimes.
GRID: tuple[tuple[float, float, int, float], ...] = (
    (0.01, 1.1, 1000, 1e-5),
    (0.001, 1.0, 10000, 1e-5),
    (0.004, 0.8, 2500, 1e-5),
    (0.02, 0.7, 500, 1e-5),
    (0.1, 2.0, 100, 1e-5),
    (1.0, 5.0, 10, 1e-5),
    (0.01, 3.0, 10000, 1e-6),
    (0.05, 1.5, 200, 1e-6),
    (0.0256, 1.0, 391, 1e-5),
    (0.002, 0.9, 50000, 1e-6),
)


def per_call(fn: Callable[[], object], *, budget: float = 0.5, max_calls: int = 2000) -> float:
    """Median CPU seconds per call after one warm-up call (at least 5 calls, ~``budget`` s).

    CPU time of this (single-threaded) process rather than wall time, so that other jobs on
    a shared machine do not inflate the numbers.
    """
    fn()
    times: list[float] = []
    start = time.process_time()
    while len(times) < 5 or (time.process_time() - start < budget and len(times) < max_calls):
        t0 = time.process_time()
        fn()
        times.append(time.process_time() - t0)
    return statistics.median(times)


def once(fn: Callable[[], float]) -> tuple[float, float]:
    """``(fn(), CPU seconds it took)``."""
    t0 = time.process_time()
    value = fn()
    return value, time.process_time() - t0


def wall(cmd: list[str], *, runs: int = 7) -> tuple[float, float]:
    """Median wall and median CPU (user + sys) seconds of a subprocess, after a warm-up run."""
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "PYTHONPYCACHEPREFIX": PYCACHE}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # an installed package has its bytecode cached
    subprocess.run(cmd, capture_output=True, check=True, env=env)
    walls, cpus = [], []
    for _ in range(runs):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        subprocess.run(cmd, capture_output=True, check=True, env=env)
        walls.append(time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpus.append(after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
    return statistics.median(walls), statistics.median(cpus)


def ms(seconds: float) -> str:
    return f"{seconds * 1e3:.2f}" if seconds < 1 else f"{seconds * 1e3:.0f}"


def table(header: tuple[str, ...], rows: list[tuple[str, ...]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


# --- 1. query time --------------------------------------------------------------------------


def query_times() -> str:
    import torch
    from dp_accounting import dp_event
    from dp_accounting.rdp import rdp_privacy_accountant
    from maskdp.accounting.conversions import epsilon_from_events
    from maskdp.accounting.events import PoissonGaussianEvent
    from maskdp.accounting.prv import prv_epsilon
    from opacus.accountants import PRVAccountant, RDPAccountant

    torch.set_num_threads(1)
    events = [PoissonGaussianEvent(Q, SIGMA, STEPS)]

    def ours_rdp() -> float:
        return epsilon_from_events(events, DELTA).epsilon

    def opacus_rdp() -> float:
        acc = RDPAccountant()
        acc.history = [(SIGMA, Q, STEPS)]
        return acc.get_epsilon(DELTA)

    def dpa_rdp() -> float:
        acc = rdp_privacy_accountant.RdpAccountant()
        acc.compose(dp_event.PoissonSampledDpEvent(Q, dp_event.GaussianDpEvent(SIGMA)), STEPS)
        return acc.get_epsilon(DELTA)

    def ours_prv() -> float:
        return prv_epsilon(events, DELTA, eps_error=0.01).epsilon_upper

    def ours_prv_substitute() -> float:
        return prv_epsilon(events, DELTA, eps_error=0.01, relation="substitute").epsilon_upper

    def opacus_prv() -> float:
        acc = PRVAccountant()
        acc.history = [(SIGMA, Q, STEPS)]
        return acc.get_epsilon(DELTA, eps_error=0.01)

    cases = [
        ("RDP", "ours (`epsilon_from_events`)", ours_rdp),
        ("RDP", "Opacus `RDPAccountant`", opacus_rdp),
        ("RDP", "dp_accounting `RdpAccountant`", dpa_rdp),
        ("PRV (eps_error 0.01)", "ours (`prv_epsilon`, upper)", ours_prv),
        ("PRV (eps_error 0.01)", "Opacus `PRVAccountant`", opacus_prv),
        ("PRV substitute (eps_error 0.01)", "ours (`prv_epsilon`, upper)", ours_prv_substitute),
        (
            "PRV substitute (eps_error 0.01)",
            "dp_accounting REPLACE_ONE PLD (1e-3)",
            lambda: _replace_one_pld(Q, SIGMA, STEPS, 1e-3),
        ),
    ]
    timed = [(kind, who, fn(), per_call(fn)) for kind, who, fn in cases]
    base = {kind: t for kind, who, _, t in timed if who.startswith("ours")}
    rows = [
        (kind, who, f"{eps:.4f}", ms(t), f"{t / base[kind]:.2f}x") for kind, who, eps, t in timed
    ]
    return (
        f"Time per epsilon query (q={Q}, sigma={SIGMA}, steps={STEPS}, delta={DELTA:g}): "
        "median CPU time over repeated calls, one thread:\n\n"
        + table(("accountant", "implementation", "epsilon", "CPU ms / query", "vs ours"), rows)
    )


# --- 2. cold start --------------------------------------------------------------------------


def cold_start() -> str:
    bindir = Path(sys.executable).parent
    maskdp = shutil.which("maskdp", path=str(bindir)) or "maskdp"
    prv_cli = shutil.which("compute-dp-epsilon", path=str(bindir)) or "compute-dp-epsilon"
    common = ["--sample-rate", str(Q), "--steps", str(STEPS), "--noise-multiplier", str(SIGMA)]
    cases = [
        ("`maskdp epsilon --accountant rdp`", [maskdp, "epsilon", *common, "--accountant", "rdp"]),
        ("`maskdp epsilon --accountant rdp --json`", [maskdp, "epsilon", *common, "--json"]),
        ("`maskdp epsilon --accountant prv`", [maskdp, "epsilon", *common, "--accountant", "prv"]),
        (
            "`compute-dp-epsilon` (prv-accountant)",
            [prv_cli, "-p", str(Q), "-s", str(SIGMA), "-i", str(STEPS), "-d", str(DELTA)],
        ),
        ("`python -c pass` (interpreter floor)", [sys.executable, "-c", "pass"]),
    ]
    timed = [(name, *wall(cmd)) for name, cmd in cases]
    ours = timed[0][1]
    rows = [(name, f"{w:.3f}", f"{c:.3f}", f"{w / ours:.2f}x") for name, w, c in timed]
    return (
        "Cold start of one epsilon query from a fresh interpreter (median of 7 runs after one "
        "warm-up run that caches bytecode, as an installed package has it; CPU = user + sys of "
        "the child, which load from other jobs inflates less than wall time):\n\n"
        + table(("command", "wall s", "CPU s", "wall vs `maskdp epsilon`"), rows)
    )


# --- 3. calibration -------------------------------------------------------------------------


def calibration() -> str:
    from maskdp.accounting.calibration import calibrate_noise
    from maskdp.accounting.ledger import PrivacyLedger
    from opacus.accountants.utils import get_noise_multiplier

    def ours(accountant: str) -> Callable[[], float]:
        return lambda: calibrate_noise(
            TARGET_EPSILON, DELTA, sample_rate=Q, steps=STEPS, accountant=accountant
        )

    def opacus(accountant: str) -> Callable[[], float]:
        return lambda: get_noise_multiplier(
            target_epsilon=TARGET_EPSILON,
            target_delta=DELTA,
            sample_rate=Q,
            steps=STEPS,
            accountant=accountant,
        )

    def achieved(sigma: float, accountant: str) -> float:
        ledger = PrivacyLedger()
        ledger.record(Q, sigma, steps=STEPS)
        return ledger.epsilon(DELTA, accountant=accountant)

    cases = [
        ("RDP", "ours (`calibrate_noise`, tolerance 1e-3)", "rdp", ours("rdp")),
        ("RDP", "Opacus `get_noise_multiplier` (tolerance 0.01)", "rdp", opacus("rdp")),
        ("PRV", "ours (`calibrate_noise`, tolerance 1e-3)", "prv", ours("prv")),
        ("PRV", "Opacus `get_noise_multiplier` (tolerance 0.01)", "prv", opacus("prv")),
    ]
    rows = []
    for kind, who, accountant, fn in cases:
        sigma, seconds = once(fn)
        eps = achieved(sigma, accountant)
        rows.append((kind, who, f"{sigma:.4f}", f"{eps:.4f}", ms(seconds)))
    return (
        f"Calibration: noise multiplier for epsilon <= {TARGET_EPSILON} (q={Q}, steps={STEPS}, "
        f"delta={DELTA:g}); achieved epsilon measured with our accountant of the same kind "
        "(PRV: upper bound):\n\n"
        + table(("accountant", "implementation", "sigma", "achieved epsilon", "CPU ms"), rows)
    )


# --- 4. tightness ---------------------------------------------------------------------------


def tightness() -> tuple[str, bool]:
    from dp_accounting import dp_event
    from dp_accounting.pld import pld_privacy_accountant
    from maskdp.accounting.conversions import epsilon_from_events
    from maskdp.accounting.events import PoissonGaussianEvent
    from maskdp.accounting.prv import prv_epsilon

    rows = []
    all_ok = True
    for q, sigma, steps, delta in GRID:
        pld = pld_privacy_accountant.PLDAccountant(value_discretization_interval=1e-4)
        pld.compose(dp_event.PoissonSampledDpEvent(q, dp_event.GaussianDpEvent(sigma)), steps)
        reference = pld.get_epsilon(delta)
        events = [PoissonGaussianEvent(q, sigma, steps)]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ht = epsilon_from_events(events, delta).epsilon
            classic = epsilon_from_events(events, delta, conversion="classic").epsilon
        prv = prv_epsilon(events, delta)
        fixed = prv_epsilon(events, delta, eps_error=0.01)  # prv-accountant's usual setting
        ok = prv.epsilon_upper <= 1.01 * reference
        all_ok &= ok
        rows.append(
            (
                f"{q:g}",
                f"{sigma:g}",
                f"{steps}",
                f"{delta:g}",
                f"{reference:.4f}",
                f"{ht / reference:.3f}",
                f"{classic / reference:.3f}",
                f"{prv.epsilon_upper / reference:.4f}",
                f"{prv.epsilon_lower / reference:.4f}",
                "yes" if ok else "**no**",
                f"{fixed.epsilon_upper / reference:.4f}",
            )
        )
    header = (
        "q",
        "sigma",
        "steps",
        "delta",
        "PLD eps",
        "RDP hyp.-test / PLD",
        "RDP classic / PLD",
        "PRV upper / PLD",
        "PRV lower / PLD",
        "PRV upper within 1%",
        "PRV upper, fixed eps_error 0.01 / PLD",
    )
    text = (
        "Tightness against dp_accounting's PLD accountant (pessimistic, discretisation 1e-4); "
        "ratios of our epsilon to the PLD epsilon. PRV runs with its default eps_error "
        "(0.4% of the RDP epsilon, at least 0.002: what `maskdp epsilon "
        "--accountant prv` uses) and, in the last column, with a fixed absolute eps_error "
        "of 0.01:\n\n" + table(header, rows)
    )
    return text, all_ok


# --- 5. substitute -------------------------------------------------------------------------

SUBSTITUTE_GRID: tuple[tuple[float, float, int], ...] = (
    (0.01, 1.1, 1000),
    (0.0625, 3.12, 128),
    (0.004, 0.8, 2500),
    (0.05, 1.5, 200),
    (0.001, 1.0, 5000),
)


def _replace_one_pld(q: float, sigma: float, steps: int, interval: float = 1e-4) -> float:
    from dp_accounting import privacy_accountant
    from dp_accounting.pld import privacy_loss_distribution as pld

    one = pld.from_gaussian_mechanism(
        sigma,
        sampling_prob=q,
        value_discretization_interval=interval,
        neighboring_relation=privacy_accountant.NeighboringRelation.REPLACE_ONE,
    )
    return float(one.self_compose(steps).get_epsilon_for_delta(DELTA))


def substitute() -> tuple[str, bool]:
    from maskdp.accounting.conversions import _minimise
    from maskdp.accounting.events import PoissonGaussianEvent
    from maskdp.accounting.ledger import account
    from maskdp.accounting.prv import prv_epsilon
    from maskdp.accounting.rdp import DEFAULT_ORDERS, rdp_of_events
    from maskdp.accounting.relations import substitute_epsilon

    rows, all_ok = [], True
    for q, sigma, steps in SUBSTITUTE_GRID:
        events = [PoissonGaussianEvent(q, sigma, steps)]
        reference = _replace_one_pld(q, sigma, steps)
        erase = prv_epsilon(events, DELTA).epsilon_upper
        prv, prv_seconds = once(lambda e=events: prv_epsilon(e, DELTA, relation="substitute"))
        rdp = account(events, DELTA, relation="substitute").epsilon
        erase_rdp = rdp_of_events(events, DEFAULT_ORDERS)
        group = substitute_epsilon(
            lambda d, r=erase_rdp: _minimise(DEFAULT_ORDERS, r, d, "hypothesis-test").epsilon,
            DELTA,
        )[0]
        pld_seconds = once(lambda a=(q, sigma, steps): _replace_one_pld(*a))[1]
        ok = prv.epsilon_upper <= 1.01 * reference
        all_ok &= ok
        rows.append(
            (
                f"{q:g}, {sigma:g}, {steps}",
                f"{erase:.3f}",
                f"{reference:.3f}",
                f"{prv.epsilon_upper:.3f} ({prv.epsilon_upper / reference:.4f})",
                f"{rdp:.3f}",
                f"{group:.3f}",
                "yes" if ok else "**no**",
                ms(prv_seconds),
                ms(pld_seconds),
            )
        )
    header = (
        "q, sigma, steps",
        "erase, ours PRV",
        "substitute, dp_accounting REPLACE_ONE PLD",
        "substitute, ours PRV upper (/ PLD)",
        "substitute, ours RDP",
        "group privacy (before)",
        "within 1%",
        "ours PRV CPU ms",
        "PLD CPU ms",
    )
    text = (
        f"Substitute relation at delta = {DELTA:g}: our PRV and RDP of the antipodal pair "
        "against dp_accounting's REPLACE_ONE PLD (pessimistic, discretisation 1e-4), and the "
        "group-privacy bound (RDP, size 2) that `--relation substitute` reported before:\n\n"
        + table(header, rows)
    )
    return text, all_ok


# --- 6. long runs ---------------------------------------------------------------------------


def long_runs() -> str:
    import tracemalloc

    from dp_accounting import privacy_accountant
    from dp_accounting.pld import privacy_loss_distribution as pld
    from maskdp.accounting.events import PoissonGaussianEvent
    from maskdp.accounting.prv import prv_epsilon
    from maskdp.accounting.prv_grid import NODE_BUDGET

    # The case at 10^6 and 10^7 steps (both relations), and a small epsilon at 10^7
    # steps, where the default error grows to fit the node budget (prv_grid.NODE_BUDGET).
    cases = [(0.0005, 1.5, n, name) for n in (10**6, 10**7) for name in ("erase", "substitute")]
    cases.append((0.0001, 2.0, 10**7, "erase"))
    relation = {
        "erase": privacy_accountant.NeighboringRelation.ADD_OR_REMOVE_ONE,
        "substitute": privacy_accountant.NeighboringRelation.REPLACE_ONE,
    }
    rows = []
    for q, sigma, steps, name in cases:
        neighbours = relation[name]
        tracemalloc.start()
        t0, c0 = time.perf_counter(), time.process_time()
        res = prv_epsilon([PoissonGaussianEvent(q, sigma, steps)], DELTA, relation=name)
        wall_s, cpu_s = time.perf_counter() - t0, time.process_time() - c0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        t0 = time.process_time()
        one = pld.from_gaussian_mechanism(
            sigma,
            sampling_prob=q,
            value_discretization_interval=1e-4,
            neighboring_relation=neighbours,
        )
        reference = one.self_compose(steps).get_epsilon_for_delta(DELTA)
        pld_s = time.process_time() - t0
        rows.append(
            (
                f"{q:g}, {sigma:g}, {steps:.0e}",
                name,
                f"{res.epsilon_lower:.4f} / {res.epsilon_upper:.4f}",
                f"{wall_s:.2f}",
                f"{cpu_s:.2f}",
                f"{peak / 2**30:.2f}",
                f"{reference:.4f}",
                f"{pld_s:.2f}",
            )
        )
    header = (
        "q, sigma, steps",
        "relation",
        "ours PRV lower / upper",
        "wall s",
        "CPU s",
        "peak GiB (numpy)",
        "dp_accounting PLD (pessimistic, 1e-4)",
        "PLD CPU s",
    )
    return (
        f"Long runs (delta = {DELTA:g}; our first PRV accountant refused 10^6 steps, its grid "
        "limit): default eps_error (0.4% of epsilon, or wider where that grid would exceed "
        f"{NODE_BUDGET:.3g} nodes), peak memory of numpy arrays (tracemalloc):\n\n"
        + table(header, rows)
    )


# --- report ---------------------------------------------------------------------------------


def environment() -> str:
    packages = ", ".join(
        f"{name} {version(name)}"
        for name in ("numpy", "scipy", "opacus", "prv-accountant", "dp-accounting", "torch")
    )
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"Python {platform.python_version()}, {cpu}, {os.cpu_count()} cores visible, "
        f"1 thread pinned, 1-minute load average {load:.1f} at the start (wall times grow "
        f"with load from other jobs; CPU times much less); {packages}."
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--write", type=Path, help="replace the '## Accounting' section of this file"
    )
    args = parser.parse_args()
    warnings.simplefilter("ignore")  # Opacus' grid-edge notices and friends

    command = "python benchmarks/accounting.py" + (f" --write {args.write}" if args.write else "")
    parts = [
        SECTION,
        f"Produced by `{command}` on {time.strftime('%Y-%m-%d')}. {environment()}",
    ]
    for step in (query_times, cold_start, calibration):
        parts.append(step())
        print(parts[-1] + "\n", flush=True)
    tight, ok = tightness()
    parts.append(tight)
    parts.append(
        "PRV upper within 1% of PLD on every grid point: " + ("**yes**" if ok else "**no**") + "."
    )
    print("\n\n".join(parts[-2:]), flush=True)
    sub, sub_ok = substitute()
    parts.append(sub)
    parts.append(
        "Substitute PRV upper within 1% of the REPLACE_ONE PLD everywhere: "
        + ("**yes**" if sub_ok else "**no**")
        + "."
    )
    print("\n\n".join(parts[-2:]), flush=True)
    parts.append(long_runs())
    print(parts[-1], flush=True)
    body = "\n\n".join(parts) + "\n"
    if args.write:
        replace_section(args.write, SECTION, body)
        print(f"\nwrote the {SECTION!r} section of {args.write}")


if __name__ == "__main__":
    main()
