"""From a configuration to the objects every model is fitted on, each stage cached on disk.

:func:`prepare_inputs` turns a :class:`~llmvem.config.RunConfig` into a :class:`PreparedInputs`: the dataset with
a validation split, captions from the SQLite caption store, caption embeddings (cached ``.npy``), the image
backbone and its frozen features (the HDF5 feature cache). The smaller functions build one object each
(``load_config_dataset``, ``build_captioner``, ``load_config_backbone``...), for the trainer, the explain sections,
the benchmarks and the CLI. This module imports nothing from ``train``, ``explain`` or ``experiment``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.config import RunConfig
from llmvem.data import check_dataset, load_dataset
from llmvem.data.dataset import SPLIT_NAMES, EncodingDataset
from llmvem.embed.base import ImageBackbone
from llmvem.errors import DataValidationError
from llmvem.utils import stable_hash

log = logging.getLogger(__name__)

__all__ = ["OTHER_CAPTIONS", "PreparedInputs", "add_map_pca", "alignment_targets", "build_captioner", "cache_root",
           "caption_dataset", "dataset_attributes", "shuffle_permutations", "target_embeddings",
           "caption_store_path", "challenge_images",
           "embed_captions", "extract_image_features", "extract_split_features", "feature_layers", "fit_map_pca", "load_config_backbone", "load_config_dataset", "prepare_inputs",
           "shuffle_caption_sets"]


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
    memory : dict of stage to int
        Peak resident memory (bytes) while each stage of ``timing`` ran (:func:`llmvem.resources.stage`).
    challenge_features : dict of layer to array of shape (n_challenge_images, d_layer), optional
        Features of the dataset's challenge test images (``dataset.meta["challenge_test_images"]``, responses
        withheld), when it has some.
    align_streams : dict of str to CaptionStream
        The alignment streams (``config.align_data``) loaded for models fitted on these inputs, by a key of the
        stream's configuration; filled by :func:`llmvem.train.stream.stream_for_inputs`, so every model that
        uses a stream shares one load.
    """

    dataset: EncodingDataset
    captions: dict[str, list[list[str]]]
    caption_info: dict[str, Any]
    text_embeddings: dict[str, np.ndarray]
    backbone: ImageBackbone
    features: dict[str, dict[str, np.ndarray]]
    timing: dict[str, float] = field(default_factory=dict)
    challenge_features: dict[str, np.ndarray] | None = None
    align_streams: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, int] = field(default_factory=dict)


def cache_root(config: RunConfig) -> Path:
    """The cache folder of ``config`` (captions store, feature cache, text embeddings), created if needed."""
    path = Path(config.cache_dir).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    return path


def load_config_dataset(config: RunConfig) -> EncodingDataset:
    """The dataset ``config.data`` describes, with its validation split carved."""
    return _with_config_dataset(config, load_dataset)


def check_config_dataset(config: RunConfig) -> str:
    """What ``config.data`` names, checked as :func:`load_config_dataset` checks it before reading any image or
    response (:func:`llmvem.data.check_dataset`): the same errors, naming the same config keys."""
    return _with_config_dataset(config, check_dataset)


def _with_config_dataset(config: RunConfig, call: Callable[..., Any]) -> Any:
    d = config.data
    options = dict(d.loader_options)
    if d.spec == "virtual" or d.spec.startswith("virtual:"):
        options = {"n_train": d.n_train, "n_test": d.n_test, "image_size": d.image_size, **options}
    # ``seed`` seeds both the loader (virtual brain generator) and the validation split.
    try:
        return call(d.spec, val_fraction=d.val_fraction, seed=d.seed, **options)
    except DataValidationError as exc:  # name the config key, not the loader's argument
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


#: What :func:`caption_dataset` does when the store holds captions of the same model under another
#: configuration (prompt, token limit...): ``stop`` (raise, the default), ``accept`` (use them), ``recaption``.
OTHER_CAPTIONS = ("stop", "accept", "recaption")


def caption_store_path(config: RunConfig) -> Path:
    """The caption store of ``config``: ``captions.store``, default ``<cache_dir>/captions.sqlite``."""
    return Path(config.captions.store).expanduser() if config.captions.store else cache_root(config) / "captions.sqlite"


