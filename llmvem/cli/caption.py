"""``llmvem caption``: caption a dataset's (or a folder's) images into a SQLite caption store."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from llmvem.cli.app import (
    app,
    check_output_file,
    other_captions_option,
    progress_option,
    threads_option,
    use_progress,
    use_threads,
)

logger = logging.getLogger(__name__)

# "\b" keeps click from re-wrapping the example block.
_EXAMPLES = """\b
Examples:
  llmvem caption --config algonauts_eva02 --set data.spec=data/algonauts_2023/subj01 \\
      --set captions.store=captions/subj01.sqlite        (exactly what `llmvem train` with that config reuses)
  llmvem caption virtual --store captions.sqlite --backend dataset
  llmvem caption data/algonauts_2023/subj01 --store subj01.sqlite --backend openai \\
      --model Qwen/Qwen2.5-VL-7B-Instruct --base-url http://localhost:8000/v1 --max-in-flight 64
  llmvem caption --images stimuli/ --store captions.sqlite --backend transformers \\
      --model llava-hf/llava-1.5-7b-hf --batch-size 8 --device cuda
"""


@app.command("caption", epilog=_EXAMPLES)
def caption(
    dataset: str | None = typer.Argument(
        None, help="Dataset spec: 'virtual', an Algonauts subjNN folder, a generic folder, 'v4:ROOT:SESSION'. "
        "All its images (train, val, test) are captioned. Leave out when using --images."),
    images_dir: Path | None = typer.Option(None, "--images", help="Caption the image files in this folder instead "
                                           "of a dataset (ids are the file names without suffix)."),
    config: str | None = typer.Option(None, "--config", help="Caption as this YAML/shipped config says (data.spec, "
                                      "captions.*: store, backend, model, prompt, token limit), exactly what `llmvem "
                                      "embed/train --config` reuse; the other options are then not used."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="--config: override a config value "
                                        "(repeatable; values are YAML)."),
    other_captions: str = other_captions_option(),
    store_path: Path | None = typer.Option(None, "--store", help="SQLite caption store to write (created if absent; "
                                           "a rerun skips images already captioned with the same settings)."),
    backend: str = typer.Option("labels", "--backend", help="labels (offline ImageNet labels, weak), dataset (the "
                                "dataset's own captions), file (--captions-file), transformers (local VLM), "
                                "openai (OpenAI-compatible server: vLLM, SGLang, Ollama, ...)."),
    model: str | None = typer.Option(None, "--model", help="transformers: hub id or local directory; openai: the "
                                     "served model name."),
    prompt: str | None = typer.Option(None, "--prompt", help="Instruction for VLM backends (default: a detailed-"
                                      "description prompt)."),
    max_new_tokens: int | None = typer.Option(None, "--max-new-tokens", help="Generation limit (default 256 "
                                              "transformers, 300 openai)."),
    base_urls: list[str] = typer.Option([], "--base-url", metavar="URL", help="openai: server URL up to /v1; repeat to spread "
                                        "requests over several servers."),
    api_key_env: str = typer.Option("OPENAI_API_KEY", "--api-key-env", help="openai: NAME of the environment "
                                    "variable holding the API key (the key itself is never recorded)."),
    max_in_flight: int = typer.Option(16, "--max-in-flight", help="openai: requests in flight at once."),
    timeout: float = typer.Option(120.0, "--timeout", help="openai: seconds per request."),
    max_retries: int = typer.Option(5, "--max-retries", help="openai: retries per image on 429/5xx/timeouts."),
    captions_file: Path | None = typer.Option(None, "--captions-file", help="file: CSV/TSV/JSON/JSONL or COCO "
                                              "captions JSON, keyed by image id or file name."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Images per model call and per store "
                                          "commit (default depends on the backend)."),
    device: str = typer.Option("auto", "--device", help="transformers/labels: auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("auto", "--dtype", help="transformers: auto (bfloat16 on GPU), float16, float32."),
    export: Path | None = typer.Option(None, "--export", help="Also write this configuration's captions to a "
                                       ".csv or .json file."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Caption stimulus images into a crash-safe SQLite caption store.

    Finished captions are committed batch by batch: after a crash or Ctrl-C, run the same command again and only
    the missing images are captioned. Several processes may caption into one store at once (e.g. one per server):
    they claim disjoint images and share the work; a killed worker's images are taken over. Prints a summary
    (done by this process, skipped, failed); exits with code 1 when some images could not be captioned (their ids
    are listed), 2 on bad input.
    """
    show = use_progress(progress)
    use_threads(threads)
    from llmvem.captions import CaptionStore, make_captioner, run_captioning
    from llmvem.errors import ConfigError

    if config is not None:
        if dataset is not None or images_dir is not None or store_path is not None:
            raise ConfigError("--config takes the dataset and the store from the config (data.spec, captions.store);"
                              " leave out DATASET, --images and --store, or change them with --set")
        _caption_from_config(config, overrides, other_captions, show)
        return
    if (dataset is None) == (images_dir is None):
        raise ConfigError("give either a dataset spec or --images DIR (not both)")
    if store_path is None:
        raise ConfigError("--store FILE is required (or --config)")
    check_output_file(store_path, "--store")
    check_output_file(export, "--export", (".csv", ".json"))
    ds = None
    if images_dir is not None:
        from llmvem.data.images import FileImages, list_image_files

        files = list_image_files(images_dir)
        if not files:
            raise ConfigError(f"{images_dir}: no image files ({', '.join(('png', 'jpg', 'jpeg', 'bmp', 'tif', 'webp'))})")
        images = FileImages(files)
        label = str(images_dir)
    else:
        from llmvem.data import load_dataset

        ds = load_dataset(dataset)
        images = ds.all_images()
        label = ds.name
    if batch_size is not None and batch_size < 1:
        raise ConfigError(f"--batch-size {batch_size}: expected >= 1")

    captioner = make_captioner(
        backend, model=model, prompt=prompt, max_new_tokens=max_new_tokens, base_urls=base_urls,
        api_key_env=api_key_env, max_in_flight=max_in_flight, captions_file=captions_file, dataset=ds,
        device=device, dtype=dtype, timeout_s=timeout, max_retries=max_retries)
    check_servers = getattr(captioner, "check_servers", None)
    try:
        if check_servers is not None:  # an unreachable server fails before the store is made
            check_servers()
        with CaptionStore(store_path) as store:
            typer.echo(f"captioning {len(images)} images of {label} with {captioner.model_id} ({captioner.backend} "
                       f"backend, config {captioner.config_hash}) into {store_path}", err=True)
            summary = run_captioning(images, captioner, store, batch_size=batch_size, show_progress=show)
            if export is not None:
                store.export(export, summary.config_hash)
    finally:
        captioner.close()

    others = f", left to other workers: {summary.others}" if summary.others else ""
    typer.echo(f"done: {summary.done}, skipped (already stored): {summary.skipped}, failed: {summary.failed}{others} "
               f"of {summary.n_images} images in {summary.elapsed_s:.1f} s ({summary.images_per_s:.2f} images/s)")
    typer.echo(f"store: {store_path}  captioner config: {summary.config_hash}")
    if summary.truncated:
        typer.echo(f"warning: {summary.truncated} captions stopped at the token limit; raise --max-new-tokens "
                   "for complete descriptions", err=True)
    if export is not None:
        typer.echo(f"exported: {export}")
    if summary.failed:
        for image_id in summary.failed_ids[:20]:
            typer.echo(f"failed: {image_id}: {summary.errors[image_id]}", err=True)
        if summary.failed > 20:
            typer.echo(f"... and {summary.failed - 20} more failed images", err=True)
        typer.echo("run the same command again to retry the failed images", err=True)
        raise typer.Exit(code=1)


def _caption_from_config(config: str, overrides: list[str], other_captions: str, show: bool) -> None:
    """``caption --config``: :func:`llmvem.inputs.caption_dataset`, the one captioning ``train`` reuses."""
    from llmvem.config import apply_overrides, load_config
    from llmvem.inputs import caption_dataset, load_config_dataset

    cfg = apply_overrides(load_config(config), overrides)
    ds = load_config_dataset(cfg)
    captions, info = caption_dataset(cfg, ds, show, other_captions=other_captions)
    n = sum(len(c) for c in captions.values())
    typer.echo(f"captions of {n} images of {ds.name}: {info['backend']} {info['model_id']}, captioner config "
               f"{info['config_hash']}, store {info['store']} (llmvem embed/train with this config reuse them)")
