"""Spatial layer specs: which part of a layer's feature map a backbone returns, parsed in one place.

A layer spec is ``<layer>[@<mode>]``; the mode says how the layer's map (conv feature map (C, H, W), or a ViT's
patch tokens laid out on their patch grid as (D, h, w)) becomes a feature:

=====================  ====================  =================================================================
spec                   shape per image       what it is
=====================  ====================  =================================================================
``block5``             (C,)                  global average over space / patch tokens (the default, as before)
``block5@mean``        (C,)                  the same, spelled out
``block11@cls``        (D,)                  a ViT's class token (first prefix token); token models only
``block5@grid4``       (C, 4, 4)             adaptive-average pooled to a G×G grid (G ≥ 1, e.g. 1, 2, 4, 7)
``block5@map``         (C, H, W)             the full map; for ViTs the patch tokens as a (D, h, w) map
``block5@proj512``     (512,)                a fixed, seeded very sparse random projection of the flattened map
``block5@pca64``       (64,)                 the flattened map's first K principal components, fitted on the
                                             TRAINING images only (:class:`MapPCA`)
=====================  ====================  =================================================================

ViT patch tokens are maps (``@map``, ``@grid<G>``); class/register tokens are never part of a map, and ``@cls``
reads the class token. ``pooled`` (the backbone's final embedding) takes no mode.

The projection of ``@proj<K>`` is fitted on nothing (it depends only on the spec and the map size), so it is the
same for training and test images by construction and needs no training split; it keeps ~K numbers of a
map that may hold 10⁵ (Johnson–Lindenstrauss: distances between images, and hence ridge and RSA on them, are
preserved up to ~1/√K). It is the very sparse projection of Li, Hastie & Church (2006): entries ±√(s/K) with
probability 1/(2s) each, s = √(C·H·W), so E‖Px‖² = ‖x‖².

``@pca<K>`` is fitted, so a backbone cannot compute it image by image: :func:`llmvem.inputs.extract_split_features`
extracts the layer's ``@map`` for every split, fits :class:`MapPCA` on the training split's maps only and projects
every split with it (test and validation images never move the projection); ``llmvem embed --pca-fit-on FILE``
does the same for a dataset's images, fitted on the images FILE lists. The fitted projection is cached
beside the feature cache under a key of the spec, the backbone and a fingerprint of the training maps it was
fitted on. It is a frozen-feature option (stage 1 and ridge); stage 2, which recomputes features from images,
refuses it.

The spec string is what the feature cache keys and names datasets by, so every choice is its own cache entry.
"""

from __future__ import annotations

import functools
import math
import re
import zlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch.nn import functional as F

from llmvem.errors import ConfigError

__all__ = ["LayerSpec", "MapPCA", "SpatialMode", "parse_layer_spec", "projection_matrix", "random_projection",
           "spatial_output", "validate_layer_specs"]

SpatialMode = Literal["mean", "cls", "grid", "map", "proj", "pca"]
_SPEC = re.compile(r"^(?P<layer>[^@\s]+)(?:@(?P<mode>mean|cls|map|grid|proj|pca)(?P<size>\d+)?)?$")


@dataclass(frozen=True)
class LayerSpec:
    """A parsed layer spec (see the module docstring).

    Attributes
    ----------
    layer : str
        Backbone layer name (``"block5"``, ``"stage2"``, ``"pooled"``...).
    mode : {"mean", "cls", "grid", "map", "proj", "pca"}
    size : int or None
        Grid side G for ``"grid"``, output size K for ``"proj"`` and ``"pca"``, else None.
    """

    layer: str
    mode: SpatialMode = "mean"
    size: int | None = None

    @property
    def name(self) -> str:
        """Canonical spec string (``"block5"`` for the plain mean, else ``"block5@grid4"`` ...)."""
        if self.mode == "mean":
            return self.layer
        return f"{self.layer}@{self.mode}{self.size if self.size is not None else ''}"

    @property
    def spatial(self) -> bool:
        """Whether the feature keeps space as its last two axes (``grid`` and ``map``)."""
        return self.mode in ("grid", "map")

    @property
    def fitted(self) -> bool:
        """Whether the feature is fitted on training images (``pca``), so not computable image by image."""
        return self.mode == "pca"

    @property
    def source(self) -> str:
        """The spec whose features a fitted spec is computed from (``"block5@map"`` for ``"block5@pca64"``)."""
        return f"{self.layer}@map" if self.fitted else self.name


