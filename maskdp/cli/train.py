"""``maskdp train`` and ``maskdp evaluate``: the main job on the command line.

Torch is imported inside the commands only, so ``maskdp epsilon`` stays fast.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Annotated, Any

import typer

from maskdp.errors import InvalidInputError

_RUN, _PRIVACY, _DATA, _OPT = "Run", "Privacy", "Data and model", "Optimisation"


def _print_metrics(metrics: dict[str, Any], as_json: bool) -> None:
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


def train_command(
    run_dir: Annotated[
        Path | None,
        typer.Option(help="Run directory (default: a new one under ./runs).", rich_help_panel=_RUN),
    ] = None,
    resume: Annotated[
        bool,
        typer.Option(
            "--resume", help="Continue the run in --run-dir with its ledger.", rich_help_panel=_RUN
        ),
    ] = False,
    config: Annotated[
        Path | None,
        typer.Option(
            help="JSON file of options (command-line options override it).", rich_help_panel=_RUN
        ),
    ] = None,
    mode: Annotated[
        str | None,
        typer.Option(
            help="maskdp | dpsgd (whole clip private) | nonprivate.", rich_help_panel=_PRIVACY
        ),
    ] = None,
    target_epsilon: Annotated[
        float | None,
        typer.Option(help="Epsilon to reach at the end (default 1.0).", rich_help_panel=_PRIVACY),
    ] = None,
    noise_multiplier: Annotated[
        float | None,
        typer.Option(
            help="Fixed noise multiplier instead of a target epsilon.", rich_help_panel=_PRIVACY
        ),
    ] = None,
    delta: Annotated[
        float | None,
        typer.Option(help="Delta of the guarantee (default 1e-5).", rich_help_panel=_PRIVACY),
    ] = None,
    max_grad_norm: Annotated[
        float | None,
        typer.Option(help="Clipping norm C of the private term.", rich_help_panel=_PRIVACY),
    ] = None,
    private_weight: Annotated[
        float | None,
        typer.Option(
            help="Weight of the noisy private sum (post-processing: free).",
            rich_help_panel=_PRIVACY,
        ),
    ] = None,
    shrinkage: Annotated[
        str | None,
        typer.Option(
            help="none | james-stein: shrink the noisy private sum (free).",
            rich_help_panel=_PRIVACY,
        ),
    ] = None,
    accountant: Annotated[
        str | None, typer.Option(help="rdp | prv.", rich_help_panel=_PRIVACY)
    ] = None,
    model: Annotated[str | None, typer.Option(help="vit | cnn.", rich_help_panel=_DATA)] = None,
    dataset: Annotated[
        str | None,
        typer.Option(
            help="'synthetic' or a ClipFolder path with train/ and test/.", rich_help_panel=_DATA
        ),
    ] = None,
    scenario: Annotated[
        str | None, typer.Option(help="Synthetic scenario: avatar | person.", rich_help_panel=_DATA)
    ] = None,
    train_size: Annotated[
        int | None, typer.Option(help="Synthetic training clips.", rich_help_panel=_DATA)
    ] = None,
    test_size: Annotated[
        int | None, typer.Option(help="Synthetic test clips.", rich_help_panel=_DATA)
    ] = None,
    frames: Annotated[
        int | None, typer.Option(help="Frames per synthetic clip.", rich_help_panel=_DATA)
    ] = None,
    image_size: Annotated[
        int | None, typer.Option(help="Height and width of synthetic clips.", rich_help_panel=_DATA)
    ] = None,
    view: Annotated[
        str | None,
        typer.Option(help="Public view: fill | random | inpaint | drop.", rich_help_panel=_DATA),
    ] = None,
    temporal_centering: Annotated[
        bool | None,
        typer.Option(
            "--temporal-centering/--no-temporal-centering",
            help="vit: subtract each pixel's mean over frames (static cameras).",
            rich_help_panel=_DATA,
        ),
    ] = None,
    engine: Annotated[
        str | None,
        typer.Option(help="auto | ghost | hooks | vmap | reference.", rich_help_panel=_OPT),
    ] = None,
    epochs: Annotated[
        float | None, typer.Option(help="Private epochs.", rich_help_panel=_OPT)
    ] = None,
    public_epochs: Annotated[
        float | None,
        typer.Option(help="Warm-up epochs on public views (free).", rich_help_panel=_OPT),
    ] = None,
    batch_size: Annotated[
        int | None, typer.Option(help="Expected batch size.", rich_help_panel=_OPT)
    ] = None,
    lr: Annotated[
        float | None, typer.Option(help="Learning rate (AdamW).", rich_help_panel=_OPT)
    ] = None,
    device: Annotated[str | None, typer.Option(help="cpu | cuda.", rich_help_panel=_OPT)] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of public things only (synthetic data, initial weights, random fill); "
            "noise and sampling always draw secret OS entropy.",
            rich_help_panel=_OPT,
        ),
    ] = None,
    threads: Annotated[
        int,
        typer.Option(
            min=1,
            help="CPU threads of torch. Default 1: on a shared 2-core machine the default run took 2x (idle) to 6x (busy) less time on 1 thread than on 2.",
            rich_help_panel=_OPT,
        ),
    ] = 1,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print the metrics as one JSON object.")
    ] = False,
    progress: Annotated[bool, typer.Option(help="Show a progress bar.")] = True,
) -> None:
    """Train a video model with MaskDP (default: VideoViT on synthetic clips, epsilon 1)."""
    options = {
        k: v
        for k, v in locals().items()
        if v is not None
        and k not in {"run_dir", "resume", "config", "as_json", "progress", "threads"}
    }
    from maskdp.trainer.config import build_config, load_config_file

    if resume and run_dir is None:
        raise InvalidInputError("--resume needs --run-dir")
    if resume and config is None and len(options) == 0:
        from maskdp.trainer.run import read_config

        settings = read_config(run_dir)
    else:
        base = load_config_file(config) if config is not None else {}
        settings = build_config(**{**base, **options})

    import torch

    torch.set_num_threads(threads)
    main = os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 alone reports
    metrics = _with_progress(settings, run_dir, resume, progress and not as_json and main)
    if main:
        _print_metrics(metrics, as_json)


def _with_progress(settings: Any, run_dir: Path | None, resume: bool, show: bool):
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
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Report the test accuracy and the privacy spent of a trained run."""
    from maskdp.trainer.run import evaluate

    _print_metrics(evaluate(run_dir), as_json)


def export_command(
    run_dir: Annotated[Path, typer.Argument(help="A run directory written by maskdp train.")],
    out: Annotated[Path, typer.Argument(help="Where to write the weights (must not exist).")],
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Write the releasable weights of a run (the model's state_dict alone) to OUT."""
    from maskdp.trainer.run import export

    _print_metrics(export(run_dir, out), as_json)


def register(app: typer.Typer) -> None:
    app.command("train")(train_command)
    app.command("evaluate")(evaluate_command)
    app.command("export")(export_command)
