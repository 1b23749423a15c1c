"""Two-stage training of the LLM-VEM network, as in the paper.

Stage 1 keeps the backbone frozen and trains the heads (voxel readout, alignment head, temperature) on features
precomputed by the frozen backbone (the feature cache), so it is fast. Stage 2 unfreezes the last N blocks of the
backbone and trains them at a lower learning rate together with the heads, on images decoded once and held in
memory as uint8 tensors.

Both stages use AdamW with a cosine or step schedule (with linear warm-up), weight decay on weight matrices,
gradient clipping and accumulation, and early stopping on the validation mean voxel correlation (the best
epoch's weights are restored at the end of each stage). CPU and CUDA, bf16 autocast on GPU, optional
``torch.compile``; several processes with ``torchrun`` (DDP, :class:`~torch.utils.data.DistributedSampler`,
contrastive negatives gathered over the global batch; gloo on CPU).

The run folder receives ``config.yaml``, ``versions.json``, ``curves.csv``, ``training.json``,
``checkpoints/``, ``model.safetensors`` and ``predictions_val.npy`` / ``predictions_test.npy``.
"""

from __future__ import annotations

import copy
import csv
import io
import logging
import math
import platform
import time
from collections.abc import Callable, Mapping
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from llmvem.config import RunConfig, StageConfig, config_diff, load_config, save_config
from llmvem.data.dataset import EncodingDataset
from llmvem.embed.base import ImageBackbone
from llmvem.errors import CheckpointError, ConfigError, DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.model.losses import LossParts, contrastive_loss, total_loss
from llmvem.model.network import EMBED_LAYER, LLMVEM
from llmvem.train.checkpoint import CheckpointManager, load_weights, save_weights
from llmvem.train.distributed import (
    DistInfo,
    barrier,
    broadcast_float,
    cleanup_distributed,
    setup_distributed,
)
from llmvem.train.inputs import (
    augment_images,
    autocast,
    backbone_features,
    load_image_tensor,
    predict_network,
    resolve_precision,
)
from llmvem.train.schedule import lr_factor
from llmvem.utils import atomic_write, progress_bar, seed_everything, stable_hash, write_json
from llmvem.utils import prepare_run_folder as _prepare_folder

__all__ = ["OUTPUT_NAMES", "TrainResult", "config_fingerprint", "prepare_run_folder", "train_encoding_model"]

log = logging.getLogger(__name__)

#: Files and folders the trainer writes in a run folder (``overwrite`` removes exactly these).
OUTPUT_NAMES = ("config.yaml", "versions.json", "curves.csv", "training.json", "checkpoints", "model.safetensors",
                "predictions_val.npy", "predictions_test.npy")

#: Config keys that do not change what is trained (resuming with other values is allowed).
NON_SEMANTIC_KEYS = ("evaluate", "cache_dir", "train.num_workers", "train.device", "train.compile",
                     "train.checkpoint_every", "captions.base_urls", "captions.api_key_env",
                     "captions.max_in_flight", "captions.batch_size", "captions.device", "captions.store",
                     "text.batch_size", "text.device", "backbone.batch_size", "backbone.device", "multisubject")

CURVE_FIELDS = ("stage", "epoch", "step", "train_loss", "train_voxel_loss", "train_align_loss", "val_mean_r",
                "val_loss", "lr", "temperature", "images_per_s", "seconds")

Callback = Callable[[str, dict[str, Any]], None]


def _identity(config: RunConfig) -> dict[str, Any]:
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
    return stable_hash(_identity(config))


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


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def prepare_run_folder(out_dir: Path, resume: bool, overwrite: bool) -> None:
    """Create ``out_dir``, refusing a non-empty one unless ``resume`` or ``overwrite``.

    ``overwrite`` deletes only what the trainer writes (``OUTPUT_NAMES``), never other files in the folder;
    see :func:`llmvem.utils.prepare_run_folder`.
    """
    _prepare_folder(out_dir, resume, overwrite, outputs=OUTPUT_NAMES)


