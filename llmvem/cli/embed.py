"""``llmvem embed``: caption embeddings (``--text``) and image features into the feature cache (``--images``)."""

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

_EXAMPLES = """\b
Examples:
  llmvem embed --config algonauts_eva02 --set data.spec=data/algonauts_2023/subj01 \\
      --set captions.store=captions/subj01.sqlite        (the caches `llmvem train` with that config reads)
  llmvem embed virtual --images --text --text-out virtual_text.npz
  llmvem embed data/algonauts_2023/subj01 --images --backbone timm:eva02_base_patch14_224.mim_in22k \\
      --layers pooled,block9 --dtype float16 --device cuda --batch-size 128
  llmvem embed data/algonauts_2023/subj01 --text --captions subj01.sqlite --text-encoder minilm \\
      --text-out subj01_text.npz
  llmvem embed v4:data/v4_cowley2023:210322 --images --layers pooled,block8@grid4,block12@map --dtype float16
  llmvem embed data/my_folder --images --layers pooled,block2@pca256 --pca-fit-on train_images.txt \
      --pca-out block2_pca.npz     (PCA of block2's map fitted on the listed (training) images only)
"""


def _fit_rows(path: Path, ids: list[str]) -> list[int]:
    """Rows of the images named in ``path`` (one image id or file name per line; blank lines and ``#`` comments
    skipped), in image order."""
    from llmvem.errors import DataValidationError

    try:
        names = [ln.strip() for ln in path.read_text(encoding="utf-8").splitlines()]
    except (OSError, UnicodeDecodeError) as exc:
        raise DataValidationError(path, "--pca-fit-on", f"cannot read the image list ({exc})") from exc
    names = [n for n in names if n and not n.startswith("#")]
    row_of: dict[str, int] = {}
    for i, image_id in enumerate(ids):
        for alias in (image_id, Path(image_id).name, Path(image_id).stem):
            row_of.setdefault(alias, i)
    unknown = [n for n in names if n not in row_of]
    if unknown:
        raise DataValidationError(path, "--pca-fit-on", f"{len(unknown)} names are not images of the dataset "
                                  f"(first: {unknown[:3]}); expected image ids or file names such as {ids[:2]}")
    rows = sorted({row_of[n] for n in names})
    if len(rows) < 2:
        raise DataValidationError(path, "--pca-fit-on", f"lists {len(rows)} image(s); a PCA needs at least 2")
    return rows


def _text_embeddings(ds, captions: Path | None, caption_config: str | None, encoder_name: str, long_policy: str,
                     batch_size: int, device: str, out: Path) -> dict:
    import numpy as np

    from llmvem.embed.base import pool_caption_sets
    from llmvem.embed.text import load_text_encoder
    from llmvem.errors import DataValidationError
    from llmvem.utils import atomic_write

    images = ds.all_images()
    split_of = [name for name in ("train", "val", "test") if name in ds.splits for _ in ds.splits[name].images.ids]
    if captions is not None:
        from llmvem.captions.store import CaptionStore

        with CaptionStore(captions, readonly=True) as store:
            caption_sets = store.get_for(images, caption_config, missing="error")
        source = str(captions)
    else:
        caption_sets = [ds.captions.get(i, []) for i in images.ids]
        absent = [i for i, caps in zip(images.ids, caption_sets, strict=True) if not caps]
        if absent:
            raise DataValidationError(
                ds.source or ds.name, "captions",
                f"{len(absent)} of {len(images)} images have no captions in the dataset (first ids: {absent[:5]}); "
                "caption them with `llmvem caption` and pass --captions STORE")
        source = f"dataset {ds.name}"
    encoder = load_text_encoder(encoder_name, device=device, long_policy=long_policy)  # type: ignore[arg-type]
    flat = [c for caps in caption_sets for c in caps]
    result = encoder.encode(flat, batch_size=batch_size, show_progress=True)
    counts = [len(c) for c in caption_sets]
    per_image = pool_caption_sets(result.embeddings, counts)
    owner = np.repeat(np.arange(len(caption_sets)), counts)
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as fh:
        np.savez(fh, embeddings=per_image, image_ids=np.array(images.ids), splits=np.array(split_of),
                 content_hashes=np.array(images.content_hashes()), n_captions=np.array([len(c) for c in caption_sets]),
                 caption_image_index=owner, caption_n_tokens=result.n_tokens, caption_long=result.long,
                 caption_truncated=result.truncated, model_id=np.array(encoder.model_id),
                 long_policy=np.array(long_policy))
    return {"images": len(caption_sets), "captions": len(flat), "long captions": int(result.long.sum()),
            "truncated": int(result.truncated.sum()), "dim": encoder.dim, "model": encoder.model_id,
            "captions from": source, "written": str(out)}


