"""The training task: the network plus its losses, one data key at a time.

As open_clip's ``TrainingTask`` / ``CLIPTask.training_forward(batch) -> losses``, the task owns the model and
the loss composition and the loop (:mod:`llmvem.train.engine`) only calls it; DDP wraps the task, so the
contrastive gather and the voxel loss run inside the wrapped forward.

A data key (a subject, a recording session, a set of captioned images) contributes a :class:`KeyData`: its
training rows' features or images, its responses and/or its caption embeddings. A key with captions and no
responses trains only the contrastive term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from llmvem.errors import DataValidationError
from llmvem.model.losses import LossParts, contrastive_loss, group_ids_from_embeddings, total_loss
from llmvem.model.network import LLMVEM
from llmvem.model.readout import LatentTargets
from llmvem.train.tensors import augment_images

__all__ = ["Batch", "EncodingTask", "KeyData"]

SPLITS = ("train", "val", "test")


@dataclass
class Batch:
    """One training batch of one data key (tensors on the training device).

    Attributes
    ----------
    features : dict of layer to tensor (B, d_layer), optional
        Stage 1 (frozen-backbone features).
    images : uint8 tensor (B, H, W, 3), optional
        Stage 2.
    responses : tensor (B, n_voxels), optional
    text, text_ids : tensor (B, text_dim) and int64 tensor (B,), optional
        Caption embeddings and caption group ids (identical captions share an id: they are positives).
    latent_targets : LatentTargets, optional
        The responses in the PCA readout's latent space: the voxel loss is computed from them (the same value
        and gradient, without decoding the predictions to voxels).
    """

    features: dict[str, torch.Tensor] | None = None
    images: torch.Tensor | None = None
    responses: torch.Tensor | None = None
    text: torch.Tensor | None = None
    text_ids: torch.Tensor | None = None
    latent_targets: LatentTargets | None = None


@dataclass
class KeyData:
    """The in-memory data of one data key.

    Attributes
    ----------
    name : str
    n : dict of split to int
        Images per split.
    features : dict of split to dict of layer to tensor (n, d_layer)
        On the CPU except ``"train"`` (on the training device).
    images : dict of split to uint8 tensor (n, H, W, 3)
        Decoded images (stage 2, or for computing features); on the CPU.
    responses : dict of split to tensor (n, n_voxels)
        ``"train"`` on the training device; empty for a captions-only key.
    text, text_ids : dict of split to tensor
        Caption embeddings (n, text_dim) and group ids (n,), on the training device.
    weight : float
        Factor on this key's voxel loss (``1 / mean training variance`` with variance weighting).
    batch_size : int, optional
        This key's global batch size; None = the stage's ``batch_size``.
    ratio : float, optional
        A key without responses (a caption stream) under ``train.epoch = "voxel_steps"``: its batches per voxel
        step; None = as many as visit its rows once per epoch.
    latent_targets : LatentTargets, optional
        The training responses in the PCA readout's latent space (set by the trainer where that loss is the
        voxel loss itself, :meth:`~llmvem.model.readout.PCAVoxelReadout.loss`); on the training device.
    """

    name: str
    n: dict[str, int]
    features: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    responses: dict[str, torch.Tensor] = field(default_factory=dict)
    text: dict[str, torch.Tensor] = field(default_factory=dict)
    text_ids: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float = 1.0
    batch_size: int | None = None
    ratio: float | None = None
    latent_targets: LatentTargets | None = None

    @property
    def has_responses(self) -> bool:
        """Whether the key has training and validation responses (a readout is trained and selected on it)."""
        return "train" in self.responses and "val" in self.responses

    def set_text(self, embeddings: Mapping[str, np.ndarray], device: torch.device,
                 ids: Mapping[str, np.ndarray] | None = None) -> None:
        """Store caption embeddings of the given splits with their group ids (rows with one id are positives).

        ``ids`` (split → int array (n,)): the caption identities, e.g. :func:`llmvem.embed.text.caption_ids` of
        the caption texts. Without them, rows with bit-identical embeddings share a group (a fallback: the same
        caption embedded in two differently padded batches may differ in its last bits).
        """
        names = [s for s in SPLITS if s in embeddings]
        rows = torch.from_numpy(np.concatenate([np.asarray(embeddings[s], dtype=np.float32) for s in names]))
        if ids is not None:
            missing = [s for s in names if s not in ids or len(ids[s]) != len(embeddings[s])]
            if missing:
                raise DataValidationError(None, f"text_ids[{self.name!r}]", f"splits {missing} missing or not "
                                          "one id per embedding row")
            ids_t = torch.from_numpy(np.concatenate([np.asarray(ids[s], dtype=np.int64) for s in names]))
        else:
            ids_t = group_ids_from_embeddings(rows)
        k = 0
        for s in names:
            n = self.n[s]
            self.text[s], self.text_ids[s] = rows[k : k + n].to(device), ids_t[k : k + n].to(device)
            k += n

    def batch(self, idx: torch.Tensor, stage: int, device: torch.device,
              augment: torch.Generator | None = None) -> Batch:
        """The training rows ``idx`` (int64 tensor (B,)): features in stage 1, (augmented) images in stage 2."""
        out = Batch()
        if stage == 1:
            # index_select: the same rows as v[idx], ~10× faster on CPU for (B, C, H, W) maps (one contiguous copy)
            out.features = {k: v.index_select(0, idx.to(v.device)) for k, v in self.features["train"].items()}
        else:
            imgs = self.images["train"][idx]
            if augment is not None:
                imgs = augment_images(imgs, augment)
            out.images = imgs.to(device, non_blocking=True)
        i = idx.to(device)
        if "train" in self.responses:
            out.responses = self.responses["train"][i]
        if self.latent_targets is not None:
            out.latent_targets = self.latent_targets[i.to(self.latent_targets.scores.device)]
        if "train" in self.text:
            out.text, out.text_ids = self.text["train"][i], self.text_ids["train"][i]
        return out


class EncodingTask(nn.Module):
    """LLM-VEM network + losses: ``voxel loss × key weight + λ · InfoNCE + readout penalty``.

    Parameters
    ----------
    network : LLMVEM
    lambda_align : float
        Weight of the contrastive term (0: not computed at all).
    key_weights : mapping of key to float, optional
        Factor on each key's voxel loss (default 1).
    align_weights : mapping of key to float, optional
        Factor on each key's contrastive loss (default 1), e.g. the captioned-image stream's ``weight``.
    regularize : bool
        Add the readout's penalty (``model.readout_l2``, ``model.spatial_l1`` or ``model.spatial_smoothness`` > 0).
    channels_last : bool
        Image mode in channels-last memory format.
    """

    def __init__(self, network: LLMVEM, lambda_align: float, key_weights: Mapping[str, float] | None = None,
                 regularize: bool = False, channels_last: bool = False,
                 align_weights: Mapping[str, float] | None = None):
        super().__init__()
        self.network = network
        self.lam = float(lambda_align)
        self.key_weights = dict(key_weights or {})
        self.align_weights = dict(align_weights or {})
        self.regularize, self.channels_last = regularize, channels_last

    def set_stage1_trainable(self, learn_temperature: bool) -> None:
        """Freeze everything but the core, the readouts and (with λ > 0) the head and temperature.

        With λ = 0 the head is built (from its own random stream) but frozen and never run, unless the readout
        reads its embedding (``readout_aligned``): the voxel loss alone then trains it.
        """
        net = self.network
        net.requires_grad_(False)
        if net.core is not None:
            net.core.requires_grad_(True)
        net.readouts.requires_grad_(True)
        if (self.lam > 0 or net.readout_aligned) and net.head is not None:
            net.head.requires_grad_(True)
        net.log_logit_scale.requires_grad_(self.lam > 0 and learn_temperature)

    def forward(self, key: str, batch: Batch) -> LossParts:
        return self.training_forward(key, batch)

    def training_forward(self, key: str, batch: Batch) -> LossParts:
        """Loss parts of one batch of data key ``key`` (a key without responses trains only the contrastive term).

        Under ``torch.distributed`` the contrastive negatives are gathered over all processes (which must
        all be at the same key).
        """
        has_y = batch.responses is not None
        with_emb = self.lam > 0 and batch.text is not None
        if not has_y and not with_emb:
            raise ValueError(f"data key {key!r}: a batch needs responses or (with lambda_align > 0) captions")
        latent = has_y and batch.latent_targets is not None  # the same voxel loss, from the PCA scores
        out = self.network(images=batch.images, features=batch.features, with_embedding=with_emb,
                           channels_last=self.channels_last, key=key, with_voxels="latent" if latent else has_y)
        reg = None
        if has_y:
            assert batch.responses is not None
            voxel = self.network.voxel_loss(out, batch.latent_targets if latent else batch.responses, key)
            weight = self.key_weights.get(key, 1.0)
            if weight != 1.0:
                voxel = voxel * weight
            if self.regularize:
                reg = self.network.readouts[key].regularizer()
        else:
            voxel = out.readout_input.new_zeros(()).float()
        align = None
        if with_emb:
            assert out.embedding is not None and out.logit_scale is not None
            align = contrastive_loss(out.embedding, batch.text, out.logit_scale, batch.text_ids)
        lam = self.lam * self.align_weights.get(key, 1.0)
        return total_loss(voxel, align, lam if align is not None else 0.0, reg)
