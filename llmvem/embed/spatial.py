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
=====================  ====================  =================================================================

ViT patch tokens are maps (``@map``, ``@grid<G>``); class/register tokens are never part of a map, and ``@cls``
reads the class token. ``pooled`` (the backbone's final embedding) takes no mode.

The projection of ``@proj<K>`` is fitted on nothing (it depends only on the spec and the map size), so it is the
same for training and test images by construction and needs no training split; it keeps ~K numbers of a
map that may hold 10⁵ (Johnson–Lindenstrauss: distances between images, and hence ridge and RSA on them, are
preserved up to ~1/√K). It is the very sparse projection of Li, Hastie & Church (2006): entries ±√(s/K) with
probability 1/(2s) each, s = √(C·H·W), so E‖Px‖² = ‖x‖².

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

__all__ = ["LayerSpec", "SpatialMode", "parse_layer_spec", "projection_matrix", "random_projection",
           "spatial_output", "validate_layer_specs"]

SpatialMode = Literal["mean", "cls", "grid", "map", "proj"]
_SPEC = re.compile(r"^(?P<layer>[^@\s]+)(?:@(?P<mode>mean|cls|map|grid|proj)(?P<size>\d+)?)?$")


@dataclass(frozen=True)
class LayerSpec:
    """A parsed layer spec (see the module docstring).

    Attributes
    ----------
    layer : str
        Backbone layer name (``"block5"``, ``"stage2"``, ``"pooled"``...).
    mode : {"mean", "cls", "grid", "map", "proj"}
    size : int or None
        Grid side G for ``"grid"``, output size K for ``"proj"``, else None.
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


def parse_layer_spec(spec: str) -> LayerSpec:
    """Parse ``"<layer>[@mean|@cls|@map|@grid<G>|@proj<K>]"``.

    Raises
    ------
    ConfigError
        Unknown mode, a size missing or given where none belongs, or a mode on ``"pooled"``.
    """
    m = _SPEC.match(spec.strip()) if isinstance(spec, str) else None
    expected = ("expected '<layer>' or '<layer>@mean', '@cls', '@map', '@grid<G>' (G ≥ 1) or '@proj<K>' (K ≥ 1), "
                "e.g. 'block5@grid4'")
    if m is None:
        raise ConfigError(f"features: layers: cannot parse {spec!r}; {expected}")
    layer, mode, size = m["layer"], m["mode"] or "mean", m["size"]
    if mode in ("grid", "proj"):
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
                          f"{list(layer_names)}, optionally with @mean, @cls, @map, @grid<G> or @proj<K>")
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
    flat = fmap.flatten(1).float()
    proj = projection_matrix(spec, flat.shape[1])
    with torch.autocast(flat.device.type, enabled=False):
        return torch.sparse.mm(proj.to(flat.device), flat.t()).t()
