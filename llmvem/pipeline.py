"""The whole LLM-VEM experiment, stage by stage, with every stage cached on disk.

``prepare_inputs`` turns a :class:`~llmvem.config.RunConfig` into what the trainer needs (dataset with a
validation split, captions from the SQLite store, caption embeddings, backbone, cached features).
``run_experiment`` then fits the baselines (ridge on frozen features, LLM-VEM with λ = 0) and LLM-VEM with each
λ > 0, evaluates them on the test split with paired statistics and writes a run folder:

``config.yaml``, ``versions.json``, ``metrics.json``, ``voxel_metrics.npz``, ``lambda_curve.json``,
``gallery.json`` + ``gallery/``, ``models/<name>/`` (the trainer's files) and ``report/index.html``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.config import RunConfig, save_config
from llmvem.data import load_dataset
from llmvem.data.dataset import SPLIT_NAMES, EncodingDataset
from llmvem.embed.base import ImageBackbone
from llmvem.errors import DataValidationError
from llmvem.utils import floored_std, seed_everything, stable_hash, write_json
from llmvem.utils import prepare_run_folder as _prepare_folder

log = logging.getLogger(__name__)


@dataclass
class PreparedInputs:
    """Everything the models are fitted on.

    Attributes
    ----------
    dataset : EncodingDataset
        With ``train``, ``val`` and ``test`` splits.
    captions : dict of split to list of list of str
        Captions of each image, in split order.
    caption_info : dict
        Backend, model id and config hash of the captions.
    text_embeddings : dict of split to array of shape (n_images, text_dim)
        One L2-normalised embedding per image (mean over its captions).
    backbone : ImageBackbone
    features : dict of split to dict of layer to array of shape (n_images, d_layer)
    timing : dict of stage to seconds
    """

    dataset: EncodingDataset
    captions: dict[str, list[list[str]]]
    caption_info: dict[str, Any]
    text_embeddings: dict[str, np.ndarray]
    backbone: ImageBackbone
    features: dict[str, dict[str, np.ndarray]]
    timing: dict[str, float] = field(default_factory=dict)


def cache_root(config: RunConfig) -> Path:
    """The cache folder of ``config`` (captions store, feature cache, text embeddings), created if needed."""
    path = Path(config.cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_config_dataset(config: RunConfig) -> EncodingDataset:
    """The dataset ``config.data`` describes, with its validation split carved."""
    d = config.data
    options = dict(d.loader_options)
    if d.spec == "virtual" or d.spec.startswith("virtual:"):
        options = {"n_train": d.n_train, "n_test": d.n_test, "image_size": d.image_size, **options}
    # ``seed`` seeds both the loader (virtual brain generator) and the validation split.
    try:
        return load_dataset(d.spec, val_fraction=d.val_fraction, seed=d.seed, **options)
    except DataValidationError as exc:
        key = exc.field.removeprefix("option ")
        if exc.source not in ("<in memory>", d.spec) or key not in {*options, "seed", "val_fraction"}:
            raise
        where = f"data.loader_options.{key}" if key in d.loader_options else f"data.{key}"
        raise DataValidationError(f"config key {where}", f"dataset {d.spec}", exc.problem) from exc


def build_captioner(config: RunConfig, dataset: EncodingDataset):
    """The captioner ``config.captions`` describes."""
    from llmvem.captions import make_captioner

    c = config.captions
    return make_captioner(c.backend, dataset=dataset, model=c.model, prompt=c.prompt, max_new_tokens=c.max_new_tokens,
                          base_urls=c.base_urls, api_key_env=c.api_key_env, max_in_flight=c.max_in_flight,
                          captions_file=c.captions_file, device=c.device)


def caption_dataset(config: RunConfig, dataset: EncodingDataset, show_progress: bool = True,
                    captioner: Any = None) -> tuple[dict[str, list[list[str]]], dict[str, Any]]:
    """Caption every image of ``dataset`` into the store (skipping what is done) and read the captions back."""
    from llmvem.captions.run import run_captioning
    from llmvem.captions.store import CaptionStore

    captioner = captioner or build_captioner(config, dataset)
    store_path = Path(config.captions.store).expanduser() if config.captions.store else cache_root(config) / "captions.sqlite"
    with CaptionStore(store_path) as store:
        summary = run_captioning(dataset.all_images(), captioner, store, batch_size=config.captions.batch_size,
                                 show_progress=show_progress)
        if summary.failed:
            from llmvem.errors import CaptionError

            raise CaptionError(f"{summary.failed} images could not be captioned (first: {summary.failed_ids[:5]});"
                               f" finished captions are kept in {store_path}; rerun to retry")
        config_hash = captioner.config_hash
        captions = {s: store.get_for(dataset.splits[s].images, config_hash) for s in dataset.splits}
    info = {"backend": captioner.backend, "model_id": captioner.model_id, "config_hash": config_hash,
            "store": str(store_path)}
    if config.captions.shuffle:  # control condition: caption sets permuted across the images of each split
        captions = shuffle_caption_sets(captions, config.captions.shuffle_seed)
        info["shuffled"] = True
        info["shuffle_seed"] = config.captions.shuffle_seed
    return captions, info


def shuffle_caption_sets(captions: dict[str, list[list[str]]], seed: int) -> dict[str, list[list[str]]]:
    """The caption sets permuted across the images of each split (the shuffled-captions control).

    Each split (drawn in ``train``, ``val``, ``test`` order from one generator) gets its own uniform random
    permutation, so an image receives the caption set of a random image of the same split (its own with
    probability 1/n); the caption sets of every split are unchanged as a multiset.
    """
    rng = np.random.default_rng(seed)
    out: dict[str, list[list[str]]] = {}
    for split in [s for s in SPLIT_NAMES if s in captions]:
        perm = rng.permutation(len(captions[split]))
        out[split] = [list(captions[split][int(j)]) for j in perm]
    return out


def embed_captions(config: RunConfig, captions: dict[str, list[list[str]]], show_progress: bool = True
                   ) -> dict[str, np.ndarray]:
    """Caption embeddings per split, cached as ``.npy`` keyed by the encoder and the caption texts."""
    from llmvem.embed.text import load_text_encoder

    key = stable_hash({"encoder": config.text.encoder, "policy": config.text.long_policy,
                       "captions": {s: captions[s] for s in sorted(captions)}})
    folder = cache_root(config) / "text_embeddings"
    out: dict[str, np.ndarray] = {}
    paths = {s: folder / f"{key}_{s}.npy" for s in captions}
    if all(p.exists() for p in paths.values()):
        return {s: np.load(p, allow_pickle=False) for s, p in paths.items()}
    encoder = load_text_encoder(config.text.encoder, device=config.text.device, long_policy=config.text.long_policy)
    folder.mkdir(parents=True, exist_ok=True)
    for split, caps in captions.items():
        emb = encoder.encode_caption_sets(caps, batch_size=config.text.batch_size, show_progress=show_progress)
        out[split] = emb.astype(np.float32)
        tmp = paths[split].with_suffix(".tmp.npy")
        np.save(tmp, out[split])
        tmp.replace(paths[split])
    return out


def load_config_backbone(config: RunConfig) -> ImageBackbone:
    """The image backbone ``config.backbone`` describes."""
    from llmvem.embed.image import load_backbone

    b = config.backbone
    return load_backbone(b.name, pretrained=b.pretrained, weights=b.weights, image_size=b.image_size)


def extract_split_features(config: RunConfig, dataset: EncodingDataset, backbone: ImageBackbone,
                           layers: Sequence[str] | None = None, show_progress: bool = True
                           ) -> dict[str, dict[str, np.ndarray]]:
    """Frozen backbone features of every split (from the HDF5 feature cache when already computed)."""
    from llmvem.embed.cache import FeatureCache, extract_features

    layers = list(layers or config.backbone.layers)
    if "pooled" not in layers:  # the alignment head reads the pooled embedding
        layers.append("pooled")
    cache = FeatureCache(cache_root(config) / "features.h5")
    return {
        split: extract_features(dataset.splits[split].images, backbone, layers=layers, cache=cache,
                                batch_size=config.backbone.batch_size, device=config.backbone.device,
                                dtype=config.backbone.feature_dtype, show_progress=show_progress)
        for split in dataset.splits
    }


def prepare_inputs(config: RunConfig, show_progress: bool = True, dataset: EncodingDataset | None = None,
                   ) -> PreparedInputs:
    """Dataset → captions → caption embeddings → backbone features, each stage cached."""
    timing: dict[str, float] = {}
    t = time.perf_counter()
    dataset = dataset if dataset is not None else load_config_dataset(config)
    if dataset.val is None:
        dataset = dataset.with_validation_split(config.data.val_fraction, config.data.seed)
    timing["data"] = time.perf_counter() - t
    t = time.perf_counter()
    captions, caption_info = caption_dataset(config, dataset, show_progress)
    timing["captions"] = time.perf_counter() - t
    t = time.perf_counter()
    text_embeddings = embed_captions(config, captions, show_progress)
    timing["text_embeddings"] = time.perf_counter() - t
    t = time.perf_counter()
    backbone = load_config_backbone(config)
    features = extract_split_features(config, dataset, backbone, show_progress=show_progress)
    timing["image_features"] = time.perf_counter() - t
    return PreparedInputs(dataset, captions, caption_info, text_embeddings, backbone, features, timing)


# ------------------------------------------------------------------------------------------- models
def concat_features(features: dict[str, np.ndarray], layers: Sequence[str]) -> np.ndarray:
    """Concatenate the named layers' features, shape (n_images, Σ d_layer), float32."""
    return np.concatenate([np.asarray(features[layer], dtype=np.float32) for layer in layers], axis=1)


