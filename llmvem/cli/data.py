"""``llmvem data …`` commands."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import typer

from llmvem.cli.app import data_app, progress_option, use_progress


def _store_coverage(store_path: Path, ds: Any) -> dict[str, int]:
    """Captioned images of the dataset per captioner configuration of a caption store."""
    from llmvem.captions.store import CaptionStore
    from llmvem.errors import DataValidationError

    if not store_path.is_file():
        raise DataValidationError(store_path, "caption store", "does not exist; expected a store written by "
                                  "`llmvem caption`")
    images = ds.all_images()
    store = CaptionStore(store_path, readonly=True)
    try:
        return store.coverage(images.content_hashes())
    finally:
        store.close()


@data_app.command("inspect")
def inspect(
    path: str = typer.Argument(..., help="Dataset: 'virtual' (built-in virtual brain), an Algonauts subjNN folder, "
                               "a generic folder, or 'v4:ROOT:SESSION'."),
    as_json: bool = typer.Option(False, "--json", help="Print the summary as JSON."),
    val_fraction: float = typer.Option(0.1, "--val-fraction", help="Validation split carved from training when "
                                       "the dataset has none (as data.val_fraction does in a run)."),
    store: Path | None = typer.Option(None, "--store", help="Caption store: count the dataset's images it has "
                                      "captions for (per captioner configuration)."),
    progress: bool | None = progress_option(),
) -> None:
    """Print a dataset summary: images per split (validation included), challenge test images, voxels, ROIs,
    hemispheres, noise-ceiling median, captioned images.

    Example: llmvem data inspect data/algonauts_2023/subj01 --store runs/captions.sqlite
    """
    from llmvem.data import load_dataset

    use_progress(progress)
    ds = load_dataset(path, val_fraction=val_fraction, load_responses=False)  # shapes, masks; values only checked
    summary = ds.summary()
    challenge = ds.meta.get("challenge_test_images")
    if ds.meta.get("format") == "algonauts2023":
        summary["n_challenge_test"] = len(challenge) if challenge is not None else 0
        if "noise_ceiling_median" in summary:
            summary["noise_ceiling_median"] = (f"{summary['noise_ceiling_median']:.4f} (fraction of variance; the "
                                               "files' percent divided by 100)")
    if store is not None:
        coverage = _store_coverage(store, ds)
        summary["n_captioned_images"] = max(coverage.values(), default=0)
        summary["captioned_per_config"] = coverage or {"-": 0}
    if as_json:
        typer.echo(json.dumps(summary, indent=2))
        return
    for key, value in summary.items():
        if isinstance(value, dict):
            value = ", ".join(f"{k}={v}" for k, v in value.items()) or "-"
        typer.echo(f"{key:>22}: {value}")
