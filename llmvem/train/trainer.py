"""Two-stage training of the LLM-VEM network, as in the paper: the entry point of one subject, and the shared
preparation of every training run (input checks, in-memory data of each data key, network, run folder).

The loop itself is :class:`llmvem.train.engine.Engine` (stages, AdamW, schedule, clipping, accumulation, DDP,
resume, model selection, curves); the losses are :class:`llmvem.train.task.EncodingTask`'s. One subject is the
one-data-key case (key ``"main"``); :func:`llmvem.train.multisubject.train_multisubject` is the several-key case
of the same code.

The run folder receives ``config.yaml``, ``versions.json``, ``curves.csv``, ``training.json``,
``checkpoints/``, ``model.safetensors`` and ``predictions_val.npy`` / ``predictions_test.npy``.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmvem.config import RunConfig, config_diff, load_config, save_config
from llmvem.data.dataset import EncodingDataset
from llmvem.embed.base import ImageBackbone
from llmvem.embed.trunk_cache import attach_trunk_cache
from llmvem.errors import CheckpointError, ConfigError, DataValidationError
from llmvem.model.network import DEFAULT_KEY, EMBED_LAYER, LLMVEM
from llmvem.model.readout import PCAVoxelReadout
from llmvem.model.start import random_start_parameters
from llmvem.resources import stage
from llmvem.train.checkpoint import save_weights
from llmvem.train.distributed import DistInfo, barrier, cleanup_distributed, setup_distributed
from llmvem.train.engine import Engine, mean_r
from llmvem.train.stream import CaptionStream, stream_key_data
from llmvem.train.task import SPLITS, EncodingTask, KeyData
from llmvem.train.tensors import backbone_features, load_image_tensor, readout_layers, resolve_precision
from llmvem.utils import prepare_run_folder as _prepare_folder
from llmvem.utils import seed_everything, stable_hash, versions, write_json

__all__ = ["OUTPUT_NAMES", "CaptionStream", "SubjectData", "TrainResult", "alignment_is_inert",
           "config_fingerprint", "prepare_run_folder", "train_encoding_model"]

log = logging.getLogger(__name__)

#: Files and folders the trainer writes in a run folder (``overwrite`` removes exactly these).
OUTPUT_NAMES = ("config.yaml", "versions.json", "curves.csv", "training.json", "checkpoints", "model.safetensors",
                "predictions_val.npy", "predictions_test.npy")

#: Config keys that do not change what is trained (resuming with other values is allowed).
NON_SEMANTIC_KEYS = ("evaluate", "cache_dir", "train.num_workers", "train.device", "train.compile",
                     "train.checkpoint_every", "captions.base_urls", "captions.api_key_env",
                     "captions.max_in_flight", "captions.batch_size", "captions.device", "captions.store",
                     "text.batch_size", "text.device", "backbone.batch_size", "backbone.device", "multisubject")

Callback = Callable[[str, dict[str, Any]], None]


def _semantic_config(config: RunConfig) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    for key in NON_SEMANTIC_KEYS:
        node = data
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.get(p, {})
        node.pop(parts[-1], None)
    return data


def config_fingerprint(config: RunConfig) -> str:
    """Hash of everything in ``config`` that changes what is trained (see ``NON_SEMANTIC_KEYS``)."""
    return stable_hash(_semantic_config(config))


@dataclass
class SubjectData:
    """What one data key (a subject, a recording session) contributes to training.

    Attributes
    ----------
    name : str
        Identifier (letters, digits, ``_`` and ``-``), unique among the keys of a run.
    dataset : EncodingDataset
        With ``train``, ``val`` and ``test`` splits and responses for train and val.
    features : dict of split to dict of layer to array of shape (n_images, d_layer), optional
        Frozen-backbone features of every split for the readout layers (the feature cache's output); None
        computes them with the backbone.
    text_embeddings : dict of split to array of shape (n_images, text_dim), optional
        L2-normalised caption embedding of each image (``"train"`` at least); needed when
        ``model.lambda_align > 0``.
    spec : str, optional
        The dataset spec it was loaded from (recorded in the outputs).
    text_ids : dict of split to int array of shape (n_images,), optional
        Caption identity of each image (:func:`llmvem.embed.text.caption_ids`): equal ids are positives of each
        other in the contrastive loss. None groups bit-identical embeddings instead (a fallback).
    """

    name: str
    dataset: EncodingDataset
    features: Mapping[str, Mapping[str, np.ndarray]] | None = None
    text_embeddings: Mapping[str, np.ndarray] | None = None
    spec: str | None = None
    text_ids: Mapping[str, np.ndarray] | None = None


@dataclass
class TrainResult:
    """What :func:`train_encoding_model` returns.

    Attributes
    ----------
    out_dir : Path
    network : LLMVEM
        The trained network (best weights of the last stage), in eval mode, on the training device.
    predictions : dict of str to array of shape (n_images, n_voxels)
        ``"val"`` and ``"test"`` predictions (also saved as ``predictions_<split>.npy``).
    metrics : dict
        ``val_mean_r``, ``test_mean_r`` (when test responses exist), per-stage best epochs and scores.
    curves : list of dict
        One row per epoch (the rows of ``curves.csv``).
    config : RunConfig
    stages : dict
        Per stage: epochs run, best epoch, best validation r, early stopped, seconds, images/s.
    """

    out_dir: Path
    network: LLMVEM
    predictions: dict[str, np.ndarray]
    metrics: dict[str, Any]
    curves: list[dict[str, Any]]
    config: RunConfig
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out_dir``, refusing a non-empty one unless ``resume`` or ``overwrite``.

    ``overwrite`` deletes only what the trainer writes (``OUTPUT_NAMES``), never other files in the folder;
    see :func:`llmvem.utils.prepare_run_folder`.
    """
    _prepare_folder(out_dir, resume, overwrite, outputs=OUTPUT_NAMES)


# -------------------------------------------------------------------------------------------- checks
def _feature_layers(config: RunConfig) -> list[str]:
    """Layers each key's features must hold: the readout layers, the spatial readout's maps, plus ``"pooled"``
    for a head without core (trained with λ > 0, or read by the readout with ``model.readout_aligned``)."""
    layers = readout_layers(config)
    m = config.model
    if (m.lambda_align > 0 or m.readout_aligned) and m.core is None and EMBED_LAYER not in layers:
        layers.append(EMBED_LAYER)
    return layers


def alignment_is_inert(config: RunConfig) -> bool:
    """Whether ``model.lambda_align > 0`` cannot change any voxel prediction.

    Without a core the alignment head and the readout share no trained parameter in stage 1, so the contrastive
    loss reaches the predictions only through the backbone blocks that stage 2 fine-tunes, unless the readout
    reads the aligned embedding (``model.readout_aligned``).
    """
    m = config.model
    return m.lambda_align > 0 and m.core is None and not m.readout_aligned and config.train.stage2.epochs == 0


def warn_if_alignment_inert(config: RunConfig) -> None:
    """One warning line when :func:`alignment_is_inert`."""
    if alignment_is_inert(config):
        log.warning("model.lambda_align = %g cannot change any prediction: there is no core (model.core) and no "
                    "stage 2 (train.stage2.epochs = 0), so the alignment head shares no parameter with the readout; "
                    "set model.core=linear|mlp, model.readout_aligned=true or train.stage2.epochs > 0",
                    config.model.lambda_align)


def check_sources(config: RunConfig, sources: Sequence[SubjectData], backbone: ImageBackbone | None,
                  world_size: int = 1, tag: bool = False, streams: Sequence[CaptionStream] = ()) -> None:
    """Validate what a training run is given; errors name the key, split, field and expectation.

    ``tag`` puts the key's name into field names (``features['sub0']['train']``), for several keys.
    ``streams`` are captions-only keys (:class:`CaptionStream`): captions and no responses.
    """
    lam, readout_layers, layers = float(config.model.lambda_align), list(config.backbone.layers), \
        _feature_layers(config)
    names = [s.name for s in sources]
    if not names and not streams:
        raise ConfigError("training needs at least one data key (a subject, or a caption stream)")
    if not names and (lam <= 0 or not any(st.weight > 0 for st in streams)):
        raise ConfigError("a captions-only run (caption streams, no subject) trains only the contrastive term: it "
                          f"needs model.lambda_align > 0 (got {lam}) and a stream weight > 0")
    if len(set(names)) != len(names):
        raise ConfigError(f"subject names must be unique, got {names}")
    s2 = config.train.stage2
    dims: dict[str, tuple[int, ...]] | None = None
    text_dims: set[int] = set()
    for s in sources:
        ds, src, t = s.dataset, s.dataset.source, f"[{s.name!r}]" if tag else ""
        who = f"subject {s.name}: " if tag else ""
        if ds.val is None:
            raise DataValidationError(src, "splits", f"{who}expected a validation split for early stopping; call "
                                      "dataset.with_validation_split(fraction, seed) first")
        for split in ("train", "val"):
            if ds.splits[split].responses is None:
                raise DataValidationError(src, f"{split}.responses", f"{who}missing; training needs responses")
        if lam > 0 and s.text_embeddings is None:
            raise ConfigError(f"model.lambda_align = {lam} needs caption embeddings" + (
                f" of subject {s.name}" if tag else "") + ": pass text_embeddings, or set model.lambda_align=0 "
                "for the plain encoding model")
        if s.text_embeddings is not None:
            if "train" not in s.text_embeddings:
                raise DataValidationError(None, f"text_embeddings{t}", "expected a 'train' entry (n_train, dim)")
            for split, emb in s.text_embeddings.items():
                if split not in ds.splits:
                    raise DataValidationError(None, f"text_embeddings{t}", f"unknown split {split!r}")
                e = np.asarray(emb)
                if e.ndim != 2 or e.shape[0] != len(ds.splits[split]):
                    raise DataValidationError(None, f"text_embeddings{t}[{split!r}]", f"shape {e.shape}, expected "
                                              f"({len(ds.splits[split])}, dim): one embedding per image")
                if not np.isfinite(e).all():
                    raise DataValidationError(None, f"text_embeddings{t}[{split!r}]", "contains NaN/Inf")
                text_dims.add(e.shape[1])
        if (s.features is None or s2.epochs > 0) and backbone is None:
            need = "stage 2 (train.stage2.epochs > 0)" if s2.epochs > 0 else "computing stage-1 features"
            raise ConfigError(f"{need} needs the image backbone; pass backbone=...")
        if s.features is not None:
            for split in SPLITS:
                if split not in s.features:
                    raise DataValidationError(None, f"features{t}", f"expected an entry for split {split!r}")
                for layer in layers:
                    if layer not in s.features[split]:
                        raise DataValidationError(
                            None, f"features{t}[{split!r}]", f"layer {layer!r} is missing (have "
                            f"{sorted(s.features[split])}); expected backbone.layers {readout_layers}"
                            + (" plus 'pooled' for the alignment head" if layer == EMBED_LAYER else ""))
                    f = np.asarray(s.features[split][layer])
                    is_map = layer in config.backbone.spatial_layers and config.model.spatial_readout != "none"
                    if f.ndim not in ((4,) if is_map else (2, 4)) or f.shape[0] != len(ds.splits[split]):
                        want = "C, H, W" if is_map else "dim"
                        raise DataValidationError(None, f"features{t}[{split!r}][{layer!r}]",
                                                  f"shape {f.shape}, expected ({len(ds.splits[split])}, {want})")
            d = {k: tuple(np.asarray(s.features["train"][k]).shape[1:]) for k in layers}
            if dims is not None and d != dims:
                raise DataValidationError(None, f"features{t}", f"layer sizes {d} differ from the other "
                                          f"subjects' {dims}; all subjects must share one backbone")
            dims = d
    if len(text_dims) > 1:
        raise DataValidationError(None, "text_embeddings", f"sizes differ {sorted(text_dims)}; embed all captions "
                                  "with one text encoder")
    for st in streams:
        if st.name in names:
            raise ConfigError(f"the caption stream's key {st.name!r} is also a subject name")
        st.check(layers, next(iter(text_dims)) if text_dims else None)
        if (st.features is None or s2.epochs > 0) and backbone is None:
            raise ConfigError("the caption stream needs the image backbone (stage 2 or no features); pass backbone=...")
    for label, st in (("train.stage1", config.train.stage1), ("train.stage2", s2)):
        if st.batch_size % world_size:
            raise ConfigError(f"{label}.batch_size = {st.batch_size} is the global batch and must be divisible "
                              f"by the number of processes ({world_size})")


# ---------------------------------------------------------------------------------------------- data
def _key_data(config: RunConfig, s: SubjectData, backbone: ImageBackbone | None, device: torch.device,
              precision: str, variance_weighting: bool, show: bool) -> KeyData:
    """The in-memory data of one key: responses, decoded images (when needed), features, caption ids."""
    ds = s.dataset
    key = KeyData(s.name, {k: len(ds.splits[k]) for k in SPLITS})
    key.responses = {k: torch.as_tensor(ds.splits[k].responses, dtype=torch.float32)
                     for k in SPLITS if ds.splits[k].responses is not None}
    layers = _feature_layers(config)
    if s.features is None or config.train.stage2.epochs > 0:
        assert backbone is not None
        size = int(backbone.image_size)
        prefix = f"{s.name} " if s.name != DEFAULT_KEY else ""
        key.images = {k: load_image_tensor(ds.splits[k].images, size, desc=f"decoding {prefix}{k} images",
                                           show_progress=show) for k in SPLITS}
    if s.features is not None:
        key.features = {k: {layer: torch.as_tensor(np.asarray(s.features[k][layer]), dtype=torch.float32)
                            for layer in layers} for k in SPLITS}
    else:
        assert backbone is not None
        backbone.to(device)
        key.features = {k: backbone_features(backbone, key.images[k], layers, device, config.backbone.batch_size,
                                             precision, desc=f"{k} features", show_progress=show) for k in SPLITS}
    key.features["train"] = {k: v.to(device) for k, v in key.features["train"].items()}
    ytr = key.responses["train"]
    if variance_weighting:
        var = float(ytr.var(dim=0).mean()) if len(ytr) > 1 else 1.0
        key.weight = 1.0 / max(var, 1e-8)
    key.responses["train"] = ytr.to(device)
    if s.text_embeddings is not None:
        key.set_text(s.text_embeddings, device, s.text_ids)
    return key


#: what the readout stage's log line adds for each ``model.readout_init``
_START_LABELS = {"random": "", "ridge": ", ridge start", "auto": ", ridge start as a candidate"}


def _build_network(config: RunConfig, keys: Sequence[KeyData], backbone: ImageBackbone | None,
                   alignment_head: bool) -> tuple[LLMVEM, dict[str, torch.Tensor] | None]:
    """The initialised network, and (``model.readout_init: auto``) the random start its ridge start replaced."""
    cfg = config.model
    first = keys[0].features["train"]
    # flat layers may be grids (n, C, G, G): the flat readout reads them flattened
    layer_dims = {k: int(np.prod(first[k].shape[1:])) for k in config.backbone.layers}
    map_shapes = {k: tuple(int(n) for n in first[k].shape[1:]) for k in config.backbone.spatial_layers} \
        if cfg.spatial_readout != "none" else None
    if cfg.core is not None:
        embed_dim: int | None = cfg.core_dim
    elif EMBED_LAYER in first:
        embed_dim = int(first[EMBED_LAYER].shape[1])
    elif backbone is not None:
        embed_dim = int(backbone.feature_dim)
    else:
        embed_dim = None
    text = [k.text["train"] for k in keys if "train" in k.text]
    text_dim = int(text[0].shape[1]) if text else (cfg.align_dim or embed_dim)
    if cfg.readout_aligned and not text and cfg.align_dim is None:
        log.warning("model.readout_aligned without caption embeddings or model.align_dim: the readout reads a "
                    "%s-dim embedding, not one of the caption size a λ > 0 model reads; set model.align_dim to "
                    "the text encoder's size to compare λ = 0 and λ > 0 with the same architecture", text_dim)
    brain = [k for k in keys if k.has_responses]  # captions-only keys have no readout, nor a say in the statistics
    stats_keys = brain or list(keys)  # ... unless there is no brain key (a captions-only run)
    network = LLMVEM.from_config(cfg, layer_dims, text_dim=text_dim, backbone=backbone,
                                 alignment=alignment_head and embed_dim is not None, seed=config.seed,
                                 embed_dim=embed_dim,
                                 keys={k.name: (int(k.responses["train"].shape[1]), k.n["train"]) for k in brain},
                                 map_shapes=map_shapes)  # type: ignore[arg-type]
    x = torch.cat([network.concat({n: v.cpu() for n, v in k.features["train"].items()}) for k in stats_keys])
    maps = {k.name: {m: k.features["train"][m].cpu() for m in network.spatial_layers} for k in stats_keys}
    random_start = random_start_parameters(network) if config.model.readout_init == "auto" else None
    started = network.initialize({k.name: k.responses["train"].cpu() for k in brain}, x, maps,
                                 readout_start=config.model.readout_init)
    for name, rec in started.items():
        log.info("readout of %s starts at the ridge solution: %s", name, rec)
    return network, random_start


def _set_latent_targets(network: LLMVEM, keys: Sequence[KeyData]) -> None:
    """Each key whose readout is a plain PCA readout gets its training responses in the readout's latent space:
    the task then computes the same voxel loss without decoding every batch to all voxels."""
    for k in keys:
        readout = network.readouts[k.name] if k.has_responses and k.name in network.readouts else None
        if type(readout) is PCAVoxelReadout:
            k.latent_targets = readout.latent_targets(k.responses["train"])


@dataclass
class FittedKeys:
    """What :func:`fit_keys` returns: the trained network, the engine, per-key predictions and metrics."""

    network: LLMVEM
    engine: Engine
    keys: list[KeyData]
    predictions: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, dict[str, float]] = field(default_factory=dict)
    seconds: float = 0.0


