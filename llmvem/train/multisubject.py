"""Several subjects trained jointly: a shared backbone and core, one voxel readout per subject.

NSD has 8 subjects who saw (mostly) different images; recordings of one animal on different days (the V4
sessions) each have their own neurons. A model per subject wastes what the subjects share. Here

* the frozen (stage 1) or partly fine-tuned (stage 2) **image backbone** is shared;
* a **shared core** — a linear bottleneck, or a small MLP, of ``multisubject.core_dim`` units over the
  concatenated, standardised layer features — is trained on every subject's data;
* the **alignment head** (projection of the core output into the caption-embedding space, with its learnable
  temperature) is shared, so the contrastive loss shapes the shared core already in stage 1;
* each subject has its own **voxel readout** (:class:`~llmvem.model.readout.PCAVoxelReadout` or
  :class:`~llmvem.model.readout.LinearVoxelReadout`) over the core output.

Training interleaves the subjects' batches: every epoch, each subject's training images are shuffled into
batches and the batches of all subjects are visited in one seeded random order, one optimizer step per batch
(voxel MSE of that subject, divided by the mean variance of its training responses with
``multisubject.loss_weighting = "variance"``, + λ × InfoNCE against that subject's captions + the readout's L2
penalty). Subjects differ in how long they take to fit (a session with 300 images still improves when one with
900 starts to overfit), so by default (``multisubject.selection = "per_subject"``) each subject is predicted by
the parameters of the epoch with *its own* best validation r, and training stops when no subject improved for
``early_stopping_patience`` epochs; ``"mean"`` selects one epoch by the mean over subjects. "Separate" training is
the same architecture and loop given one subject (where both selections coincide).

A training folder receives ``config.yaml``, ``subjects.json``, ``curves.csv``, ``training.json``,
``model.safetensors`` and ``predictions/<subject>_{val,test}.npy``. The experiment around it (prepare subjects,
train jointly and alone, evaluate, summarise) is :func:`llmvem.multisubject.run_multisubject`.
"""

from __future__ import annotations

import copy
import csv
import io
import json
import logging
import math
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from llmvem.config import RunConfig, StageConfig, save_config
from llmvem.data.dataset import EncodingDataset
from llmvem.embed.base import ImageBackbone
from llmvem.errors import ConfigError, DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.model.losses import contrastive_loss, total_loss
from llmvem.model.network import _HEAD_SEED_OFFSET, AlignmentHead, ModelOutput
from llmvem.model.readout import LinearVoxelReadout, PCAVoxelReadout, Readout, default_pca_components
from llmvem.train.checkpoint import save_weights
from llmvem.train.inputs import (
    augment_images,
    autocast,
    load_image_tensor,
    predict_network,
    resolve_precision,
)
from llmvem.train.schedule import lr_factor
from llmvem.train.trainer import config_fingerprint
from llmvem.utils import (
    atomic_write,
    floored_std,
    prepare_run_folder,
    progress_bar,
    resolve_device,
    seed_everything,
    stable_hash,
    write_json,
)

__all__ = ["TRAIN_OUTPUTS", "MultiSubjectLLMVEM", "MultiSubjectResult", "SubjectData", "train_multisubject"]

log = logging.getLogger(__name__)

#: Files a training folder holds (``overwrite`` removes exactly these).
TRAIN_OUTPUTS = ("config.yaml", "subjects.json", "curves.csv", "training.json", "model.safetensors", "predictions")

CURVE_FIELDS = ("stage", "epoch", "step", "train_loss", "train_voxel_loss", "train_align_loss", "val_mean_r", "lr",
                "temperature", "seconds")

Callback = Callable[[str, dict[str, Any]], None]



# ------------------------------------------------------------------------------------------------- data
@dataclass
class SubjectData:
    """What one subject contributes to training.

    Attributes
    ----------
    name : str
        Identifier (letters, digits, ``_`` and ``-``), unique among the subjects.
    dataset : EncodingDataset
        With ``train``, ``val`` and ``test`` splits and responses for train and val.
    features : dict of split to dict of layer to array of shape (n_images, d_layer)
        Frozen-backbone features of every split for the readout layers (the feature cache's output).
    text_embeddings : dict of split to array of shape (n_images, text_dim), optional
        L2-normalised caption embedding of each image; needed when ``model.lambda_align > 0``.
    spec : str, optional
        The dataset spec it was loaded from (recorded in the outputs).
    """

    name: str
    dataset: EncodingDataset
    features: Mapping[str, Mapping[str, np.ndarray]]
    text_embeddings: Mapping[str, np.ndarray] | None = None
    spec: str | None = None


