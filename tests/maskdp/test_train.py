"""The ``maskdp train`` main job: run directory, metrics, resume, evaluate, bad input."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from accounting.ledger import PrivacyLedger
from maskdp.errors import InvalidInputError
from maskdp.train import CHECKPOINT, CONFIG, METRICS, Run, evaluate, poisson_indices, train
from maskdp.train_config import build_config

TINY = dict(
    train_size=32,
    test_size=16,
    epochs=1.0,
    batch_size=8,
    frames=4,
    image_size=16,
    public_epochs=0.0,
)


def _cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "maskdp.cli", *args], capture_output=True, text=True, timeout=600
    )


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    config = build_config(**TINY, target_epsilon=1.0)
    metrics = train(config, tmp_path / "run")
    run = tmp_path / "run"
    assert {CONFIG, METRICS, CHECKPOINT} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    stored = json.loads((run / METRICS).read_text())
    assert {"epsilon", "delta", "steps", "accuracy"} <= stored.keys()
    assert stored == metrics
    # steps = ceil(epochs / q) with q = B / N; epsilon is the ledger's for (q, sigma, steps)
    q = config.batch_size / config.train_size
    assert stored["steps"] == math.ceil(config.epochs / q)
    ledger = PrivacyLedger()
    ledger.record(q, stored["noise_multiplier"], stored["steps"])
    assert stored["epsilon"] == pytest.approx(ledger.epsilon(config.delta), rel=1e-12)
    assert stored["epsilon"] <= 1.0  # calibration lands on the safe side
    assert 0.0 <= stored["accuracy"] <= 1.0
    assert json.loads((run / CONFIG).read_text()) == config.to_dict()


def test_resume_after_interruption_equals_an_uninterrupted_run(tmp_path: Path) -> None:
    config = build_config(**{**TINY, "epochs": 2.0}, noise_multiplier=1.0)
    reference = train(config, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_at(step: int, total: int, loss: float, run: Run) -> None:
        if step == 6:  # between checkpoints (every 4 steps): replays steps 5 and 6
            raise Stop

    with pytest.raises(Stop):
        train(config, tmp_path / "cut", on_step=stop_at)
    resumed = train(config, tmp_path / "cut", resume=True)
    for key in ("epsilon", "steps", "accuracy", "noise_multiplier"):
        assert resumed[key] == reference[key]
    whole = torch.load(tmp_path / "whole" / CHECKPOINT, weights_only=False)
    cut = torch.load(tmp_path / "cut" / CHECKPOINT, weights_only=False)
    for name, tensor in whole["model"].items():
        assert torch.equal(tensor, cut["model"][name]), name
    assert whole["optimizer"]["ledger"] == cut["optimizer"]["ledger"]


def test_evaluate_reports_the_stored_run(tmp_path: Path) -> None:
    metrics = train(build_config(**TINY, noise_multiplier=2.0), tmp_path / "run")
    again = evaluate(tmp_path / "run")
    assert again["accuracy"] == metrics["accuracy"]
    assert again["epsilon"] == pytest.approx(metrics["epsilon"], rel=1e-12)


def test_nonprivate_mode_reports_no_epsilon(tmp_path: Path) -> None:
    metrics = train(build_config(**TINY, mode="nonprivate"), tmp_path / "run")
    assert metrics["epsilon"] is None and metrics["delta"] is None


def test_existing_run_directory_is_never_overwritten(tmp_path: Path) -> None:
    config = build_config(**TINY, noise_multiplier=1.0)
    train(config, tmp_path / "run")
    before = (tmp_path / "run" / CHECKPOINT).read_bytes()
    with pytest.raises(InvalidInputError, match="already holds a run"):
        train(config, tmp_path / "run")
    other = build_config(**{**TINY, "lr": 1e-4}, noise_multiplier=1.0)
    with pytest.raises(InvalidInputError, match="options differ"):
        train(other, tmp_path / "run", resume=True)
    assert (tmp_path / "run" / CHECKPOINT).read_bytes() == before


def test_poisson_batches_are_a_function_of_seed_and_step() -> None:
    a = poisson_indices(1000, 0.1, seed=3, step=7)
    assert torch.equal(a, poisson_indices(1000, 0.1, seed=3, step=7))
    assert not torch.equal(a, poisson_indices(1000, 0.1, seed=3, step=8))
    sizes = torch.tensor([len(poisson_indices(1000, 0.1, seed=0, step=s)) for s in range(300)])
    assert abs(sizes.float().mean().item() - 100) < 3  # Binomial(1000, 0.1): sd of mean ~0.55


def test_cli_train_json_and_evaluate(tmp_path: Path) -> None:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    done = _cli("train", "--run-dir", str(tmp_path / "run"), *args, "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert {"epsilon", "delta", "steps", "accuracy"} <= metrics.keys()
    assert metrics["epsilon"] <= 1.0
    shown = _cli("evaluate", str(tmp_path / "run"), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["accuracy"] == metrics["accuracy"]


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "0"], "batch_size"),
        (["--target-epsilon", "nan"], "target_epsilon"),
        (["--target-epsilon", "-1"], "target_epsilon"),
        (["--view", "blur"], "view"),
        (["--mode", "magic"], "mode"),
        (["--target-epsilon", "1", "--noise-multiplier", "1"], "not both"),
        (["--resume"], "--resume needs --run-dir"),
        (["--config", "/nonexistent/config.json"], "does not exist"),
        (["--batch-size", "5000", "--train-size", "100"], "batch_size"),
        (["--engine", "warp"], "engine"),
        (["--device", "quantum"], "--device"),
    ],
)
def test_cli_train_bad_input_exits_2_with_one_line(args: list[str], needle: str) -> None:
    done = _cli("train", "--no-progress", *args)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and needle in lines[0], done.stderr
    assert "Traceback" not in done.stderr


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error without CUDA")
def test_cuda_device_without_cuda_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(InvalidInputError, match="CUDA is not available"):
        train(build_config(**TINY, device="cuda"), tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing written


def test_cli_evaluate_of_a_non_run_directory_exits_2(tmp_path: Path) -> None:
    done = _cli("evaluate", str(tmp_path))
    assert done.returncode == 2
    assert "not a run directory" in done.stderr and "Traceback" not in done.stderr