def fit_ridge_baseline(config: RunConfig, inputs: PreparedInputs, layers: Sequence[str] | None = None
                       ) -> dict[str, np.ndarray]:
    """Voxelwise ridge (per-voxel alpha by K-fold CV) on frozen features of train+val; predictions per split."""
    from llmvem.evaluate.ridge import RidgeCV

    layers = list(layers or config.backbone.layers)
    ds = inputs.dataset
    fit_splits = [s for s in ("train", "val") if s in ds.splits]
    X = np.concatenate([concat_features(inputs.features[s], layers) for s in fit_splits])
    Y = np.concatenate([ds.splits[s].responses for s in fit_splits])
    mu, sd = X.mean(axis=0), floored_std(X.std(axis=0)).astype(np.float32)
    ridge = RidgeCV(alphas=config.evaluate.ridge_alphas, cv=config.evaluate.ridge_folds,
                    device=config.evaluate.ridge_device).fit((X - mu) / sd, Y)
    return {s: ridge.predict((concat_features(inputs.features[s], layers) - mu) / sd) for s in ds.splits}


def model_name(lam: float) -> str:
    """Run-folder name of the LLM-VEM model trained with ``lambda_align = lam``."""
    return f"llmvem_lambda{lam:g}"


def train_llmvem(config: RunConfig, inputs: PreparedInputs, lam: float, out_dir: Path, resume: bool = False,
                 show_progress: bool = True) -> dict[str, np.ndarray]:
    """Train LLM-VEM with ``lambda_align = lam`` into ``out_dir``; predictions per split (from the best epoch)."""
    from llmvem.train import train_encoding_model

    cfg = config.model_copy(deep=True)
    cfg.model.lambda_align = float(lam)
    # stage 2 fine-tunes the backbone in place: give it a private copy, so the next model (another λ) starts from
    # the same frozen backbone that the cached features describe
    backbone = copy.deepcopy(inputs.backbone) if cfg.train.stage2.epochs > 0 else inputs.backbone
    result = train_encoding_model(cfg, inputs.dataset, text_embeddings=inputs.text_embeddings if lam > 0 else None,
                                  backbone=backbone, features=inputs.features, out_dir=out_dir,
                                  resume=resume, show_progress=show_progress)
    return result.predictions


