"""The accounting commands of the ``maskdp`` CLI: ``epsilon``, ``noise``, ``steps``, ``risk``.

Each command is a thin shell: it hands its options, as typed, to :func:`maskdp.accounting.params.parse`
(the one place where input is validated), calls :mod:`maskdp.accounting.api` and prints a table
(rich, imported only then) or, with ``--json``, exactly one JSON object on stdout.

:func:`run` is the top level: any usage error or bad value exits with code 2 and one line on
stderr naming the option and the rule it broke; warnings go to stderr as one line each.
Numbers are taken as text and parsed by pydantic so that ``nan``, ``inf`` and fractional
step counts get the same one-line message as every other bad value.

Import budget: this module imports typer and pydantic only; numpy comes with the RDP core
on first use, scipy only on the PRV, calibration and risk paths, torch never.
"""

import json
import os
import sys
import warnings
from collections.abc import Callable, Sequence
from typing import Annotated, Any, get_args

import typer
from maskdp.accounting import api
from maskdp.accounting.choices import CONVERSIONS, RELATIONS
from maskdp.accounting.params import (
    DEFAULT_DELTA,
    AccountantChoice,
    EpsilonParams,
    NoiseParams,
    RiskParams,
    StepsParams,
    parse,
)

try:  # typer >= 0.22 vendors click
    from typer._click.exceptions import ClickException, NoArgsIsHelpError
except ImportError:  # pragma: no cover - older typer on top of click
    from click.exceptions import ClickException, NoArgsIsHelpError

__all__ = ["register", "run"]

# --- options (text, validated by maskdp.accounting.params) -----------------------------------------

_SAMPLING = "Sampling"
_PRIVACY = "Privacy"
_OUTPUT = "Output"

SampleRate = Annotated[
    str | None,
    typer.Option(
        "--sample-rate",
        metavar="Q",
        help="Poisson sampling rate q in (0, 1]. Or give --dataset-size and --batch-size.",
        rich_help_panel=_SAMPLING,
    ),
]
Steps = Annotated[
    str | None,
    typer.Option(
        "--steps",
        metavar="N",
        help="Number of training steps. Or give --epochs.",
        rich_help_panel=_SAMPLING,
    ),
]
DatasetSize = Annotated[
    str | None,
    typer.Option(
        "--dataset-size",
        metavar="N",
        help="Number of records; q = batch size / dataset size.",
        rich_help_panel=_SAMPLING,
    ),
]
BatchSize = Annotated[
    str | None,
    typer.Option(
        "--batch-size",
        metavar="B",
        help="Expected (Poisson) batch size, at most --dataset-size.",
        rich_help_panel=_SAMPLING,
    ),
]
Epochs = Annotated[
    str | None,
    typer.Option(
        "--epochs",
        metavar="E",
        help="Passes over the data, may be fractional; steps = ceil(E / q).",
        rich_help_panel=_SAMPLING,
    ),
]
NoiseMultiplier = Annotated[
    str | None,
    typer.Option(
        "--noise-multiplier",
        metavar="SIGMA",
        help="Noise standard deviation divided by the clipping norm (> 0). Required.",
        rich_help_panel=_PRIVACY,
    ),
]
TargetEpsilon = Annotated[
    str | None,
    typer.Option(
        "--target-epsilon",
        metavar="EPS",
        help="Epsilon to stay within (> 0). Required.",
        rich_help_panel=_PRIVACY,
    ),
]
Delta = Annotated[
    str | None,
    typer.Option(
        "--delta",
        metavar="DELTA",
        help="Target delta in (0, 1); keep it below 1/dataset size.",
        show_default=f"{DEFAULT_DELTA:g}",
        rich_help_panel=_PRIVACY,
    ),
]
RiskDelta = Annotated[
    str | None,
    typer.Option(
        "--delta",
        metavar="DELTA",
        help="Also report epsilon at this delta; the bounds always use the whole privacy curve.",
        show_default="none",
        rich_help_panel=_PRIVACY,
    ),
]
Fpr = Annotated[
    str | None,
    typer.Option(
        "--fpr",
        metavar="FPR",
        help="The attacker's false-positive rate in (0, 1). Required.",
        rich_help_panel=_PRIVACY,
    ),
]
AccountantOpt = Annotated[
    str | None,
    typer.Option(
        "--accountant",
        metavar="|".join(get_args(AccountantChoice)),
        help="RDP (fast), PRV (tight, numerical) or both.",
        show_default="rdp",
        rich_help_panel=_PRIVACY,
    ),
]
ConversionOpt = Annotated[
    str | None,
    typer.Option(
        "--conversion",
        metavar="|".join(CONVERSIONS),
        help="RDP to (eps, delta) conversion: Balle et al. 2020 or Mironov 2017.",
        show_default="hypothesis-test",
        rich_help_panel=_PRIVACY,
    ),
]
RelationOpt = Annotated[
    str | None,
    typer.Option(
        "--relation",
        metavar="|".join(RELATIONS),
        help="Masked adjacency: sensitive content erased, or substituted (replace-one).",
        show_default="erase",
        rich_help_panel=_PRIVACY,
    ),
]
Json = Annotated[
    bool,
    typer.Option(
        "--json", help="Print one JSON object instead of a table.", rich_help_panel=_OUTPUT
    ),
]


# --- commands -------------------------------------------------------------------------------


def epsilon(
    sample_rate: SampleRate = None,
    steps: Steps = None,
    dataset_size: DatasetSize = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    noise_multiplier: NoiseMultiplier = None,
    delta: Delta = None,
    accountant: AccountantOpt = None,
    conversion: ConversionOpt = None,
    relation: RelationOpt = None,
    as_json: Json = False,
) -> None:
    """Epsilon at delta of DP-SGD with Poisson sampling (an upper bound).

    Example: maskdp epsilon --sample-rate 0.01 --steps 1000 --noise-multiplier 1.1
    """
    _answer(api.epsilon_report, EpsilonParams, locals())


