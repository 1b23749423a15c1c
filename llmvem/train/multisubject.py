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
:func:`run_multisubject` trains jointly (and, optionally, each subject alone), evaluates each subject on its test
split and writes ``summary.json``, ``summary.md`` and ``subjects/<subject>.json``.
"""

from __future__ import annotations

import copy
import logging
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmvem.config import RunConfig, save_config
from llmvem.embed.base import ImageBackbone
from llmvem.errors import ConfigError, DataValidationError
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

__all__ = ["MULTI_OUTPUTS", "TRAIN_OUTPUTS", "MultiSubjectResult", "SubjectData", "prepare_subjects",
           "run_multisubject", "summary_table", "train_multisubject"]

log = logging.getLogger(__name__)

#: Files a training folder holds (``overwrite`` removes exactly these).
TRAIN_OUTPUTS = ("config.yaml", "versions.json", "subjects.json", "curves.csv", "training.json", "checkpoints",
                 "model.safetensors", "predictions")
#: Files and folders :func:`run_multisubject` writes in its output folder.
MULTI_OUTPUTS = ("config.yaml", "versions.json", "joint", "separate", "subjects", "summary.json", "summary.md")

Callback = Callable[[str, dict[str, Any]], None]


# ------------------------------------------------------------------------------------------------- data
def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "subject"


def prepare_subjects(config: RunConfig, specs: Sequence[str], show_progress: bool = True,
                     on_stage: Callable[[str], None] | None = None) -> tuple[list[SubjectData], ImageBackbone]:
    """Load each subject's dataset (``config.data`` with ``spec`` replaced), its cached backbone features and,
    when ``model.lambda_align > 0``, its caption embeddings; all subjects share one backbone.

    Parameters
    ----------
    config : RunConfig
    specs : sequence of str
        Dataset specs (``"virtual:seed=1"``, ``"v4:ROOT:SESSION"``, an Algonauts subject folder...).

    Returns
    -------
    subjects : list of SubjectData
        Named after their datasets (``virtual_brain_seed1``, ``v4_210325``), made unique.
    backbone : ImageBackbone
    """
    from llmvem.pipeline import (
        caption_dataset,
        embed_captions,
        extract_split_features,
        load_config_backbone,
        load_config_dataset,
    )

    if not specs:
        raise ConfigError("--subjects: expected at least one dataset spec, e.g. v4:DATA:210325,v4:DATA:210322")
    say = on_stage or (lambda msg: log.info(msg))
    backbone = load_config_backbone(config)
    out: list[SubjectData] = []
    for spec in specs:
        cfg = config.model_copy(deep=True)
        cfg.data.spec = spec
        say(f"preparing subject {spec}: dataset, image features" + (", captions" if cfg.model.lambda_align > 0
                                                                     else ""))
        ds = load_config_dataset(cfg)
        if ds.val is None:
            ds = ds.with_validation_split(cfg.data.val_fraction, cfg.data.seed)
        feats = extract_split_features(cfg, ds, backbone, show_progress=show_progress)
        text = None
        if cfg.model.lambda_align > 0:
            captions, _ = caption_dataset(cfg, ds, show_progress)
            text = embed_captions(cfg, captions, show_progress)
        name, k = _safe_name(ds.name), 2
        while any(s.name == name for s in out):
            name, k = f"{_safe_name(ds.name)}_{k}", k + 1
        out.append(SubjectData(name, ds, feats, text, spec))
    return out, backbone


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
    cfg.model.core, cfg.model.core_dim, cfg.model.core_dropout = ms.core, ms.core_dim, ms.core_dropout
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


# ------------------------------------------------------------------------------------------ experiment
def _evaluate(s: SubjectData, pred: np.ndarray) -> dict[str, Any]:
    from llmvem.evaluate.metrics import evaluate_predictions

    ds = s.dataset
    ev = evaluate_predictions(ds.test.responses, pred, ds.noise_ceiling, ds.roi_masks, ds.hemisphere)
    return {"summary": ev["summary"], "r": ev["r"]}


def run_multisubject(config: RunConfig, subjects: Sequence[str] | Sequence[SubjectData], out_dir: str | Path,
                     separate: bool = False, backbone: ImageBackbone | None = None, resume: bool = False,
                     overwrite: bool = False, show_progress: bool = True,
                     on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train all subjects jointly (and, with ``separate``, each alone), evaluate each subject, write a summary.

    Parameters
    ----------
    config : RunConfig
    subjects : sequence of str or of SubjectData
        Dataset specs (loaded with :func:`prepare_subjects`) or prepared subjects (then pass ``backbone`` for
        stage 2).
    out_dir : path
        Output folder: ``joint/``, ``separate/<subject>/``, ``subjects/<subject>.json`` (test metrics of each
        mode, per-voxel r, and the paired bootstrap of joint vs separate), ``summary.json``, ``summary.md``.
    separate : bool
        Also train the same architecture on each subject alone, and compare.
    resume : bool
        Reuse finished trainings in ``out_dir``.

    Returns
    -------
    dict
        The content of ``summary.json``: ``subjects`` {name: {spec, n_train, n_voxels, joint: {mean_r, median_r,
        [mean_accuracy]}, [separate: {...}, joint_vs_separate: {diff, ci_low, ci_high, p_value,
        fraction_improved}]}}, ``mean`` (over subjects) and ``seconds`` per mode.
    """
    from llmvem.evaluate.stats import paired_bootstrap
    from llmvem.pipeline import _flatten_comparison, _versions

    out_dir = Path(out_dir)
    prepare_run_folder(out_dir, resume, overwrite, outputs=MULTI_OUTPUTS)
    say = on_stage or (lambda msg: log.info(msg))
    save_config(config, out_dir / "config.yaml")
    write_json(out_dir / "versions.json", _versions(config.seed))
    if subjects and all(isinstance(s, str) for s in subjects):
        prepared, backbone = prepare_subjects(config, [str(s) for s in subjects], show_progress, on_stage)
    elif all(isinstance(s, SubjectData) for s in subjects):
        prepared = [s for s in subjects if isinstance(s, SubjectData)]
    else:
        raise ConfigError("subjects: expected dataset specs (str) or SubjectData, not a mix")
    if not prepared:
        raise ConfigError("--subjects: expected at least one dataset spec")

    seconds: dict[str, float] = {}
    say(f"training {len(prepared)} subjects jointly")
    t = time.perf_counter()
    joint = train_multisubject(config, prepared, backbone, out_dir / "joint", resume=resume,
                               show_progress=show_progress)
    seconds["joint"] = time.perf_counter() - t
    sep: dict[str, MultiSubjectResult] = {}
    if separate:
        t = time.perf_counter()
        for s in prepared:
            say(f"training {s.name} alone")
            sep[s.name] = train_multisubject(config, [s], backbone, out_dir / "separate" / s.name, resume=resume,
                                             show_progress=show_progress)
        seconds["separate"] = time.perf_counter() - t

    say("evaluating each subject on its test split")
    keys = ("mean_r", "median_r", "mean_accuracy", "median_accuracy")
    per: dict[str, Any] = {}
    for s in prepared:
        ds = s.dataset
        if ds.test.responses is None:
            raise DataValidationError(ds.source, "test.responses", f"subject {s.name}: withheld; evaluation needs "
                                      "test responses")
        entry: dict[str, Any] = {"spec": s.spec, "dataset": ds.name, "n_train": len(ds.train), "n_val": len(ds.val),
                                 "n_test": len(ds.test), "n_voxels": ds.n_voxels}
        ev_joint = _evaluate(s, joint.predictions[s.name]["test"])
        entry["joint"] = {k: ev_joint["summary"][k] for k in keys if k in ev_joint["summary"]}
        entry["joint"]["per_roi"] = ev_joint["summary"]["per_roi"]
        voxel = {"r__joint": ev_joint["r"]}
        if separate:
            ev_sep = _evaluate(s, sep[s.name].predictions[s.name]["test"])
            entry["separate"] = {k: ev_sep["summary"][k] for k in keys if k in ev_sep["summary"]}
            entry["separate"]["per_roi"] = ev_sep["summary"]["per_roi"]
            voxel["r__separate"] = ev_sep["r"]
            if config.evaluate.bootstrap > 0:
                res = paired_bootstrap(ds.test.responses, sep[s.name].predictions[s.name]["test"],
                                       joint.predictions[s.name]["test"], n_boot=config.evaluate.bootstrap,
                                       seed=config.seed, noise_ceiling=ds.noise_ceiling, roi_masks=ds.roi_masks)
                entry["joint_vs_separate"] = _flatten_comparison(res)
        per[s.name] = entry
        write_json(out_dir / "subjects" / f"{s.name}.json", entry)
        np.savez_compressed(out_dir / "subjects" / f"{s.name}_voxel_r.npz", **voxel)
    modes = ["joint", *(["separate"] if separate else [])]
    summary: dict[str, Any] = {
        "subjects": per,
        "mean": {m: {"mean_r": float(np.mean([per[n][m]["mean_r"] for n in per]))} for m in modes},
        "lambda_align": config.model.lambda_align,
        "core": {"kind": config.multisubject.core, "dim": config.multisubject.core_dim},
        "stage2_epochs": config.train.stage2.epochs,
        "seconds": seconds,
    }
    write_json(out_dir / "summary.json", summary)
    (out_dir / "summary.md").write_text(summary_table(summary), encoding="utf-8")
    return summary