def _identity_difference(record: Any, captioner: Any) -> str:
    """``prompt``/settings keys in which a stored configuration differs from ``captioner`` (for messages)."""
    mine = {"prompt": captioner.prompt, **captioner.settings()}
    theirs = {"prompt": record.prompt, **record.settings}
    diff = [k for k in sorted(set(mine) | set(theirs)) if mine.get(k) != theirs.get(k)] or ["settings"]
    return ", ".join(diff) + (" differs" if len(diff) == 1 else " differ")


def _other_configuration(store: Any, images: Any, captioner: Any) -> Any:
    """A stored configuration of the same backend and model that covers more of ``images`` than ``captioner``'s
    own (so captioning now would describe them a second time), or None."""
    coverage = store.coverage(images.content_hashes())
    own = coverage.get(captioner.config_hash, 0)
    others = [r for r in store.configs() if r.config_hash != captioner.config_hash and r.backend == captioner.backend
              and r.model_id == captioner.model_id and coverage.get(r.config_hash, 0) > own]
    return max(others, key=lambda r: coverage[r.config_hash]) if others else None


def caption_dataset(config: RunConfig, dataset: EncodingDataset, show_progress: bool = True,
                    captioner: Any = None, other_captions: str = "stop"
                    ) -> tuple[dict[str, list[list[str]]], dict[str, Any]]:
    """Caption every image of ``dataset`` into the store (skipping what is done) and read the captions back.

    ``llmvem caption --config``, ``embed --config`` and ``train`` all call this, so they share one store and one
    captioner configuration hash. When the store already holds captions of the same backend and model under
    another configuration, ``other_captions`` (:data:`OTHER_CAPTIONS`) decides: ``stop`` raises
    :class:`~llmvem.errors.CaptionError` (one line naming the difference), ``accept`` reads those captions
    instead, ``recaption`` captions under this configuration.
    """
    from llmvem.captions.run import run_captioning
    from llmvem.captions.store import CaptionStore
    from llmvem.errors import CaptionError, ConfigError

    if other_captions not in OTHER_CAPTIONS:
        raise ConfigError(f"other_captions {other_captions!r}: expected one of {', '.join(OTHER_CAPTIONS)}")
    captioner = captioner or build_captioner(config, dataset)
    store_path = caption_store_path(config)
    images = dataset.all_images()
    with CaptionStore(store_path) as store:
        config_hash = captioner.config_hash
        other = _other_configuration(store, images, captioner)
        if other is not None and other_captions == "stop":
            raise CaptionError(
                f"{store_path}: holds captions of {captioner.model_id} for {other.n_images} images under another "
                f"configuration {other.config_hash} ({_identity_difference(other, captioner)} from "
                f"{config_hash}); pass --other-captions accept to use them or --other-captions recaption")
        if other is not None and other_captions == "accept":
            config_hash = other.config_hash
            missing = len(images) - store.coverage(images.content_hashes()).get(config_hash, 0)
            if missing:
                raise CaptionError(f"{store_path}: configuration {config_hash} lacks captions of {missing} of "
                                   f"{len(images)} images; caption them with that configuration or recaption")
        else:
            summary = run_captioning(images, captioner, store, batch_size=config.captions.batch_size,
                                     show_progress=show_progress)
            if summary.failed:
                raise CaptionError(f"{summary.failed} images could not be captioned (first: "
                                   f"{summary.failed_ids[:5]}); finished captions are kept in {store_path}; rerun "
                                   "to retry")
        captions = {s: store.get_for(dataset.splits[s].images, config_hash) for s in dataset.splits}
    info = {"backend": captioner.backend, "model_id": captioner.model_id, "config_hash": config_hash,
            "store": str(store_path)}
    if config.captions.shuffle:  # control condition: caption sets permuted across the images of each split
        captions = shuffle_caption_sets(captions, config.captions.shuffle_seed)
        info["shuffled"] = True
        info["shuffle_seed"] = config.captions.shuffle_seed
    return captions, info


def shuffle_permutations(sizes: Mapping[str, int], seed: int) -> dict[str, np.ndarray]:
    """The permutation of each split of the shuffled-captions control (``captions.shuffle``): drawn in ``train``,
    ``val``, ``test`` order from one generator seeded ``seed``; ``sizes`` are the splits' image counts."""
    rng = np.random.default_rng(seed)
    return {split: rng.permutation(sizes[split]) for split in SPLIT_NAMES if split in sizes}