def parse_layer_spec(spec: str) -> LayerSpec:
    """Parse ``"<layer>[@mean|@cls|@map|@grid<G>|@proj<K>|@pca<K>]"``.

    Raises
    ------
    ConfigError
        Unknown mode, a size missing or given where none belongs, or a mode on ``"pooled"``.
    """
    m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    expected = ("expected '<layer>' or '<layer>@mean', '@cls', '@map', '@grid<G>' (G ≥ 1), '@proj<K>' or "
                "'@pca<K>' (K ≥ 1), e.g. 'block5@grid4'")
    if m is None:
        raise ConfigError(f"features: layers: cannot parse {spec!r}; {expected}")
    layer, mode, size = m["layer"], m["mode"] or "mean", m["size"]
    if mode in ("grid", "proj", "pca"):
        if size is None or int(size) < 1:
            raise ConfigError(f"features: layers: {spec!r} needs a size ≥ 1 after @{mode}; {expected}")
        n: int | None = int(size)
    elif size is not None:
        raise ConfigError(f"features: layers: {spec!r}: @{mode} takes no size; {expected}")
    else:
        n = None
    if layer == "pooled" and mode != "mean":
        raise ConfigError(f"features: layers: {spec!r}: 'pooled' is the final embedding and takes no @mode; use "
                          "the last block's name for its map")
    return LayerSpec(layer, mode, n)  # type: ignore[arg-type]


def validate_layer_specs(layers: Sequence[str], layer_names: Sequence[str], model_id: str) -> list[str]:
    """Check layer specs against a backbone's layer names; returns the specs other than ``"pooled"``.

    Raises
    ------
    ConfigError
        A spec does not parse, or names a layer the backbone does not have.
    """
    specs = [parse_layer_spec(name) for name in layers]
    unknown = [name for name, s in zip(layers, specs, strict=True) if s.layer != "pooled"
               and s.layer not in layer_names]
    if unknown:
        raise ConfigError(f"{model_id}: layers: unknown layer(s) {unknown}; expected 'pooled' or one of "
                          f"{list(layer_names)}, optionally with @mean, @cls, @map, @grid<G>, @proj<K> or "
                          "@pca<K>")
    return [name for name in layers if name != "pooled"]


@functools.lru_cache(maxsize=16)
def random_projection(d_in: int, d_out: int, seed: int) -> torch.Tensor:
    """Very sparse random projection matrix (Li, Hastie & Church 2006), seeded.

    Returns
    -------
    sparse COO tensor of shape (d_out, d_in), float32, with about ``d_out · √d_in`` non-zeros ±√(s / d_out),
    s = √d_in, so that E‖Px‖² = ‖x‖² for every x.
    """
    rng = np.random.default_rng(seed)
    s = math.sqrt(d_in)
    nnz_per_row = rng.binomial(d_in, 1.0 / s, size=d_out)
    rows = np.repeat(np.arange(d_out), nnz_per_row)
    cols = rng.integers(0, d_in, size=int(nnz_per_row.sum()))
    vals = rng.choice(np.array([-1.0, 1.0], dtype=np.float32), size=len(cols)) * np.float32(math.sqrt(s / d_out))
    idx = torch.from_numpy(np.stack([rows, cols]))
    return torch.sparse_coo_tensor(idx, torch.from_numpy(vals.astype(np.float32)), (d_out, d_in),
                                   check_invariants=True).coalesce()


def projection_matrix(spec: LayerSpec, d_in: int) -> torch.Tensor:
    """The fixed projection of a ``"<layer>@proj<K>"`` spec for maps of ``d_in`` = C·H·W values: a sparse
    (K, d_in) tensor from :func:`random_projection`, seeded by the spec string and ``d_in``."""
    if spec.mode != "proj" or spec.size is None:
        raise ConfigError(f"features: layers: {spec.name!r} is not a '@proj<K>' spec")
    return random_projection(d_in, spec.size, zlib.crc32(f"{spec.name}:{d_in}".encode()))