# --------------------------------------------------------------------------------------- evaluation
def _evaluate_all(ds: EncodingDataset, predictions: dict[str, dict[str, np.ndarray]], labels: dict[str, str],
                  lambdas: dict[str, float | None], n_boot: int, seed: int) -> tuple[dict, dict, list]:
    from llmvem.evaluate.metrics import evaluate_predictions
    from llmvem.evaluate.stats import paired_bootstrap

    y = ds.test.responses
    models: dict[str, Any] = {}
    voxel: dict[str, np.ndarray] = {}
    for name, preds in predictions.items():
        ev = evaluate_predictions(y, preds["test"], ds.noise_ceiling, ds.roi_masks, ds.hemisphere)
        models[name] = {"label": labels[name], "kind": "ridge" if name == "ridge" else "llmvem",
                        "lambda": lambdas[name], **ev["summary"]}
        voxel[f"r__{name}"] = ev["r"]
        if ev["accuracy"] is not None:
            voxel[f"accuracy__{name}"] = ev["accuracy"]
    comparisons = []
    base = model_name(0.0)
    pairs = []
    if base in predictions:
        pairs += [(base, n) for n in predictions if n not in (base, "ridge")]
    if "ridge" in predictions:
        pairs += [("ridge", n) for n in predictions if n != "ridge"]
    for a, b in pairs:
        if n_boot <= 0:
            break
        res = paired_bootstrap(y, predictions[a]["test"], predictions[b]["test"], n_boot=n_boot, seed=seed,
                               noise_ceiling=ds.noise_ceiling, roi_masks=ds.roi_masks)
        comparisons.append({"a": a, "b": b, **_flatten_comparison(res)})
    return models, voxel, comparisons