def shuffle_caption_sets(captions: dict[str, list[list[str]]], seed: int) -> dict[str, list[list[str]]]:
    """The caption sets permuted across the images of each split (the shuffled-captions control).

    Each split gets its own uniform random permutation (:func:`shuffle_permutations`), so an image receives the
    caption set of a random image of the same split (its own with probability 1/n); the caption sets of every
    split are unchanged as a multiset.
    """
    perms = shuffle_permutations({s: len(c) for s, c in captions.items()}, seed)
    return {split: [list(captions[split][int(j)]) for j in perm] for split, perm in perms.items()}


def dataset_attributes(dataset: EncodingDataset, split: str) -> np.ndarray:
    """The attribute vectors (n_images, n_attributes) of a split's images, from ``dataset.meta["attributes"]``
    (``by_id``: image id → vector; the virtual brain provides them).

    Raises
    ------
    DataValidationError
        The dataset has no attributes, or not for every image of the split.
    """
    table = (dataset.meta.get("attributes") or {}).get("by_id")
    if not table:
        raise DataValidationError(dataset.source, "meta.attributes", "this dataset has no attribute vectors; "
                                  "model.align_target=attributes needs them (the virtual brain has them); use "
                                  "align_target=classes for a one-hot of each caption set")
    ids = dataset.splits[split].images.ids
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataValidationError(dataset.source, "meta.attributes", f"no attribute vector for {len(missing)} "
                                  f"{split} images (e.g. {missing[0]!r})")
    return np.stack([np.asarray(table[i], dtype=np.float64) for i in ids])


def target_embeddings(config: RunConfig, captions: Mapping[str, Sequence[Sequence[str]]],
                      text_embeddings: Mapping[str, np.ndarray],
                      attributes: Callable[[], Mapping[str, np.ndarray]] | None = None
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """The alignment targets of ``config.model.align_target`` and their ids, per split (:mod:`llmvem.embed.targets`).

    ``captions`` (as used, i.e. already shuffled under ``captions.shuffle``) give the ids of the ``captions`` and
    ``classes`` targets; ``attributes()`` gives the attribute vectors of the ``attributes`` target, which are
    permuted like the captions under ``captions.shuffle``. Every target has the caption embeddings' size. Without
    the caption texts of every embedded image (inputs built from embeddings alone) the ids of the ``captions``
    target are None: the trainer then groups bit-identical embeddings.
    """
    from llmvem.embed.targets import attribute_embeddings, attribute_ids, class_embeddings
    from llmvem.embed.text import caption_ids

    kind = config.model.align_target
    known = all(s in captions and len(captions[s]) == len(e) for s, e in text_embeddings.items())
    ids = {s: caption_ids(list(captions[s])) for s in text_embeddings} if known else None
    if kind == "captions":
        return dict(text_embeddings), ids
    dim = int(next(iter(text_embeddings.values())).shape[1])
    if kind == "classes":
        if ids is None:
            raise DataValidationError(None, "model.align_target", "classes: needs the caption texts of every image")
        return {s: class_embeddings(v, dim) for s, v in ids.items()}, ids
    if attributes is None:
        raise DataValidationError(None, "model.align_target", "attributes: these images have no attribute vectors "
                                  "(the virtual brain and virtual-scenes streams have them)")
    attrs = dict(attributes())
    if config.captions.shuffle:
        perms = shuffle_permutations({s: len(a) for s, a in attrs.items()}, config.captions.shuffle_seed)
        attrs = {s: attrs[s][perms[s]] for s in perms}
    return ({s: attribute_embeddings(a, dim) for s, a in attrs.items()},
            {s: attribute_ids(a) for s, a in attrs.items()})


def alignment_targets(config: RunConfig, prepared: PreparedInputs
                      ) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray] | None]:
    """What the alignment head of a model fitted on ``prepared`` is trained toward (``model.align_target``):
    embeddings (split → (n_images, dim)) and ids (split → (n_images,), equal ids are positives). The ids of the
    caption targets are hashes of the caption texts (:func:`llmvem.embed.text.caption_ids`), never float equality.
    """
    ds = prepared.dataset
    return target_embeddings(config, prepared.captions, prepared.text_embeddings,
                             lambda: {s: dataset_attributes(ds, s) for s in prepared.captions})


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
    """The image backbone ``config.backbone`` describes; with ``backbone.init_core``, carrying the fine-tuned
    weights of that training folder (:func:`llmvem.train.core_init.load_core`)."""
    from llmvem.embed.image import load_backbone

    b = config.backbone
    backbone = load_backbone(b.name, pretrained=b.pretrained, weights=b.weights, image_size=b.image_size)
    if b.init_core:
        from llmvem.train.core_init import load_core

        load_core(backbone, b.init_core, b.name)
    return backbone


