"""Several subjects trained jointly: a shared backbone and core, one voxel readout per subject.

NSD has 8 subjects who saw (mostly) different images; recordings of one animal on different days (the V4
sessions) each have their own neurons. A model per subject wastes what the subjects share. Joint training is
configuration of the one training engine (:mod:`llmvem.train.engine`) with one data key per subject:

* the frozen (stage 1) or partly fine-tuned (stage 2) **image backbone** is shared;
* a **shared core** (``multisubject.core``/``core_dim``/``core_dropout`` → the network's ``model.core``) is
  trained on every subject's data, and the **alignment head** reads its output;
* each subject has its own **voxel readout** (a key of :class:`~llmvem.model.LLMVEM`'s readouts).

The engine interleaves the subjects' batches in a seeded random order; with ``multisubject.loss_weighting =
"variance"`` each subject's voxel MSE is divided by the mean variance of its training responses. With
``multisubject.selection = "per_subject"`` (the engine's ``train.selection = "per_key"``) each subject is
predicted by the parameters of the epoch with its own best validation r. Training has DDP, checkpoints and
resume like single-subject training. "Separate" training is the same architecture and loop given one subject.

A training folder receives ``config.yaml``, ``versions.json``, ``subjects.json``, ``curves.csv``,
``training.json``, ``checkpoints/``, ``model.safetensors`` and ``predictions/<subject>_{val,test}.npy``.
:func:`llmvem.multisubject.run_multisubject` trains jointly (and, optionally, each subject alone), evaluates each
subject on its test split and writes the summary.
"""

from __future__ import annotations

import copy
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmvem.config import RunConfig
from llmvem.embed.base import ImageBackbone
from llmvem.errors import ConfigError
from llmvem.model.network import LLMVEM
from llmvem.train.checkpoint import save_weights
from llmvem.train.distributed import barrier, cleanup_distributed, setup_distributed
from llmvem.train.trainer import (
    SubjectData,
    check_sources,
    config_fingerprint,
    fit_keys,
    stage_metrics,
)
from llmvem.utils import prepare_run_folder, stable_hash, write_json

__all__ = ["TRAIN_OUTPUTS", "MultiSubjectResult", "SubjectData", "train_multisubject"]

log = logging.getLogger(__name__)

#: Files a training folder holds (``overwrite`` removes exactly these).
TRAIN_OUTPUTS = ("config.yaml", "versions.json", "subjects.json", "curves.csv", "training.json", "checkpoints",
                 "model.safetensors", "predictions")

Callback = Callable[[str, dict[str, Any]], None]


# --------------------------------------------------------------------------------------------- training
@dataclass
class MultiSubjectResult:
    """What :func:`train_multisubject` returns.

    Attributes
    ----------
    out_dir : Path
    network : LLMVEM
        The trained network (one readout per subject; best epoch of the last stage), in eval mode.
    predictions : dict of subject to dict of split to array of shape (n_images, n_voxels)
        ``"val"`` and ``"test"`` predictions of each subject.
    metrics : dict
        ``val_mean_r`` (mean over subjects), ``per_subject`` {subject: {val_mean_r, test_mean_r}}, per-stage best
        epochs and scores.
    curves : list of dict
        One row per epoch (the rows of ``curves.csv``; ``val_r__<subject>`` per subject).
    stages : dict
    subject_states : dict of subject to dict of str to tensor
        With ``multisubject.selection = "per_subject"`` (``train.selection = "per_key"``): the trained parameters (shared core, head, unfrozen
        backbone blocks and the subject's own readout) of the epoch with the subject's best validation r.
    """

    out_dir: Path
    network: LLMVEM | None
    predictions: dict[str, dict[str, np.ndarray]]
    metrics: dict[str, Any]
    curves: list[dict[str, Any]] = field(default_factory=list)
    stages: dict[str, dict[str, Any]] = field(default_factory=dict)
    subject_states: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    def network_for(self, subject: str) -> LLMVEM:
        """The network with the parameters that made ``predictions[subject]``; call it with ``key=subject``.

        With ``multisubject.selection = "per_subject"`` this loads the subject's best-epoch parameters into
        :attr:`network` (its shared parts change: take the next subject's network after using this one).
        """
        if self.network is None:
            raise ConfigError(f"{self.out_dir}: this result was read back from a finished training folder; "
                              "its network is not loaded")
        if subject not in self.network.keys:
            raise KeyError(f"unknown subject {subject!r}; the network has {self.network.keys}")
        if subject in self.subject_states:
            self.network.load_state_dict(self.subject_states[subject], strict=False)
        return self.network


