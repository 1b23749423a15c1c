"""The alignment stream: captioned images without brain data, as one more data key of the training engine.

Its batches are interleaved with the brain batches in stage 1 (cached features → core and alignment head) and
stage 2 (images → unfrozen backbone blocks); it adds only the contrastive loss, times ``weight``. Images come
from :func:`llmvem.data.captioned.load_captioned_images`, caption embeddings from the text-embedding cache and
features from the HDF5 feature cache (through :mod:`llmvem.inputs`, the one place those caches are read).

On the user's path (``llmvem train``/``run``, :class:`llmvem.estimators.LLMVEMEncoder`) the stream of
``config.align_data`` is loaded once per prepared inputs (:func:`stream_for_inputs`) and passed to every model with
``lambda_align > 0``; a λ = 0 model ignores it.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from llmvem.config import RunConfig
from llmvem.data.images import ImageCollection
from llmvem.embed.base import ImageBackbone
from llmvem.errors import DataValidationError
from llmvem.train.task import KeyData
from llmvem.train.tensors import backbone_features, load_image_tensor, readout_layers
from llmvem.utils import stable_hash

if TYPE_CHECKING:
    from llmvem.inputs import PreparedInputs

__all__ = ["ALIGN_KEY", "CaptionStream", "check_align_data", "load_align_stream", "stream_for_inputs",
           "stream_is_used", "stream_key_data"]

log = logging.getLogger(__name__)

#: Data-key name of the alignment stream.
ALIGN_KEY = "align_stream"


@dataclass
class CaptionStream:
    """Captioned images that train only the contrastive term.

    Attributes
    ----------
    images : ImageCollection
        ``n`` images (decoded for stage 2, or for computing features when ``features`` is None).
    text_embeddings : array of shape (n, text_dim)
        L2-normalised caption embedding of each image.
    features : dict of layer to array of shape (n, d_layer), optional
        Frozen-backbone features of the layers the network reads (``backbone.layers``, plus ``"pooled"`` for a
        head without core).
    weight : float
        Factor on the stream's contrastive loss (0: the stream is not used).
    batch_size : int, optional
        Its batch size (global); None = the stage's.
    name : str
        Its data key.
    source : str, optional
        The spec it was loaded from (``align_data.spec``), recorded in the run folder.
    text_ids : int array of shape (n,), optional
        Caption identity of each image (:func:`llmvem.embed.text.caption_ids`); None groups bit-identical
        embeddings instead.
    ratio : float, optional
        Its batches per voxel step (``align_data.ratio``; None: its images once per epoch).
    target : str
        What ``text_embeddings`` embed (``model.align_target``: captions, attributes or classes).
    """

    images: ImageCollection
    text_embeddings: np.ndarray
    features: Mapping[str, np.ndarray] | None = None
    weight: float = 1.0
    batch_size: int | None = None
    name: str = ALIGN_KEY
    source: str | None = None
    text_ids: np.ndarray | None = None
    ratio: float | None = None
    target: str = "captions"

    def describe(self) -> dict[str, Any]:
        """The record a run folder keeps of the stream: ``spec``, ``n_images``, ``weight``, ``batch_size``,
        ``ratio``, ``target``."""
        return {"spec": self.source, "n_images": len(self.images), "weight": float(self.weight),
                "batch_size": self.batch_size, "ratio": self.ratio, "target": self.target}

    def check(self, layers: Sequence[str], text_dim: int | None) -> None:
        """Validate sizes against the readout ``layers`` and the brain keys' ``text_dim``."""
        n, e = len(self.images), np.asarray(self.text_embeddings)
        if e.ndim != 2 or e.shape[0] != n or not np.isfinite(e).all():
            raise DataValidationError(None, "align_stream.text_embeddings", f"shape {e.shape}, expected ({n}, dim) "
                                      "finite values: one embedding per image")
        if text_dim is not None and e.shape[1] != text_dim:
            raise DataValidationError(None, "align_stream.text_embeddings", f"size {e.shape[1]} differs from the "
                                      f"brain captions' {text_dim}; embed all captions with one text encoder")
        if self.features is not None:
            for layer in layers:
                f = self.features.get(layer)
                if f is None or np.asarray(f).shape[0] != n:
                    raise DataValidationError(None, f"align_stream.features[{layer!r}]",
                                              f"missing or not ({n}, dim); expected every layer of {list(layers)}")