# ---------------------------------------------------------------------------------------------- network
class _SubjectView(nn.Module):
    """One subject's slice of a :class:`MultiSubjectLLMVEM`, with the single-subject network's call signature
    (so :func:`llmvem.train.inputs.predict_network` can run it)."""

    def __init__(self, net: MultiSubjectLLMVEM, subject: str):
        super().__init__()
        self.net, self.subject = net, subject
        self.n_voxels = net.readouts[subject].n_voxels
        self.training = net.training  # so predict_network restores the network's own mode afterwards

    def forward(self, images: torch.Tensor | None = None, features: Mapping[str, torch.Tensor] | None = None,
                with_embedding: bool = False, channels_last: bool = False) -> ModelOutput:
        return self.net(self.subject, images=images, features=features, with_embedding=with_embedding,
                        channels_last=channels_last)


class MultiSubjectLLMVEM(nn.Module):
    """Shared backbone and core, shared alignment head, one voxel readout per subject.

    Parameters
    ----------
    layer_dims : mapping of str to int
        Readout layers in concatenation order and their feature sizes.
    subjects : mapping of str to (n_voxels, n_train)
        Each subject's number of voxels and of training images (sets its PCA components).
    core : {"linear", "mlp"}
        Linear bottleneck, or Linear → GELU → Linear.
    core_dim : int
        Units of the core output (the readouts' and the alignment head's input).
    core_dropout : float
        Dropout on the core output fed to the readouts.
    readout, n_components, voxel_loss, readout_l2, text_dim, align_dim, projection, temperature_init,
    learn_temperature, feature_dropout, standardize_features, backbone, alignment, head_seed
        As in :class:`llmvem.model.LLMVEM` (``n_components`` is capped per subject at
        ``min(n_train, n_voxels)``; the alignment head reads the core output).
    """

    def __init__(self, layer_dims: Mapping[str, int], subjects: Mapping[str, tuple[int, int]], *,
                 core: str = "linear", core_dim: int = 256, core_dropout: float = 0.0, readout: str = "pca",
                 n_components: int | None = None, voxel_loss: str = "voxel", readout_l2: float = 0.0,
                 text_dim: int | None = None, align_dim: int | None = None, projection: str = "linear",
                 temperature_init: float = 0.07, learn_temperature: bool = True, feature_dropout: float = 0.0,
                 standardize_features: bool = True, backbone: ImageBackbone | None = None, alignment: bool = True,
                 head_seed: int = 0):
        super().__init__()
        if not layer_dims:
            raise ValueError("layer_dims: expected at least one readout layer")
        if not subjects:
            raise ValueError("subjects: expected at least one subject")
        bad = [s for s in subjects if not re.fullmatch(r"[A-Za-z0-9_-]+", s)]
        if bad:
            raise ValueError(f"subject names {bad}: expected letters, digits, '_' and '-' only")
        self.layers = list(layer_dims)
        self.layer_dims = {k: int(v) for k, v in layer_dims.items()}
        self.n_features = sum(self.layer_dims.values())
        self.subjects = list(subjects)
        self.backbone = backbone
        self.standardize_features = standardize_features
        self.register_buffer("feature_mean", torch.zeros(self.n_features))
        self.register_buffer("feature_std", torch.ones(self.n_features))
        self.dropout: nn.Module = nn.Dropout(feature_dropout) if feature_dropout > 0 else nn.Identity()
        if core == "linear":
            self.core: nn.Module = nn.Linear(self.n_features, core_dim)
        elif core == "mlp":
            self.core = nn.Sequential(nn.Linear(self.n_features, core_dim), nn.GELU(), nn.Linear(core_dim, core_dim))
        else:
            raise ValueError(f"core: expected 'linear' or 'mlp', got {core!r}")
        self.core_dim = int(core_dim)
        self.core_dropout: nn.Module = nn.Dropout(core_dropout) if core_dropout > 0 else nn.Identity()
        readouts: dict[str, Readout] = {}
        for name, (n_vox, n_train) in subjects.items():
            if readout == "pca":
                k = n_components if n_components is not None else default_pca_components(n_train, n_vox)
                readouts[name] = PCAVoxelReadout(core_dim, n_vox, min(k, n_train, n_vox), voxel_loss=voxel_loss,
                                                 l2=readout_l2)
            elif readout == "linear":
                readouts[name] = LinearVoxelReadout(core_dim, n_vox, l2=readout_l2)
            else:
                raise ValueError(f"readout: expected 'pca' or 'linear', got {readout!r}")
        self.readouts = nn.ModuleDict(readouts)
        self.head: AlignmentHead | None = None
        if alignment:
            out_dim = align_dim or text_dim
            if out_dim is None:
                raise ValueError("the alignment head needs text_dim or align_dim")
            # built from its own random stream: with λ = 0 the rest of the model is the same as without the head
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(head_seed + _HEAD_SEED_OFFSET)
                self.head = AlignmentHead(core_dim, out_dim, projection)
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1.0 / temperature_init)),
                                            requires_grad=learn_temperature)

    @classmethod
    def from_config(cls, config: RunConfig, layer_dims: Mapping[str, int], subjects: Mapping[str, tuple[int, int]],
                    text_dim: int | None, backbone: ImageBackbone | None = None,
                    alignment: bool = True) -> MultiSubjectLLMVEM:
        """Build the network a :class:`~llmvem.config.RunConfig` describes (``model`` and ``multisubject``)."""
        m, ms = config.model, config.multisubject
        return cls(layer_dims, subjects, core=ms.core, core_dim=ms.core_dim, core_dropout=ms.core_dropout,
                   readout=m.readout, n_components=m.pca_components, voxel_loss=m.voxel_loss,
                   readout_l2=m.readout_l2, text_dim=text_dim, align_dim=m.align_dim, projection=m.projection,
                   temperature_init=m.temperature_init, learn_temperature=m.learn_temperature,
                   feature_dropout=m.feature_dropout, standardize_features=m.standardize_features,
                   backbone=backbone, alignment=alignment, head_seed=config.seed)

    @torch.no_grad()
    def initialize(self, train_responses: Mapping[str, torch.Tensor], train_features: torch.Tensor | None) -> None:
        """Fit the closed-form parts: each readout's PCA basis / mean, and the feature statistics.

        Parameters
        ----------
        train_responses : mapping of subject to tensor of shape (n_train_subject, n_voxels_subject)
        train_features : tensor of shape (Σ n_train, n_features), optional
            Concatenated readout features of all subjects' training images (needed when standardising).
        """
        for name, y in train_responses.items():
            self.readouts[name].initialize(y)
        if self.standardize_features:
            if train_features is None:
                raise ValueError("standardize_features needs the training features")
            x = train_features.detach().to(torch.float64)
            self.feature_mean.copy_(x.mean(dim=0).float())
            std = floored_std(x.std(dim=0).cpu().numpy())  # see llmvem.utils.floored_std
            self.feature_std.copy_(torch.as_tensor(std, dtype=torch.float32))

    def concat(self, features: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate the readout layers' features (B, d_layer) → (B, n_features)."""
        missing = [k for k in self.layers if k not in features]
        if missing:
            raise KeyError(f"features lack layers {missing}; the core was built for {self.layers}")
        return torch.cat([features[k].flatten(1) for k in self.layers], dim=1)

    def logit_scale(self) -> torch.Tensor:
        """CLIP-style inverse temperature, clamped at 100."""
        return self.log_logit_scale.exp().clamp(max=100.0)

    def subject(self, name: str) -> nn.Module:
        """A module that predicts subject ``name`` with the single-subject call signature."""
        if name not in self.readouts:
            raise KeyError(f"unknown subject {name!r}; the network has {self.subjects}")
        return _SubjectView(self, name)

    def forward(self, subject: str, images: torch.Tensor | None = None,
                features: Mapping[str, torch.Tensor] | None = None, with_embedding: bool = False,
                channels_last: bool = False) -> ModelOutput:
        """Predict the responses of ``subject`` from uint8 images (B, H, W, 3) or features {layer: (B, d)}.

        Returns
        -------
        ModelOutput
            ``voxels`` (B, n_voxels of the subject), ``readout_input`` = the core output (B, core_dim),
            ``latent`` (PCA scores or None), ``embedding`` (B, align_dim) and ``logit_scale`` with
            ``with_embedding``.
        """
        if features is None:
            if images is None:
                raise ValueError("pass images or features")
            if self.backbone is None:
                raise RuntimeError("this network has no backbone; pass precomputed features instead of images")
            x = self.backbone.preprocess(images)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            features = self.backbone(x, list(self.layers))
        x = self.concat(features)
        if self.standardize_features:
            x = (x - self.feature_mean) / self.feature_std
        z = self.core(self.dropout(x))
        voxels, latent = self.readouts[subject].forward_latent(self.core_dropout(z))
        embedding = logit_scale = None
        if with_embedding:
            if self.head is None:
                raise RuntimeError("this network was built without an alignment head")
            embedding = self.head(z)
            logit_scale = self.logit_scale()
        return ModelOutput(voxels=voxels, readout_input=z, latent=latent, embedding=embedding,
                           logit_scale=logit_scale)


# --------------------------------------------------------------------------------------------- training
@dataclass
class MultiSubjectResult:
    """What :func:`train_multisubject` returns.

    Attributes
    ----------
    out_dir : Path
    network : MultiSubjectLLMVEM or None
        The trained network (best epoch of the last stage), in eval mode; None when a finished training
        folder was reused (``resume``).
    predictions : dict of subject to dict of split to array of shape (n_images, n_voxels)
        ``"val"`` and ``"test"`` predictions of each subject.
    metrics : dict
        ``val_mean_r`` (mean over subjects), ``per_subject`` {subject: {val_mean_r, test_mean_r}}, per-stage best
        epochs and scores.
    curves : list of dict
        One row per epoch (the rows of ``curves.csv``; ``val_r__<subject>`` per subject).
    stages : dict
    subject_states : dict of subject to dict of str to tensor
        With ``multisubject.selection = "per_subject"``: the trained parameters (shared core, head, unfrozen
        backbone blocks and the subject's own readout) of the epoch with the subject's best validation r.
    """

    out_dir: Path
    network: MultiSubjectLLMVEM | None
    predictions: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, Any]
    curves: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    subject_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def network_for(self, subject: str) -> nn.Module:
        """The network that made ``predictions[subject]``, with the single-subject call signature.

        With ``multisubject.selection = "per_subject"`` this loads the subject's best-epoch parameters into
        :attr:`network` (its shared parts change: take the next subject's network after using this one).
        """
        if self.network is None:
            raise ConfigError(f"{self.out_dir}: this result was read back from a finished training folder; "
                              "its network is not loaded")
        if subject in self.subject_states:
            self.network.load_state_dict(self.subject_states[subject], strict=False)
        return self.network.subject(subject)


