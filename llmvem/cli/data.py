"""``llmvem data …`` commands."""

from __future__ import annotations

import json

import typer

from llmvem.cli.app import data_app


@data_app.command("inspect")
def inspect(
    path: str = typer.Argument(..., help="Dataset: 'virtual' (built-in virtual brain), an Algonauts subjNN folder, "
                               "a generic folder, or 'v4:ROOT:SESSION'."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
) -> None:
    """Print a dataset summary: images per split, voxels, ROIs, hemispheres, noise-ceiling median.

    Example: llmvem data inspect data/algonauts_2023/subj01
    """
    from llmvem.data import load_dataset

    ds = load_dataset(path)
    summary = ds.summary()
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        typer.echo(f"{key:>22}: {value}")
