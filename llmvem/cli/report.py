"""``llmvem report`` command."""

from __future__ import annotations

from pathlib import Path

import typer

from llmvem.cli.app import app, progress_option, use_progress


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run folders (each with metrics.json); several are compared "
                                      "side by side."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default: FIRST_RUN/report)."),
    title: str | None = typer.Option(None, "--title", help="Page title."),
    progress: bool | None = progress_option(),
) -> None:
    """Write an HTML report (index.html + PNG figures) of one or more run folders and print its path.

    Example: llmvem report runs/demo runs/sweep --out reports/compare
    """
    from llmvem.report import write_report

    use_progress(progress)

    index = write_report(runs, out_dir=out, title=title)
    typer.echo(str(index))