def _mean_r(y: np.ndarray, pred: np.ndarray) -> float:
    r = pearson_r(y, pred)
    return float(np.nanmean(r)) if r.size else float("nan")


def _identity(config: RunConfig, subjects: Sequence[SubjectData]) -> str:
    """Hash of what a training folder's result depends on: the config and the subjects' data shapes."""
    return stable_hash({"config": config_fingerprint(config),
                        "subjects": [[s.name, {k: len(v) for k, v in s.dataset.splits.items()},
                                      s.dataset.n_voxels] for s in subjects]})


class _MultiTrainer:
    """One joint training run (internal; use :func:`train_multisubject`)."""

    def __init__(self, config: RunConfig, subjects: Sequence[SubjectData], backbone: ImageBackbone | None,
                 out_dir: Path, show_progress: bool, callback: Callback | None):
        self.config, self.subjects, self.backbone = config, list(subjects), backbone
        self.out_dir, self.show, self.callback = out_dir, show_progress, callback
        self.device = torch.device(resolve_device(config.train.device))
        self.precision = resolve_precision(config.train.precision, self.device)
        self.lam = float(config.model.lambda_align)
        self.layers = list(config.backbone.layers)
        self.curves: list[dict[str, Any]] = []
        self.stages: dict[str, dict[str, Any]] = {}
        self._check()

    def _check(self) -> None:
        names = [s.name for s in self.subjects]
        if not names:
            raise ConfigError("train_multisubject: expected at least one subject")
        if len(set(names)) != len(names):
            raise ConfigError(f"subject names must be unique, got {names}")
        s1, s2 = self.config.train.stage1, self.config.train.stage2
        for label, st in (("train.stage1", s1), ("train.stage2", s2)):
            if st.grad_accum != 1:
                raise ConfigError(f"{label}.grad_accum = {st.grad_accum}: multi-subject training steps once per "
                                  "subject batch; set it to 1 and choose batch_size instead")
        if s2.epochs > 0 and self.backbone is None:
            raise ConfigError("stage 2 (train.stage2.epochs > 0) fine-tunes the shared backbone; pass backbone=...")
        dims: dict[str, int] | None = None
        text_dims = set()
        for s in self.subjects:
            ds, src = s.dataset, s.dataset.source
            if ds.val is None:
                raise DataValidationError(src, "splits", f"subject {s.name}: expected a validation split; call "
                                          "dataset.with_validation_split(fraction, seed) first")
            for split in ("train", "val"):
                if ds.splits[split].responses is None:
                    raise DataValidationError(src, f"{split}.responses", f"subject {s.name}: missing; training "
                                              "needs responses")
            for split in ("train", "val", "test"):
                if split not in s.features:
                    raise DataValidationError(None, f"features[{s.name!r}]", f"expected an entry for split {split!r}")
                for layer in self.layers:
                    if layer not in s.features[split]:
                        raise DataValidationError(None, f"features[{s.name!r}][{split!r}]", f"layer {layer!r} is "
                                                  f"missing (have {sorted(s.features[split])}); expected "
                                                  f"backbone.layers {self.layers}")
                    f = np.asarray(s.features[split][layer])
                    if f.ndim != 2 or f.shape[0] != len(ds.splits[split]):
                        raise DataValidationError(None, f"features[{s.name!r}][{split!r}][{layer!r}]",
                                                  f"shape {f.shape}, expected ({len(ds.splits[split])}, dim)")
            d = {k: int(np.asarray(s.features["train"][k]).shape[1]) for k in self.layers}
            if dims is not None and d != dims:
                raise DataValidationError(None, f"features[{s.name!r}]", f"layer sizes {d} differ from the other "
                                          f"subjects' {dims}; all subjects must share one backbone")
            dims = d
            if self.lam > 0:
                if s.text_embeddings is None:
                    raise ConfigError(f"model.lambda_align = {self.lam} needs caption embeddings of subject "
                                      f"{s.name}; give them, or set model.lambda_align=0")
                for split in ("train", "val", "test"):
                    e = np.asarray(s.text_embeddings.get(split)) if split in s.text_embeddings else None
                    if e is None or e.ndim != 2 or e.shape[0] != len(ds.splits[split]):
                        raise DataValidationError(None, f"text_embeddings[{s.name!r}][{split!r}]",
                                                  f"expected shape ({len(ds.splits[split])}, dim): one embedding "
                                                  "per image")
                    text_dims.add(e.shape[1])
        if len(text_dims) > 1:
            raise DataValidationError(None, "text_embeddings", f"subjects have different sizes {sorted(text_dims)}; "
                                      "embed all captions with one text encoder")
        self.layer_dims = dims or {}
        self.text_dim = next(iter(text_dims)) if text_dims else None

    # ------------------------------------------------------------------------------------------ data
    def _prepare(self) -> None:
        dev = self.device
        self.n: dict[str, dict[str, int]] = {}
        self.y: dict[str, dict[str, torch.Tensor]] = {}
        self.feats: dict[str, dict[str, dict[str, torch.Tensor]]] = {}
        self.images: dict[str, dict[str, torch.Tensor]] = {}
        self.text: dict[str, torch.Tensor] = {}
        self.text_ids: dict[str, torch.Tensor] = {}
        self.weight: dict[str, float] = {}
        need_images = self.config.train.stage2.epochs > 0
        for s in self.subjects:
            ds = s.dataset
            self.n[s.name] = {k: len(ds.splits[k]) for k in ("train", "val", "test")}
            self.y[s.name] = {k: torch.as_tensor(ds.splits[k].responses, dtype=torch.float32)
                              for k in ("train", "val", "test") if ds.splits[k].responses is not None}
            self.feats[s.name] = {k: {layer: torch.as_tensor(np.asarray(s.features[k][layer]), dtype=torch.float32)
                                      for layer in self.layers} for k in ("train", "val", "test")}
            if need_images:
                assert self.backbone is not None
                size = int(self.backbone.image_size)
                self.images[s.name] = {k: load_image_tensor(ds.splits[k].images, size,
                                                            desc=f"decoding {s.name} {k} images",
                                                            show_progress=self.show)
                                       for k in ("train", "val", "test")}
            ytr = self.y[s.name]["train"]
            var = float(ytr.var(dim=0).mean()) if len(ytr) > 1 else 1.0
            self.weight[s.name] = 1.0 / max(var, 1e-8) if self.config.multisubject.loss_weighting == "variance" \
                else 1.0
            if self.lam > 0:
                assert s.text_embeddings is not None
                rows = np.asarray(s.text_embeddings["train"], dtype=np.float32)
                _, inverse = np.unique(rows, axis=0, return_inverse=True)  # identical captions: positives
                self.text[s.name] = torch.from_numpy(rows).to(dev)
                self.text_ids[s.name] = torch.from_numpy(inverse.reshape(-1).astype(np.int64)).to(dev)
            self.y[s.name]["train"] = ytr.to(dev)

    def _build(self) -> MultiSubjectLLMVEM:
        subjects = {s.name: (s.dataset.n_voxels, self.n[s.name]["train"]) for s in self.subjects}
        net = MultiSubjectLLMVEM.from_config(self.config, self.layer_dims, subjects, self.text_dim,
                                             backbone=self.backbone, alignment=self.text_dim is not None)
        train_x = torch.cat([net.concat(self.feats[s.name]["train"]) for s in self.subjects])
        net.initialize({s.name: self.y[s.name]["train"].cpu() for s in self.subjects}, train_x)
        net.to(self.device)
        for p in net.parameters():
            p.requires_grad_(False)
        trainable: list[nn.Module] = [net.core, net.readouts]
        if self.lam > 0 and net.head is not None:
            trainable.append(net.head)
        for m in trainable:
            m.requires_grad_(True)
        net.log_logit_scale.requires_grad_(self.lam > 0 and self.config.model.learn_temperature)
        return net

    # ---------------------------------------------------------------------------------------- stages
    def _unfreeze(self, n_blocks: int) -> list[nn.Module]:
        assert self.backbone is not None
        blocks = list(self.backbone.blocks())
        chosen = blocks[len(blocks) - min(n_blocks, len(blocks)):] if n_blocks > 0 else []
        for block in chosen:
            block.requires_grad_(True)
        return chosen

    def _param_groups(self, cfg: StageConfig) -> list[dict[str, Any]]:
        """AdamW groups: heads at ``lr``, unfrozen backbone blocks at ``backbone_lr``; no decay on biases."""
        bb_ids = {id(p) for p in self.backbone.parameters()} if self.backbone is not None else set()
        bb_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10.0
        groups = []
        for is_bb, lr in ((False, cfg.lr), (True, bb_lr)):
            params = [p for p in self.network.parameters() if p.requires_grad and (id(p) in bb_ids) == is_bb]
            for decay in (True, False):
                chosen = [p for p in params if (p.ndim >= 2) == decay]
                if chosen:
                    groups.append({"params": chosen, "lr": lr, "base_lr": lr,
                                   "weight_decay": cfg.weight_decay if decay else 0.0})
        return groups

    def _set_modes(self, stage: int) -> None:
        self.network.train()
        if self.backbone is not None:
            self.backbone.eval()
            if stage == 2:
                for block in self.unfrozen:
                    block.train()
                for m in self.backbone.modules():  # BatchNorm statistics stay frozen (small batches)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def _predict(self, name: str, split: str, stage: int) -> np.ndarray:
        view = self.network.subject(name)
        bs = max(self._stage_cfg(stage).batch_size, 64)
        if stage == 1:
            return predict_network(view, self.n[name][split], self.device, features=self.feats[name][split],
                                   batch_size=bs, precision=self.precision)
        return predict_network(view, self.n[name][split], self.device, images=self.images[name][split],
                               batch_size=bs, precision=self.precision, channels_last=self.config.train.channels_last)

    def _stage_cfg(self, stage: int) -> StageConfig:
        return self.config.train.stage1 if stage == 1 else self.config.train.stage2

    def _loss(self, name: str, idx: torch.Tensor, stage: int, aug: torch.Generator | None):
        dev = self.device
        y = self.y[name]["train"][idx.to(dev)]
        with_emb = self.lam > 0
        if stage == 1:
            feats = {k: v[idx].to(dev) for k, v in self.feats[name]["train"].items()}
            out = self.network(name, features=feats, with_embedding=with_emb)
        else:
            imgs = self.images[name]["train"][idx]
            if aug is not None:
                imgs = augment_images(imgs, aug)
            out = self.network(name, images=imgs.to(dev), with_embedding=with_emb,
                               channels_last=self.config.train.channels_last)
        readout = self.network.readouts[name]
        voxel = readout.loss(out.voxels, y, out.latent) * self.weight[name]
        align = None
        if with_emb:
            i = idx.to(dev)
            align = contrastive_loss(out.embedding, self.text[name][i], out.logit_scale, self.text_ids[name][i],
                                     gather=False)
        reg = readout.regularizer() if self.config.model.readout_l2 > 0 else None
        return total_loss(voxel, align, self.lam, reg)

    def _validate(self, stage: int) -> tuple[float, dict[str, float]]:
        per = {s.name: _mean_r(self.y[s.name]["val"].numpy(), self._predict(s.name, "val", stage))
               for s in self.subjects}
        return float(np.mean(list(per.values()))), per

    def _run_stage(self, stage: int) -> None:
        cfg = self._stage_cfg(stage)
        seed = self.config.seed + 1000 * stage
        seed_everything(seed)
        self.unfrozen = self._unfreeze(cfg.unfreeze_last_n) if stage == 2 else []
        optimizer = torch.optim.AdamW(self._param_groups(cfg), lr=cfg.lr, weight_decay=cfg.weight_decay)
        params = [p for g in optimizer.param_groups for p in g["params"]]
        gen = torch.Generator().manual_seed(seed)
        n_batches = {s.name: math.ceil(self.n[s.name]["train"] / cfg.batch_size) for s in self.subjects}
        steps_per_epoch = sum(n_batches.values())
        total_steps = cfg.epochs * steps_per_epoch
        step_offset = sum(int(st.get("steps", 0)) for st in self.stages.values())
        step, best_r, best_epoch, bad, stopped = 0, -math.inf, -1, 0, False
        best_state: dict[str, torch.Tensor] | None = None
        per_subject = self.config.multisubject.selection == "per_subject"
        self.subject_best = {s.name: (-math.inf, -1, None) for s in self.subjects}
        bar = progress_bar(total=cfg.epochs * steps_per_epoch, desc=f"stage {stage} ({len(self.subjects)} subjects)",
                           unit="batch") if self.show else None
        t_stage = 0.0
        try:
            for epoch in range(cfg.epochs):
                if stopped:
                    break
                schedule = [(s.name, b) for s in self.subjects
                            for b in torch.randperm(self.n[s.name]["train"], generator=gen).split(cfg.batch_size)]
                order = torch.randperm(len(schedule), generator=gen).tolist()
                aug = torch.Generator().manual_seed(seed + 7 * (epoch + 1)) if stage == 2 and cfg.augment else None
                self._set_modes(stage)
                t0 = time.perf_counter()
                sums = np.zeros(3)
                n_seen = 0
                for j in order:
                    name, idx = schedule[j]
                    factor = lr_factor(step, total_steps, steps_per_epoch, cfg)
                    for g in optimizer.param_groups:
                        g["lr"] = g["base_lr"] * factor
                    optimizer.zero_grad(set_to_none=True)
                    with autocast(self.device, self.precision):
                        parts = self._loss(name, idx, stage, aug)
                    parts.total.backward()
                    if cfg.grad_clip is not None:
                        torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
                    optimizer.step()
                    step += 1
                    k = len(idx)
                    n_seen += k
                    sums += k * np.array([float(parts.total.detach()), float(parts.voxel.detach()),
                                          float(parts.align.detach()) if parts.align is not None else 0.0])
                    if bar is not None:
                        bar.update(1)
                seconds = time.perf_counter() - t0
                t_stage += seconds
                mean = sums / max(n_seen, 1)
                if not math.isfinite(mean[0]):
                    raise ConfigError(f"training diverged in stage {stage}, epoch {epoch + 1}: the loss is {mean[0]};"
                                      f" lower train.stage{stage}.lr (now {cfg.lr:g}) or set a grad_clip")
                val_r, per = self._validate(stage)
                improved = val_r > best_r
                if val_r > best_r:
                    best_r, best_epoch = val_r, epoch
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in self._state(stage).items()}
                for name, r in per.items():
                    if r > self.subject_best[name][0]:
                        self.subject_best[name] = (r, epoch, self._subject_snapshot(name) if per_subject else None)
                        improved = improved or per_subject
                bad = 0 if improved else bad + 1
                stopped = cfg.early_stopping_patience is not None and bad >= cfg.early_stopping_patience
                row = {"stage": f"stage{stage}", "epoch": epoch + 1, "step": step_offset + step,
                       "train_loss": mean[0], "train_voxel_loss": mean[1],
                       "train_align_loss": mean[2] if self.lam > 0 else None, "val_mean_r": val_r,
                       "lr": optimizer.param_groups[0]["lr"],
                       "temperature": float(1.0 / self.network.logit_scale().item()), "seconds": seconds,
                       **{f"val_r__{k}": v for k, v in per.items()}}
                self.curves.append(row)
                if bar is not None:
                    bar.set_postfix(loss=f"{mean[0]:.4f}", val_r=f"{val_r:.4f}")
                self._write_curves()
                if self.callback is not None:
                    self.callback("epoch_end", {**row, "stage": stage})
        finally:
            if bar is not None:
                bar.close()
        if best_state is not None:
            self.network.load_state_dict({**self.network.state_dict(), **best_state})
        self.stages[f"stage{stage}"] = {"epochs_run": len([r for r in self.curves if r["stage"] == f"stage{stage}"]),
                                        "best_epoch": best_epoch + 1, "best_val_mean_r": best_r,
                                        "best_epoch_per_subject": {n: b[1] + 1 for n, b in self.subject_best.items()},
                                        "best_val_r_per_subject": {n: b[0] for n, b in self.subject_best.items()},
                                        "early_stopped": stopped, "steps": step, "train_seconds": t_stage}

    def _subject_snapshot(self, name: str) -> dict[str, torch.Tensor]:
        """The trained parameters that predict subject ``name`` (shared parts and its own readout), on the CPU."""
        own = f"readouts.{name}."
        return {k: p.detach().to("cpu", copy=True) for k, p in self.network.named_parameters()
                if p.requires_grad and (not k.startswith("readouts.") or k.startswith(own))}

    def _predict_selected(self, name: str, split: str, stage: int) -> np.ndarray:
        """Predictions of subject ``name`` by the network of its own best epoch (``selection = "per_subject"``) or
        by the network as it is (best mean epoch)."""
        snapshot = self.subject_best.get(name, (None, None, None))[2] if hasattr(self, "subject_best") else None
        if snapshot is None:
            return self._predict(name, split, stage)
        current = {k: v.detach().clone() for k, v in self.network.state_dict().items() if k in snapshot}
        self.network.load_state_dict(snapshot, strict=False)
        try:
            return self._predict(name, split, stage)
        finally:
            self.network.load_state_dict(current, strict=False)

    def _state(self, stage: int) -> dict[str, torch.Tensor]:
        state = self.network.state_dict()
        if stage == 1:  # the backbone is untouched in stage 1
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def _write_curves(self) -> None:
        fields = list(CURVE_FIELDS) + [f"val_r__{s.name}" for s in self.subjects]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.curves:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
        with atomic_write(self.out_dir / "curves.csv") as fh:
            fh.write(buf.getvalue())

    def run(self, identity: str) -> MultiSubjectResult:
        t_start = time.perf_counter()
        self._prepare()
        seed_everything(self.config.seed)  # the core's and readouts' initial weights
        self.network = self._build()
        for stage in (1, 2):
            if self._stage_cfg(stage).epochs > 0:
                self._run_stage(stage)
        final = 2 if self.config.train.stage2.epochs > 0 else 1
        self.network.eval()
        predictions = {s.name: {k: self._predict_selected(s.name, k, final) for k in ("val", "test")}
                       for s in self.subjects}
        subject_states = {n: b[2] for n, b in getattr(self, "subject_best", {}).items() if b[2] is not None}
        per_subject: dict[str, dict[str, float]] = {}
        for s in self.subjects:
            per_subject[s.name] = {"val_mean_r": _mean_r(self.y[s.name]["val"].numpy(), predictions[s.name]["val"])}
            if "test" in self.y[s.name]:
                per_subject[s.name]["test_mean_r"] = _mean_r(self.y[s.name]["test"].numpy(),
                                                             predictions[s.name]["test"])
        metrics: dict[str, Any] = {"val_mean_r": float(np.mean([v["val_mean_r"] for v in per_subject.values()])),
                                   "per_subject": per_subject}
        for name, st in self.stages.items():
            metrics[f"{name}_best_val_mean_r"] = st["best_val_mean_r"]
            metrics[f"{name}_best_epoch"] = st["best_epoch"]
        folder = self.out_dir / "predictions"
        folder.mkdir(parents=True, exist_ok=True)
        for name, preds in predictions.items():
            for split, p in preds.items():
                np.save(folder / f"{name}_{split}.npy", p.astype(np.float32))
        save_weights(self.out_dir / "model.safetensors",
                     {**self._state(final), **{f"subject_best.{n}.{k}": v for n, st in subject_states.items()
                                               for k, v in st.items()}},
                     {"identity": identity, "includes_backbone": str(final == 2),
                      "selection": self.config.multisubject.selection})
        write_json(self.out_dir / "training.json", {
            "identity": identity, "metrics": metrics, "stages": self.stages, "subjects": [s.name for s in self.subjects],
            "n_features": self.network.n_features, "core_dim": self.network.core_dim,
            "lambda_align": self.lam, "device": str(self.device), "precision": self.precision,
            "seconds": time.perf_counter() - t_start})
        return MultiSubjectResult(self.out_dir, self.network, predictions, metrics, copy.deepcopy(self.curves),
                                  copy.deepcopy(self.stages), subject_states)


