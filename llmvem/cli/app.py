"""The shared typer application; command modules attach their commands to it."""

from __future__ import annotations

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
