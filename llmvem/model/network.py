"""The LLM-VEM network: image backbone → selected layer features → standardiser → dropout → optional shared
core → **voxel readouts keyed by data source** (one per subject / session), and an alignment head (projection
to the caption-embedding space, with a learnable CLIP-style temperature) that reads the pooled image embedding,
or the core output when there is a core.

One subject is the one-key case (key ``"main"``); several subjects are several keys sharing everything but
their readout (as neuralpredictors' ``MultiReadoutBase``). ``forward(key=None)`` uses the only key.

The network runs in two modes:

* **feature mode** (stage 1): ``forward(features={layer: (B, d_layer)})`` with features precomputed by the
  frozen backbone (from the feature cache); the backbone is not called. Maps of the spatial layers travel in the
  same mapping, ``{"block5@grid7": (B, C, 7, 7)}``.
* **image mode** (stage 2): ``forward(images=uint8 (B, H, W, 3))`` preprocesses the images and runs the
  backbone, whose last blocks may be trainable.

**Spatial readouts** (``spatial_readout="factorized"`` or ``"gaussian"``, :mod:`llmvem.model.spatial`) read the
maps of ``map_shapes`` (layer specs ``"<layer>@grid<G>"`` / ``"<layer>@map"``, several layers at once), each
channel z-scored with training statistics. ``spatial_mode="residual"`` adds them to the flat readout (PCA voxel
mapping on the flat features + spatial residual, :class:`~llmvem.model.spatial.FlatPlusSpatialReadout`);
``"alone"`` predicts with the spatial readout only. Each data key gets its own spatial readout. The alignment
head keeps reading the pooled features (or the core); with a core, the core acts on the flat features only and
the spatial readout reads the maps directly. ``readout_aligned``: the flat readout also reads the embedding.

Nothing here knows about files or datasets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
from torch import nn

from llmvem.embed.base import ImageBackbone
from llmvem.embed.trunk_cache import TrunkCache, cached_backbone_features
from llmvem.model.features import FeatureStandardizer
from llmvem.model.head import AlignmentHead
from llmvem.model.readout import LinearVoxelReadout, PCAVoxelReadout, Readout, default_pca_components
from llmvem.model.spatial import (
    ChannelNorm,
    FactorizedReadout,
    FlatPlusSpatialReadout,
    GaussianReadout,
    make_spatial_readout,
)
from llmvem.model.start import ridge_start

if TYPE_CHECKING:
    from llmvem.config import ModelConfig

__all__ = ["DEFAULT_KEY", "EMBED_LAYER", "SPATIAL_READOUTS", "AlignmentHead", "LLMVEM", "ModelOutput"]

EMBED_LAYER = "pooled"
DEFAULT_KEY = "main"  #: the data key of a single-subject network
_HEAD_SEED_OFFSET = 7919  # the alignment head draws its init from its own stream (see LLMVEM.__init__)
SPATIAL_READOUTS = ("factorized", "gaussian")  #: kinds of ``spatial_readout`` besides ``"none"``


@dataclass
class ModelOutput:
    """What one forward pass returns.

    Attributes
    ----------
    voxels : tensor of shape (B, n_voxels) or None
        Predicted responses of the key's readout (None with ``with_voxels=False``).
    readout_input : tensor of shape (B, n_features) or (B, core_dim)
        Standardised, dropped-out features, or the core output (without the ``readout_aligned`` embedding).
    latent : tensor of shape (B, n_components) or None
        Predicted PCA scores (PCA readout).
    embedding : tensor of shape (B, align_dim) or None
        L2-normalised projected image embedding (only when asked for with ``with_embedding=True``).
    logit_scale : scalar tensor or None
        The clamped inverse temperature (with the embedding; computed inside ``forward`` so DDP sees it used).
    """

    voxels: torch.Tensor | None
    readout_input: torch.Tensor
    latent: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


class LLMVEM(nn.Module):
    """Visual encoding model with an LLM-caption alignment head and one voxel readout per data key.

    Parameters
    ----------
    layer_dims : mapping of str to int
        Readout layers in concatenation order and their feature sizes, e.g. ``{"block5": 80, "pooled": 1280}``.
    n_voxels, n_train : int, optional
        Voxels and training images of the single data key ``"main"`` (shorthand for ``keys``).
    keys : mapping of str to (n_voxels, n_train), optional
        One readout per data key (letters, digits, ``_``, ``-``); ``n_train`` sets its default PCA components.
    readout : {"pca", "linear"}
    n_components : int or None
        PCA components; None → ``min(2048, n_train, n_voxels)`` (always capped at ``min(n_train, n_voxels)``).
    voxel_loss : {"voxel", "pca"}
    readout_l2 : float
    core : {None, "linear", "mlp"}
        Optional shared core over the standardised features: a linear bottleneck or Linear → GELU → Linear of
        ``core_dim`` units. None reads out the features directly (the single-subject model of the paper).
    core_dim : int
    core_dropout : float
        Dropout on the core output fed to the readouts.
    text_dim : int or None
        Size of the caption embeddings; the projection's output size unless ``align_dim`` is given.
    align_dim : int or None
    embed_dim : int or None
        Size of the pooled image embedding; None → ``layer_dims["pooled"]`` or ``backbone.feature_dim``
        (with a core the head reads the core output, of ``core_dim``).
    projection : {"linear", "mlp"}
    temperature_init : float
        Initial softmax temperature τ; the learnable logit scale starts at 1/τ and is clamped at 100.
    learn_temperature : bool
    feature_dropout : float
        Dropout on the concatenated readout input.
    standardize_features : bool
        z-score the readout input with training statistics set by :meth:`initialize`.
    backbone : ImageBackbone or None
        Needed for image mode only.
    alignment : bool
        Build the alignment head. Its parameters are initialised from a separate random stream, so a network
        built with and without it (same global seed) has identical readout weights and, with λ = 0, identical
        predictions.
    head_seed : int
        Seed of the alignment head's own random stream (the spatial readouts are seeded from it too).
    map_shapes : mapping of str to (C, H, W), optional
        Maps read by the spatial readouts, e.g. ``{"block5@grid7": (80, 7, 7)}``; needed with
        ``spatial_readout``.
    spatial_readout : {"none", "factorized", "gaussian"}
        "none" builds exactly the network without spatial readout.
    spatial_mode : {"residual", "alone"}
        Spatial readout added to the flat readout, or predicting alone (the flat layers then feed only the
        alignment head).
    spatial_l1 : float
        Sparsity penalty of the spatial readout (factorized: Σ‖mask‖₁‖w‖₁; Gaussian: ‖channel weights‖₁).
    spatial_smoothness : float
        Laplacian smoothness penalty of factorized masks.
    spatial_init : {"ridge", "random"}
        Start of factorized readouts in :meth:`initialize`: the rank-1 part of a ridge fit on the training maps
        (:meth:`~llmvem.model.spatial.FactorizedReadout.initialize_from_ridge`), or small random weights.
    readout_aligned : bool
        The flat readout reads ``[x, √D · embedding]`` (B, D + align_dim), x its usual input of D columns: the
        unit-norm embedding weighs as much as D standardised features (scaled by √align_dim, Adam's per-weight
        steps let the D feature weights outrun it). Needs the head and a flat readout. At λ = 0 the head is
        trained by the voxel loss alone: the same architecture as λ > 0, differing only by the contrastive term.
    """

    def __init__(self, layer_dims: Mapping[str, int], n_voxels: int | None = None, n_train: int | None = None, *,
                 keys: Mapping[str, tuple[int, int]] | None = None, readout: str = "pca",
                 n_components: int | None = None, voxel_loss: str = "voxel", readout_l2: float = 0.0,
                 core: str | None = None, core_dim: int = 256, core_dropout: float = 0.0,
                 text_dim: int | None = None, align_dim: int | None = None, embed_dim: int | None = None,
                 projection: str = "linear", temperature_init: float = 0.07, learn_temperature: bool = True,
                 feature_dropout: float = 0.0, standardize_features: bool = True,
                 backbone: ImageBackbone | None = None, alignment: bool = True, head_seed: int = 0,
                 map_shapes: Mapping[str, tuple[int, int, int]] | None = None, spatial_readout: str = "none",
                 spatial_mode: str = "residual", spatial_l1: float = 0.0, spatial_smoothness: float = 0.0,
                 spatial_init: str = "ridge", readout_aligned: bool = False):
        super().__init__()
        if not layer_dims:
            raise ValueError("layer_dims: expected at least one readout layer")
        if keys is None:
            if n_voxels is None or n_train is None:
                raise ValueError("pass n_voxels and n_train (one data key) or keys={key: (n_voxels, n_train)}")
            keys = {DEFAULT_KEY: (int(n_voxels), int(n_train))}
        if not keys and not alignment:  # no readout and no head: nothing to train
            raise ValueError("keys: expected at least one data key (or the alignment head of a captions-only model)")
        bad = [k for k in keys if not re.fullmatch(r"[A-Za-z0-9_-]+", k)]
        if bad:
            raise ValueError(f"data keys {bad}: expected letters, digits, '_' and '-' only")
        self.layers: list[str] = list(layer_dims)
        self.layer_dims = {k: int(v) for k, v in layer_dims.items()}
        self.n_features = sum(self.layer_dims.values())
        self.keys: list[str] = list(keys)
        self.backbone = backbone
        #: image mode: the backbone's leading block groups whose output may come from ``trunk_cache`` (0: run the
        #: backbone whole); set by the trainer and the model loader to the groups stage 2 leaves frozen
        self.trunk_groups: int = 0
        self.trunk_cache: TrunkCache | None = None
        self.standardize_features = standardize_features
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.dropout: nn.Module = nn.Dropout(feature_dropout) if feature_dropout > 0 else nn.Identity()
        self.core: nn.Module | None = None
        self.core_dim: int | None = None
        self.core_dropout: nn.Module = nn.Identity()
        readout_dim = self.n_features
        if core is not None:
            if core == "linear":
                self.core = nn.Linear(self.n_features, core_dim)
            elif core == "mlp":
                self.core = nn.Sequential(nn.Linear(self.n_features, core_dim), nn.GELU(),
                                          nn.Linear(core_dim, core_dim))
            else:
                raise ValueError(f"core: expected None, 'linear' or 'mlp', got {core!r}")
            self.core_dim = readout_dim = int(core_dim)
            if core_dropout > 0:
                self.core_dropout = nn.Dropout(core_dropout)
        if spatial_init not in ("ridge", "random"):
            raise ValueError(f"spatial_init: expected 'ridge' or 'random', got {spatial_init!r}")
        self.spatial_init = spatial_init
        if spatial_readout not in ("none", *SPATIAL_READOUTS) or spatial_mode not in ("residual", "alone"):
            raise ValueError(f"spatial_readout / spatial_mode: expected one of {('none', *SPATIAL_READOUTS)} / "
                             f"'residual' or 'alone', got {spatial_readout!r} / {spatial_mode!r}")
        shapes = {k: tuple(int(n) for n in v) for k, v in (map_shapes or {}).items()} \
            if spatial_readout != "none" else {}
        if spatial_readout != "none" and not shapes:
            raise ValueError(f"spatial_readout={spatial_readout!r} needs map_shapes (backbone.spatial_layers)")
        self.spatial_readout, self.spatial_mode = spatial_readout, spatial_mode
        self.map_shapes: dict[str, tuple[int, int, int]] = shapes  # type: ignore[assignment]
        self.spatial_layers: list[str] = list(shapes)
        self.map_norm = nn.ModuleDict({k: ChannelNorm(c) for k, (c, _, _) in shapes.items()})
        self.readout_aligned = bool(readout_aligned)
        if self.readout_aligned:
            if not alignment or (shapes and spatial_mode == "alone") or not (align_dim or text_dim):
                raise ValueError("readout_aligned: the flat readout reads the head's embedding; it needs the "
                                 "alignment head, its size (text_dim or align_dim) and spatial_mode='residual'")
            readout_dim += int(align_dim or text_dim)  # type: ignore[arg-type]
        readouts: dict[str, Readout] = {}
        for i, (k, (nv, nt)) in enumerate(keys.items()):
            flat = None if shapes and spatial_mode == "alone" else \
                _make_readout(readout, readout_dim, nv, nt, n_components, voxel_loss, readout_l2)
            spatial = make_spatial_readout(spatial_readout, shapes, nv, spatial_l1, spatial_smoothness,
                                           head_seed + i) \
                if shapes else None
            readouts[k] = (flat if spatial is None else spatial if flat is None  # type: ignore[assignment]
                           else FlatPlusSpatialReadout(flat, spatial))
        self.readouts = nn.ModuleDict(readouts)
        if self.core is not None:
            embed_dim = self.core_dim
        elif embed_dim is None:
            if EMBED_LAYER in self.layer_dims:
                embed_dim = self.layer_dims[EMBED_LAYER]
            elif backbone is not None:
                embed_dim = int(backbone.feature_dim)
        self.embed_dim = embed_dim
        self.head: AlignmentHead | None = None
        if alignment:
            out_dim = align_dim or text_dim
            if embed_dim is None or out_dim is None:
                raise ValueError("the alignment head needs embed_dim (pooled size) and text_dim or align_dim")
            # fork_rng: building the head must not advance the global stream, so the rest of the model (and
            # every dropout mask later) is identical to a model built without the head.
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(head_seed + _HEAD_SEED_OFFSET)
                self.head = AlignmentHead(embed_dim, out_dim, projection)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)),
                                            requires_grad=learn_temperature)
        self.learn_temperature = learn_temperature
        # single-subject file format: the one "main" readout is saved as ``readout.*`` (as before keyed readouts),
        # so run folders and loaders of single-subject models keep working
        self.register_state_dict_post_hook(_single_key_names)
        self.register_load_state_dict_pre_hook(_keyed_names)

    @classmethod
    def from_config(cls, config: ModelConfig, layer_dims: Mapping[str, int], n_voxels: int | None = None,
                    n_train: int | None = None, text_dim: int | None = None, backbone: ImageBackbone | None = None,
                    alignment: bool = True, seed: int = 0, embed_dim: int | None = None,
                    keys: Mapping[str, tuple[int, int]] | None = None,
                    map_shapes: Mapping[str, tuple[int, int, int]] | None = None) -> LLMVEM:
        """Build the network described by a :class:`llmvem.config.ModelConfig` section (``core`` and the
        spatial readout, reading ``map_shapes``, included)."""
        return cls(layer_dims, n_voxels, n_train, keys=keys, readout=config.readout,
                   n_components=config.pca_components, voxel_loss=config.voxel_loss, readout_l2=config.readout_l2,
                   core=config.core, core_dim=config.core_dim, core_dropout=config.core_dropout,
                   text_dim=text_dim, align_dim=config.align_dim, embed_dim=embed_dim, projection=config.projection,
                   temperature_init=config.temperature_init, learn_temperature=config.learn_temperature,
                   feature_dropout=config.feature_dropout, standardize_features=config.standardize_features,
                   backbone=backbone, alignment=alignment, head_seed=seed, **_spatial_kwargs(config, map_shapes))

    @classmethod
    def from_state_dict(cls, config: ModelConfig, state: Mapping[str, torch.Tensor], layer_dims: Mapping[str, int],
                        n_train: int | None = None, backbone: ImageBackbone | None = None,
                        seed: int = 0, map_shapes: Mapping[str, tuple[int, int, int]] | None = None) -> LLMVEM:
        """Rebuild a saved network: keys, voxels, PCA components, core and head sizes are read from ``state``.

        Parameters
        ----------
        config : ModelConfig
            The run's ``model`` section (readout kind, projection, core kind...).
        state : mapping of str to tensor
            A saved ``state_dict`` (e.g. ``model.safetensors``); the weights are loaded into the new network.
        layer_dims : mapping of str to int
            Readout layers and sizes (from the backbone).
        n_train : int, optional
            Training images (only recorded; the PCA size comes from the state).
        map_shapes : mapping of str to (C, H, W), optional
            Maps of ``backbone.spatial_layers`` (from the backbone), with ``config.spatial_readout``.

        Raises
        ------
        ValueError
            ``state`` does not describe a network of this ``config`` (the message names the missing weight).
        """
        keys: dict[str, tuple[int, int]] = {}
        n_components = None
        alone = config.spatial_readout != "none" and config.spatial_mode == "alone"
        # residual spatial readouts keep the flat readout under ``.flat``; alone, the spatial bias gives the size
        pattern = r"(?:readouts\.([A-Za-z0-9_-]+)|readout)\.(bias)" if alone else \
            r"(?:readouts\.([A-Za-z0-9_-]+)|readout)\.(?:flat\.)?(basis|linear\.weight)"
        for name in state:
            m = re.fullmatch(pattern, name)
            if m is None:
                continue
            if m.group(2) == "basis":
                n_components, n_vox = (int(x) for x in state[name].shape)
            else:
                n_vox = int(state[name].shape[0])
            keys[m.group(1) or DEFAULT_KEY] = (n_vox, int(n_train or n_components or 1))
        want = "bias" if alone else "basis" if config.readout == "pca" else "linear.weight"
        if not keys or (not alone and (config.readout == "pca") != (n_components is not None)):
            raise ValueError(f"no {config.readout} readout (readout.{want} or readouts.<key>.{want}) in the saved "
                             "weights")
        core_dim = int(state["core.weight" if "core.weight" in state else "core.0.weight"].shape[0]) \
            if config.core is not None else config.core_dim
        head = _head_dims(state, config.projection)
        net = cls(layer_dims, keys=keys, readout=config.readout, n_components=n_components,
                  voxel_loss=config.voxel_loss, readout_l2=config.readout_l2, core=config.core, core_dim=core_dim,
                  core_dropout=config.core_dropout, text_dim=head[1] if head else None,
                  embed_dim=head[0] if head else None, projection=config.projection,
                  temperature_init=config.temperature_init, learn_temperature=config.learn_temperature,
                  feature_dropout=config.feature_dropout, standardize_features=config.standardize_features,
                  backbone=backbone, alignment=head is not None, head_seed=seed,
                  **_spatial_kwargs(config, map_shapes))
        try:
            missing, unexpected = net.load_state_dict(dict(state), strict=False)
        except RuntimeError as exc:  # size mismatch, e.g. weights saved with another model.readout_aligned
            raise ValueError(f"weights do not fit the network of the config ({str(exc).splitlines()[-1].strip()}; "
                             f"model.readout_aligned = {config.readout_aligned})") from exc
        bad_missing = [k for k in missing if not k.startswith("backbone.")]
        if bad_missing or unexpected:
            raise ValueError(f"weights do not fit the network of the config (missing {bad_missing[:5]}, "
                             f"unexpected {list(unexpected)[:5]})")
        return net

    # ----------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def initialize(self, train_responses: torch.Tensor | Mapping[str, torch.Tensor],
                   train_features: torch.Tensor | None = None,
                   train_maps: Mapping[str, Mapping[str, torch.Tensor]] | None = None,
                   readout_start: str = "random") -> dict:
        """Fit the closed-form parts from training data: the readouts (PCA basis, mean) and the feature statistics.

        Parameters
        ----------
        train_responses : tensor of shape (n_train, n_voxels), or mapping of key to such tensors
            A tensor initialises the only key; keys missing from a mapping (e.g. a captions-only key) keep
            their initial readout.
        train_features : tensor of shape (n_train, n_features), optional
            Concatenated readout features (see :meth:`concat`) of every key's training rows; needed when
            ``standardize_features``. The statistics are :class:`~llmvem.model.features.FeatureStandardizer`'s.
        train_maps : mapping of data key to mapping of layer to tensor (n_train_key, C, H, W), optional
            Each key's training maps of the spatial layers; needed with a spatial readout (per-channel
            statistics over every key's images and positions, with ``standardize_features``; Gaussian
            readouts start at the position that best predicts each unit, see
            :meth:`~llmvem.model.spatial.GaussianReadout.initialize_positions`; factorized ones, with
            ``spatial_init="ridge"``, at a ridge fit of the centred responses on the maps).
        readout_start : {"random", "ridge", "auto"}
            "ridge": the flat PCA readouts (and a linear core) start at the ridge solution of the training scores
            (:func:`llmvem.model.start.ridge_start`, whose record is returned; needs ``train_features``).
            "auto" does the same; its caller has kept the random start
            (:func:`llmvem.model.start.random_start_parameters`) to train from.
        """
        responses = train_responses if isinstance(train_responses, Mapping) else {self._key(None): train_responses}
        for key, y in responses.items():
            self._readout(key).initialize(y)
        if self.standardize_features:
            if train_features is None:
                raise ValueError("standardize_features needs the training features")
            fitted = FeatureStandardizer().fit(train_features.detach().cpu().double().numpy())
            self.feature_mean.copy_(torch.from_numpy(fitted.mean_))
            self.feature_std.copy_(torch.from_numpy(fitted.std_))
        started = ridge_start(self, responses, train_features) if readout_start in ("ridge", "auto") and \
            train_features is not None else {}
        if not self.spatial_layers:
            return started
        if train_maps is None:
            raise ValueError(f"the spatial readout needs the training maps of {self.spatial_layers}")
        if self.standardize_features:
            for layer in self.spatial_layers:
                self.map_norm[layer].fit(torch.cat([m[layer] for m in train_maps.values()]))  # type: ignore[operator]
        for key, y in responses.items():
            readout = self._readout(key)
            spatial = readout.spatial if isinstance(readout, FlatPlusSpatialReadout) else readout
            if isinstance(spatial, GaussianReadout) and key in train_maps:
                spatial.initialize_positions(self.maps(train_maps[key]), y)
            elif isinstance(spatial, FactorizedReadout) and key in train_maps and self.spatial_init == "ridge":
                # the flat readout (or the bias) starts at the mean response: the maps fit what is left
                spatial.initialize_from_ridge(self.maps(train_maps[key]), y - y.mean(dim=0))
        return started

    def n_voxels_of(self, key: str | None = None) -> int:
        """Number of voxels of ``key``'s readout (None: the only key)."""
        return int(self._readout(key).n_voxels)

    @property
    def n_voxels(self) -> int:
        """Voxels of the only key (a one-key network; see :meth:`n_voxels_of`)."""
        return self.n_voxels_of(None)

    @property
    def readout(self) -> Readout:
        """The only key's readout (a one-key network)."""
        return self._readout(None)

    def _key(self, key: str | None) -> str:
        if key is None:
            if len(self.keys) != 1:
                raise KeyError(f"this network has {len(self.keys)} data keys {self.keys}; pass key=...")
            return self.keys[0]
        if key not in self.readouts:
            raise KeyError(f"unknown data key {key!r}; the network has {self.keys}")
        return key

    def _readout(self, key: str | None) -> Readout:
        return self.readouts[self._key(key)]  # type: ignore[return-value]

    def required_layers(self, with_embedding: bool) -> list[str]:
        """Backbone layers a forward pass needs: the readout layers and maps, plus ``"pooled"`` for the
        embedding (also for the voxels with ``readout_aligned``)."""
        layers = list(self.layers) + [k for k in self.spatial_layers if k not in self.layers]
        if (with_embedding or self.readout_aligned) and self.core is None and EMBED_LAYER not in layers:
            layers.append(EMBED_LAYER)
        return layers

    def concat(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the readout layers' features (B, d_layer) into (B, n_features), in ``self.layers`` order."""
        missing = [k for k in self.layers if k not in features]
        if missing:
            raise KeyError(f"features lack layers {missing}; the readout was built for {self.layers}")
        return torch.cat([features[k].flatten(1) for k in self.layers], dim=1)

    def maps(self, features: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """The spatial layers' maps (B, C, H, W) from ``features``, channel-standardised (``standardize_features``)."""
        missing = [k for k in self.spatial_layers if k not in features]
        if missing:
            raise KeyError(f"features lack the maps {missing}; the spatial readout was built for "
                           f"{self.spatial_layers}")
        if not self.standardize_features:
            return {k: features[k] for k in self.spatial_layers}
        return {k: self.map_norm[k](features[k]) for k in self.spatial_layers}

    def regularizer(self, key: str | None = None) -> torch.Tensor:
        """The penalty of ``key``'s readout (flat L2 and the spatial readout's sparsity/smoothness)."""
        return self._readout(key).regularizer()

    def logit_scale(self) -> torch.Tensor:
        """CLIP-style inverse temperature ``exp(log_logit_scale)``, clamped at 100."""
        return self.log_logit_scale.exp().clamp(max=100.0)

    def backbone_features(self, images: torch.Tensor, layers: Sequence[str],
                          channels_last: bool = False) -> dict[str, torch.Tensor]:
        """Run the backbone on uint8 images (B, H, W, 3) or (B, 3, H, W) → ``{layer: (B, d_layer)}``.

        With ``trunk_groups`` and a ``trunk_cache``, the frozen trunk's output is reused where that is exact
        (:func:`llmvem.embed.trunk_cache.cached_backbone_features`); the result is the full forward's."""
        if self.backbone is None:
            raise RuntimeError("this network has no backbone; pass precomputed features instead of images")
        if self.trunk_groups > 0 and self.trunk_cache is not None:
            cached = cached_backbone_features(self.backbone, images, layers, self.trunk_groups, self.trunk_cache,
                                              channels_last)
            if cached is not None:  # exact and in budget: only the tail ran
                return cached
        x = self.backbone.preprocess(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x, list(layers))

    # --------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor | None = None, features: Mapping[str, torch.Tensor] | None = None,
                with_embedding: bool = False, channels_last: bool = False, key: str | None = None,
                with_voxels: bool | str = True) -> ModelOutput:
        """Predict the responses of data key ``key`` (and optionally the projected image embedding).

        Parameters
        ----------
        images : uint8 tensor of shape (B, H, W, 3), optional
            Image mode: the backbone is run.
        features : mapping of layer to tensor (B, d_layer), optional
            Feature mode: precomputed backbone features.
        with_embedding : bool
            Also return the alignment head's projected embedding.
        key : str, optional
            Whose readout predicts; None: the only key.
        with_voxels : bool or "latent"
            Run the readout (False for a data key with captions and no responses; "latent": only the PCA
            readout's scores, not decoded to voxels, for a loss on :class:`~llmvem.model.readout.LatentTargets`).

        With a spatial readout, ``features`` also holds the maps of the spatial layers, (B, C, H, W) each.
        """
        if features is None:
            if images is None:
                raise ValueError("pass images or features")
            features = self.backbone_features(images, self.required_layers(with_embedding), channels_last)
        x = self.concat(features)
        if self.standardize_features:
            x = (x - self.feature_mean) / self.feature_std
        x = self.dropout(x)
        z = self.core(x) if self.core is not None else x
        embedding = logit_scale = None
        if with_embedding or (with_voxels and self.readout_aligned):
            embedding = self._embed(z, features)
            logit_scale = self.logit_scale() if with_embedding else None
        voxels = latent = None
        if with_voxels:
            flat_in = self.core_dropout(z)
            if embedding is not None and self.readout_aligned:
                flat_in = torch.cat([flat_in, embedding.to(flat_in.dtype) * math.sqrt(flat_in.shape[1])], dim=1)
            inputs: tuple = (flat_in,)
            if self.spatial_layers:
                maps = self.maps(features)
                inputs = (maps,) if self.spatial_mode == "alone" else (flat_in, maps)
            ro = self._readout(key)
            voxels, latent = (None, ro.scores(*inputs)) if with_voxels == "latent" else ro.forward_latent(*inputs)
        return ModelOutput(voxels=voxels, readout_input=z, latent=latent,
                           embedding=embedding if with_embedding else None, logit_scale=logit_scale)

    def _embed(self, z: torch.Tensor, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The head's embedding (B, align_dim) of the core output ``z``, or of the pooled features without core."""
        if self.head is None:
            raise RuntimeError("this network was built without an alignment head")
        if self.core is None and EMBED_LAYER not in features:
            raise KeyError(f"the alignment head needs the {EMBED_LAYER!r} layer among the features")
        return self.head(z if self.core is not None else features[EMBED_LAYER])

    def voxel_loss(self, out: ModelOutput, targets: torch.Tensor, key: str | None = None) -> torch.Tensor:
        """The readout's MSE (voxel or PCA space) of ``out`` against targets (B, n_voxels)."""
        if out.voxels is None and out.latent is None:
            raise ValueError("this output has no voxel predictions (with_voxels=False)")
        return self._readout(key).loss(out.voxels, targets, out.latent)


_SINGLE, _KEYED = "readout.", f"readouts.{DEFAULT_KEY}."


def _single_key_names(module: LLMVEM, state: dict[str, torch.Tensor], prefix: str, local_metadata: dict) -> None:
    """State-dict hook: ``readouts.main.*`` → ``readout.*`` when ``"main"`` is the only key, in place, order kept."""
    keyed = prefix + _KEYED
    if module.keys != [DEFAULT_KEY] or not any(k.startswith(keyed) for k in state):
        return
    items = list(state.items())
    state.clear()
    for k, v in items:
        state[prefix + _SINGLE + k[len(keyed):] if k.startswith(keyed) else k] = v


def _keyed_names(module: LLMVEM, state: dict[str, torch.Tensor], prefix: str, *args: object) -> None:
    """Load pre-hook: ``readout.*`` (single-subject format) → ``readouts.<only key>.*``, in place."""
    single = prefix + _SINGLE
    if len(module.keys) != 1:
        return
    for k in [k for k in state if k.startswith(single)]:
        state[f"{prefix}readouts.{module.keys[0]}.{k[len(single):]}"] = state.pop(k)


def _make_readout(kind: str, n_features: int, n_voxels: int, n_train: int, n_components: int | None,
                  voxel_loss: str, l2: float) -> Readout:
    if kind == "pca":
        k = n_components if n_components is not None else default_pca_components(n_train, n_voxels)
        return PCAVoxelReadout(n_features, n_voxels, min(k, n_train, n_voxels), voxel_loss=voxel_loss, l2=l2)
    if kind == "linear":
        return LinearVoxelReadout(n_features, n_voxels, l2=l2)
    raise ValueError(f"readout: expected 'pca' or 'linear', got {kind!r}")


def _spatial_kwargs(config: ModelConfig, map_shapes: Mapping[str, tuple[int, int, int]] | None) -> dict:
    """The spatial-readout (and ``readout_aligned``) arguments of :class:`LLMVEM` from a ``model`` section."""
    return {"map_shapes": map_shapes, "spatial_readout": config.spatial_readout,
            "spatial_mode": config.spatial_mode, "spatial_l1": config.spatial_l1,
            "spatial_smoothness": config.spatial_smoothness, "spatial_init": config.spatial_init,
            "readout_aligned": config.readout_aligned}


def _head_dims(state: Mapping[str, torch.Tensor], projection: str) -> tuple[int, int] | None:
    """(input, output) sizes of a saved alignment head, or None when the state has none."""
    first = "head.proj.weight" if projection == "linear" else "head.proj.0.weight"
    last = "head.proj.weight" if projection == "linear" else "head.proj.2.weight"
    if first not in state or last not in state:
        return None
    return int(state[first].shape[1]), int(state[last].shape[0])
