"""The shared typer application; command modules attach their commands to it."""

from __future__ import annotations

import os
from typing import Any

import typer

app = typer.Typer(
    name="llmvem",
    help="LLM-aligned visual encoding models: caption stimuli, embed, train, evaluate and report.\n\n"
    "Example: llmvem demo --out runs/demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Inspect and validate datasets.\n\nExample: llmvem data inspect virtual", no_args_is_help=True)
app.add_typer(data_app, name="data")


def progress_option() -> Any:
    """The one ``--progress/--no-progress`` option every command takes (default: on, off when
    ``LLMVEM_NO_PROGRESS=1``)."""
    return typer.Option(None, "--progress/--no-progress",
                        help="Show progress bars (default on; off when LLMVEM_NO_PROGRESS=1).")


def other_captions_option() -> Any:
    """The ``--other-captions`` option of ``caption``/``embed``/``train --config`` (see
    :func:`llmvem.inputs.caption_dataset`)."""
    return typer.Option("stop", "--other-captions", help="When the caption store holds captions of the same model "
                        "under another prompt/token limit: stop (say so and exit 2), accept (use them) or recaption.")


def use_progress(flag: bool | None) -> bool:
    """Apply a command's ``--progress/--no-progress`` to every bar (llmvem's and the weight-loading bars of
    transformers) and return whether bars are on."""
    from llmvem.utils import set_progress

    enabled = flag if flag is not None else os.environ.get("LLMVEM_NO_PROGRESS", "") != "1"
    set_progress(enabled)
    return enabled


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"llmvem {version('llmvem')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
            typer.echo("llmvem (not installed)")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the llmvem version and exit."),
) -> None:
    """LLM-aligned visual encoding models: caption stimuli, embed, train, evaluate and report.

    Example: llmvem demo --out runs/demo
    """
