"""Crash safety of ``maskdp train``: SIGKILL at random moments, then ``--resume``.

Each trial starts ``python -m maskdp.cli.app train`` in a subprocess and kills it with SIGKILL
after a random delay (from launch, or from the moment its ``config.json`` appears, so that
kills land during training and checkpoint writes too). Every time:

- the run directory holds nothing yet, or ``config.json`` alone (then ``--resume`` starts
  from step 0), or a checkpoint of a whole number of saved steps that loads with
  ``weights_only=True`` and whose ledger counts exactly its steps; every target file parses
  (strict JSON, ``torch.load``), never a torn file; at most hidden ``.NAME.*.tmp``
  temporaries are left, and the resumed run removes them;
- after resuming (or starting afresh when nothing was written), the run finishes with the
  uninterrupted run's step count, ledger and epsilon exactly (accounting is deterministic),
  and no file holds a seed or generator state that would replay the noise. The weights are
  *not* the uninterrupted run's: noise and sampling draw secret OS entropy, so a resumed
  run draws fresh batches and noise (as the uninterrupted run did), never a replay.

The killed process is a real subprocess; the reference and the resumed runs go through
the same CLI in-process (``maskdp.accounting.cli.run``) to save interpreter start-ups. The default
tier runs 3 trials, the slow tier 24.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from maskdp.accounting.cli import run
from maskdp.accounting.ledger import PrivacyLedger

from maskdp.cli.app import app
from maskdp.trainer.config import TrainConfig
from maskdp.trainer.run import CHECKPOINT, CONFIG, METRICS

OPTIONS = [
    "--train-size", "32", "--test-size", "16", "--epochs", "2", "--batch-size", "8",
    "--frames", "4", "--image-size", "16", "--noise-multiplier", "1.0",
    "--public-epochs", "0", "--no-progress", "--json",
]  # fmt: skip
TOTAL_STEPS = 8  # ceil(epochs / q) with q = 8 / 32
SAVED_STEPS = {4, 8}  # a checkpoint about every epoch (1 / q = 4 steps) and at the end
TARGETS = (CONFIG, CHECKPOINT, METRICS)
# What a MaskDPOptimizer checkpoint holds: no randomness state (secret randomness has none).
OPTIMIZER_KEYS = {"format", "version", "optimizer", "ledger", "steps", "noiseless_steps"}
# Metrics that are a function of the config and the step count alone (not of the draws).
DETERMINISTIC_METRICS = (
    "mode", "epsilon", "delta", "steps", "private_steps", "noise_multiplier", "sample_rate",
)  # fmt: skip


def cli(*args: str) -> int:
    return run(app, ["train", *args])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    """The uninterrupted run."""
    root = tmp_path_factory.mktemp("reference")
    torch.set_num_threads(1)
    assert cli("--run-dir", str(root / "run"), *OPTIONS) == 0
    return {**summary(root / "run"), "dir": root / "run"}


def load_checkpoint(run_dir: Path) -> dict:
    """The checkpoint, loaded without unpickling code (tensors and plain types only)."""
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)


def summary(run_dir: Path) -> dict:
    state = load_checkpoint(run_dir)
    metrics = strict_json(run_dir / METRICS)
    return {
        "step": state["extra"]["step"],
        "model": state["model"],
        "ledger": state["optimizer"]["ledger"],
        "optimizer_keys": set(state["optimizer"]),
        "checkpoint_keys": set(state),
        "config": strict_json(run_dir / CONFIG),
        "metrics": metrics,
    }


def assert_consistent(state: dict) -> None:
    """A checkpoint's optimizer counts exactly its steps (all private here) in its ledger."""
    optimizer = state["optimizer"]
    assert set(optimizer) == OPTIMIZER_KEYS, sorted(optimizer)  # nothing to replay noise with
    assert optimizer["steps"] == state["extra"]["step"]
    assert PrivacyLedger.from_dict(optimizer["ledger"]).steps == state["extra"]["step"]


def strict_json(path: Path) -> object:
    def refuse(token: str) -> None:
        raise ValueError(f"{path.name} holds {token}")

    return json.loads(path.read_text(), parse_constant=refuse)


def inspect(run_dir: Path) -> str:
    """Check what a killed run left; return its state: nothing, config, step-k, done."""
    if not run_dir.exists():
        return "nothing"
    names = {p.name for p in run_dir.iterdir()}
    stray = {n for n in names - set(TARGETS) if not (n.startswith(".") and n.endswith(".tmp"))}
    assert not stray, f"unexpected files {stray}"
    if CONFIG not in names:
        assert not names & {CHECKPOINT, METRICS}, names  # config.json is written first
        return "nothing"
    assert isinstance(strict_json(run_dir / CONFIG), dict)
    if CHECKPOINT not in names:
        assert METRICS not in names
        return "config"
    state = load_checkpoint(run_dir)
    assert state["format"] == "maskdp-checkpoint" and state["extra"]["step"] in SAVED_STEPS
    assert_consistent(state)
    if METRICS in names:
        assert state["extra"]["step"] == TOTAL_STEPS
        assert strict_json(run_dir / METRICS)["steps"] == TOTAL_STEPS
        return "done"
    return f"step-{state['extra']['step']}"