def stream_key_data(stream: CaptionStream, layers: Sequence[str], backbone: ImageBackbone | None, stage2: bool,
                    device: torch.device, precision: str, batch_size: int, show: bool) -> KeyData:
    """The engine's in-memory data of the stream: training rows only (it is never validated or predicted)."""
    n = len(stream.images)
    key = KeyData(stream.name, {"train": n, "val": 0, "test": 0}, batch_size=stream.batch_size, ratio=stream.ratio)
    if stage2 or stream.features is None:
        assert backbone is not None
        key.images = {"train": load_image_tensor(stream.images, int(backbone.image_size),
                                                 desc="decoding caption-stream images", show_progress=show)}
    if stream.features is not None:
        feats = {layer: torch.as_tensor(np.asarray(stream.features[layer]), dtype=torch.float32) for layer in layers}
    else:
        assert backbone is not None
        backbone.to(device)
        feats = backbone_features(backbone, key.images["train"], list(layers), device, batch_size, precision,
                                  desc="caption-stream features", show_progress=show)
    key.features = {"train": {k: v.to(device) for k, v in feats.items()}}
    key.set_text({"train": np.asarray(stream.text_embeddings)}, device,
                 None if stream.text_ids is None else {"train": np.asarray(stream.text_ids)})
    return key


def stream_is_used(config: RunConfig) -> bool:
    """Whether training with ``config`` uses the stream of ``config.align_data`` (a spec, a weight > 0 and
    ``model.lambda_align > 0``)."""
    a = config.align_data
    return a.spec is not None and a.weight > 0 and config.model.lambda_align > 0


def check_align_data(config: RunConfig) -> str | None:
    """Check ``config.align_data`` cheaply, before anything trains: the spec's syntax and paths (no image and no
    caption is read), with the errors :func:`load_align_stream` gives (both run
    :func:`~llmvem.data.captioned.parse_captioned_spec`).

    Returns
    -------
    str or None
        One line saying what the spec names (and whether the stream is used); None when there is no spec.

    Raises
    ------
    DataValidationError
        A malformed ``virtual-scenes:`` spec, more scenes than :data:`llmvem.data.sizes.MAX_GENERATED_IMAGES` or
        than fit in memory, a missing folder, a folder without ``images/`` or caption file.
    """
    from llmvem.data.captioned import parse_captioned_spec

    a = config.align_data
    if a.spec is None:
        return None
    line = parse_captioned_spec(a.spec, a.captions_file, config.data.image_size, a.max_images).describe()
    return line + ("" if stream_is_used(config) else " (unused: model.lambda_align or align_data.weight is 0)")


def load_align_stream(config: RunConfig, backbone: ImageBackbone, show_progress: bool = True,
                      layers: Sequence[str] | None = None) -> CaptionStream | None:
    """The stream ``config.align_data`` names, with cached caption embeddings and backbone features.

    Returns None when ``align_data.spec`` is None. ``layers`` default: ``backbone.layers`` (and the spatial
    readout's maps) plus ``"pooled"``. With ``captions.shuffle`` the stream's caption sets are permuted across its
    images too (seed ``captions.shuffle_seed``), so the shuffled-captions control covers the stream. The targets
    follow ``model.align_target`` (:func:`llmvem.inputs.target_embeddings`), their ids the caption texts.

    Raises
    ------
    DataValidationError
        The spec is neither ``virtual-scenes:...`` nor a folder with ``images/`` and a caption file (naming it).
    """
    from llmvem import inputs
    from llmvem.data.captioned import load_captioned_images

    a = config.align_data
    if a.spec is None:
        return None
    data = load_captioned_images(a.spec, a.captions_file, image_size=config.data.image_size,
                                 max_images=a.max_images)
    captions = {"train": data.captions}
    if config.captions.shuffle:
        captions = inputs.shuffle_caption_sets(captions, config.captions.shuffle_seed)
    text = inputs.embed_captions(config, captions, show_progress)
    attrs = data.attributes
    targets, ids = inputs.target_embeddings(config, captions, text,
                                            None if attrs is None else (lambda: {"train": attrs}))
    features = inputs.extract_image_features(config, data.images, backbone,
                                             readout_layers(config) if layers is None else layers, show_progress)
    return CaptionStream(data.images, targets["train"], features, weight=a.weight, batch_size=a.batch_size,
                         source=data.source, text_ids=None if ids is None else ids["train"], ratio=a.ratio,
                         target=config.model.align_target)


def stream_for_inputs(config: RunConfig, prepared: PreparedInputs, show_progress: bool = True
                      ) -> CaptionStream | None:
    """The stream of ``config.align_data`` for models fitted on ``prepared``, loaded once per configuration of
    the stream (kept in ``prepared.align_streams``); None when :func:`stream_is_used` is false.

    The features come from ``prepared.backbone`` (the frozen backbone the cached features describe).
    """
    if not stream_is_used(config):
        return None
    key = stable_hash({"align_data": config.align_data.model_dump(mode="json"),
                       "text": [config.text.encoder, config.text.long_policy],
                       "backbone": config.backbone.model_dump(mode="json"), "image_size": config.data.image_size,
                       "layers": readout_layers(config),
                       "shuffle": [config.captions.shuffle, config.captions.shuffle_seed],
                       "target": config.model.align_target})
    if key not in prepared.align_streams:
        stream = load_align_stream(config, prepared.backbone, show_progress)
        assert stream is not None
        log.info("alignment stream %s: %d captioned images, weight %g", stream.source, len(stream.images),
                 stream.weight)
        prepared.align_streams[key] = stream
    return prepared.align_streams[key]
