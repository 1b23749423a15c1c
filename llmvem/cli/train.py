"""``llmvem train``: train one LLM-VEM model from a config into a run folder."""

from __future__ import annotations

from pathlib import Path

import typer

from llmvem.cli.app import app, new_output_folder, progress_option, use_progress
from llmvem.errors import DiskFullError, is_disk_full

_EXAMPLES = """\b
Examples:
  llmvem train --config demo --out runs/demo_train
  llmvem train --config my.yaml --out runs/s01 --set model.lambda_align=0.05 --set train.stage1.lr=3e-4
  llmvem train --config my.yaml --out runs/s01 --resume
  torchrun --nproc_per_node 4 -m llmvem train --config algonauts_eva02 --out runs/subj01
"""


@app.command("train", epilog=_EXAMPLES)
def train(
    config: str = typer.Option(..., "--config", help="YAML config file, or a shipped config name (demo, "
                               "algonauts_eva02)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (config.yaml, curves.csv, checkpoints, "
                             "predictions)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the trainer's previous outputs in --out and "
                                   "start again."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config value, e.g. "
                                        "train.stage1.lr=1e-3 (repeatable; values are YAML)."),
    progress: bool | None = progress_option(),
) -> None:
    """Train the LLM-VEM network (stage 1: heads on cached features; stage 2: last backbone blocks).

    Captions, caption embeddings and backbone features are computed first (or read from the cache in
    cache_dir). Under torchrun every process runs this command; only rank 0 writes and prints.
    """
    from llmvem.config import apply_overrides, load_config

    show = use_progress(progress)
    cfg = apply_overrides(load_config(config), overrides)  # bad input fails here, before torch is imported
    from llmvem.inputs import prepare_inputs
    from llmvem.train import prepare_run_folder, train_encoding_model
    from llmvem.train.distributed import cleanup_distributed, setup_distributed

    info = setup_distributed(cfg.train.device)
    try:
        with new_output_folder(out):
            if info.is_main:  # refuse a used folder before the (slow) input preparation
                prepare_run_folder(out, resume=resume, overwrite=overwrite)
            inputs = prepare_inputs(cfg, show_progress=show and info.is_main)
            lam = cfg.model.lambda_align
            result = train_encoding_model(cfg, inputs.dataset,
                                          text_embeddings=inputs.text_embeddings if lam > 0 else None,
                                          backbone=inputs.backbone, features=inputs.features, out_dir=out,
                                          resume=resume, overwrite=overwrite, show_progress=show)
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(out, "the run folder (checkpoints, predictions)") from exc
        raise
    finally:
        cleanup_distributed(info)
    if info.is_main:
        m = result.metrics
        typer.echo(f"trained {out}: val mean r = {m['val_mean_r']:.4f}"
                   + (f", test mean r = {m['test_mean_r']:.4f}" if "test_mean_r" in m else ""))
        for name, st in result.stages.items():
            ips = st.get("images_per_s")
            typer.echo(f"  {name}: {st['epochs_run']} epochs, best epoch {st['best_epoch']} "
                       f"(val r {st['best_val_mean_r']:.4f})" + (", early stopped" if st["early_stopped"] else "")
                       + (f", {ips:.0f} img/s" if ips else ""))