def _load_finished(out_dir: Path, identity: str, subjects: Sequence[SubjectData]) -> MultiSubjectResult | None:
    """The result of a finished training folder made by the same configuration and subjects, else None."""
    path = out_dir / "training.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("identity") != identity:
        return None
    preds = {}
    for s in subjects:
        preds[s.name] = {}
        for split in ("val", "test"):
            p = out_dir / "predictions" / f"{s.name}_{split}.npy"
            if not p.is_file():
                return None
            preds[s.name][split] = np.load(p, allow_pickle=False)
    return MultiSubjectResult(out_dir, None, preds, info["metrics"], [], info.get("stages", {}))


def train_multisubject(config: RunConfig, subjects: Sequence[SubjectData], backbone: ImageBackbone | None = None,
                       out_dir: str | Path = "run_multi", resume: bool = False, overwrite: bool = False,
                       show_progress: bool = True, callback: Callback | None = None) -> MultiSubjectResult:
    """Train one :class:`MultiSubjectLLMVEM` on all ``subjects`` jointly (one subject: "separate" training).

    Parameters
    ----------
    config : RunConfig
        Uses ``model``, ``multisubject``, ``train`` (stage 1 on features; stage 2 fine-tunes the shared
        backbone's last ``unfreeze_last_n`` blocks), ``backbone.layers`` and ``seed``.
    subjects : sequence of SubjectData
    backbone : ImageBackbone, optional
        Needed for stage 2; it is deep-copied there, so the caller's backbone is never modified.
    out_dir : path
        Training folder; refused if it is used unless ``resume`` or ``overwrite``.
    resume : bool
        Reuse a finished training folder made by the same configuration and subjects (its saved predictions);
        an unfinished one is trained again from the start.
    overwrite : bool
    show_progress : bool
    callback : callable(event, info), optional
        Called with ``"epoch_end"`` and the epoch's curve row.

    Returns
    -------
    MultiSubjectResult

    Raises
    ------
    ConfigError, DataValidationError, RunFolderError
    """
    out_dir = Path(out_dir)
    identity = _identity(config, subjects)
    if resume:
        done = _load_finished(out_dir, identity, subjects)
        if done is not None:
            log.info("reusing the finished training in %s", out_dir)
            return done
        prepare_run_folder(out_dir, resume=False, overwrite=True, outputs=TRAIN_OUTPUTS)
    else:
        prepare_run_folder(out_dir, resume=False, overwrite=overwrite, outputs=TRAIN_OUTPUTS)
    if backbone is not None and config.train.stage2.epochs > 0:
        backbone = copy.deepcopy(backbone)  # stage 2 fine-tunes it in place
    trainer = _MultiTrainer(config, subjects, backbone, out_dir, show_progress, callback)
    save_config(config, out_dir / "config.yaml")
    write_json(out_dir / "subjects.json", [{"name": s.name, "spec": s.spec, "dataset": s.dataset.name,
                                            **{f"n_{k}": len(v) for k, v in s.dataset.splits.items()},
                                            "n_voxels": s.dataset.n_voxels} for s in subjects])
    return trainer.run(identity)