def spatial_output(hidden: torch.Tensor, spec: LayerSpec, n_prefix: int = 0,
                   prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
    """Turn one layer's hidden state into the feature a spec asks for.

    Parameters
    ----------
    hidden : tensor of shape (B, C, H, W) (a map) or (B, T, D) (tokens: ``n_prefix`` prefix tokens, then a
        square grid of patch tokens in row-major order) or (B, D) (already pooled; ``mean`` only)
    spec : LayerSpec
    n_prefix : int
        Class/register tokens at the start of a token sequence.
    prefix_tokens : tensor of shape (B, n_prefix, D), optional
        The prefix tokens when ``hidden`` is already a map of the patch tokens (timm ``forward_intermediates``);
        needed for ``@cls`` then.

    Returns
    -------
    tensor of shape (B, C) for ``mean``/``cls``, (B, C, G, G) for ``grid``, (B, C, H, W) for ``map``,
    (B, K) for ``proj`` (float32 for ``proj``, else the dtype of ``hidden``)
    """
    if hidden.ndim == 3:
        if spec.mode == "cls":
            if n_prefix < 1:
                raise ConfigError(f"features: layers: {spec.name!r}: this layer has no class token")
            return hidden[:, 0]
        tokens = hidden[:, n_prefix:]
        if spec.mode == "mean":
            return tokens.mean(dim=1)
        b, t, d = tokens.shape
        side = math.isqrt(t)
        if side * side != t:
            raise ConfigError(f"features: layers: {spec.name!r}: {t} patch tokens do not form a square grid")
        fmap = tokens.transpose(1, 2).reshape(b, d, side, side)
    elif hidden.ndim == 4:
        fmap = hidden
        if spec.mode == "cls":
            if prefix_tokens is None or prefix_tokens.shape[1] < 1:
                raise ConfigError(f"features: layers: {spec.name!r}: this layer has no class token")
            return prefix_tokens[:, 0]
    elif hidden.ndim == 2 and spec.mode == "mean":
        return hidden
    else:
        raise ConfigError(f"features: layers: {spec.name!r}: a hidden state of shape {tuple(hidden.shape)} has "
                          "no spatial map")
    if spec.mode == "mean":
        return fmap.mean(dim=(2, 3))
    if spec.mode == "grid":
        return F.adaptive_avg_pool2d(fmap, int(spec.size))  # type: ignore[arg-type]
    if spec.mode == "map":
        return fmap
    if spec.mode == "pca":
        raise ConfigError(f"features: layers: {spec.name!r} is fitted on training images and cannot be computed "
                          "image by image; extract it with llmvem.inputs.extract_split_features (frozen features), "
                          f"or use {spec.layer}@proj{spec.size} (fixed projection) for fine-tuning")
    flat = fmap.flatten(1).float()
    proj = projection_matrix(spec, flat.shape[1])
    with torch.autocast(flat.device.type, enabled=False):
        return torch.sparse.mm(proj.to(flat.device), flat.t()).t()


class MapPCA:
    """Principal components of flattened feature maps, fitted on training images only.

    Parameters
    ----------
    n_components : int
        K, the number of components kept (at most min(n_train, D)).
    seed : int
        Seed of the randomized SVD (used when K is small against the data; exact SVD otherwise).

    Attributes
    ----------
    mean_ : ndarray of shape (D,)
        Training mean of the flattened maps.
    components_ : ndarray of shape (K, D)
        Orthonormal principal axes, largest variance first (sign fixed: largest |entry| positive).
    explained_variance_ratio_ : ndarray of shape (K,)
        Share of the training maps' total variance along each axis.
    """

    def __init__(self, n_components: int, seed: int = 0):
        self.n_components, self.seed = int(n_components), int(seed)

    def fit(self, maps: np.ndarray) -> MapPCA:
        """Fit on the training maps, array of shape (n_train, ...) (flattened to (n_train, D), in float64)."""
        x = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
        k = self.n_components
        if not 1 <= k <= min(x.shape):
            raise ConfigError(f"features: layers: @pca{k} needs 1 ≤ K ≤ min(training images, map size) = "
                              f"{min(x.shape)}; lower K")
        self.mean_ = x.mean(axis=0)
        xc = torch.from_numpy(x - self.mean_)
        if 4 * k < min(x.shape):
            gen_state = torch.random.get_rng_state()
            torch.manual_seed(self.seed)
            try:
                _, sv, v = torch.svd_lowrank(xc, q=min(min(x.shape), k + 10), niter=4)
            finally:
                torch.random.set_rng_state(gen_state)
            vt = v.t()[:k]
            sv = sv[:k]
        else:
            _, sv, vt = torch.linalg.svd(xc, full_matrices=False)
            vt, sv = vt[:k], sv[:k]
        comp = vt.numpy()
        sign = np.sign(comp[np.arange(k), np.abs(comp).argmax(axis=1)])
        self.components_ = comp * sign[:, None]
        total = float((xc ** 2).sum())
        self.explained_variance_ratio_ = (sv.numpy() ** 2) / total if total > 0 else np.zeros(k)
        return self

    def transform(self, maps: np.ndarray) -> np.ndarray:
        """Project maps of shape (n, ...) (same D as in ``fit``) to their components, (n, K) float32."""
        x = np.asarray(maps, dtype=np.float64).reshape(len(maps), -1)
        if x.shape[1] != self.mean_.shape[0]:
            raise ConfigError(f"features: layers: @pca{self.n_components}: maps of {x.shape[1]} values, fitted on "
                              f"{self.mean_.shape[0]}")
        return ((x - self.mean_) @ self.components_.T).astype(np.float32)
