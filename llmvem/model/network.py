"""The LLM-VEM network: image backbone → selected layer features → dropout → voxel readout, and the pooled
image embedding → alignment head (projection to the caption-embedding space) with a learnable CLIP-style
temperature.

The network runs in two modes:

* **feature mode** (stage 1): ``forward(features={layer: (B, d_layer)})`` with features precomputed by the
  frozen backbone (from the feature cache); the backbone is not called.
* **image mode** (stage 2): ``forward(images=uint8 (B, H, W, 3))`` preprocesses the images and runs the
  backbone, whose last blocks may be trainable.

Nothing here knows about files or datasets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from llmvem.embed.base import ImageBackbone
from llmvem.model.readout import LinearVoxelReadout, PCAVoxelReadout, Readout, default_pca_components
from llmvem.utils import floored_std

if TYPE_CHECKING:
    from llmvem.config import ModelConfig

__all__ = ["EMBED_LAYER", "AlignmentHead", "LLMVEM", "ModelOutput"]

EMBED_LAYER = "pooled"
_HEAD_SEED_OFFSET = 7919  # the alignment head draws its init from its own stream (see LLMVEM.__init__)


@dataclass
class ModelOutput:
    """What one forward pass returns.

    Attributes
    ----------
    voxels : tensor of shape (B, n_voxels)
        Predicted responses.
    readout_input : tensor of shape (B, n_features)
        Concatenated, standardised, dropped-out features fed to the readout.
    latent : tensor of shape (B, n_components) or None
        Predicted PCA scores (PCA readout).
    embedding : tensor of shape (B, align_dim) or None
        L2-normalised projected image embedding (only when asked for with ``with_embedding=True``).
    logit_scale : scalar tensor or None
        The clamped inverse temperature (with the embedding; computed inside ``forward`` so DDP sees it used).
    """

    voxels: torch.Tensor
    readout_input: torch.Tensor
    latent: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    logit_scale: torch.Tensor | None = None


class AlignmentHead(nn.Module):
    """Projects the pooled image embedding into the caption-embedding space; output rows are L2-normalised.

    Parameters
    ----------
    in_dim : int
        Size of the pooled image embedding.
    out_dim : int
        Size of the text embedding (or ``align_dim``).
    kind : {"linear", "mlp"}
        A single linear map, or Linear → GELU → Linear with ``out_dim`` hidden units.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise ValueError(f"projection: expected 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x).float(), dim=-1)


class LLMVEM(nn.Module):
    """Visual encoding model with an LLM-caption alignment head.

    Parameters
    ----------
    layer_dims : mapping of str to int
        Readout layers in concatenation order and their feature sizes, e.g. ``{"block5": 80, "pooled": 1280}``.
    n_voxels : int
    n_train : int
        Training images (sets the default number of PCA components).
    readout : {"pca", "linear"}
    n_components : int or None
        PCA components; None → ``min(2048, n_train, n_voxels)``.
    voxel_loss : {"voxel", "pca"}
    readout_l2 : float
    text_dim : int or None
        Size of the caption embeddings; the projection's output size unless ``align_dim`` is given.
    align_dim : int or None
    embed_dim : int or None
        Size of the pooled image embedding; None → ``layer_dims["pooled"]`` or ``backbone.feature_dim``.
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
        Seed of the alignment head's own random stream.
    """

    def __init__(self, layer_dims: Mapping[str, int], n_voxels: int, n_train: int, *,
                 readout: str = "pca", n_components: int | None = None, voxel_loss: str = "voxel",
                 readout_l2: float = 0.0, text_dim: int | None = None, align_dim: int | None = None,
                 embed_dim: int | None = None, projection: str = "linear", temperature_init: float = 0.07,
                 learn_temperature: bool = True, feature_dropout: float = 0.0, standardize_features: bool = True,
                 backbone: ImageBackbone | None = None, alignment: bool = True, head_seed: int = 0):
        super().__init__()
        if not layer_dims:
            raise ValueError("layer_dims: expected at least one readout layer")
        self.layers: list[str] = list(layer_dims)
        self.layer_dims = {k: int(v) for k, v in layer_dims.items()}
        self.n_voxels, self.n_train = int(n_voxels), int(n_train)
        self.n_features = sum(self.layer_dims.values())
        self.backbone = backbone
        self.standardize_features = standardize_features
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.dropout: nn.Module = nn.Dropout(feature_dropout) if feature_dropout > 0 else nn.Identity()
        if readout == "pca":
            k = n_components if n_components is not None else default_pca_components(n_train, n_voxels)
            k = min(k, n_train, n_voxels)
            self.readout: Readout = PCAVoxelReadout(self.n_features, n_voxels, k, voxel_loss=voxel_loss,
                                                    l2=readout_l2)
        elif readout == "linear":
            self.readout = LinearVoxelReadout(self.n_features, n_voxels, l2=readout_l2)
        else:
            raise ValueError(f"readout: expected 'pca' or 'linear', got {readout!r}")

        if embed_dim is None:
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

    @classmethod
    def from_config(cls, config: ModelConfig, layer_dims: Mapping[str, int], n_voxels: int, n_train: int,
                    text_dim: int | None, backbone: ImageBackbone | None = None, alignment: bool = True,
                    seed: int = 0, embed_dim: int | None = None) -> LLMVEM:
        """Build the network described by a :class:`llmvem.config.ModelConfig` section."""
        return cls(layer_dims, n_voxels, n_train, readout=config.readout, n_components=config.pca_components,
                   voxel_loss=config.voxel_loss, readout_l2=config.readout_l2, text_dim=text_dim,
                   align_dim=config.align_dim, embed_dim=embed_dim, projection=config.projection,
                   temperature_init=config.temperature_init, learn_temperature=config.learn_temperature,
                   feature_dropout=config.feature_dropout, standardize_features=config.standardize_features,
                   backbone=backbone, alignment=alignment, head_seed=seed)

    # ----------------------------------------------------------------------------------------- setup
    @torch.no_grad()
    def initialize(self, train_responses: torch.Tensor, train_features: torch.Tensor | None = None) -> None:
        """Fit the closed-form parts from training data: the readout (PCA basis, mean) and the feature statistics.

        Parameters
        ----------
        train_responses : tensor of shape (n_train, n_voxels)
        train_features : tensor of shape (n_train, n_features), optional
            Concatenated readout features (see :meth:`concat`); needed when ``standardize_features``.
        """
        self.readout.initialize(train_responses)
        if self.standardize_features:
            if train_features is None:
                raise ValueError("standardize_features needs the training features")
            x = train_features.detach().to(torch.float64)
            self.feature_mean.copy_(x.mean(dim=0).float())
            std = floored_std(x.std(dim=0).cpu().numpy())  # tiny stds would blow up test features
            self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def required_layers(self, with_embedding: bool) -> list[str]:
        """Backbone layers a forward pass needs: the readout layers, plus ``"pooled"`` for the embedding."""
        layers = list(self.layers)
        if with_embedding and EMBED_LAYER not in layers:
            layers.append(EMBED_LAYER)
        return layers

    def concat(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the readout layers' features (B, d_layer) into (B, n_features), in ``self.layers`` order."""
        missing = [k for k in self.layers if k not in features]
        if missing:
            raise KeyError(f"features lack layers {missing}; the readout was built for {self.layers}")
        return torch.cat([features[k].flatten(1) for k in self.layers], dim=1)

    def logit_scale(self) -> torch.Tensor:
        """CLIP-style inverse temperature ``exp(log_logit_scale)``, clamped at 100."""
        return self.log_logit_scale.exp().clamp(max=100.0)

    def backbone_features(self, images: torch.Tensor, layers: Sequence[str],
                          channels_last: bool = False) -> dict[str, torch.Tensor]:
        """Run the backbone on uint8 images (B, H, W, 3) or (B, 3, H, W) → ``{layer: (B, d_layer)}``."""
        if self.backbone is None:
            raise RuntimeError("this network has no backbone; pass precomputed features instead of images")
        x = self.backbone.preprocess(images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return self.backbone(x, list(layers))

    # --------------------------------------------------------------------------------------- forward
    def forward(self, images: torch.Tensor | None = None, features: Mapping[str, torch.Tensor] | None = None,
                with_embedding: bool = False, channels_last: bool = False) -> ModelOutput:
        """Predict responses (and optionally the projected image embedding).

        Parameters
        ----------
        images : uint8 tensor of shape (B, H, W, 3), optional
            Image mode: the backbone is run.
        features : mapping of layer to tensor (B, d_layer), optional
            Feature mode: precomputed backbone features.
        with_embedding : bool
            Also return the alignment head's projected embedding.
        """
        if features is None:
            if images is None:
                raise ValueError("pass images or features")
            features = self.backbone_features(images, self.required_layers(with_embedding), channels_last)
        x = self.concat(features)
        if self.standardize_features:
            x = (x - self.feature_mean) / self.feature_std
        x = self.dropout(x)
        voxels, latent = self.readout.forward_latent(x)
        embedding = logit_scale = None
        if with_embedding:
            if self.head is None:
                raise RuntimeError("this network was built without an alignment head")
            if EMBED_LAYER not in features:
                raise KeyError(f"the alignment head needs the {EMBED_LAYER!r} layer among the features")
            embedding = self.head(features[EMBED_LAYER])
            logit_scale = self.logit_scale()
        return ModelOutput(voxels=voxels, readout_input=x, latent=latent, embedding=embedding,
                           logit_scale=logit_scale)

    def voxel_loss(self, out: ModelOutput, targets: torch.Tensor) -> torch.Tensor:
        """The readout's MSE (voxel or PCA space) of ``out`` against targets (B, n_voxels)."""
        return self.readout.loss(out.voxels, targets, out.latent)

    def head_parameters(self) -> list[nn.Parameter]:
        """Parameters of the readout, the alignment head and the temperature (what stage 1 trains)."""
        params = list(self.readout.parameters())
        if self.head is not None:
            params += list(self.head.parameters())
        params.append(self.log_logit_scale)
        return params
