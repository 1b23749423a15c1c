"""``llmvem export`` command."""

from __future__ import annotations

from pathlib import Path

import typer

from llmvem.cli.app import app, progress_option, use_progress
from llmvem.errors import ConfigError


@app.command("export")
def export(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run folders, one per subject."),
    fmt: str = typer.Option("algonauts", "--format", help="Export format (only 'algonauts' so far)."),
    subject_dirs: list[Path] = typer.Option(..., "--subject-dir", help="Algonauts subjNN folder of each RUN, "
                                            "repeated in the order of the runs."),
    out: Path = typer.Option(Path("export"), "--out", "-o", help="Export folder."),
    model: str | None = typer.Option(None, "--model", help="Model to submit (default: best validation mean r)."),
    n_boot: int = typer.Option(1000, "--n-boot", help="Bootstrap resamples (over test images) of the intervals."),
    progress: bool | None = progress_option(),
) -> None:
    """Write challenge submission files (lh/rh_pred_test.npy per subject), per-vertex r/accuracy maps and a tidy
    per-ROI table (results.csv, results.parquet with pyarrow).

    Every input and flag is checked before anything is written; the files are written into a staging folder
    beside --out and moved into place at the end, so a refused or interrupted export leaves nothing behind.

    Example: llmvem export runs/subj01 runs/subj02 --subject-dir data/subj01 --subject-dir data/subj02 --out sub
    """
    from llmvem.export import export_algonauts

    use_progress(progress)

    if fmt != "algonauts":
        raise ConfigError(f"--format {fmt!r}; expected 'algonauts'")
    if n_boot < 1:  # flags are checked before any run folder is read (and long before anything is written)
        raise ConfigError(f"--n-boot {n_boot}: expected a positive number of bootstrap resamples, e.g. 1000")
    if len(subject_dirs) != len(runs):
        raise ConfigError(f"--subject-dir given {len(subject_dirs)} times for {len(runs)} runs; expected one "
                          "--subject-dir per RUN, in the same order")
    summary = export_algonauts(runs, subject_dirs, out, model=model, n_boot=n_boot)
    for subject, info in summary["subjects"].items():  # type: ignore[union-attr]
        typer.echo(f"{subject}: model {info['model']} ({info['why']}), {len(info['files'])} files in {out / subject}")
    for path in summary["results"]:  # type: ignore[union-attr]
        typer.echo(str(path))
