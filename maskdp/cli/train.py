"""``maskdp train``, ``maskdp evaluate`` and ``maskdp export``: the main job on the command line.

The options of ``maskdp train`` that set the run are generated from the fields of
:class:`~maskdp.trainer.config.TrainConfig` (one option each: its type, default, help and
panel), so the command and the config cannot drift apart. Torch is imported inside the
commands only, so ``maskdp epsilon`` and ``maskdp train --help`` stay fast.
"""

from __future__ import annotations

import inspect
import json
import os
import types
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, Literal, Union, get_args, get_origin

import typer

from maskdp.errors import InvalidInputError
from maskdp.trainer.config import TrainConfig, build_config, load_config_file

if TYPE_CHECKING:
    from pydantic.fields import FieldInfo

    from maskdp.trainer.result import TrainResult

_RUN, _OPT = "Run", "Optimisation"
_FIRST = ("run_dir", "resume", "config")  # before the config's options in --help

RunDir = Annotated[
    Path | None,
    typer.Option(help="Run directory (default: a new one under ./runs).", rich_help_panel=_RUN),
]
Resume = Annotated[
    bool,
    typer.Option(
        "--resume", help="Continue the run in --run-dir with its ledger.", rich_help_panel=_RUN
    ),
]
ConfigFile = Annotated[
    Path | None,
    typer.Option(
        help="JSON file of options (command-line options override it).", rich_help_panel=_RUN
    ),
]
Threads = Annotated[
    int,
    typer.Option(
        min=1,
        help="CPU threads of torch. Default 1: on a shared 2-core machine the default run took "
        "2x (idle) to 6x (busy) less time on 1 thread than on 2.",
        rich_help_panel=_OPT,
    ),
]
Json = Annotated[bool, typer.Option("--json", help="Print one JSON object.")]
MetricsJson = Annotated[bool, typer.Option("--json", help="Print the metrics as one JSON object.")]
Progress = Annotated[bool, typer.Option(help="Show a progress bar.")]

# -- options generated from TrainConfig ---------------------------------------------------------


def _plain_type(annotation: Any) -> Any:
    """``X`` of ``X | None``; any other annotation unchanged."""
    if get_origin(annotation) in (Union, types.UnionType):
        kept = [arg for arg in get_args(annotation) if arg is not type(None)]
        if len(kept) == 1:
            return kept[0]
    return annotation


def config_option(name: str, field: FieldInfo) -> inspect.Parameter:
    """The ``maskdp train`` option of one TrainConfig field, with the field's default.

    Literal fields become choices and bools ``--x/--no-x``; the value is validated by
    :func:`~maskdp.trainer.config.build_config` with the rest of the config.
    """
    flag = name.replace("_", "-")
    kind = _plain_type(field.annotation)
    extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
    text, metavar = field.description or "", None
    if get_origin(kind) is Literal:  # choices in the help: a long metavar squeezes --help
        text, metavar = f"{text} One of: {', '.join(get_args(kind))}.".strip(), "<choice>"
    option = typer.Option(
        f"--{flag}/--no-{flag}" if kind is bool else f"--{flag}",
        help=text,
        metavar=metavar,
        rich_help_panel=str(extra.get("group", _OPT)),
    )
    return inspect.Parameter(
        name,
        inspect.Parameter.KEYWORD_ONLY,
        default=field.default,
        annotation=Annotated[field.annotation, option],
    )


def _with_config_options(command: Any) -> Any:
    """Give ``command`` (whose ``**options`` takes the config) one option per config field."""
    own = inspect.signature(command, eval_str=True).parameters.values()
    named = [p for p in own if p.kind is p.KEYWORD_ONLY]  # **options goes
    head = [p for p in named if p.name in _FIRST]
    tail = [p for p in named if p.name not in _FIRST]
    generated = [config_option(n, f) for n, f in TrainConfig.model_fields.items()]
    command.__signature__ = inspect.Signature([*head, *generated, *tail], return_annotation=None)
    return command


# -- commands ----------------------------------------------------------------------------------


def _print_metrics(metrics: dict[str, Any], as_json: bool) -> None:
    """A table of ``metrics``, or with ``--json`` one JSON object on stdout."""
    if as_json:
        typer.echo(json.dumps(metrics, allow_nan=False))
        return
    from rich.console import Console
    from rich.table import Table

    table = Table(show_header=False)
    for key, value in metrics.items():
        shown = f"{value:.4g}" if isinstance(value, float) else str(value)
        table.add_row(key, shown)
    Console().print(table)


def _settings(
    options: dict[str, Any], run_dir: Path | None, resume: bool, config: Path | None
) -> TrainConfig:
    """The run's config: the stored one to resume, else ``--config`` overridden by options."""
    if resume and run_dir is None:
        raise InvalidInputError("--resume needs --run-dir")
    if resume and config is None and not options:
        from maskdp.trainer.rundir import read_config

        return read_config(run_dir)
    base = load_config_file(config) if config is not None else {}
    return build_config(**{**base, **options})


@_with_config_options
def train_command(
    *,
    ctx: typer.Context,
    run_dir: RunDir = None,
    resume: Resume = False,
    config: ConfigFile = None,
    threads: Threads = 1,
    as_json: MetricsJson = False,
    progress: Progress = True,
    **options: Any,
) -> None:
    """Train a video model with MaskDP (default: VideoViT on synthetic clips, epsilon 1)."""
    # Options left at their default do not override the --config file or the resumed config.
    given = {n: v for n, v in options.items() if ctx.get_parameter_source(n).name == "COMMANDLINE"}
    settings = _settings(given, run_dir, resume, config)
    import torch

    torch.set_num_threads(threads)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    result = _with_progress(settings, run_dir, resume, progress and not as_json and main)
    if main:
        _print_metrics(result.to_dict(), as_json)


def _with_progress(
    settings: TrainConfig, run_dir: Path | None, resume: bool, show: bool
) -> TrainResult:
    from maskdp.trainer.run import train

    if not show:
        return train(settings, run_dir, resume=resume)
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = (
        TextColumn("[bold]train"),
        BarColumn(),
        MofNCompleteColumn(),
        # The public-view loss of the public batch: never a figure of the private batch.
        TextColumn("public loss {task.fields[loss]:.3f}  eps {task.fields[eps]}"),
        TimeElapsedColumn(),
    )
    with Progress(*columns, transient=False) as bar:
        task = bar.add_task("train", total=None, loss=float("nan"), eps="-")

        def on_step(step: int, total: int, loss: float, run: Any) -> None:
            eps = "-"
            if run.optimizer is not None and (step % 10 == 0 or step == total):
                eps = f"{run.epsilon():.3f}"
            bar.update(
                task, completed=step, total=total, loss=loss, **({"eps": eps} if eps != "-" else {})
            )

        return train(settings, run_dir, resume=resume, on_step=on_step)


def evaluate_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by maskdp train.")],
    as_json: Json = False,
) -> None:
    """Report the test accuracy and the privacy spent of a trained run."""
    from maskdp.trainer.artifacts import evaluate

    _print_metrics(evaluate(run_dir), as_json)


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by maskdp train.")],
    out: Annotated[Path, typer.Argument(help="Where to write the weights (must not exist).")],
    as_json: Json = False,
) -> None:
    """Write the releasable weights of a run (the model's state_dict alone) to OUT."""
    from maskdp.trainer.artifacts import export

    _print_metrics(export(run_dir, out), as_json)


def register(app: typer.Typer) -> None:
    """Add ``train``, ``evaluate`` and ``export`` to ``app``."""
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("export")(export_command)