@app.command("embed", epilog=_EXAMPLES)
def embed(
    dataset: str | None = typer.Argument(None, help="Dataset spec: 'virtual', an Algonauts subjNN folder, a generic "
                                         "folder, 'v4:ROOT:SESSION'. All its images (train, val, test) are embedded. "
                                         "Leave out with --config."),
    config: str | None = typer.Option(None, "--config", help="Embed as this YAML/shipped config says: its captions "
                                      "(the store must hold them), text encoder, backbone, layers and dtype, into "
                                      "the caches of its cache_dir, exactly what `llmvem train --config` reads; the "
                                      "other options are then not used."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="--config: override a config value "
                                        "(repeatable; values are YAML)."),
    other_captions: str = other_captions_option(),
    text: bool = typer.Option(False, "--text", help="Embed each image's captions (mean of its captions)."),
    images: bool = typer.Option(False, "--images", help="Compute backbone features into the feature cache."),
    captions: Path | None = typer.Option(None, "--captions", help="--text: SQLite caption store written by "
                                         "`llmvem caption` (default: the dataset's own captions)."),
    caption_config: str | None = typer.Option(None, "--caption-config", help="--text: captioner config hash when "
                                              "the store holds several."),
    text_encoder: str = typer.Option("minilm", "--text-encoder", help="minilm (bundled, offline), st:<path-or-id> "
                                     "or clip:<path-or-id>."),
    long_policy: str = typer.Option("sentence_mean", "--long-policy", help="Captions over the encoder's context: "
                                    "sentence_mean (embed sentences, average) or truncate."),
    text_out: Path = typer.Option(Path("text_embeddings.npz"), "--text-out", help="--text: output .npz (per-image "
                                  "embeddings, image ids, splits, per-caption token counts and long flags)."),
    backbone_name: str = typer.Option("efficientnet_lite0", "--backbone", help="efficientnet_lite0 (offline), "
                                      "timm:<name> or hf:<path-or-id>."),
    pretrained: bool = typer.Option(True, "--pretrained/--random-init", help="Pretrained backbone weights."),
    weights: Path | None = typer.Option(None, "--weights", help="timm: local weights file (.safetensors/.pth)."),
    layers: str = typer.Option("pooled", "--layers", help="Comma-separated layers, e.g. pooled,block9 (spatially "
                               "averaged). Keep space with a mode: block9@grid4 (4x4 grid), block9@map (full map; "
                               "ViT patch tokens as a map), block9@proj512 (fixed random projection of the map), "
                               "block9@cls (ViT class token), block9@pca64 (the map's first 64 principal components, with "
                               "--pca-fit-on)."),
    pca_fit_on: Path | None = typer.Option(None, "--pca-fit-on", help="Text file of image ids or file names, one "
                                           "per line (typically the training images): @pca<K> layers (the map's "
                                           "first K principal components) are fitted on these images only and "
                                           "written for every image to --pca-out."),
    pca_out: Path = typer.Option(Path("pca_features.npz"), "--pca-out", help="--pca-fit-on: output .npz (one "
                                 "(n_images, K) array per @pca layer, image ids, content hashes, fit_on mask)."),
    cache: Path = typer.Option(Path("~/.cache/llmvem/features.h5"), "--cache", help="Feature cache (HDF5); fitted "
                               "PCA projections go to map_pca/ beside it."),
    batch_size: int = typer.Option(32, "--batch-size", help="Images (or caption pieces) per forward pass."),
    device: str = typer.Option("auto", "--device", help="auto, cpu, cuda, cuda:1, ..."),
    dtype: str = typer.Option("float32", "--dtype", help="Feature storage: float32 or float16."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Embed a dataset's captions (text encoder) and/or images (backbone features, cached on disk).

    Without --text or --images, does both. Image features are keyed by image content and backbone settings, so
    a rerun (or another command needing the same features) reads them from the cache; an interrupted run resumes
    where it stopped.
    """
    from llmvem.data import load_dataset
    from llmvem.embed.spatial import parse_layer_spec
    from llmvem.errors import ConfigError

    show = use_progress(progress)
    use_threads(threads)
    if config is not None:
        if dataset is not None:
            raise ConfigError("--config takes the dataset from data.spec; leave out DATASET (or --set data.spec=...)")
        _embed_from_config(config, overrides, other_captions, show)
        return
    if dataset is None:
        raise ConfigError("give a dataset spec (or --config)")
    if not text and not images:
        text = images = True
    if text:
        check_output_file(text_out, "--text-out", (".npz",))
    layer_list = [name.strip() for name in layers.split(",") if name.strip()]
    fitted = _fitted_specs(layer_list, pca_fit_on, images)
    if images:
        check_output_file(cache.expanduser(), "--cache")
        if fitted:
            check_output_file(pca_out, "--pca-out", (".npz",))
    ds = load_dataset(dataset)
    summary: dict[str, object] = {"dataset": ds.name}
    if images:
        from llmvem.embed.cache import FeatureCache, compute_features
        from llmvem.embed.image import load_backbone

        all_images = ds.all_images()
        fit_rows = _fit_rows(pca_fit_on, list(all_images.ids)) if fitted and pca_fit_on is not None else []
        direct = list(dict.fromkeys([k for k in layer_list if k not in fitted] +
                                    [parse_layer_spec(k).source for k in fitted]))
        backbone = load_backbone(backbone_name, pretrained=pretrained, device="cpu", weights=weights)
        feature_cache = FeatureCache(cache.expanduser())
        result = compute_features(all_images, backbone, layers=direct, cache=feature_cache,
                                  batch_size=batch_size, device=device, dtype=dtype,  # type: ignore[arg-type]
                                  show_progress=True)
        feats = dict(result.features)
        if fitted:
            summary.update(_write_map_pca(fitted, feats, fit_rows, all_images, backbone, feature_cache.path.parent,
                                          dtype, pca_out))
        summary.update({
            "backbone": backbone.model_id,
            "feature layers": ", ".join(f"{k} {v.shape[1]}-d" if v.ndim == 2 else f"{k} {'×'.join(map(str, v.shape[1:]))}"
                                        for k, v in feats.items() if k in layer_list),
            "images computed": result.n_computed, "images from cache": result.n_cached,
            "feature cache": f"{feature_cache.path} (config {result.key})"})
    if text:
        summary.update(_text_embeddings(ds, captions, caption_config, text_encoder, long_policy, batch_size, device,
                                        text_out))
    for key, value in summary.items():
        typer.echo(f"{key:>18}: {value}")


def _fitted_specs(layer_list: list[str], pca_fit_on: Path | None, images: bool) -> list[str]:
    """The fitted (``@pca<K>``) specs of ``--layers``; refused without ``--pca-fit-on`` (and the option without
    them)."""
    from llmvem.embed.spatial import parse_layer_spec
    from llmvem.errors import ConfigError

    fitted = [k for k in layer_list if parse_layer_spec(k).fitted]
    if fitted and pca_fit_on is None and images:
        raise ConfigError(f"--layers {fitted[0]}: @pca<K> is fitted on training images; pass --pca-fit-on FILE (the "
                          f"images to fit it on, one id per line), or use {parse_layer_spec(fitted[0]).layer}@proj"
                          f"{parse_layer_spec(fitted[0]).size} (a fixed projection)")
    if pca_fit_on is not None and not fitted:
        raise ConfigError(f"--pca-fit-on {pca_fit_on}: --layers has no @pca<K> layer to fit, e.g. block8@pca64")
    return fitted


def _write_map_pca(fitted: list[str], feats: dict, fit_rows: list[int], images, backbone, cache_dir: Path,
                   dtype: str, out: Path) -> dict[str, object]:
    """Fit each ``@pca<K>`` of ``fitted`` on the maps of ``fit_rows`` (:func:`llmvem.inputs.add_map_pca`, seed 0 as
    the configs' default, so ``llmvem train`` finds the same projection), add it to ``feats`` (every image), and
    write ``out``."""
    import numpy as np

    from llmvem.embed.spatial import parse_layer_spec
    from llmvem.inputs import add_map_pca
    from llmvem.utils import atomic_write

    sources = {parse_layer_spec(k).source for k in fitted}
    add_map_pca(fitted, {s: feats[s][fit_rows] for s in sources}, [feats], cache_dir, backbone, dtype, seed=0)
    fit_on = np.zeros(len(images), dtype=bool)
    fit_on[fit_rows] = True
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(out, "wb") as fh:
        np.savez(fh, **{k: feats[k] for k in fitted}, image_ids=np.array(images.ids),
                 content_hashes=np.array(images.content_hashes()), fit_on=fit_on)
    return {"PCA fitted on": f"{len(fit_rows)} of {len(images)} images", "PCA features": str(out)}


def _embed_from_config(config: str, overrides: list[str], other_captions: str, show: bool) -> None:
    """``embed --config``: :func:`llmvem.inputs.prepare_inputs`, the caches ``train`` reads."""
    from llmvem.config import apply_overrides, load_config
    from llmvem.inputs import prepare_inputs
    from llmvem.pipeline import extraction_config

    cfg = apply_overrides(load_config(config), overrides)
    inputs = prepare_inputs(extraction_config(cfg), show_progress=show, other_captions=other_captions)
    summary = {"dataset": inputs.dataset.name,
               "captions": f"{inputs.caption_info['model_id']} (config {inputs.caption_info['config_hash']})",
               "text embeddings": f"{cfg.text.encoder}, {next(iter(inputs.text_embeddings.values())).shape[1]}-d",
               "backbone": f"{cfg.backbone.name}, layers {', '.join(inputs.features['train'])}, "
                           f"{cfg.backbone.feature_dtype}",
               "challenge images": 0 if inputs.challenge_features is None else
               len(next(iter(inputs.challenge_features.values()))),
               "cache": str(cfg.cache_dir)}
    for key, value in summary.items():
        typer.echo(f"{key:>18}: {value}")