def fit_keys(config: RunConfig, sources: Sequence[SubjectData], backbone: ImageBackbone | None, out_dir: Path,
             info: DistInfo, *, resume: bool, fingerprint: str, data_identity: Any,
             saved_config: RunConfig | None = None, show_progress: bool = True, callback: Callback | None = None,
             alignment_head: bool = True, variance_weighting: bool = False,
             streams: Sequence[CaptionStream] = ()) -> FittedKeys:
    """Train one network on the data keys ``sources`` in an already prepared run folder.

    Writes ``config.yaml`` (``saved_config``, default ``config``), ``versions.json``, ``curves.csv`` and
    ``checkpoints/``; returns the network (best weights of the last stage, eval mode), and each key's
    ``"val"``/``"test"`` predictions (by its own best epoch with ``train.selection = "per_key"``) with
    ``val_mean_r``/``test_mean_r``. ``streams`` (captions-only keys) train only the contrastive term, times
    their ``weight``; they are left out (training is exactly as without them) when ``lambda_align`` = 0 or
    their weight is 0.
    """
    saved_config = saved_config or config
    warn_if_alignment_inert(config)
    streams = [st for st in streams if st.weight > 0 and config.model.lambda_align > 0]
    if resume:
        _check_resume_config(saved_config, out_dir)
    barrier(info)
    if info.is_main:
        save_config(saved_config, out_dir / "config.yaml")
        write_json(out_dir / "versions.json", versions(config.seed, device=str(info.device), world_size=info.world_size))
    seed_everything(config.seed + info.rank)
    prev_det = torch.are_deterministic_algorithms_enabled()
    prev_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    if config.train.deterministic:
        if info.device.type == "cpu":
            torch.use_deterministic_algorithms(True, warn_only=True)
        else:
            torch.backends.cudnn.benchmark = False
            torch.backends.cudnn.deterministic = True
    t_start = time.perf_counter()
    show = show_progress and info.is_main
    try:
        precision = resolve_precision(config.train.precision, info.device)
        keys = [_key_data(config, s, backbone, info.device, precision, variance_weighting, show) for s in sources]
        keys += [stream_key_data(st, _feature_layers(config), backbone, config.train.stage2.epochs > 0, info.device,
                                 precision, config.backbone.batch_size, show) for st in streams]
        quiet = None if info.is_main else (lambda message: None)
        with stage("voxel readout: PCA of the training responses" + _START_LABELS[config.model.readout_init],
                   say=quiet):
            network, random_start = _build_network(config, keys, backbone, alignment_head)
            network.to(info.device)
            attach_trunk_cache(network, config.train.stage2.unfreeze_last_n,
                               config.train.trunk_cache_mib * 2**20)
            _set_latent_targets(network, keys)
        task = EncodingTask(network, config.model.lambda_align, {k.name: k.weight for k in keys},
                            regularize=config.model.readout_l2 > 0 or config.model.spatial_l1 > 0
                            or config.model.spatial_smoothness > 0, channels_last=config.train.channels_last,
                            align_weights={st.name: st.weight for st in streams})
        task.set_stage1_trainable(config.model.learn_temperature)
        engine = Engine(config, task, keys, backbone, out_dir, info, precision, fingerprint, data_identity,
                        show_progress, callback, random_start=random_start)
        with stage("training", say=quiet):
            engine.run(resume)
        network.eval()
        predictions: dict[str, dict[str, np.ndarray]] = {}
        metrics: dict[str, dict[str, float]] = {}
        for k in engine.scored:
            predictions[k.name] = {s: engine.predict(k, s, engine.final_stage, selected=True) for s in ("val", "test")}
            metrics[k.name] = {f"{s}_mean_r": mean_r(k.responses[s].cpu().numpy(), predictions[k.name][s])
                               for s in ("val", "test") if s in k.responses}
        return FittedKeys(network, engine, keys, predictions, metrics, time.perf_counter() - t_start)
    finally:  # leave the process's global settings as they were
        torch.use_deterministic_algorithms(prev_det)
        torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn


def _check_resume_config(config: RunConfig, out_dir: Path) -> None:
    saved_path = out_dir / "config.yaml"
    if not saved_path.is_file():
        return
    saved = load_config(saved_path)
    diffs = config_diff(_semantic_config(saved), _semantic_config(config))
    if diffs:
        listed = "; ".join(f"{k}: {a!r} in the checkpoint vs {b!r} now" for k, a, b in diffs[:8])
        raise CheckpointError(
            f"{saved_path} (the configuration of the checkpoints in {out_dir}) differs from the "
            f"configuration given now: {listed}. Resume with the same configuration, or start again with "
            "overwrite (--overwrite) or another run folder")


def stage_metrics(stages: Mapping[str, Mapping[str, Any]]) -> dict[str, Any]:
    """``stage<N>_best_val_mean_r`` and ``stage<N>_best_epoch`` of each stage summary."""
    out: dict[str, Any] = {}
    for name, st in stages.items():
        out[f"{name}_best_val_mean_r"] = st.get("best_val_mean_r")
        out[f"{name}_best_epoch"] = st.get("best_epoch")
    return out


def train_encoding_model(config: RunConfig, dataset: EncodingDataset,
                         text_embeddings: Mapping[str, np.ndarray] | None = None,
                         backbone: ImageBackbone | None = None,
                         features: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                         out_dir: str | Path = "run", resume: bool = False, overwrite: bool = False,
                         show_progress: bool = True, callback: Callback | None = None,
                         alignment_head: bool = True, align_stream: CaptionStream | None = None,
                         text_ids: Mapping[str, np.ndarray] | None = None) -> TrainResult:
    """Train the LLM-VEM network in two stages and write the run folder.

    Parameters
    ----------
    config : RunConfig
        Uses ``model``, ``train``, ``backbone.layers``/``batch_size`` and ``seed``.
    dataset : EncodingDataset
        Must have a ``"val"`` split (:meth:`EncodingDataset.with_validation_split`) with responses.
    text_embeddings : dict of split to array of shape (n_images, dim), optional
        L2-normalised caption embedding of each image (``"train"`` at least). Required when
        ``model.lambda_align > 0``. Images with identical captions count as positives of each other.
    backbone : ImageBackbone, optional
        Needed for stage 2 and when ``features`` is None (then stage-1 features are computed here).
    features : dict of split to dict of layer to array of shape (n_images, d_layer), optional
        Precomputed frozen-backbone features of ``"train"``, ``"val"`` and ``"test"`` for every layer of
        ``backbone.layers`` (plus ``"pooled"`` when ``lambda_align > 0``), e.g. from the feature cache.
    out_dir : path
        Run folder; refused if it exists and is not empty, unless ``resume`` or ``overwrite``.
    resume : bool
        Continue from the newest checkpoint in ``out_dir`` (same configuration required).
    overwrite : bool
        Delete the trainer's previous outputs in ``out_dir`` and start again.
    show_progress : bool
    callback : callable(event, info), optional
        Called with ``"epoch_end"`` (after the epoch's checkpoint is written) and ``"stage_end"``.
    alignment_head : bool
        Build the alignment head (default). ``False`` builds the plain encoding network; with
        ``lambda_align = 0`` both train to identical predictions (the head is built from its own random stream,
        frozen and never run).
    align_stream : CaptionStream, optional
        Captioned images without responses (:func:`llmvem.train.stream.load_align_stream` loads the one
        ``config.align_data`` names): one more data key, interleaved with the brain batches in both stages, that
        adds only its contrastive loss × ``align_stream.weight``. Ignored when ``lambda_align`` = 0 or the weight
        is 0 (predictions are then bit-identical to a run without it). Under ``train.epoch = "voxel_steps"`` its
        batches join the voxel steps (``align_stream.ratio`` per step), so the run takes the optimizer steps of
        the same run without it; ``training.json`` records the steps per epoch of each stage.
    text_ids : dict of split to int array of shape (n_images,), optional
        Caption identity of each image (:func:`llmvem.embed.text.caption_ids`, hashed from the caption texts;
        :func:`llmvem.inputs.alignment_targets` gives both): equal ids are positives in the contrastive loss.
        None: bit-identical embeddings are grouped instead.

    Returns
    -------
    TrainResult

    Raises
    ------
    RunFolderError, CheckpointError, ConfigError, DataValidationError

    Notes
    -----
    Under ``torchrun`` every process calls this function; ``batch_size`` is the global batch, split evenly
    across processes, and only rank 0 writes files. Resuming reproduces an uninterrupted single-process CPU run
    exactly (seeded sampler, augmentation and RNG states restored).
    """
    info = setup_distributed(config.train.device)
    out_dir = Path(out_dir)
    try:
        if config.model.lambda_align > 0 and not alignment_head:
            raise ConfigError(f"model.lambda_align = {config.model.lambda_align} needs the alignment head "
                              "(alignment_head=True)")
        source = SubjectData(DEFAULT_KEY, dataset, features, text_embeddings, text_ids=text_ids)
        streams = [align_stream] if align_stream is not None else []
        check_sources(config, [source], backbone, info.world_size, streams=streams)
        if info.is_main:
            prepare_run_folder(out_dir, resume, overwrite)
        barrier(info)
        n = {s: len(dataset.splits[s]) for s in SPLITS}
        identity = {"name": dataset.name, "n_train": n["train"], "n_val": n["val"], "n_test": n["test"],
                    "n_voxels": dataset.n_voxels}
        used_stream = align_stream if align_stream is not None and align_stream.weight > 0 \
            and config.model.lambda_align > 0 else None
        if used_stream is not None:
            identity["n_align_stream"] = len(used_stream.images)
        fingerprint = config_fingerprint(config)
        fit = fit_keys(config, [source], backbone, out_dir, info, resume=resume, fingerprint=fingerprint,
                       data_identity=identity, show_progress=show_progress, callback=callback,
                       alignment_head=alignment_head, streams=streams)
        engine, network = fit.engine, fit.network
        predictions = fit.predictions[DEFAULT_KEY]
        metrics: dict[str, Any] = {**fit.metrics[DEFAULT_KEY], **stage_metrics(engine.stages)}
        if info.is_main:
            for s, p in predictions.items():
                np.save(out_dir / f"predictions_{s}.npy", p.astype(np.float32))
            save_weights(out_dir / "model.safetensors", engine.model_state(engine.final_stage),
                         {"config_hash": fingerprint, "includes_backbone": str(engine.final_stage == 2)})
            write_json(out_dir / "training.json", {
                "metrics": metrics, "stages": engine.stages, "dataset": identity,
                "readout_layers": list(config.backbone.layers), "n_features": network.n_features,
                "pca_components": getattr(network.readout, "n_components", None),
                "lambda_align": float(config.model.lambda_align), "precision": engine.precision,
                "device": str(info.device), "world_size": info.world_size, "seconds": fit.seconds,
                "config_hash": fingerprint,
                "steps_per_epoch": {k: st.get("steps_per_epoch") for k, st in engine.stages.items()},
                "align_stream": used_stream.describe() if used_stream is not None else None})
        barrier(info)
        return TrainResult(out_dir=out_dir, network=network, predictions=predictions, metrics=metrics,
                           curves=copy.deepcopy(engine.curves), config=config, stages=copy.deepcopy(engine.stages))
    finally:
        cleanup_distributed(info)
