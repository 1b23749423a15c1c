"""The one training loop: two stages over one or several data keys.

Stage 1 keeps the backbone frozen and trains the core, readouts, alignment head and temperature on features
precomputed by the frozen backbone; stage 2 unfreezes the last N backbone blocks and trains them at a lower
learning rate with the rest, on images decoded once and held in memory.

Per stage: AdamW (weight decay on matrices only; heads at ``lr``, backbone blocks at ``backbone_lr``), the lr
schedule of :mod:`llmvem.train.schedule`, gradient clipping and accumulation, DDP (gloo on CPU; every process
visits the same key at each step, on its shard of that key's batch), checkpoints every
``train.checkpoint_every`` epochs with exact resume, and early stopping on the validation mean r.

Data keys are interleaved as in neuralpredictors' cyclers: every epoch each key's training rows are shuffled
into batches (a seeded :class:`~torch.utils.data.DistributedSampler` per key) and the batches of the keys with
responses are visited in one seeded random order (:func:`key_schedule`); with one key the order is that key's
sampler order. An epoch is those voxel-loss steps (``train.epoch = "voxel_steps"``): keys without responses (caption
streams) join the steps by a ratio instead of adding steps, so models with and without a stream take the same
optimizer steps and learning-rate schedule (:mod:`llmvem.train.steps`, also for clipping the voxel and the
contrastive gradient separately, ``train.clip_per_loss``). ``"all_batches"`` makes every batch of every key its
own step. Each stage summary records ``steps_per_epoch``, the voxel and extra batches per epoch and the fraction
of steps whose gradient (per group) was clipped.

Without a key with responses (a captions-only run: only caption streams) there is nothing to validate on:
every epoch runs (no early stopping) and the last epoch's weights are kept.

Model selection (``train.selection``): ``"global"`` keeps the epoch with the best mean r over keys; ``"per_key"``
additionally keeps, for each key, the trained parameters of the epoch with that key's own best r (shared parts
and its own readout) and predicts the key with them; training then stops when no key improved for
``early_stopping_patience`` epochs.
"""

from __future__ import annotations

import csv
import io
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DistributedSampler

from llmvem.config import RunConfig, StageConfig
from llmvem.embed.base import ImageBackbone
from llmvem.embed.trunk_cache import trunk_cache_suspended
from llmvem.errors import CheckpointError, ConfigError
from llmvem.evaluate.metrics import pearson_r
from llmvem.train.checkpoint import CheckpointManager, load_weights
from llmvem.train.distributed import DistInfo, broadcast_float
from llmvem.train.schedule import lr_factor
from llmvem.train.steps import GroupGrads, KeyCycler, resolve_ratio, unit_schedule
from llmvem.train.task import EncodingTask, KeyData
from llmvem.train.tensors import autocast, predict_network
from llmvem.utils import atomic_write, progress_bar, seed_everything, stable_hash

__all__ = ["CURVE_FIELDS", "Engine", "key_schedule", "mean_r"]

log = logging.getLogger(__name__)

CURVE_FIELDS = ("stage", "epoch", "step", "train_loss", "train_voxel_loss", "train_align_loss", "val_mean_r",
                "val_loss", "lr", "temperature", "images_per_s", "seconds")

Callback = Callable[[str, dict[str, Any]], None]