def _flatten_comparison(res: dict[str, Any]) -> dict[str, Any]:
    """Bootstrap output → the report's comparison record (metric mean_r, with accuracy and per-ROI parts)."""

    def record(group: dict[str, Any]) -> dict[str, Any]:
        r = group["r"]
        rec = {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"],
               "fraction_improved": group["fraction_improved"], "a_value": r["a"], "b_value": r["b"]}
        if "accuracy" in group:
            rec["accuracy"] = group["accuracy"]
        return rec

    return {"metric": "mean_r", **record(res["overall"]),
            "per_roi": {roi: record(g) for roi, g in res["per_roi"].items()}}


def _write_gallery(out_dir: Path, inputs: PreparedInputs, n: int = 8) -> None:
    ds = inputs.dataset
    folder = out_dir / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    entries = []
    test = ds.test
    idx = np.linspace(0, len(test) - 1, min(n, len(test))).astype(int)
    source = f"{inputs.caption_info['backend']}: {inputs.caption_info['model_id']}"
    for i in idx:
        img = test.images.load(int(i))
        img.thumbnail((160, 160))
        name = f"img{int(i):04d}.png"
        img.save(folder / name)
        sources = {source: inputs.captions["test"][int(i)]}
        truth = ds.captions.get(test.images.ids[int(i)])
        if truth and inputs.caption_info["backend"] != "dataset":
            sources["dataset"] = truth
        entries.append({"image": f"gallery/{name}", "id": test.images.ids[int(i)], "captions": sources})
    write_json(out_dir / "gallery.json", entries)


