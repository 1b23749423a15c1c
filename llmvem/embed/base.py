"""Interfaces of the embedding stage: text encoders and image backbones.

Concrete classes live in :mod:`llmvem.embed.text` and :mod:`llmvem.embed.image`; the model and trainer code
only rely on what is declared here.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn


@dataclass
class TextEmbeddings:
    """Embeddings of a list of texts.

    Attributes
    ----------
    embeddings : array of shape (n_texts, dim), float32, L2-normalised rows
    n_tokens : int array of shape (n_texts,)
        Tokens of each full text under the encoder's tokenizer (before any truncation).
    truncated : bool array of shape (n_texts,)
        Whether information was cut to fit the encoder's context (only with the ``"truncate"`` policy).
    long : bool array of shape (n_texts,)
        Whether the text was longer than the encoder's context (whatever the policy did about it).
    model_id : str
    """

    embeddings: np.ndarray
    n_tokens: np.ndarray
    truncated: np.ndarray
    long: np.ndarray
    model_id: str


class TextEncoder:
    """Texts in, L2-normalised float32 embeddings out."""

    model_id: str
    dim: int
    max_tokens: int

    def encode(self, texts: Sequence[str], batch_size: int = 64, show_progress: bool = False) -> TextEmbeddings:
        raise NotImplementedError

    def encode_caption_sets(self, caption_sets: Sequence[Sequence[str]], batch_size: int = 64,
                            show_progress: bool = False) -> np.ndarray:
        """One embedding per image from several captions each: the re-normalised mean of their embeddings.

        Returns array of shape (n_images, dim), float32.
        """
        flat = [c for caps in caption_sets for c in caps]
        if any(len(caps) == 0 for caps in caption_sets):
            raise ValueError("every image needs at least one caption")
        emb = self.encode(flat, batch_size=batch_size, show_progress=show_progress).embeddings
        return pool_caption_sets(emb, [len(caps) for caps in caption_sets])


def pool_caption_sets(embeddings: np.ndarray, counts: Sequence[int]) -> np.ndarray:
    """Per-image embeddings from consecutive caption embeddings: the re-normalised mean of each image's rows.

    Parameters
    ----------
    embeddings : array of shape (n_captions, dim)
        Captions of image 0, then of image 1, ...
    counts : sequence of int, length n_images, summing to n_captions (each ≥ 1)

    Returns
    -------
    array of shape (n_images, dim), float32, L2-normalised rows
    """
    counts = np.asarray(counts, dtype=np.int64)
    if counts.sum() != len(embeddings) or (counts < 1).any():
        raise ValueError(f"caption counts (sum {int(counts.sum())}) must be ≥ 1 each and sum to the "
                         f"{len(embeddings)} caption embeddings")
    out = np.zeros((len(counts), embeddings.shape[1]), dtype=np.float32)
    np.add.at(out, np.repeat(np.arange(len(counts)), counts), embeddings)
    out /= np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-12)
    return out


class ImageBackbone(nn.Module):
    """An image encoder with its own preprocessing.

    Subclasses set ``model_id`` (str), ``feature_dim`` (int, size of the pooled embedding), ``image_size``
    (int, square input side), ``mean``/``std`` (3-tuples in 0–1 units) and ``layer_names`` (names accepted by
    ``forward(..., layers=...)``), and implement :meth:`features` and :meth:`blocks`.
    """

    model_id: str
    feature_dim: int
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    layer_names: list[str]

    def preprocess(self, images: torch.Tensor) -> torch.Tensor:
        """uint8 images of shape (B, H, W, 3) or (B, 3, H, W) → normalised float (B, 3, S, S), S = image_size."""
        x = images
        if x.ndim != 4:
            raise ValueError(f"expected a batch of images with 4 dims, got shape {tuple(x.shape)}")
        if x.shape[-1] == 3 and x.shape[1] != 3:
            x = x.permute(0, 3, 1, 2)
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        if x.shape[-1] != self.image_size or x.shape[-2] != self.image_size:
            x = nn.functional.interpolate(x, size=(self.image_size, self.image_size), mode="bilinear",
                                          align_corners=False, antialias=True)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
        return (x - mean) / std

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """Preprocessed batch (B, 3, S, S) → ``{"pooled": (B, feature_dim), layer: (B, d_layer), ...}``.

        Plain layer names are spatially pooled (global average for conv maps, mean of patch tokens for ViTs);
        layer specs ``"<layer>@<mode>"`` give grids (B, C, G, G), full maps (B, C, H, W), class tokens or
        projections (:mod:`llmvem.embed.spatial`), keyed by the spec string.
        """
        raise NotImplementedError

    def forward(self, x: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        return self.features(x, layers)

    def layer_shape(self, layer: str) -> tuple[int, ...]:
        """Per-image feature shape of a layer spec, found by a dry run if needed: ``(d,)`` for pooled layers,
        ``(C, G, G)`` for ``"<layer>@grid<G>"``, ``(C, H, W)`` for ``"<layer>@map"`` (see
        :mod:`llmvem.embed.spatial`)."""
        if layer == "pooled":
            return (self.feature_dim,)
        shapes = self.__dict__.setdefault("_layer_shapes", {})
        if layer not in shapes:
            p = next(self.parameters())
            with torch.no_grad():
                was = self.training
                self.eval()
                x = torch.zeros(1, 3, self.image_size, self.image_size, device=p.device, dtype=p.dtype)
                shapes[layer] = tuple(int(n) for n in self.features(x, [layer])[layer].shape[1:])
                self.train(was)
        return shapes[layer]

    def layer_dim(self, layer: str) -> int:
        """Flattened feature size of ``layer`` (``"pooled"`` → ``feature_dim``; a grid → C·G·G)."""
        return int(np.prod(self.layer_shape(layer)))

    def blocks(self) -> list[nn.Module]:
        """Ordered list of the backbone's stages/blocks, input to output (``unfreeze_last_n`` counts from the end)."""
        raise NotImplementedError

    # ------------------------------------------------------------------- split forward (optional capability)
    #: Whether :meth:`trunk` and :meth:`tail` are implemented (a backbone opts in; the others always run
    #: :meth:`features` whole). With it, stage 2 and prediction can reuse the output of a frozen trunk
    #: (:mod:`llmvem.embed.trunk_cache`).
    supports_trunk: bool = False

    def trunk(self, x: torch.Tensor, n_groups: int, layers: Sequence[str] = ()
              ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The forward pass through the first ``n_groups`` of :meth:`blocks`.

        Parameters
        ----------
        x : tensor of shape (B, 3, S, S)
            Preprocessed batch.
        n_groups : int
            Leading block groups to run, 1 ≤ n_groups ≤ len(blocks()).
        layers : sequence of str
            Layer specs of the whole forward; those produced inside the trunk are returned.

        Returns
        -------
        hidden : tensor of shape (B, C, H, W)
            The input of group ``n_groups`` (what :meth:`tail` starts from).
        taps : dict of layer spec to tensor
            The requested layers that lie inside the trunk, as :meth:`features` returns them.
        """
        raise NotImplementedError

    def layer_group(self, layer: str) -> int:
        """Index in :meth:`blocks` of the group whose output ``layer`` (a name or spec) is read from: a layer
        with index < ``n_groups`` comes from :meth:`trunk`, the others (and ``"pooled"``) from :meth:`tail`."""
        raise NotImplementedError

    def tail(self, hidden: torch.Tensor, n_groups: int, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        """The rest of the forward pass from :meth:`trunk`'s ``hidden``: ``{"pooled": ..., layer: ...}`` for the
        requested layers after the trunk, so ``{**taps, **tail}`` equals ``features(x, layers)``."""
        raise NotImplementedError

    def config_dict(self) -> dict:
        """What identifies this backbone's features (model id, weights, image size, normalisation)."""
        return {"model_id": self.model_id, "image_size": self.image_size, "mean": list(self.mean),
                "std": list(self.std)}


@contextmanager
def quiet_unused_weights() -> Iterator[None]:
    """Silence transformers' load report while one tower of a two-tower checkpoint (CLIP) is loaded.

    Loading the text (or vision) tower of a full CLIP checkpoint leaves the other tower's weights unused, which
    transformers reports as a long table of "UNEXPECTED" keys. Missing or mismatched weights still raise.
    """
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        yield
    finally:
        hf_logging.set_verbosity(level)


@contextmanager
def quiet_loading_bars() -> Iterator[None]:
    """Hide transformers' "Loading weights" progress bar when llmvem's bars are off (``LLMVEM_NO_PROGRESS=1``).

    transformers draws it on stderr whenever a model loads, regardless of llmvem's setting, so a failing command
    would otherwise print bar fragments before its one-line error.
    """
    import os

    from transformers.utils import logging as hf_logging

    if os.environ.get("LLMVEM_NO_PROGRESS", "") != "1" or not hf_logging.is_progress_bar_enabled():
        yield
        return
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        hf_logging.enable_progress_bar()
