"""``llmvem train``: train one LLM-VEM model from a config into a run folder."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import typer

from llmvem.cli.app import (
    app,
    new_output_folder,
    other_captions_option,
    progress_option,
    threads_option,
    use_progress,
    use_threads,
)
from llmvem.errors import DiskFullError, is_disk_full

if TYPE_CHECKING:
    from llmvem.config import RunConfig

_EXAMPLES = """\b
Examples:
  llmvem train --config demo --out runs/demo_train
  llmvem train --config my.yaml --out runs/s01 --set model.lambda_align=0.05 --set train.stage1.lr=3e-4
  llmvem train --config my.yaml --out runs/s01 --resume
  llmvem train --config demo --out runs/flickr --set model.core=linear --set align_data.spec=../shared/data/flickr8k_1000
  llmvem train --config v4_spatial --init-core runs/v4_core --set data.spec=v4:DATA:210322 --out runs/v4_210322_core
  torchrun --nproc_per_node 4 -m llmvem train --config algonauts_eva02 --out runs/subj01
"""


@app.command("train", epilog=_EXAMPLES)
def train(
    config: str = typer.Option(..., "--config", help="YAML config file, or a shipped config name (demo, "
                               "algonauts_eva02)."),
    out: Path = typer.Option(..., "--out", help="Run folder to write (config.yaml, metrics.json, "
                             "voxel_metrics.npz, models/<name>/ with checkpoints and predictions)."),
    resume: bool = typer.Option(False, "--resume", help="Continue the run in --out from its newest checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Delete the trainer's previous outputs in --out and "
                                   "start again."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config value, e.g. "
                                        "train.stage1.lr=1e-3 (repeatable; values are YAML)."),
    init_core: Path | None = typer.Option(None, "--init-core", help="A finished train-multi folder (or its "
                                          "joint/) trained with stage 2: fit this session on its fine-tuned "
                                          "backbone instead of the pretrained one (backbone.init_core)."),
    other_captions: str = other_captions_option(),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Train LLM-VEM (and the ridge baseline of evaluate.baselines) into a complete run folder.

    Captions, caption embeddings and backbone features are computed first (or read from the cache in
    cache_dir, as `llmvem caption/embed --config` left them). The run folder is the experiment runner's:
    metrics.json (per ROI and hemisphere, validation-chosen model), voxel_metrics.npz, test_responses.npy,
    models/<name>/ (the LLM-VEM training folder; ridge.npz), challenge test predictions when the dataset has
    challenge test images; `llmvem report`, `predict` and `export` read it. Under torchrun (several processes)
    only the LLM-VEM model is trained, into --out itself; only rank 0 writes and prints.
    """
    from llmvem.config import apply_overrides, load_config

    show = use_progress(progress)
    use_threads(threads)
    cfg = apply_overrides(load_config(config), overrides)  # bad input fails here, before torch is imported
    if init_core is not None:  # absolute, so predict / export find the core from any working folder
        cfg.backbone.init_core = str(init_core.expanduser().resolve())
    from llmvem.config_check import check_config, config_source

    check_config(cfg, config_source(config, overrides))  # what `config validate` checks: the same answer
    from llmvem.train.distributed import cleanup_distributed, setup_distributed

    info = setup_distributed(cfg.train.device)
    try:
        with new_output_folder(out):  # refused inputs (another captioner...) leave no half-made folder
            if info.world_size > 1:
                _train_distributed(cfg, out, resume, overwrite, show, info.is_main, other_captions)
            else:
                _train_experiment(cfg, out, resume, overwrite, show, other_captions)
    except Exception as exc:
        if is_disk_full(exc):
            raise DiskFullError(out, "the run folder (checkpoints, predictions)") from exc
        raise
    finally:
        cleanup_distributed(info)


def _train_experiment(cfg: RunConfig, out: Path, resume: bool, overwrite: bool, show: bool,
                      other_captions: str) -> None:
    import llmvem.inputs
    from llmvem.experiment import run_models
    from llmvem.pipeline import experiment_models, experiment_pairs, extraction_config, load_model_streams

    models = experiment_models(cfg, [cfg.model.lambda_align], show_progress=show)
    def say(message: str) -> None:  # with or without bars: one line per long stage (start, end, time, memory)
        typer.echo(f"[llmvem] {message}", err=True)


    def prepare():
        say("preparing inputs: dataset, captions, caption embeddings, image features")
        inputs = llmvem.inputs.prepare_inputs(extraction_config(cfg), show_progress=show,
                                              other_captions=other_captions)
        load_model_streams(models, inputs, show, say)  # a bad align_data.spec fails before any training
        return inputs

    result = run_models(cfg, prepare, models, out, resume=resume, overwrite=overwrite, say=say,
                        pairs=experiment_pairs(list(models), cfg))
    m = result.metrics
    for name, rec in m["models"].items():
        val = rec.get("val_mean_r")
        typer.echo(f"{name}: val mean r = " + (f"{val:.4f}" if val is not None else "n/a")
                   + (" (fitted on val)" if rec.get("val_in_fit") else "") + f", test mean r = {rec['mean_r']:.4f}")
        stages = getattr(getattr(result.estimators[name], "result_", None), "stages", {}) or {}
        for stage, st in stages.items():
            typer.echo(f"  {stage}: {st['epochs_run']} epochs, best epoch {st['best_epoch']} "
                       + ("= the ridge start " if st.get("ridge_start_kept") else "")
                       + f"(val r {st['best_val_mean_r']:.4f})" + (", early stopped" if st["early_stopped"] else ""))
        stream = rec.get("align_stream")
        if stream is not None:
            typer.echo(f"  alignment stream: {stream['spec']} ({stream['n_images']} captioned images, weight "
                       f"{stream['weight']:g})")
        elif rec.get("kind") == "llmvem" and rec.get("lambda") is not None and cfg.align_data.spec is not None:
            typer.echo(f"  alignment stream {cfg.align_data.spec} not used (λ = {rec['lambda']:g}, align_data.weight "
                       f"= {cfg.align_data.weight:g})")
    typer.echo(f"selected: {m['selected_model'] or 'none'} ({m['selection']['reason']})")
    typer.echo(f"run folder: {out}  (llmvem report {out})")


def _train_distributed(cfg: RunConfig, out: Path, resume: bool, overwrite: bool, show: bool, is_main: bool,
                       other_captions: str) -> None:
    import llmvem.inputs
    from llmvem.train import prepare_run_folder, train_encoding_model

    if is_main:  # refuse a used folder before the (slow) input preparation
        prepare_run_folder(out, resume=resume, overwrite=overwrite)
    from llmvem.train.stream import stream_for_inputs

    inputs = llmvem.inputs.prepare_inputs(cfg, show_progress=show and is_main, other_captions=other_captions)
    lam = cfg.model.lambda_align
    stream = stream_for_inputs(cfg, inputs, show and is_main)  # None unless λ > 0 and align_data names one
    text, ids = llmvem.inputs.alignment_targets(cfg, inputs) if lam > 0 else (None, None)
    result = train_encoding_model(cfg, inputs.dataset, text_embeddings=text, text_ids=ids, backbone=inputs.backbone,
                                  features=inputs.features, out_dir=out, resume=resume, overwrite=overwrite,
                                  show_progress=show, align_stream=stream)
    if is_main:
        m = result.metrics
        typer.echo(f"trained {out}: val mean r = {m['val_mean_r']:.4f}"
                   + (f", test mean r = {m['test_mean_r']:.4f}" if "test_mean_r" in m else ""))