def _versions(seed: int) -> dict[str, Any]:
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "seed": seed}
    for pkg in ("llmvem", "torch", "timm", "transformers", "sentence-transformers", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    return out


EXPERIMENT_OUTPUTS = ("config.yaml", "versions.json", "metrics.json", "voxel_metrics.npz", "lambda_curve.json",
                      "gallery.json", "gallery", "models", "report", "extra_sections")


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create an experiment folder (see :func:`llmvem.utils.prepare_run_folder`); overwrite removes only
    ``EXPERIMENT_OUTPUTS``."""
    _prepare_folder(out_dir, resume, overwrite, outputs=EXPERIMENT_OUTPUTS)


def run_experiment(config: RunConfig, out_dir: str | Path, lambdas: Sequence[float] | None = None,
                   resume: bool = False, overwrite: bool = False, show_progress: bool = True,
                   report: bool = True, inputs: PreparedInputs | None = None,
                   on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Fit the baselines and LLM-VEM at each λ, evaluate, write the run folder (and the HTML report).

    Parameters
    ----------
    config : RunConfig
    out_dir : path
        Run folder; refused if it exists unless ``resume`` (finished models are reused) or ``overwrite``.
    lambdas : sequence of float, optional
        λ values to train; default ``[0, config.model.lambda_align] + config.evaluate.compare_lambdas``
        (λ = 0 is the plain encoding model baseline, included when ``"lambda0"`` is in ``evaluate.baselines``).
    on_stage : callable, optional
        Called with a short message as each stage starts (the CLI prints it).

    Returns
    -------
    dict
        The content of ``metrics.json``.
    """
    out_dir = Path(out_dir)
    prepare_run_folder(out_dir, resume, overwrite)
    say = on_stage or (lambda msg: log.info(msg))
    seed_everything(config.seed)
    t0 = time.perf_counter()
    save_config(config, out_dir / "config.yaml")
    write_json(out_dir / "versions.json", _versions(config.seed))
    if inputs is None:
        say("preparing inputs: dataset, captions, caption embeddings, image features")
        inputs = prepare_inputs(config, show_progress=show_progress)
    ds = inputs.dataset
    timing = dict(inputs.timing)

    if lambdas is None:
        lambdas = [config.model.lambda_align, *config.evaluate.compare_lambdas]
        if "lambda0" in config.evaluate.baselines:
            lambdas = [0.0, *lambdas]
    lambdas = sorted({float(x) for x in lambdas})

    predictions: dict[str, dict[str, np.ndarray]] = {}
    labels: dict[str, str] = {}
    lam_of: dict[str, float | None] = {}
    if "ridge" in config.evaluate.baselines:
        say("fitting the ridge baseline on frozen features")
        t = time.perf_counter()
        predictions["ridge"] = fit_ridge_baseline(config, inputs)
        timing["ridge"] = time.perf_counter() - t
        labels["ridge"], lam_of["ridge"] = "Ridge (frozen features)", None
    for lam in lambdas:
        name = model_name(lam)
        say(f"training LLM-VEM with lambda = {lam:g}")
        t = time.perf_counter()
        predictions[name] = train_llmvem(config, inputs, lam, out_dir / "models" / name, resume=resume,
                                         show_progress=show_progress)
        timing[name] = time.perf_counter() - t
        labels[name] = f"LLM-VEM λ={lam:g}" + (" (no alignment)" if lam == 0 else "")
        lam_of[name] = lam

    say("evaluating on the test split")
    t = time.perf_counter()
    models, voxel, comparisons = _evaluate_all(ds, predictions, labels, lam_of, config.evaluate.bootstrap, config.seed)
    timing["evaluate"] = time.perf_counter() - t
    np.savez_compressed(out_dir / "voxel_metrics.npz", **voxel,
                        **({"noise_ceiling": ds.noise_ceiling} if ds.noise_ceiling is not None else {}),
                        **({"hemisphere": ds.hemisphere} if ds.hemisphere is not None else {}),
                        **({"fsaverage_index": ds.fsaverage_index} if ds.fsaverage_index is not None else {}),
                        **{f"roi__{k}": v for k, v in ds.roi_masks.items()})
    for name, preds in predictions.items():
        folder = out_dir / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "predictions_test.npy", preds["test"].astype(np.float32))
    curve = [{"lambda": lam_of[n], "model": n, "mean_r": models[n]["mean_r"],
              "per_roi": {roi: v["mean_r"] for roi, v in models[n]["per_roi"].items()}}
             for n in predictions if n != "ridge"]
    write_json(out_dir / "lambda_curve.json", sorted(curve, key=lambda c: c["lambda"]))
    _write_gallery(out_dir, inputs)
    if config.evaluate.text_to_brain:  # llmvem.explain: text-to-brain readouts + voxel descriptions sections
        from llmvem.explain import add_text_to_brain_section

        say("text-to-brain readouts and voxel descriptions")
        t = time.perf_counter()
        add_text_to_brain_section(out_dir, config, inputs)
        timing["text_to_brain"] = time.perf_counter() - t
    timing["total_s"] = time.perf_counter() - t0
    metrics = {
        "dataset": {"name": ds.name, **{f"n_{s}": len(ds.splits[s]) for s in SPLIT_NAMES if s in ds.splits},
                    "n_voxels": ds.n_voxels, "rois": {k: int(v.sum()) for k, v in ds.roi_masks.items()}},
        "models": models,
        "comparisons": comparisons,
        "captions": inputs.caption_info,
        "timing": {"total_s": timing.pop("total_s"), "stages": timing},
    }
    write_json(out_dir / "metrics.json", metrics)
    if report:
        say("writing the report")
        from llmvem.report import write_report

        metrics["report"] = str(write_report([out_dir]))
    return metrics