def launch(run_dir: Path) -> subprocess.Popen:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "maskdp.cli.app", "train", "--run-dir", str(run_dir), *OPTIONS],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        env=env,
    )


def kill_at_random(procs: list[tuple[subprocess.Popen, Path, random.Random]]) -> None:
    """Kill each process after its own random delay; half of them count from config.json."""
    plans = []
    start = time.monotonic()
    for proc, run_dir, rng in procs:
        from_config = rng.random() < 0.5
        delay = rng.uniform(0.0, 2.0) if from_config else rng.uniform(0.0, 15.0)
        plans.append([proc, run_dir, from_config, delay, None])
    while any(plan[0].poll() is None for plan in plans):
        now = time.monotonic()
        for plan in plans:
            proc, run_dir, from_config, delay, origin = plan
            if proc.poll() is not None:
                continue
            if origin is None:
                if not from_config:
                    plan[4] = origin = start
                elif (run_dir / CONFIG).exists():
                    plan[4] = origin = now
            if origin is not None and now - origin >= delay:
                proc.send_signal(signal.SIGKILL)
        time.sleep(0.01)
    for proc, *_ in plans:
        stderr = proc.stderr.read().decode()
        proc.stderr.close()
        assert proc.returncode in (0, -signal.SIGKILL), stderr[-2000:]


def recover_and_compare(run_dir: Path, reference: dict) -> str:
    state = inspect(run_dir)
    if run_dir.exists() and any(p.name.endswith(".tmp") for p in run_dir.iterdir()):
        state += "+tmp"  # killed mid-write: a temporary, never a torn target
    if state.startswith("nothing"):
        assert cli("--run-dir", str(run_dir), *OPTIONS) == 0
    else:
        assert cli("--run-dir", str(run_dir), "--resume", *OPTIONS) == 0
    assert sorted(p.name for p in run_dir.iterdir()) == sorted(TARGETS)  # temporaries gone
    got = summary(run_dir)
    assert got["step"] == reference["step"] == TOTAL_STEPS
    assert_consistent(load_checkpoint(run_dir))
    # Accounting is deterministic: the same ledger and epsilon, bit for bit.
    assert got["ledger"] == reference["ledger"]
    for key in DETERMINISTIC_METRICS:
        assert got["metrics"][key] == reference["metrics"][key], (state, key)
    assert got["metrics"]["steps"] == TOTAL_STEPS
    # No file holds anything that replays the noise or the sampling.
    assert got["optimizer_keys"] == reference["optimizer_keys"] == OPTIMIZER_KEYS
    assert got["checkpoint_keys"] == reference["checkpoint_keys"]
    assert not [k for k in got["metrics"] if "seed" in k or "generator" in k]
    assert set(got["config"]) == set(TrainConfig.model_fields)  # the options, nothing else
    assert got["config"] == reference["config"]
    # Whole, finite weights of the right shapes; fresh secret draws, so not the reference's.
    assert got["model"].keys() == reference["model"].keys()
    for name, value in reference["model"].items():
        assert got["model"][name].shape == value.shape, name
        assert torch.isfinite(got["model"][name]).all(), (state, name)
    assert any(not torch.equal(got["model"][n], v) for n, v in reference["model"].items())
    return state


def trials(tmp_path: Path, reference: dict, seeds: list[int], parallel: int) -> list[str]:
    states = []
    for first in range(0, len(seeds), parallel):
        batch = seeds[first : first + parallel]
        procs = []
        for seed in batch:
            run_dir = tmp_path / f"trial-{seed}"
            procs.append((launch(run_dir), run_dir, random.Random(seed)))
        kill_at_random(procs)
        states += [recover_and_compare(run_dir, reference) for _, run_dir, _ in procs]
    return states


def test_sigkill_then_resume_finishes_with_the_uninterrupted_ledger(
    tmp_path: Path, reference
) -> None:
    states = trials(tmp_path, reference, seeds=[1, 2, 3], parallel=3)
    assert len(states) == 3


@pytest.mark.slow
def test_sigkill_at_24_random_moments(tmp_path: Path, reference) -> None:
    states = trials(tmp_path, reference, seeds=list(range(100, 124)), parallel=4)
    assert len(states) == 24
    print("states after SIGKILL:", sorted(states))


def test_resume_with_config_but_no_checkpoint_starts_from_step_zero(
    tmp_path: Path, reference
) -> None:
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    ref_config = json.loads((reference["dir"] / CONFIG).read_text())
    (run_dir / CONFIG).write_text(json.dumps(ref_config))
    (run_dir / f".{CHECKPOINT}.abc123.tmp").write_bytes(b"torn")  # a killed writer's leftover
    assert inspect(run_dir) == "config"
    assert recover_and_compare(run_dir, reference) == "config+tmp"