def noise(
    sample_rate: SampleRate = None,
    steps: Steps = None,
    dataset_size: DatasetSize = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    target_epsilon: TargetEpsilon = None,
    delta: Delta = None,
    accountant: AccountantOpt = None,
    conversion: ConversionOpt = None,
    relation: RelationOpt = None,
    as_json: Json = False,
) -> None:
    """Smallest noise multiplier whose epsilon is at most --target-epsilon.

    Example: maskdp noise --dataset-size 60000 --batch-size 256 --epochs 10 --target-epsilon 3
    """
    _answer(api.noise_report, NoiseParams, locals())


def steps(
    sample_rate: SampleRate = None,
    dataset_size: DatasetSize = None,
    batch_size: BatchSize = None,
    noise_multiplier: NoiseMultiplier = None,
    target_epsilon: TargetEpsilon = None,
    delta: Delta = None,
    accountant: AccountantOpt = None,
    conversion: ConversionOpt = None,
    relation: RelationOpt = None,
    as_json: Json = False,
) -> None:
    """Largest number of steps (and epochs) whose epsilon is at most --target-epsilon.

    Example: maskdp steps --sample-rate 0.01 --noise-multiplier 1.0 --target-epsilon 2
    """
    _answer(api.steps_report, StepsParams, locals())


def risk(
    sample_rate: SampleRate = None,
    steps: Steps = None,
    dataset_size: DatasetSize = None,
    batch_size: BatchSize = None,
    epochs: Epochs = None,
    noise_multiplier: NoiseMultiplier = None,
    fpr: Fpr = None,
    delta: RiskDelta = None,
    accountant: AccountantOpt = None,
    relation: RelationOpt = None,
    as_json: Json = False,
) -> None:
    """Upper bound on a membership attacker's true-positive rate at a false-positive rate.

    Example: maskdp risk --sample-rate 0.01 --steps 1000 --noise-multiplier 1.1 --fpr 0.01
    """
    _answer(api.risk_report, RiskParams, locals())


COMMANDS: dict[str, Callable[..., None]] = {
    "epsilon": epsilon,
    "noise": noise,
    "steps": steps,
    "risk": risk,
}


def register(app: typer.Typer) -> None:
    """Add the accounting commands to ``app``."""
    for name, command in COMMANDS.items():
        app.command(name)(command)


# --- output ---------------------------------------------------------------------------------


def _answer(compute: Callable[[Any], Any], model: type, options: dict[str, Any]) -> None:
    as_json = options.pop("as_json")
    report = compute(parse(model, options, spelling="cli"))
    if as_json:
        sys.stdout.write(json.dumps(report.to_dict(), allow_nan=False) + "\n")
    else:
        _print_table(report)


def _fmt(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.6g}"
    return str(value)


def _print_table(report: Any) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(soft_wrap=True)
    console.print("  ".join(f"{key}={_fmt(value)}" for key, value in report.inputs().items()))
    results = [result.to_dict() for result in report.results]
    keys = [k for k in dict.fromkeys(k for r in results for k in r) if k != "accountant"]
    table = Table()  # one column per accountant: stays narrow whatever the keys
    table.add_column("")
    for result in results:
        table.add_column(result["accountant"], justify="right")
    for key in keys:
        table.add_row(key, *(_fmt(result.get(key, "")) for result in results))
    console.print(table)
    if len(results) > 1:
        best = report.best.to_dict()
        headline = "  ".join(f"{key}={_fmt(best[key])}" for key in report.HEADLINE)
        console.print(f"best ({best['accountant']}): {headline}")


# --- top level ------------------------------------------------------------------------------


def _show_warning(message: Any, category: type, *_: Any, **__: Any) -> None:
    sys.stderr.write(f"Warning: {message}\n")


def _fail(message: str, code: int) -> int:
    first = message.strip().splitlines()[0] if message.strip() else "unknown error"
    sys.stderr.write(f"Error: {first}\n")
    return code


def run(app: typer.Typer, argv: Sequence[str] | None = None, *, prog_name: str = "maskdp") -> int:
    """Run ``app`` on ``argv`` and return the exit code (0 ok, 2 bad usage or input).

    Never prints a traceback: click usage errors and ``ValueError`` or ``TypeError`` (every
    MaskDP input error subclasses one of them) become one line on stderr and exit code 2; any
    other exception is a bug and becomes one line and exit code 1 (``MASKDP_DEBUG=1`` shows
    the traceback).
    """
    command = typer.main.get_command(app)
    args = list(sys.argv[1:] if argv is None else argv)
    with warnings.catch_warnings():
        warnings.showwarning = _show_warning  # one line each, filters left to the user
        try:
            result = command.main(args=args, prog_name=prog_name, standalone_mode=False)
        except NoArgsIsHelpError as error:  # help is printed already (rich) or is the message
            sys.stdout.write(error.format_message())
            return error.exit_code
        except ClickException as error:
            return _fail(error.format_message(), error.exit_code)
        except typer.Abort:
            return _fail("aborted", 1)
        except (ValueError, TypeError) as error:
            return _fail(str(error), 2)
        except Exception as error:  # a bug, not bad input: one line unless debugging
            if os.environ.get("MASKDP_DEBUG"):
                raise
            name = type(error).__name__
            return _fail(f"internal error ({name}: {error}); rerun with MASKDP_DEBUG=1", 1)
    return result if isinstance(result, int) else 0