def feature_layers(config: RunConfig, layers: Sequence[str] | None = None) -> list[str]:
    """The layers features are extracted for: ``layers`` (default ``config.backbone.layers``) plus ``pooled``
    (the alignment head reads it)."""
    out = list(layers or config.backbone.layers)
    if "pooled" not in out:
        out.append("pooled")
    return out


def extract_image_features(config: RunConfig, images: Any, backbone: ImageBackbone,
                           layers: Sequence[str] | None = None, show_progress: bool = True) -> dict[str, np.ndarray]:
    """Frozen backbone features of ``images`` (n images) with ``config``'s cache, batch size, device and storage
    dtype: dict of layer (:func:`feature_layers`) to array of shape (n, d_layer). What ``train``, ``embed
    --config`` and the challenge predictions share, so each reads what the other computed."""
    from llmvem.embed.cache import FeatureCache, extract_features

    cache = FeatureCache(cache_root(config) / "features.h5")
    layers = feature_layers(config, layers)
    key, _ = FeatureCache.config_key(backbone, layers, config.backbone.feature_dtype)
    stored = cache.info()
    same_model = [e for e in stored if e["model_id"] == backbone.model_id]
    if same_model and not any(e["key"] == key for e in stored):  # fine to compute, but say it is a new set
        e = same_model[0]
        log.warning("feature cache %s holds %s features of layers %s (%s); computing layers %s (%s) as a new "
                    "configuration", cache.path, backbone.model_id, ",".join(e["layers"]), e["dtype"],
                    ",".join(layers), config.backbone.feature_dtype)
    return extract_features(images, backbone, layers=layers, cache=cache,
                            batch_size=config.backbone.batch_size, device=config.backbone.device,
                            dtype=config.backbone.feature_dtype, show_progress=show_progress)


def extract_split_features(config: RunConfig, dataset: EncodingDataset, backbone: ImageBackbone,
                           layers: Sequence[str] | None = None, show_progress: bool = True
                           ) -> dict[str, dict[str, np.ndarray]]:
    """Frozen backbone features of every split (from the HDF5 feature cache when already computed); with a
    spatial readout (``model.spatial_readout``) also the maps of ``backbone.spatial_layers``.

    Fitted specs (``"block8@pca64"``, :class:`llmvem.embed.spatial.MapPCA`) are computed from the layer's
    ``@map`` of every split with a projection fitted on the ``train`` split's maps only (:func:`fit_map_pca`).
    """
    from llmvem.embed.spatial import parse_layer_spec

    layers = list(layers or config.backbone.layers)
    if config.model.spatial_readout != "none":
        layers += [k for k in config.backbone.spatial_layers if k not in layers]
    fitted = [parse_layer_spec(k) for k in layers if parse_layer_spec(k).fitted]
    direct = list(dict.fromkeys([k for k in layers if not parse_layer_spec(k).fitted] + [f.source for f in fitted]))
    feats = {split: extract_image_features(config, dataset.splits[split].images, backbone, direct, show_progress)
             for split in dataset.splits}
    if fitted and "train" not in feats:
        raise DataValidationError(dataset.source, "features: layers", f"{fitted[0].name!r} is fitted on the "
                                  f"training split, and the dataset has none (splits {sorted(feats)})")
    if fitted:
        add_map_pca([f.name for f in fitted], feats["train"], list(feats.values()), cache_root(config), backbone,
                    config.backbone.feature_dtype, config.seed)
    unrequested = [k for k in direct if k not in layers and k != "pooled"]
    return {split: {k: v for k, v in f.items() if k not in unrequested} for split, f in feats.items()}


