"""The ``maskdp`` command line: accounting commands (``epsilon``, ``noise``, ``steps``,
``risk``) and training commands.

Only typer and pydantic are imported here so that ``maskdp epsilon`` answers in under half a
second. Commands that need torch (``train``, ``evaluate``) must import it inside the
command function, never at module level.
"""

from __future__ import annotations

import os
import sys

import typer

from maskdp.accounting.cli import register, run
from maskdp.cli import train as train_cli

app = typer.Typer(
    name="maskdp",
    help="Differentially private training of video models with masked privacy units.",
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
register(app)
train_cli.register(app)  # train, evaluate: torch is imported inside the commands


def main() -> None:
    """Entry point of the ``maskdp`` console script: exits with 0, or 2 on bad usage or input."""
    # Pydantic scans every installed package's entry points for plugins when it builds the
    # first model (~10-20 ms of a ~0.4 s cold start); this short-lived process needs none.
    # An explicit setting by the user wins.
    os.environ.setdefault("PYDANTIC_DISABLE_PLUGINS", "__all__")
    sys.exit(run(app, prog_name="maskdp"))


if __name__ == "__main__":
    main()
