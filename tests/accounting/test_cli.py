"""The accounting commands of the ``maskdp`` CLI: output, agreement with the API, bad input.

Most cases run in-process through :func:`maskdp.accounting.cli.run` (the same top level as the
console script); a representative subset runs the installed ``maskdp`` script.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest
from maskdp.accounting.api import compute_epsilon, compute_noise, compute_risk, compute_steps
from maskdp.accounting.cli import run

from maskdp.cli.app import app

EPS_ARGS = ["--sample-rate", "0.01", "--steps", "1000", "--noise-multiplier", "1.1"]
PRV_ARGS = ["--sample-rate", "0.1", "--steps", "50", "--noise-multiplier", "2"]  # small PRV grid
SIZE_ARGS = ["--dataset-size", "60000", "--batch-size", "600", "--epochs", "10"]

COMMANDS = {
    "epsilon": EPS_ARGS,
    "noise": ["--sample-rate", "0.01", "--steps", "1000", "--target-epsilon", "2"],
    "steps": ["--sample-rate", "0.01", "--noise-multiplier", "1.0", "--target-epsilon", "2"],
    "risk": [*EPS_ARGS, "--fpr", "0.01"],
}


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = run(app, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def cli_json(capsys: pytest.CaptureFixture[str], *args: str) -> dict:
    code, out, err = cli(capsys, *args, "--json")
    assert code == 0, err
    assert out.endswith("\n") and out.count("\n") == 1  # exactly one line: one object
    data = json.loads(out)
    assert isinstance(data, dict)
    return data


# --- output ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", list(COMMANDS))
def test_human_output_is_a_table(capsys: pytest.CaptureFixture[str], command: str) -> None:
    code, out, err = cli(capsys, command, *COMMANDS[command])
    assert code == 0, err
    assert "rdp" in out and "sample_rate=0.01" in out
    assert err == ""


def test_epsilon_json_matches_api(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "epsilon", *EPS_ARGS)
    expected = compute_epsilon(sample_rate=0.01, steps=1000, noise_multiplier=1.1).to_dict()
    assert data == expected
    for key in ("epsilon", "delta", "order", "accountant", "conversion", "relation"):
        assert key in data
    assert data["delta"] == 1e-5  # the documented default


def test_epsilon_prv_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "epsilon", *PRV_ARGS, "--accountant", "prv", "--delta", "1e-6")
    assert data["accountant"] == "prv" and data["delta"] == 1e-6
    assert data["epsilon_lower"] <= data["epsilon_estimate"] <= data["epsilon"]


def test_epsilon_all_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "epsilon", *PRV_ARGS, "--accountant", "all")
    assert [r["accountant"] for r in data["results"]] == ["rdp", "prv"]
    assert data["epsilon"] == min(r["epsilon"] for r in data["results"])


def test_dataset_form_equals_explicit_form(capsys: pytest.CaptureFixture[str]) -> None:
    by_size = cli_json(capsys, "epsilon", *SIZE_ARGS, "--noise-multiplier", "1.1")
    explicit = cli_json(
        capsys, "epsilon", "--sample-rate", "0.01", "--steps", "1000", "--noise-multiplier", "1.1"
    )
    assert by_size["epsilon"] == explicit["epsilon"]
    assert (by_size["steps"], by_size["sample_rate"]) == (1000, 0.01)


def test_noise_json_is_safe(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "noise", *COMMANDS["noise"], "--conversion", "classic")
    assert (
        data
        == compute_noise(
            sample_rate=0.01, steps=1000, target_epsilon=2, conversion="classic"
        ).to_dict()
    )
    check = cli_json(
        capsys,
        "epsilon",
        "--sample-rate",
        "0.01",
        "--steps",
        "1000",
        "--noise-multiplier",
        repr(data["noise_multiplier"]),
        "--conversion",
        "classic",
    )
    assert check["epsilon"] <= 2.0


def test_steps_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "steps", "--dataset-size", "10000", "--batch-size", "100",
                    "--noise-multiplier", "1.0", "--target-epsilon", "2")  # fmt: skip
    expected = compute_steps(
        dataset_size=10000, batch_size=100, noise_multiplier=1.0, target_epsilon=2
    )
    assert data == expected.to_dict()
    assert data["epochs"] == pytest.approx(data["steps"] / 100)


def test_risk_json(capsys: pytest.CaptureFixture[str]) -> None:
    data = cli_json(capsys, "risk", *COMMANDS["risk"])
    assert (
        data == compute_risk(sample_rate=0.01, steps=1000, noise_multiplier=1.1, fpr=0.01).to_dict()
    )
    assert {"tpr_upper", "fpr", "advantage_upper"} <= set(data)


def test_warning_goes_to_stderr_as_one_line(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(
        capsys, "epsilon", "--dataset-size", "1000", "--batch-size", "10", "--epochs", "1",
        "--noise-multiplier", "1", "--delta", "0.01", "--json",
    )  # fmt: skip
    assert code == 0
    json.loads(out)
    assert err.startswith("Warning: delta=") and err.count("\n") == 1


# --- bad input ------------------------------------------------------------------------------

BAD = [
    (["epsilon", "--sample-rate", "0", "--steps", "10", "--noise-multiplier", "1"], "--sample-rate"),
    (["epsilon", "--sample-rate", "-0.1", "--steps", "10", "--noise-multiplier", "1"], "--sample-rate"),
    (["epsilon", "--sample-rate", "1.5", "--steps", "10", "--noise-multiplier", "1"], "--sample-rate"),
    (["epsilon", "--sample-rate", "nan", "--steps", "10", "--noise-multiplier", "1"], "--sample-rate"),
    (["epsilon", "--sample-rate", "0.1", "--steps", "10", "--noise-multiplier", "inf"], "--noise-multiplier"),
    (["epsilon", "--sample-rate", "0.1", "--steps", "10", "--noise-multiplier", "-1"], "--noise-multiplier"),
    (["epsilon", "--sample-rate", "0.1", "--steps", "10", "--noise-multiplier", "abc"], "--noise-multiplier"),
    (["epsilon", "--sample-rate", "0.1", "--steps", "1.5", "--noise-multiplier", "1"], "--steps"),
    (["epsilon", "--sample-rate", "0.1", "--steps", "0", "--noise-multiplier", "1"], "--steps"),
    (["epsilon", *EPS_ARGS, "--delta", "1"], "--delta"),
    (["epsilon", *EPS_ARGS, "--delta", "0"], "--delta"),
    (["epsilon", *EPS_ARGS, "--delta", "-inf"], "--delta"),
    (["epsilon", *EPS_ARGS, "--accountant", "moments"], "--accountant"),
    (["epsilon", *EPS_ARGS, "--conversion", "tight"], "--conversion"),
    (["epsilon", *EPS_ARGS, "--relation", "replace"], "--relation"),
    (["epsilon", "--steps", "10", "--noise-multiplier", "1"], "--sample-rate"),
    (["epsilon", "--sample-rate", "0.1", "--noise-multiplier", "1"], "--steps"),
    (["epsilon", "--sample-rate", "0.1", "--steps", "10"], "--noise-multiplier"),
    (["epsilon", *EPS_ARGS, "--epochs", "2"], "--epochs"),
    (["epsilon", *EPS_ARGS, "--dataset-size", "100"], "--dataset-size"),
    (["epsilon", "--dataset-size", "100", "--epochs", "1", "--noise-multiplier", "1"], "--batch-size"),
    (["epsilon", "--dataset-size", "10", "--batch-size", "20", "--epochs", "1", "--noise-multiplier", "1"], "--batch-size"),
    (["epsilon", "--dataset-size", "10.5", "--batch-size", "2", "--epochs", "1", "--noise-multiplier", "1"], "--dataset-size"),
    (["epsilon", *EPS_ARGS, "--bogus", "1"], "--bogus"),
    (["epsilon", *EPS_ARGS, "--delta"], "--delta"),
    (["noise", "--sample-rate", "0.1", "--steps", "10"], "--target-epsilon"),
    (["noise", "--sample-rate", "0.1", "--steps", "10", "--target-epsilon", "0"], "--target-epsilon"),
    (["noise", "--sample-rate", "0.1", "--steps", "10", "--target-epsilon", "nan"], "--target-epsilon"),
    (["steps", "--sample-rate", "0.1", "--noise-multiplier", "1", "--target-epsilon", "1", "--steps", "5"], "--steps"),
    (["steps", "--sample-rate", "0.1", "--noise-multiplier", "1", "--target-epsilon", "-3"], "--target-epsilon"),
    (["risk", *EPS_ARGS], "--fpr"),
    (["risk", *EPS_ARGS, "--fpr", "1"], "--fpr"),
    (["risk", *EPS_ARGS, "--fpr", "0.1", "--relation", "swap"], "--relation"),
    (["frobnicate"], "frobnicate"),
]  # fmt: skip


@pytest.mark.parametrize(("argv", "option"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_input_exits_2_with_one_line(
    capsys: pytest.CaptureFixture[str], argv: list[str], option: str
) -> None:
    code, out, err = cli(capsys, *argv, "--json") if argv[0] != "frobnicate" else cli(capsys, *argv)
    assert code == 2
    assert out == ""
    assert err.startswith("Error: ") and err.count("\n") == 1, err
    assert option in err
    assert "Traceback" not in err


# --- the installed script -------------------------------------------------------------------

MASKDP = shutil.which("maskdp") or os.path.join(os.path.dirname(sys.executable), "maskdp")


def _script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([MASKDP, *args], capture_output=True, text=True, timeout=120)


def test_script_epsilon_json() -> None:
    proc = _script("epsilon", *EPS_ARGS, "--json")
    assert proc.returncode == 0, proc.stderr
    assert (
        json.loads(proc.stdout)
        == compute_epsilon(sample_rate=0.01, steps=1000, noise_multiplier=1.1).to_dict()
    )


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["epsilon", "--sample-rate", "1.5", "--steps", "10", "--noise-multiplier", "1"],
         "Error: --sample-rate must be a number in (0, 1], got 1.5\n"),
        (["epsilon", "--sample-rate", "0.1", "--steps", "10", "--noise-multiplier", "nan"],
         "Error: --noise-multiplier must be a finite number > 0, got nan\n"),
        (["noise", "--sample-rate", "0.1", "--steps", "10", "--target-epsilon", "1", "--zzz"],
         "Error: No such option: --zzz\n"),
    ],
)  # fmt: skip
def test_script_bad_input(args: list[str], message: str) -> None:
    proc = _script(*args)
    assert (proc.returncode, proc.stdout, proc.stderr) == (2, "", message)


def test_script_help_lists_commands() -> None:
    proc = _script("--help")
    assert proc.returncode == 0
    for command in COMMANDS:
        assert command in proc.stdout


def test_rdp_path_imports_neither_torch_nor_scipy() -> None:
    code = (
        "import sys\n"
        "from maskdp.accounting.cli import run\n"
        "from maskdp.cli.app import app\n"
        f"assert run(app, {['epsilon', *EPS_ARGS, '--json']!r}) == 0\n"
        f"assert run(app, {['epsilon', *EPS_ARGS]!r}) == 0\n"
        "heavy = sorted(m for m in sys.modules if m.split('.')[0] in "
        "('torch', 'scipy', 'opacus', 'prv_accountant', 'dp_accounting'))\n"
        "assert not heavy, heavy\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_internal_error_is_one_line_exit_1(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import maskdp.accounting.api

    def broken(params: object) -> None:
        raise OverflowError("boom")

    monkeypatch.setattr(maskdp.accounting.api, "epsilon_report", broken)
    monkeypatch.delenv("MASKDP_DEBUG", raising=False)
    code, out, err = cli(capsys, "epsilon", *EPS_ARGS)
    assert (code, out) == (1, "")
    assert err == "Error: internal error (OverflowError: boom); rerun with MASKDP_DEBUG=1\n"


def test_no_arguments_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = cli(capsys)
    assert code == 2  # click's convention for a group called without a command
    assert "epsilon" in out and "Error" not in err