def add_map_pca(specs: Sequence[str], fit_features: Mapping[str, np.ndarray],
                targets: Sequence[dict[str, np.ndarray]], cache_dir: Path, backbone: ImageBackbone,
                dtype: str, seed: int) -> None:
    """Add the ``"<layer>@pca<K>"`` features of ``specs`` to every dict of ``targets``, each projection fitted
    (:func:`fit_map_pca`) on the maps of ``fit_features`` only.

    Parameters
    ----------
    specs : sequence of str
        Fitted specs, e.g. ``["block8@pca64"]``.
    fit_features : dict of spec to array
        Holds each spec's source map (``"block8@map"``, shape (n_fit, C, H, W)): the images the PCA is fitted on.
    targets : sequence of dict of spec to array
        Feature dicts holding the source maps (n, C, H, W); each gets ``spec`` → array (n, K), float32.
    cache_dir : path
        Cache folder; the fitted projections go to ``cache_dir/map_pca/``.
    dtype, seed
        Storage dtype of the maps and the seed of the randomized SVD (both part of the cache key).
    """
    from llmvem.embed.spatial import parse_layer_spec

    for name in specs:
        source = parse_layer_spec(name).source
        pca = fit_map_pca(cache_dir, backbone, name, fit_features[source], dtype, seed)
        for feats in targets:
            feats[name] = pca.transform(feats[source])


def fit_map_pca(cache_dir: Path, backbone: ImageBackbone, spec: str, train_maps: np.ndarray, dtype: str,
                seed: int):
    """The :class:`~llmvem.embed.spatial.MapPCA` of a ``"<layer>@pca<K>"`` spec fitted on ``train_maps``
    (n_train, C, H, W), cached under ``<cache_dir>/map_pca/`` by a key of the spec, the backbone, the storage
    ``dtype``, ``seed`` and a fingerprint of the training maps (so another training split is another entry)."""
    import hashlib

    from llmvem.embed.spatial import MapPCA, parse_layer_spec

    k = int(parse_layer_spec(spec).size or 0)
    x = np.ascontiguousarray(train_maps)
    fingerprint = hashlib.sha256(x.tobytes()).hexdigest()[:16]
    key = stable_hash({"backbone": backbone.config_dict(), "spec": spec, "dtype": dtype,
                       "train_maps": fingerprint, "shape": list(x.shape), "seed": seed})
    path = Path(cache_dir).expanduser() / "map_pca" / f"{key}.npz"
    pca = MapPCA(k, seed=seed)
    if path.is_file():
        with np.load(path) as z:
            pca.mean_, pca.components_ = z["mean"], z["components"]
            pca.explained_variance_ratio_ = z["explained_variance_ratio"]
        return pca
    pca.fit(x)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp.npz")
    np.savez(tmp, mean=pca.mean_, components=pca.components_, explained_variance_ratio=pca.explained_variance_ratio_)
    tmp.replace(path)
    return pca


def challenge_images(dataset: EncodingDataset) -> Any:
    """The dataset's challenge test images (responses withheld; ``meta["challenge_test_images"]``), or None."""
    images = dataset.meta.get("challenge_test_images")
    return images if images is not None and len(images) else None


def prepare_inputs(config: RunConfig, show_progress: bool = True, dataset: EncodingDataset | None = None,
                   other_captions: str = "stop") -> PreparedInputs:
    """Dataset → captions → caption embeddings → backbone features, each stage cached (``other_captions``: see
    :func:`caption_dataset`)."""
    from llmvem.resources import stage

    timing: dict[str, float] = {}
    memory: dict[str, int] = {}
    with stage("dataset", "data", timing=timing, memory=memory):
        dataset = dataset if dataset is not None else load_config_dataset(config)
        if dataset.val is None:
            dataset = dataset.with_validation_split(config.data.val_fraction, config.data.seed)
    with stage("captions", timing=timing, memory=memory):
        captions, caption_info = caption_dataset(config, dataset, show_progress, other_captions=other_captions)
    with stage("caption embeddings", "text_embeddings", timing=timing, memory=memory):
        text_embeddings = embed_captions(config, captions, show_progress)
    with stage("image features", "image_features", timing=timing, memory=memory):
        backbone = load_config_backbone(config)
        features = extract_split_features(config, dataset, backbone, show_progress=show_progress)
        challenge = challenge_images(dataset)
        challenge_features = (extract_image_features(config, challenge, backbone, show_progress=show_progress)
                              if challenge is not None else None)
    return PreparedInputs(dataset, captions, caption_info, text_embeddings, backbone, features, timing,
                          challenge_features, memory=memory)