def engine_config(config: RunConfig) -> RunConfig:
    """The engine configuration of joint training: ``multisubject.core*`` become ``model.core*`` and
    ``multisubject.selection`` becomes ``train.selection`` (``"per_subject"`` → ``"per_key"``)."""
    ms = config.multisubject
    cfg = config.model_copy(deep=True)
    cfg.model.core = None if ms.core == "none" else ms.core
    cfg.model.core_dim, cfg.model.core_dropout = ms.core_dim, ms.core_dropout
    cfg.train.selection = "per_key" if ms.selection == "per_subject" else "global"
    return cfg


def _load_finished(out_dir: Path, identity: str, subjects: Sequence[SubjectData]) -> MultiSubjectResult | None:
    """The result of a finished training folder made by the same configuration and subjects, else None."""
    import json

    path = out_dir / "training.json"
    if not path.is_file():
        return None
    info = json.loads(path.read_text(encoding="utf-8"))
    if info.get("identity") != identity:
        return None
    preds: dict[str, dict[str, np.ndarray]] = {}
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
    """Train one network with a readout per subject on all ``subjects`` jointly (one subject: "separate").

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
        Continue from the newest checkpoint in ``out_dir`` (same configuration and subjects required); a
        finished folder made by them is read back (its saved predictions and metrics; ``network`` is None).
    overwrite : bool
    show_progress : bool
    callback : callable(event, info), optional
        Called with ``"epoch_end"`` (the epoch's curve row) and ``"stage_end"`` (the stage summary).

    Returns
    -------
    MultiSubjectResult

    Raises
    ------
    ConfigError, DataValidationError, RunFolderError, CheckpointError

    Notes
    -----
    Under ``torchrun`` every process calls this function (DDP; only rank 0 writes files).
    """
    out_dir = Path(out_dir)
    cfg = engine_config(config)
    info = setup_distributed(config.train.device)
    try:
        check_sources(cfg, subjects, backbone, info.world_size, tag=True)
        if info.is_main:
            prepare_run_folder(out_dir, resume, overwrite, outputs=TRAIN_OUTPUTS)
        barrier(info)
        if backbone is not None and config.train.stage2.epochs > 0:
            backbone = copy.deepcopy(backbone)  # stage 2 fine-tunes it in place
        shapes = [{"name": s.name, "spec": s.spec, "dataset": s.dataset.name,
                   **{f"n_{k}": len(v) for k, v in s.dataset.splits.items()}, "n_voxels": s.dataset.n_voxels}
                  for s in subjects]
        identity = stable_hash({"config": config_fingerprint(cfg), "subjects": shapes})
        done = _load_finished(out_dir, identity, subjects) if resume else None
        if done is not None:
            log.info("reusing the finished training in %s", out_dir)
            return done
        if info.is_main:
            write_json(out_dir / "subjects.json", shapes)
        fit = fit_keys(cfg, subjects, backbone, out_dir, info, resume=resume, fingerprint=identity,
                       data_identity=shapes, saved_config=config, show_progress=show_progress, callback=callback,
                       variance_weighting=config.multisubject.loss_weighting == "variance")
        engine, network = fit.engine, fit.network
        metrics: dict[str, Any] = {"val_mean_r": float(np.mean([m["val_mean_r"] for m in fit.metrics.values()])),
                                   "per_subject": fit.metrics, **stage_metrics(engine.stages)}
        states = {n: b[2] for n, b in engine.key_best.items() if b[2] is not None}
        if info.is_main:
            folder = out_dir / "predictions"
            folder.mkdir(parents=True, exist_ok=True)
            for name, preds in fit.predictions.items():
                for split, p in preds.items():
                    np.save(folder / f"{name}_{split}.npy", p.astype(np.float32))
            save_weights(out_dir / "model.safetensors",
                         {**engine.model_state(engine.final_stage),
                          **{f"subject_best.{n}.{k}": v for n, st in states.items() for k, v in st.items()}},
                         {"identity": identity, "includes_backbone": str(engine.final_stage == 2),
                          "selection": config.multisubject.selection})
            write_json(out_dir / "training.json", {
                "identity": identity, "metrics": metrics, "stages": engine.stages,
                "subjects": [s.name for s in subjects], "n_features": network.n_features,
                "core_dim": network.core_dim, "lambda_align": float(config.model.lambda_align),
                "device": str(info.device), "precision": engine.precision, "world_size": info.world_size,
                "seconds": fit.seconds})
        barrier(info)
        return MultiSubjectResult(out_dir, network, fit.predictions, metrics, copy.deepcopy(engine.curves),
                                  copy.deepcopy(engine.stages), states)
    finally:
        cleanup_distributed(info)