def _versions(config: RunConfig, info: DistInfo) -> dict[str, Any]:
    from importlib import metadata

    def ver(pkg: str) -> str | None:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return None

    return {"python": platform.python_version(), "platform": platform.platform(), "torch": torch.__version__,
            "numpy": np.__version__, "llmvem": ver("llmvem"), "timm": ver("timm"),
            "transformers": ver("transformers"), "safetensors": ver("safetensors"), "seed": config.seed,
            "device": str(info.device), "world_size": info.world_size}


def _mean_r(y: np.ndarray, pred: np.ndarray) -> float:
    r = pearson_r(y, pred)
    return float(np.nanmean(r)) if r.size else float("nan")


class _Trainer:
    """One training run (internal; use :func:`train_encoding_model`)."""

    def __init__(self, config: RunConfig, dataset: EncodingDataset, text_embeddings: Mapping[str, np.ndarray] | None,
                 backbone: ImageBackbone | None, features: Mapping[str, Mapping[str, np.ndarray]] | None,
                 out_dir: Path, resume: bool, overwrite: bool, show_progress: bool, callback: Callback | None,
                 info: DistInfo, alignment_head: bool = True):
        self.config, self.dataset, self.backbone = config, dataset, backbone
        self.alignment_head = alignment_head
        self.out_dir, self.resume, self.overwrite = Path(out_dir), resume, overwrite
        self.callback, self.info = callback, info
        self.show = show_progress and info.is_main
        self.device = info.device
        self.precision = resolve_precision(config.train.precision, self.device)
        self.lam = float(config.model.lambda_align)
        self.readout_layers = list(config.backbone.layers)
        self.feature_layers = self.readout_layers + ([EMBED_LAYER] if self.lam > 0 and EMBED_LAYER not in
                                                     self.readout_layers else [])
        self.fingerprint = config_fingerprint(config)
        self.curves: list[dict[str, Any]] = []
        self.stages: dict[str, dict[str, Any]] = {}
        self._check_inputs(text_embeddings, features)
        self.text_embeddings = text_embeddings
        self.features_in = features

    # ---------------------------------------------------------------------------------------- checks
    def _check_inputs(self, text_embeddings: Mapping[str, np.ndarray] | None,
                      features: Mapping[str, Mapping[str, np.ndarray]] | None) -> None:
        ds, src = self.dataset, self.dataset.source
        if ds.val is None:
            raise DataValidationError(src, "splits", "expected a validation split for early stopping; call "
                                      "dataset.with_validation_split(fraction, seed) first")
        for name in ("train", "val"):
            if ds.splits[name].responses is None:
                raise DataValidationError(src, f"{name}.responses", "missing; training needs responses")
        if self.lam > 0 and not self.alignment_head:
            raise ConfigError(f"model.lambda_align = {self.lam} needs the alignment head (alignment_head=True)")
        if self.lam > 0 and text_embeddings is None:
            raise ConfigError(f"model.lambda_align = {self.lam} needs caption embeddings: pass text_embeddings, "
                              "or set model.lambda_align=0 for the plain encoding model")
        if text_embeddings is not None:
            if "train" not in text_embeddings:
                raise DataValidationError(None, "text_embeddings", "expected a 'train' entry (n_train, dim)")
            dims = set()
            for name, emb in text_embeddings.items():
                if name not in ds.splits:
                    raise DataValidationError(None, "text_embeddings", f"unknown split {name!r}")
                e = np.asarray(emb)
                if e.ndim != 2 or e.shape[0] != len(ds.splits[name]):
                    raise DataValidationError(None, f"text_embeddings[{name!r}]", f"shape {e.shape}, expected "
                                              f"({len(ds.splits[name])}, dim): one embedding per image")
                if not np.isfinite(e).all():
                    raise DataValidationError(None, f"text_embeddings[{name!r}]", "contains NaN/Inf")
                dims.add(e.shape[1])
            if len(dims) != 1:
                raise DataValidationError(None, "text_embeddings", f"splits have different sizes {sorted(dims)}")
        s1, s2 = self.config.train.stage1, self.config.train.stage2
        if features is None or s2.epochs > 0:
            if self.backbone is None:
                need = "stage 2 (train.stage2.epochs > 0)" if s2.epochs > 0 else "computing stage-1 features"
                raise ConfigError(f"{need} needs the image backbone; pass backbone=...")
        if features is not None:
            for name in ("train", "val", "test"):
                if name not in features:
                    raise DataValidationError(None, "features", f"expected an entry for split {name!r}")
                for layer in self.feature_layers:
                    if layer not in features[name]:
                        raise DataValidationError(
                            None, f"features[{name!r}]", f"layer {layer!r} is missing (have {sorted(features[name])});"
                            f" expected backbone.layers {self.readout_layers}"
                            + (" plus 'pooled' for the alignment head" if layer == EMBED_LAYER else ""))
                    f = np.asarray(features[name][layer])
                    if f.ndim != 2 or f.shape[0] != len(ds.splits[name]):
                        raise DataValidationError(None, f"features[{name!r}][{layer!r}]",
                                                  f"shape {f.shape}, expected ({len(ds.splits[name])}, dim)")
        for label, st in (("train.stage1", s1), ("train.stage2", s2)):
            if st.batch_size % self.info.world_size:
                raise ConfigError(f"{label}.batch_size = {st.batch_size} is the global batch and must be divisible "
                                  f"by the number of processes ({self.info.world_size})")

    # ------------------------------------------------------------------------------------------ data
    def _prepare_data(self) -> None:
        ds, dev = self.dataset, self.device
        self.n = {s: len(ds.splits[s]) for s in ("train", "val", "test")}
        self.responses = {s: torch.as_tensor(ds.splits[s].responses, dtype=torch.float32)
                          for s in ("train", "val", "test") if ds.splits[s].responses is not None}
        self.train_y = self.responses["train"].to(dev)
        self.images: dict[str, torch.Tensor] = {}
        need_images = self.features_in is None or self.config.train.stage2.epochs > 0
        if need_images:
            assert self.backbone is not None
            size = int(self.backbone.image_size)
            for s in ("train", "val", "test"):
                self.images[s] = load_image_tensor(ds.splits[s].images, size, desc=f"decoding {s} images",
                                                   show_progress=self.show)
        if self.features_in is not None:
            self.features = {s: {k: torch.as_tensor(np.asarray(self.features_in[s][k]), dtype=torch.float32)
                                 for k in self.feature_layers} for s in ("train", "val", "test")}
        else:
            assert self.backbone is not None
            self.backbone.to(dev)
            bs = self.config.backbone.batch_size
            self.features = {s: backbone_features(self.backbone, self.images[s], self.feature_layers, dev, bs,
                                                  self.precision, desc=f"{s} features", show_progress=self.show)
                             for s in ("train", "val", "test")}
        self.train_features = {k: v.to(dev) for k, v in self.features["train"].items()}
        self.text: dict[str, torch.Tensor] = {}
        self.text_ids: dict[str, torch.Tensor] = {}
        if self.text_embeddings is not None:
            names = [s for s in ("train", "val", "test") if s in self.text_embeddings]
            allrows = np.concatenate([np.asarray(self.text_embeddings[s], dtype=np.float32) for s in names])
            # identical captions (→ identical embeddings) share an id, across the whole dataset
            _, inverse = np.unique(allrows, axis=0, return_inverse=True)
            k = 0
            for s in names:
                n = self.n[s]
                self.text[s] = torch.from_numpy(allrows[k : k + n]).to(dev)
                self.text_ids[s] = torch.from_numpy(inverse.reshape(-1)[k : k + n].astype(np.int64)).to(dev)
                k += n

    def _build_network(self) -> LLMVEM:
        cfg = self.config.model
        layer_dims = {k: int(self.features["train"][k].shape[1]) for k in self.readout_layers}
        if EMBED_LAYER in self.features["train"]:
            embed_dim: int | None = int(self.features["train"][EMBED_LAYER].shape[1])
        elif self.backbone is not None:
            embed_dim = int(self.backbone.feature_dim)
        else:
            embed_dim = None
        text_dim = int(next(iter(self.text.values())).shape[1]) if self.text else (cfg.align_dim or embed_dim)
        network = LLMVEM.from_config(cfg, layer_dims, self.dataset.n_voxels, self.n["train"], text_dim,
                                     backbone=self.backbone, alignment=self.alignment_head and embed_dim is not None,
                                     seed=self.config.seed, embed_dim=embed_dim)
        network.initialize(self.responses["train"], network.concat(self.features["train"]))
        network.to(self.device)
        for p in network.parameters():
            p.requires_grad_(False)
        for p in network.head_parameters():
            p.requires_grad_(True)
        if self.lam == 0.0 or not cfg.learn_temperature:
            network.log_logit_scale.requires_grad_(False)
        if self.lam == 0.0 and network.head is not None:
            # λ = 0: the head is built (same RNG stream) but frozen and never run.
            network.head.requires_grad_(False)
        return network

    # ------------------------------------------------------------------------------------ checkpoints
    def _model_state(self, stage: int) -> dict[str, torch.Tensor]:
        state = self.network.state_dict()
        if stage == 1:  # the backbone is untouched in stage 1: leave its weights out
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def _load_model_state(self, state: Mapping[str, torch.Tensor], source: Path) -> None:
        missing, unexpected = self.network.load_state_dict(dict(state), strict=False)
        bad_missing = [k for k in missing if not k.startswith("backbone.")]
        if unexpected or bad_missing:
            raise CheckpointError(f"{source}: weights do not fit this network (missing {bad_missing[:5]}, "
                                  f"unexpected {list(unexpected)[:5]}); was it written by another configuration?")

    def _trainer_state(self, stage: int, epoch: int, step: int, done: bool, best_r: float, best_epoch: int,
                       bad: int, stopped: bool) -> dict[str, Any]:
        return {"stage": stage, "epoch": epoch, "step": step, "stage_done": done, "best_r": best_r,
                "best_epoch": best_epoch, "bad_epochs": bad, "early_stopped": stopped, "curves": self.curves,
                "stages": self.stages, "dataset": self._dataset_identity()}

    def _dataset_identity(self) -> dict[str, Any]:
        return {"name": self.dataset.name, "n_train": self.n["train"], "n_val": self.n["val"],
                "n_test": self.n["test"], "n_voxels": self.dataset.n_voxels}

    def _check_resume_config(self) -> None:
        saved_path = self.out_dir / "config.yaml"
        if not saved_path.is_file():
            return
        saved = load_config(saved_path)
        diffs = config_diff(_identity(saved), _identity(self.config))
        if diffs:
            listed = "; ".join(f"{k}: {a!r} in the checkpoint vs {b!r} now" for k, a, b in diffs[:8])
            raise CheckpointError(
                f"{saved_path} (the configuration of the checkpoints in {self.out_dir}) differs from the "
                f"configuration given now: {listed}. Resume with the same configuration, or start again with "
                "overwrite (--overwrite) or another run folder")

    # ----------------------------------------------------------------------------------------- stages
    def _stage_cfg(self, stage: int) -> StageConfig:
        return self.config.train.stage1 if stage == 1 else self.config.train.stage2

    def _unfreeze(self, n_blocks: int) -> list[nn.Module]:
        assert self.backbone is not None
        blocks = list(self.backbone.blocks())
        if n_blocks > len(blocks):
            log.warning("train.stage2.unfreeze_last_n = %d but the backbone has %d blocks; unfreezing all of them",
                        n_blocks, len(blocks))
        chosen = blocks[len(blocks) - min(n_blocks, len(blocks)):] if n_blocks > 0 else []
        for block in chosen:
            block.requires_grad_(True)
        return chosen

    def _set_train_modes(self, stage: int) -> None:
        self.network.train()
        if self.backbone is not None:
            self.backbone.eval()
            if stage == 2:
                for block in self.unfrozen:
                    block.train()
                for m in self.backbone.modules():  # BatchNorm statistics stay frozen (small batches)
                    if isinstance(m, nn.modules.batchnorm._BatchNorm):
                        m.eval()

    def _param_groups(self, stage: int, cfg: StageConfig) -> list[dict[str, Any]]:
        backbone_ids = {id(p) for p in self.backbone.parameters()} if self.backbone is not None else set()
        head, bb = [], []
        for p in self.network.parameters():
            if p.requires_grad:
                (bb if id(p) in backbone_ids else head).append(p)
        bb_lr = cfg.backbone_lr if cfg.backbone_lr is not None else cfg.lr / 10.0
        groups = []
        for params, lr, label in ((head, cfg.lr, "heads"), (bb, bb_lr, "backbone")):
            decay = [p for p in params if p.ndim >= 2]
            no_decay = [p for p in params if p.ndim < 2]
            if decay:
                groups.append({"params": decay, "lr": lr, "base_lr": lr, "weight_decay": cfg.weight_decay,
                               "name": f"{label}_decay"})
            if no_decay:
                groups.append({"params": no_decay, "lr": lr, "base_lr": lr, "weight_decay": 0.0,
                               "name": f"{label}_no_decay"})
        return groups

    def _loss(self, model: nn.Module, stage: int, idx: torch.Tensor, aug_gen: torch.Generator | None) -> LossParts:
        dev = self.device
        y = self.train_y[idx.to(dev)]
        with_emb = self.lam > 0
        if stage == 1:
            feats = {k: v[idx.to(v.device)] for k, v in self.train_features.items()}
            out = model(features=feats, with_embedding=with_emb)
        else:
            imgs = self.images["train"][idx]
            if aug_gen is not None:
                imgs = augment_images(imgs, aug_gen)
            out = model(images=imgs.to(dev, non_blocking=True), with_embedding=with_emb,
                        channels_last=self.config.train.channels_last)
        voxel = self.network.voxel_loss(out, y)
        align = None
        if with_emb:
            idd = idx.to(dev)
            align = contrastive_loss(out.embedding, self.text["train"][idd], out.logit_scale,
                                     self.text_ids["train"][idd])
        reg = self.network.readout.regularizer() if self.config.model.readout_l2 > 0 else None
        return total_loss(voxel, align, self.lam, reg)

    def _validate(self, stage: int) -> tuple[float, float]:
        pred = self._predict("val", stage)
        y = self.responses["val"].numpy()
        return _mean_r(y, pred), float(np.mean((pred - y) ** 2))

    def _predict(self, split: str, stage: int) -> np.ndarray:
        cfg = self._stage_cfg(stage)
        bs = max(cfg.batch_size, 64)
        if stage == 1:
            return predict_network(self.network, self.n[split], self.device, features=self.features[split],
                                   batch_size=bs, precision=self.precision)
        return predict_network(self.network, self.n[split], self.device, images=self.images[split],
                               batch_size=bs, precision=self.precision,
                               channels_last=self.config.train.channels_last)

    def _run_stage(self, stage: int, resume_state: dict[str, Any] | None,
                   resume_opt: dict[str, Any] | None) -> None:
        cfg = self._stage_cfg(stage)
        info = self.info
        if resume_state is None:
            seed_everything(self.config.seed + 1000 * stage + info.rank)
        self.unfrozen = self._unfreeze(cfg.unfreeze_last_n) if stage == 2 else []
        if stage == 2 and self.config.train.channels_last and self.backbone is not None:
            self.backbone.to(memory_format=torch.channels_last)
        fused = self.device.type == "cuda"
        optimizer = torch.optim.AdamW(self._param_groups(stage, cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=fused or None)
        model: nn.Module = self.network
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.network, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.config.train.compile:
            model = torch.compile(model)
        local_bs = cfg.batch_size // info.world_size
        sampler = DistributedSampler(range(self.n["train"]), num_replicas=info.world_size, rank=info.rank,
                                     shuffle=True, seed=self.config.seed + stage, drop_last=False)
        n_batches = math.ceil(len(sampler) / local_bs)
        steps_per_epoch = math.ceil(n_batches / cfg.grad_accum)
        total_steps = cfg.epochs * steps_per_epoch
        step_offset = sum(int(s.get("steps", 0)) for k, s in self.stages.items() if k != f"stage{stage}")

        start_epoch, step, best_r, best_epoch, bad, stopped = 0, 0, -math.inf, -1, 0, False
        best_state: dict[str, torch.Tensor] | None = None
        if resume_state is not None:
            start_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
            best_r = resume_state["best_r"] if resume_state["best_r"] is not None else -math.inf
            best_epoch, bad = int(resume_state["best_epoch"]), int(resume_state["bad_epochs"])
            stopped = bool(resume_state["early_stopped"])
            if resume_opt is not None:
                optimizer.load_state_dict(resume_opt)
            if self.ckpt.best_path(stage).is_file():
                best_state = load_weights(self.ckpt.best_path(stage))
        bar = progress_bar(total=(cfg.epochs - start_epoch) * n_batches, desc=f"stage {stage}", unit="batch") \
            if self.show else _NullBar()
        train_total_s = 0.0
        seen_total = 0
        epoch = start_epoch
        try:
            for epoch in range(start_epoch, cfg.epochs):
                if stopped:
                    break
                sampler.set_epoch(epoch)
                order = torch.tensor(list(iter(sampler)), dtype=torch.int64)
                batches = list(order.split(local_bs))
                aug_gen = None
                if stage == 2 and cfg.augment:
                    aug_gen = torch.Generator().manual_seed(
                        int(stable_hash([self.config.seed, stage, epoch, info.rank]), 16) % (2**62))
                self._set_train_modes(stage)
                t0 = time.perf_counter()
                sums = torch.zeros(3, dtype=torch.float64, device=self.device)  # no host sync per step
                n_seen = 0
                optimizer.zero_grad(set_to_none=True)
                for b, idx in enumerate(batches):
                    group_start = (b // cfg.grad_accum) * cfg.grad_accum
                    group_len = min(cfg.grad_accum, len(batches) - group_start)
                    last_in_group = b == group_start + group_len - 1
                    sync = model.no_sync() if info.distributed and not last_in_group and hasattr(model, "no_sync") \
                        else nullcontext()
                    with sync:
                        with autocast(self.device, self.precision):
                            parts = self._loss(model, stage, idx, aug_gen)
                        (parts.total / group_len).backward()
                    if last_in_group:
                        factor = lr_factor(step, total_steps, steps_per_epoch, cfg)
                        for g in optimizer.param_groups:
                            g["lr"] = g["base_lr"] * factor
                        if cfg.grad_clip is not None:
                            torch.nn.utils.clip_grad_norm_(
                                [p for g in optimizer.param_groups for p in g["params"]], cfg.grad_clip)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                    k = len(idx)
                    n_seen += k
                    align_part = parts.align.detach() if parts.align is not None else torch.zeros_like(parts.voxel)
                    sums += torch.stack([parts.total.detach(), parts.voxel.detach(), align_part]).double() * k
                    bar.update(1)
                train_s = time.perf_counter() - t0
                train_total_s += train_s
                seen_total += n_seen * info.world_size
                mean = (sums / max(n_seen, 1)).cpu().tolist()
                if not math.isfinite(mean[0]):
                    raise ConfigError(f"training diverged in stage {stage}, epoch {epoch + 1}: the loss is {mean[0]}; "
                                      f"lower train.stage{stage}.lr (now {cfg.lr:g}) or set a grad_clip")
                val_r, val_loss = self._validate(stage)
                val_r = broadcast_float(val_r, info)
                if val_r > best_r:
                    best_r, best_epoch, bad = val_r, epoch, 0
                    best_state = {k: v.detach().to("cpu", copy=True) for k, v in self._model_state(stage).items()}
                    self.ckpt.save_best(stage, best_state)
                else:
                    bad += 1
                stopped = cfg.early_stopping_patience is not None and bad >= cfg.early_stopping_patience
                row = {"stage": f"stage{stage}", "epoch": epoch + 1, "step": step_offset + step,
                       "train_loss": mean[0], "train_voxel_loss": mean[1],
                       "train_align_loss": mean[2] if self.lam > 0 else None, "val_mean_r": val_r,
                       "val_loss": val_loss, "lr": optimizer.param_groups[0]["lr"],
                       "temperature": float(1.0 / self.network.logit_scale().item()),
                       "images_per_s": n_seen * info.world_size / max(train_s, 1e-9), "seconds": train_s}
                self.curves.append(row)
                bar.set_postfix(loss=f"{mean[0]:.4f}", val_r=f"{val_r:.4f}")
                self.stages[f"stage{stage}"] = self._stage_summary(epoch + 1, best_epoch, best_r, stopped, step,
                                                                   train_total_s, seen_total)
                self._write_curves()
                last = epoch + 1 == cfg.epochs or stopped
                if (epoch + 1) % self.config.train.checkpoint_every == 0 or last:
                    self.ckpt.save(f"stage{stage}_epoch{epoch + 1:04d}", self._model_state(stage), optimizer,
                                   self._trainer_state(stage, epoch + 1, step, False, best_r, best_epoch, bad,
                                                       stopped))
                self._emit("epoch_end", {**row, "stage": stage})
        finally:
            bar.close()
        if best_state is not None:  # restore the best epoch
            self._load_model_state({k: v.to(self.device) for k, v in best_state.items()}, self.ckpt.best_path(stage))
        summary = self.stages.get(f"stage{stage}", self._stage_summary(0, best_epoch, best_r, stopped, step, 0.0, 0))
        summary["steps"] = step
        self.stages[f"stage{stage}"] = summary
        self.ckpt.save(f"stage{stage}_done", self._model_state(stage), None,
                       self._trainer_state(stage, cfg.epochs, step, True, best_r, best_epoch, bad, stopped))
        self._emit("stage_end", {**summary, "stage": stage})

    def _stage_summary(self, epochs: int, best_epoch: int, best_r: float, stopped: bool, steps: int,
                       seconds: float, seen: int) -> dict[str, Any]:
        """Per-stage summary; ``seconds`` and ``images_per_s`` count the training loops only (no validation)."""
        return {"epochs_run": epochs, "best_epoch": best_epoch + 1, "best_val_mean_r": best_r,
                "early_stopped": stopped, "steps": steps, "train_seconds": seconds,
                "images_per_s": seen / seconds if seconds > 0 else None}

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(event, payload)

    def _write_curves(self) -> None:
        if not self.info.is_main:
            return
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=CURVE_FIELDS, lineterminator="\n")
        writer.writeheader()
        for row in self.curves:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in CURVE_FIELDS})
        with atomic_write(self.out_dir / "curves.csv") as fh:
            fh.write(buf.getvalue())

    # -------------------------------------------------------------------------------------------- run
    def run(self) -> TrainResult:
        info = self.info
        if info.is_main:
            prepare_run_folder(self.out_dir, self.resume, self.overwrite)
        barrier(info)
        if self.resume:
            self._check_resume_config()
        barrier(info)
        if info.is_main:
            save_config(self.config, self.out_dir / "config.yaml")
            write_json(self.out_dir / "versions.json", _versions(self.config, info))
        seed_everything(self.config.seed + info.rank)
        prev_det = torch.are_deterministic_algorithms_enabled()
        prev_cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
        if self.config.train.deterministic:
            if self.device.type == "cpu":
                torch.use_deterministic_algorithms(True, warn_only=True)
            else:
                torch.backends.cudnn.benchmark = False
                torch.backends.cudnn.deterministic = True
        t_start = time.perf_counter()
        try:
            self._prepare_data()
            self.network = self._build_network()
            self.ckpt = CheckpointManager(self.out_dir / "checkpoints", info, self.fingerprint)
            first_stage, resume_state, resume_opt = 1, None, None
            latest = self.ckpt.latest() if self.resume else None
            if latest is not None:
                model_state, opt_state, state = self.ckpt.load(latest, self.device)
                if state.get("dataset") != self._dataset_identity():
                    raise CheckpointError(f"{latest}: written for dataset {state.get('dataset')}, but this run's "
                                          f"dataset is {self._dataset_identity()}")
                if int(state["stage"]) == 2:  # stage-2 weights include the fine-tuned backbone blocks
                    self._unfreeze(self.config.train.stage2.unfreeze_last_n)
                self._load_model_state(model_state, latest)
                self.curves, self.stages = list(state.get("curves", [])), dict(state.get("stages", {}))
                if state["stage_done"]:
                    first_stage = int(state["stage"]) + 1
                else:
                    first_stage, resume_state, resume_opt = int(state["stage"]), state, opt_state
                log.info("resuming %s from %s", self.out_dir, latest)
            for stage in (1, 2):
                if stage < first_stage or self._stage_cfg(stage).epochs == 0:
                    continue
                self._run_stage(stage, resume_state if stage == first_stage else None,
                                resume_opt if stage == first_stage else None)
            return self._finish(time.perf_counter() - t_start)
        finally:  # leave the process's global settings as they were
            torch.use_deterministic_algorithms(prev_det)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = prev_cudnn

    def _finish(self, seconds: float) -> TrainResult:
        final_stage = 2 if self.config.train.stage2.epochs > 0 else 1
        self.network.eval()
        predictions = {s: self._predict(s, final_stage) for s in ("val", "test")}
        metrics: dict[str, Any] = {"val_mean_r": _mean_r(self.responses["val"].numpy(), predictions["val"])}
        if "test" in self.responses:
            metrics["test_mean_r"] = _mean_r(self.responses["test"].numpy(), predictions["test"])
        for name, st in self.stages.items():
            metrics[f"{name}_best_val_mean_r"] = st.get("best_val_mean_r")
            metrics[f"{name}_best_epoch"] = st.get("best_epoch")
        if self.info.is_main:
            for s, p in predictions.items():
                np.save(self.out_dir / f"predictions_{s}.npy", p.astype(np.float32))
            state = self.network.state_dict()
            if final_stage == 1:
                state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
            save_weights(self.out_dir / "model.safetensors", state,
                         {"config_hash": self.fingerprint, "includes_backbone": str(final_stage == 2)})
            write_json(self.out_dir / "training.json", {
                "metrics": metrics, "stages": self.stages, "dataset": self._dataset_identity(),
                "readout_layers": self.readout_layers, "n_features": self.network.n_features,
                "pca_components": getattr(self.network.readout, "n_components", None),
                "lambda_align": self.lam, "precision": self.precision, "device": str(self.device),
                "world_size": self.info.world_size, "seconds": seconds, "config_hash": self.fingerprint})
        barrier(self.info)
        return TrainResult(out_dir=self.out_dir, network=self.network, predictions=predictions, metrics=metrics,
                           curves=copy.deepcopy(self.curves), config=self.config, stages=copy.deepcopy(self.stages))


def train_encoding_model(config: RunConfig, dataset: EncodingDataset,
                         text_embeddings: Mapping[str, np.ndarray] | None = None,
                         backbone: ImageBackbone | None = None,
                         features: Mapping[str, Mapping[str, np.ndarray]] | None = None,
                         out_dir: str | Path = "run", resume: bool = False, overwrite: bool = False,
                         show_progress: bool = True, callback: Callback | None = None,
                         alignment_head: bool = True) -> TrainResult:
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
    try:
        trainer = _Trainer(config, dataset, text_embeddings, backbone, features, Path(out_dir), resume, overwrite,
                           show_progress, callback, info, alignment_head)
        return trainer.run()
    finally:
        cleanup_distributed(info)