def summary_table(summary: dict[str, Any]) -> str:
    """Markdown table of :func:`run_multisubject`'s summary: one row per subject, mean r of each mode and the
    joint − separate difference with its bootstrap CI and p."""
    separate = any("separate" in e for e in summary["subjects"].values())
    header = ["subject", "n_train", "n_voxels", "joint mean r"]
    if separate:
        header += ["separate mean r", "Δ (joint − separate)", "95% CI", "p", "improved %"]
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]

    def f(x: Any, d: int = 3, signed: bool = False) -> str:
        if x is None or not np.isfinite(x):
            return "-"
        return f"{x:+.{d}f}" if signed else f"{x:.{d}f}"

    for name, e in summary["subjects"].items():
        cells = [name, str(e["n_train"]), str(e["n_voxels"]), f(e["joint"]["mean_r"])]
        if separate:
            c = e.get("joint_vs_separate")
            cells.append(f(e["separate"]["mean_r"]))
            if c is not None:
                cells += [f(c["diff"], 4, True), f"[{f(c['ci_low'], 4, True)}, {f(c['ci_high'], 4, True)}]",
                          f"{c['p_value']:.3g}", f(100 * c["fraction_improved"], 1)]
            else:
                cells += [f(e["joint"]["mean_r"] - e["separate"]["mean_r"], 4, True), "", "", ""]
        lines.append("| " + " | ".join(cells) + " |")
    mean = summary["mean"]
    cells = ["**mean**", "", "", f(mean["joint"]["mean_r"])]
    if separate:
        cells += [f(mean["separate"]["mean_r"]), f(mean["joint"]["mean_r"] - mean["separate"]["mean_r"], 4, True),
                  "", "", ""]
    lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"