def mean_r(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over voxels of the Pearson r between ``y`` and ``pred`` (n_images, n_voxels); NaN voxels skipped."""
    r = pearson_r(y, pred)
    return float(np.nanmean(r)) if r.size else float("nan")


def key_schedule(batches: Mapping[str, Sequence[torch.Tensor]], seed: int) -> list[tuple[str, torch.Tensor]]:
    """Interleave the batches of several data keys in one seeded random order (one key: its own order).

    Parameters
    ----------
    batches : mapping of key to sequence of int64 tensors (B,)
        Each key's batches of training rows for this epoch.
    seed : int
        Seed of the order; every process must pass the same one.

    Returns
    -------
    list of (key, rows)
        Every batch exactly once.
    """
    flat = [(k, b) for k, bs in batches.items() for b in bs]
    if len(batches) <= 1:
        return flat
    order = torch.randperm(len(flat), generator=torch.Generator().manual_seed(seed % (2**62))).tolist()
    return [flat[j] for j in order]


class _NullBar:
    def update(self, n: int = 1) -> None:
        pass

    def set_postfix(self, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _mean_squared_error(y: np.ndarray, pred: np.ndarray, rows: int = 64) -> float:
    """``mean((pred - y)²)`` a few rows at a time (no two voxel-sized temporaries), summed in float64."""
    total = 0.0
    for s in range(0, len(y), rows):
        d = np.subtract(pred[s:s + rows], y[s:s + rows], dtype=np.float64)
        total += float(np.einsum("ij,ij->", d, d))
    return total / max(y.size, 1)


class Engine:
    """Runs both training stages of an :class:`~llmvem.train.task.EncodingTask` over data keys.

    Parameters
    ----------
    config : RunConfig
        Uses ``train`` (stages, selection, checkpoint_every, compile, channels_last) and ``seed``.
    task : EncodingTask
    keys : sequence of KeyData
    backbone : ImageBackbone or None
        The network's backbone (stage 2 unfreezes its last blocks).
    out_dir : Path
        Run folder (``curves.csv``, ``checkpoints/``).
    info : DistInfo
    precision : {"fp32", "bf16"}
    fingerprint : str
        Configuration hash stored with (and required of) checkpoints.
    data_identity : object
        JSON description of the data; a checkpoint written for other data is refused.
    show_progress : bool
    callback : callable(event, info), optional
        ``"epoch_end"`` (after the epoch's checkpoint) with the curve row, ``"stage_end"`` with the stage summary.
    """

    def __init__(self, config: RunConfig, task: EncodingTask, keys: Sequence[KeyData],
                 backbone: ImageBackbone | None, out_dir: Path, info: DistInfo, precision: str, fingerprint: str,
                 data_identity: Any, show_progress: bool = True, callback: Callback | None = None,
                 random_start: Mapping[str, torch.Tensor] | None = None):
        self.config, self.task, self.network = config, task, task.network
        #: ``model.readout_init: auto``: the parameters stage 1 trains from once the ridge start is validated
        self.random_start = random_start
        self.keys = list(keys)
        self.scored = [k for k in self.keys if k.has_responses]
        self.backbone, self.out_dir, self.info = backbone, Path(out_dir), info
        self.device, self.precision = info.device, precision
        self.data_identity = data_identity
        self.show, self.callback = show_progress and info.is_main, callback
        self.per_key = config.train.selection == "per_key"
        self.ckpt = CheckpointManager(self.out_dir / "checkpoints", info, fingerprint)
        self.curves: list[dict[str, Any]] = []
        self.stages: dict[str, dict[str, Any]] = {}
        self.unfrozen: list[nn.Module] = []
        #: per key: (best val r, best epoch (0-based), snapshot of its trained parameters or None)
        self.key_best: dict[str, tuple[float, int, dict[str, torch.Tensor] | None]] = {}
        #: the running stage and its step schedule (``steps_per_epoch``, batches per epoch, clipping mode)
        self._stage: int = 0
        self._schedule: dict[str, Any] = {}

    # ------------------------------------------------------------------------------------------ run
    def run(self, resume: bool) -> None:
        """Train the stages with epochs > 0, continuing from the newest checkpoint when ``resume``."""
        first_stage, resume_state, resume_opt = 1, None, None
        latest = self.ckpt.latest() if resume else None
        if latest is not None:
            model_state, opt_state, state = self.ckpt.load(latest, self.device)
            if state.get("dataset") != self.data_identity:
                raise CheckpointError(f"{latest}: written for data {state.get('dataset')}, but this run's data is "
                                      f"{self.data_identity}")
            stage = int(state["stage"])
            if stage == 2:  # stage-2 weights include the fine-tuned backbone blocks
                self._unfreeze(self.config.train.stage2.unfreeze_last_n)
            self.load_state(model_state, latest)
            self.curves, self.stages = list(state.get("curves", [])), dict(state.get("stages", {}))
            self._restore_key_best(stage, state.get("key_best", {}))
            if state["stage_done"]:
                first_stage = stage + 1
            else:
                first_stage, resume_state, resume_opt = stage, state, opt_state
            log.info("resuming %s from %s", self.out_dir, latest)
        for stage in (1, 2):
            if stage < first_stage or self.stage_cfg(stage).epochs == 0:
                continue
            self._run_stage(stage, resume_state if stage == first_stage else None,
                            resume_opt if stage == first_stage else None)

    @property
    def final_stage(self) -> int:
        return 2 if self.config.train.stage2.epochs > 0 else 1

    def stage_cfg(self, stage: int) -> StageConfig:
        return self.config.train.stage1 if stage == 1 else self.config.train.stage2

    # ----------------------------------------------------------------------------------- state
    def best_snapshot(self, stage: int) -> dict[str, torch.Tensor]:
        """A CPU copy of :meth:`model_state` for the best epoch; the readouts' constant buffers (the PCA basis,
        fixed before training) are shared, not copied."""
        constant = {f"{name}.{b}" for name, m in self.network.named_modules()
                    for b in getattr(type(m), "CONSTANT_BUFFERS", ())}
        return {k: v.detach() if k in constant and v.device.type == "cpu" else v.detach().to("cpu", copy=True)
                for k, v in self.model_state(stage).items()}

    def model_state(self, stage: int) -> dict[str, torch.Tensor]:
        """The network's state; without the backbone in stage 1 (it is untouched there)."""
        state = self.network.state_dict()
        if stage == 1:
            state = {k: v for k, v in state.items() if not k.startswith("backbone.")}
        return state

    def load_state(self, state: Mapping[str, torch.Tensor], source: Path) -> None:
        missing, unexpected = self.network.load_state_dict(dict(state), strict=False)
        bad_missing = [k for k in missing if not k.startswith("backbone.")]
        if unexpected or bad_missing:
            raise CheckpointError(f"{source}: weights do not fit this network (missing {bad_missing[:5]}, "
                                  f"unexpected {list(unexpected)[:5]}); was it written by another configuration?")

    def _restore_key_best(self, stage: int, saved: Mapping[str, Any]) -> None:
        self.key_best = {}
        for name, (r, epoch) in saved.items():
            path = self.ckpt.best_path(stage, name)
            snap = load_weights(path) if self.per_key and path.is_file() else None
            self.key_best[name] = (float(r) if r is not None else -math.inf, int(epoch), snap)

    def _trainer_state(self, stage: int, epoch: int, step: int, done: bool, best_r: float, best_epoch: int,
                       bad: int, stopped: bool) -> dict[str, Any]:
        return {"stage": stage, "epoch": epoch, "step": step, "stage_done": done, "best_r": best_r,
                "best_epoch": best_epoch, "bad_epochs": bad, "early_stopped": stopped, "curves": self.curves,
                "stages": self.stages, "dataset": self.data_identity,
                "key_best": {k: [b[0], b[1]] for k, b in self.key_best.items()}}

    def _key_snapshot(self, name: str) -> dict[str, torch.Tensor]:
        """The trained parameters that predict key ``name`` (shared parts and its own readout), on the CPU."""
        own = f"readouts.{name}."
        return {k: p.detach().to("cpu", copy=True) for k, p in self.network.named_parameters()
                if p.requires_grad and (not k.startswith("readouts.") or k.startswith(own))}

    # ----------------------------------------------------------------------------------- stages
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

    def _param_groups(self, cfg: StageConfig) -> list[dict[str, Any]]:
        """AdamW groups: heads at ``lr``, unfrozen backbone blocks at ``backbone_lr``; no decay on vectors."""
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

    def predict(self, key: KeyData, split: str, stage: int, selected: bool = False) -> np.ndarray:
        """Predicted responses (n_images, n_voxels) of ``key`` on ``split`` by the current network, or with
        ``selected`` by the parameters of the key's own best epoch (``train.selection = "per_key"``)."""
        snapshot = self.key_best.get(key.name, (None, None, None))[2] if selected and self.per_key else None
        if snapshot is not None:
            current = {k: p.detach().clone() for k, p in self.network.named_parameters() if k in snapshot}
            self.network.load_state_dict(snapshot, strict=False)
            try:
                return self.predict(key, split, stage)
            finally:
                self.network.load_state_dict(current, strict=False)
        bs = max(self.stage_cfg(stage).batch_size, 64)
        name = key.name if len(self.network.keys) > 1 else None
        if stage == 1:
            return predict_network(self.network, key.n[split], self.device, features=key.features[split],
                                   batch_size=bs, precision=self.precision, key=name)
        return predict_network(self.network, key.n[split], self.device, images=key.images[split], batch_size=bs,
                               precision=self.precision, channels_last=self.config.train.channels_last, key=name)

    def _validate(self, stage: int) -> tuple[float, float, dict[str, float]]:
        """Validation (mean r over keys, mean MSE over keys, r per key), identical on every process."""
        per, losses = {}, []
        if not self.scored:  # captions-only run: no responses to validate on
            return float("nan"), float("nan"), per
        for key in self.scored:
            pred = self.predict(key, "val", stage)
            y = key.responses["val"].cpu().numpy()
            per[key.name] = broadcast_float(mean_r(y, pred), self.info)
            losses.append(_mean_squared_error(y, pred))
        return float(np.mean(list(per.values()))), float(np.mean(losses)), per

    def _run_stage(self, stage: int, resume_state: dict[str, Any] | None,
                   resume_opt: dict[str, Any] | None) -> None:
        cfg, info, seed = self.stage_cfg(stage), self.info, self.config.seed
        self._stage = stage
        if resume_state is None:
            seed_everything(seed + 1000 * stage + info.rank)
        self.unfrozen = self._unfreeze(cfg.unfreeze_last_n) if stage == 2 else []
        if stage == 2 and self.config.train.channels_last and self.backbone is not None:
            self.backbone.to(memory_format=torch.channels_last)
        optimizer = torch.optim.AdamW(self._param_groups(cfg), lr=cfg.lr, weight_decay=cfg.weight_decay,
                                      fused=self.device.type == "cuda" or None)
        model: nn.Module = self.task
        if info.distributed:
            from torch.nn.parallel import DistributedDataParallel as DDP

            model = DDP(self.task, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                        find_unused_parameters=len(self.keys) > 1)
        if self.config.train.compile:
            model = torch.compile(model)
        key_bs = {k.name: max(1, (k.batch_size or cfg.batch_size) // info.world_size) for k in self.keys}
        samplers = {k.name: DistributedSampler(range(k.n["train"]), num_replicas=info.world_size, rank=info.rank,
                                               shuffle=True, seed=seed + stage + 7919 * i, drop_last=False)
                    for i, k in enumerate(self.keys)}
        by_name = {k.name: k for k in self.keys}
        n_batches = sum(math.ceil(len(s) / key_bs[n]) for n, s in samplers.items())
        matched = self.config.train.epoch == "voxel_steps" and bool(self.scored) and len(self.scored) < len(self.keys)
        voxel_names = [k.name for k in self.scored] if matched else list(samplers)
        n_units = sum(math.ceil(len(samplers[n]) / key_bs[n]) for n in voxel_names)
        extras: dict[str, tuple[KeyCycler, Any]] = {}
        if matched:
            for k in self.keys:
                if not k.has_responses:
                    cycler = KeyCycler(samplers[k.name], key_bs[k.name])
                    extras[k.name] = (cycler, resolve_ratio(k.ratio, cycler.per_pass, n_units))
        steps_per_epoch = math.ceil(n_units / cfg.grad_accum)
        total_steps = cfg.epochs * steps_per_epoch
        params = [p for g in optimizer.param_groups for p in g["params"]]
        per_loss = self.config.train.clip_per_loss and cfg.grad_clip is not None and self.task.lam > 0
        group_grads = GroupGrads(params, info) if per_loss else None
        self._schedule = {"epoch": self.config.train.epoch if self.scored else "all_batches",
                          "steps_per_epoch": steps_per_epoch,
                          "voxel_batches_per_epoch": sum(math.ceil(len(samplers[k.name]) / key_bs[k.name])
                                                         for k in self.scored),
                          "extra_batches_per_epoch": {n: float(r) * n_units for n, (_, r) in extras.items()}
                          if matched else {k.name: math.ceil(len(samplers[k.name]) / key_bs[k.name])
                                           for k in self.keys if not k.has_responses},
                          "clip": ("per_loss" if per_loss else "global") if cfg.grad_clip is not None else None}
        step_offset = sum(int(s.get("steps", 0)) for k, s in self.stages.items() if k != f"stage{stage}")

        start_epoch, step, best_r, best_epoch, bad, stopped = 0, 0, -math.inf, -1, 0, False
        best_state: dict[str, torch.Tensor] | None = None
        if resume_state is not None:
            start_epoch, step = int(resume_state["epoch"]), int(resume_state["step"])
            best_r = resume_state["best_r"] if resume_state["best_r"] is not None else -math.inf
            best_epoch, bad = int(resume_state["best_epoch"]), int(resume_state["bad_epochs"])
            stopped = bool(resume_state["early_stopped"])
            saved = resume_state.get("arm_best") or {"r": best_r, "keys": {n: b[0] for n, b in self.key_best.items()}}
            arm = {"r": -math.inf if saved["r"] is None else float(saved["r"]),  # JSON writes -inf as null
                   "keys": {n: -math.inf if r is None else float(r) for n, r in saved["keys"].items()}}
            if resume_opt is not None:
                optimizer.load_state_dict(resume_opt)
            if self.ckpt.best_path(stage).is_file():
                best_state = load_weights(self.ckpt.best_path(stage))
        else:
            self.key_best = {k.name: (-math.inf, -1, None) for k in self.scored}
            # the best validation r of the weights being trained, which early stopping counts from; the overall
            # best (best_r, key_best) may also be a start that training did not begin at (readout_init auto)
            arm = {"r": -math.inf, "keys": {k.name: -math.inf for k in self.scored}}
            if stage == 1 and self.scored and self.config.model.readout_init in ("ridge", "auto"):
                # a fitted start (the readout's ridge solution) is a candidate too: best epoch 0 keeps it
                best_r, _, start_per = self._validate(stage)
                best_state = self.best_snapshot(stage)
                self.ckpt.save_best(stage, best_state)
                self.key_best = {n: (r, -1, self._key_snapshot(n) if self.per_key else None)
                                 for n, r in start_per.items()}
                if self.random_start is None:  # ridge: training starts there
                    arm = {"r": best_r, "keys": dict(start_per)}
                else:  # auto: training starts from the random weights, as readout_init random would
                    named = dict(self.network.named_parameters())
                    with torch.no_grad():
                        for pname, value in self.random_start.items():
                            named[pname].copy_(value)
        bar = progress_bar(total=(cfg.epochs - start_epoch) * n_batches, desc=f"stage {stage}", unit="batch") \
            if self.show else _NullBar()
        train_total_s, seen_total = 0.0, 0
        try:
            for epoch in range(start_epoch, cfg.epochs):
                if stopped:
                    break
                per_key_batches = {}
                for name in voxel_names:
                    samplers[name].set_epoch(epoch)
                    per_key_batches[name] = torch.tensor(list(iter(samplers[name])),
                                                         dtype=torch.int64).split(key_bs[name])
                batches = key_schedule(per_key_batches, int(stable_hash([seed, stage, epoch, "keys"]), 16))
                units = unit_schedule(batches, extras, epoch * n_units) if matched else [[b] for b in batches]
                aug_gen = None
                if stage == 2 and cfg.augment:
                    aug_gen = torch.Generator().manual_seed(
                        int(stable_hash([seed, stage, epoch, info.rank]), 16) % (2**62))
                self._set_train_modes(stage)
                t0 = time.perf_counter()
                # total·rows, voxel·rows, align·rows, voxel rows, align rows; clipped steps per group (no host sync)
                sums = torch.zeros(5, dtype=torch.float64, device=self.device)
                clipped: dict[str, torch.Tensor] = {}
                n_seen = 0
                optimizer.zero_grad(set_to_none=True)
                for u, unit in enumerate(units):
                    group_start = (u // cfg.grad_accum) * cfg.grad_accum
                    group_len = min(cfg.grad_accum, len(units) - group_start)
                    last_in_group = u == group_start + group_len - 1
                    for j, (name, idx) in enumerate(unit):
                        sync_now = last_in_group and j == len(unit) - 1 and group_grads is None
                        sync = model.no_sync() if info.distributed and not sync_now and hasattr(model, "no_sync") \
                            else nullcontext()
                        # augmented images are new at every step: their trunk outputs would only fill the cache
                        suspend = trunk_cache_suspended(self.network) if aug_gen is not None else nullcontext()
                        with sync, suspend:
                            batch = by_name[name].batch(idx, stage, self.device, aug_gen)
                            with autocast(self.device, self.precision):
                                parts = model(name, batch)
                            if group_grads is not None:
                                group_grads.add(parts.groups(), 1.0 / group_len)
                            else:
                                (parts.total / group_len).backward()
                        k = len(idx)
                        n_seen += k
                        has_y, has_a = batch.responses is not None, parts.align is not None
                        zero = torch.zeros_like(parts.voxel)
                        sums += torch.stack([parts.total.detach(), parts.voxel.detach() if has_y else zero,
                                             parts.align.detach() if has_a else zero,  # type: ignore[union-attr]
                                             zero + float(has_y), zero + float(has_a)]).double() * k
                        bar.update(1)
                    if last_in_group:
                        factor = lr_factor(step, total_steps, steps_per_epoch, cfg)
                        for g in optimizer.param_groups:
                            g["lr"] = g["base_lr"] * factor
                        if group_grads is not None:
                            norms = group_grads.finish(cfg.grad_clip)
                        elif cfg.grad_clip is not None:
                            norms = {"global": torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)}
                        else:
                            norms = {}
                        for g_name, norm in norms.items():
                            hit = (norm.detach() > cfg.grad_clip).double()
                            clipped[g_name] = clipped[g_name] + hit if g_name in clipped else hit
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                        step += 1
                # the loss sums come to the host first: on a GPU that waits for the epoch's last kernels, so the
                # loop's seconds are the work done, not the work queued
                tot = sums.cpu().tolist()
                mean = [tot[0] / max(n_seen, 1), tot[1] / max(tot[3], 1), tot[2] / max(tot[4], 1)]
                clipped_steps = {g: float(v.item()) for g, v in clipped.items()}
                train_s = time.perf_counter() - t0
                train_total_s += train_s
                seen_total += n_seen * info.world_size
                if not math.isfinite(mean[0]):
                    raise ConfigError(f"training diverged in stage {stage}, epoch {epoch + 1}: the loss is {mean[0]}; "
                                      f"lower train.stage{stage}.lr (now {cfg.lr:g}) or set a grad_clip")
                val_r, val_loss, per = self._validate(stage)
                improved = val_r > arm["r"] or not self.scored  # captions-only: keep the last epoch
                arm["r"] = max(arm["r"], val_r)
                if val_r > best_r or not self.scored:
                    best_r, best_epoch = val_r, epoch
                    best_state = self.best_snapshot(stage)
                    self.ckpt.save_best(stage, best_state)
                for name, r in per.items():
                    if r > self.key_best[name][0]:
                        snap = self._key_snapshot(name) if self.per_key else None
                        self.key_best[name] = (r, epoch, snap)
                        if snap is not None:
                            self.ckpt.save_best(stage, snap, key=name)
                    if r > arm["keys"].get(name, -math.inf):
                        arm["keys"][name] = r
                        improved = improved or self.per_key
                bad = 0 if improved else bad + 1
                stopped = cfg.early_stopping_patience is not None and bad >= cfg.early_stopping_patience
                row = {"stage": f"stage{stage}", "epoch": epoch + 1, "step": step_offset + step,
                       "train_loss": mean[0], "train_voxel_loss": mean[1],
                       "train_align_loss": mean[2] if self.task.lam > 0 else None,
                       "val_mean_r": val_r if self.scored else None, "val_loss": val_loss if self.scored else None, "lr": optimizer.param_groups[0]["lr"],
                       "temperature": float(1.0 / self.network.logit_scale().item()),
                       "images_per_s": n_seen * info.world_size / max(train_s, 1e-9), "seconds": train_s,
                       "steps_in_epoch": steps_per_epoch, "clipped_steps": clipped_steps}
                if len(per) > 1:
                    row.update({f"val_r__{k}": v for k, v in per.items()})
                self.curves.append(row)
                bar.set_postfix(loss=f"{mean[0]:.4f}", val_r=f"{val_r:.4f}")
                self.stages[f"stage{stage}"] = self._stage_summary(epoch + 1, best_epoch, best_r, stopped, step,
                                                                   train_total_s, seen_total)
                self._write_curves()
                last = epoch + 1 == cfg.epochs or stopped
                if (epoch + 1) % self.config.train.checkpoint_every == 0 or last:
                    self.ckpt.save(f"stage{stage}_epoch{epoch + 1:04d}", self.model_state(stage), optimizer,
                                   {**self._trainer_state(stage, epoch + 1, step, False, best_r, best_epoch, bad,
                                                          stopped), "arm_best": arm})
                self._emit("epoch_end", {**row, "stage": stage})
        finally:
            bar.close()
        if best_state is not None:  # restore the best epoch
            self.load_state({k: v.to(self.device) for k, v in best_state.items()}, self.ckpt.best_path(stage))
        summary = self.stages.get(f"stage{stage}", self._stage_summary(0, best_epoch, best_r, stopped, step, 0.0, 0))
        summary["steps"] = step
        self.stages[f"stage{stage}"] = summary
        self.ckpt.save(f"stage{stage}_done", self.model_state(stage), None,
                       self._trainer_state(stage, cfg.epochs, step, True, best_r, best_epoch, bad, stopped))
        self._emit("stage_end", {**summary, "stage": stage})

    def _stage_summary(self, epochs: int, best_epoch: int, best_r: float, stopped: bool, steps: int,
                       seconds: float, seen: int) -> dict[str, Any]:
        """Per-stage summary; ``seconds`` and ``images_per_s`` count the training loops only (no validation)."""
        out = {"epochs_run": epochs, "best_epoch": best_epoch + 1, "best_val_mean_r": best_r,
               "early_stopped": stopped, "steps": steps, "train_seconds": seconds,
               "images_per_s": seen / seconds if seconds > 0 else None, **self._schedule}
        rows = [r for r in self.curves if r.get("stage") == f"stage{self._stage}"]
        counts: dict[str, float] = {}
        for r in rows:
            for g, c in (r.get("clipped_steps") or {}).items():
                counts[g] = counts.get(g, 0.0) + c
        n_steps = sum(int(r.get("steps_in_epoch") or 0) for r in rows)
        out["clipped_fraction"] = {g: c / n_steps for g, c in counts.items()} if n_steps else {}
        if self._stage == 1 and self.config.model.readout_init in ("ridge", "auto"):
            out["ridge_start_kept"] = best_epoch < 0  # validation kept the closed-form start (best epoch 0)
        if len(self.scored) > 1:
            out["best_epoch_per_key"] = {n: b[1] + 1 for n, b in self.key_best.items()}
            out["best_val_r_per_key"] = {n: b[0] for n, b in self.key_best.items()}
        return out

    def _emit(self, event: str, payload: dict[str, Any]) -> None:
        if self.callback is not None:
            self.callback(event, payload)

    def _write_curves(self) -> None:
        if not self.info.is_main:
            return
        fields = list(CURVE_FIELDS)
        if len(self.scored) > 1:
            fields += [f"val_r__{k.name}" for k in self.scored]
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=fields, lineterminator="\n")
        writer.writeheader()
        for row in self.curves:
            writer.writerow({k: ("" if row.get(k) is None else row.get(k)) for k in fields})
        with atomic_write(self.out_dir / "curves.csv") as fh:
            fh.write(buf.getvalue())
