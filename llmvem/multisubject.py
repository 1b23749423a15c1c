"""The multi-subject experiment: prepare each subject, train them jointly (and each alone), evaluate, summarise.

:func:`run_multisubject` fits :class:`~llmvem.estimators.MultiSubjectEncoder` once on all subjects (``joint/``)
and, with ``separate``, once per subject (``separate/<subject>/``), evaluates every subject on its own test split
(:func:`~llmvem.evaluate.metrics.evaluate_predictions`), compares joint with separate by the paired bootstrap
(the record of :func:`llmvem.experiment.flatten_comparison`) and writes ``subjects/<subject>.json``,
``subjects/<subject>_voxel_r.npz``, ``summary.json`` and ``summary.md`` (:func:`summary_table`).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.config import RunConfig, save_config
from llmvem.data.noise_ceiling import held_out_noise_ceiling
from llmvem.data.splits import check_split_agreement, shared_test_fraction, split_by_image_key
from llmvem.embed.base import ImageBackbone
from llmvem.errors import ConfigError, DataValidationError
from llmvem.estimators import MultiSubjectEncoder
from llmvem.experiment import flatten_comparison
from llmvem.inputs import (
    caption_dataset,
    dataset_attributes,
    embed_captions,
    extract_split_features,
    load_config_backbone,
    load_config_dataset,
    target_embeddings,
)
from llmvem.report.tables import fmt_ci, fmt_number, markdown_table
from llmvem.train.multisubject import SubjectData
from llmvem.utils import prepare_run_folder, versions, write_json

__all__ = ["MULTI_OUTPUTS", "prepare_subjects", "run_multisubject", "summary_table"]

log = logging.getLogger(__name__)

#: Files and folders :func:`run_multisubject` writes in its output folder.
MULTI_OUTPUTS = ("config.yaml", "versions.json", "joint", "separate", "subjects", "summary.json", "summary.md")


def _safe_name(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "_", text).strip("_") or "subject"


def prepare_subjects(config: RunConfig, specs: Sequence[str], show_progress: bool = True,
                     on_stage: Callable[[str], None] | None = None) -> tuple[list[SubjectData], ImageBackbone]:
    """Load each subject's dataset (``config.data`` with ``spec`` replaced), its cached backbone features and,
    when ``model.lambda_align > 0``, its caption embeddings; all subjects share one backbone.

    With ``multisubject.split = "image_key"`` (default) every subject is re-split by image key
    (:func:`llmvem.data.splits.split_by_image_key`, seed ``data.seed``, validation share ``data.val_fraction``,
    one test share for all subjects: the pooled share of test images rounded to 0.01), so an image that several
    subjects saw (same NSD id or same content) is on the same side - train, val or test - for each of them. With
    ``"dataset"`` each subject keeps its dataset's own split (the split ``llmvem train`` uses, so joint and
    single-session models are scored on the same test images), after
    :func:`~llmvem.data.splits.check_split_agreement` has checked that no shared image crosses the test line.

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
    if not specs:
        raise ConfigError("--subjects: expected at least one dataset spec, e.g. v4:DATA:210325,v4:DATA:210322")
    say = on_stage or log.info
    backbone = load_config_backbone(config)
    configs, datasets = [], []
    for spec in specs:
        cfg = config.model_copy(deep=True)
        cfg.data.spec = spec
        configs.append(cfg)
        datasets.append(load_config_dataset(cfg))
    own_split = config.multisubject.split == "dataset"
    if own_split:
        shared = check_split_agreement(datasets, list(specs))
        say(f"keeping each subject's own split ({shared} images seen by more than one subject, none crossing "
            "the test line)")
    # One test share for every subject, so that an image two subjects saw lands on the same side for both.
    test_fraction = shared_test_fraction(datasets)
    out: list[SubjectData] = []
    for spec, cfg, ds in zip(specs, configs, datasets, strict=True):
        say(f"preparing subject {spec}: dataset, image features" + (", captions" if cfg.model.lambda_align > 0
                                                                     else ""))
        if not own_split:
            ds = split_by_image_key(ds, cfg.data.val_fraction, test_fraction, cfg.data.seed)
        elif ds.val is None:
            raise DataValidationError(ds.source, "splits", f"subject {spec}: multisubject.split='dataset' needs a "
                                      "validation split in the dataset (data.val_fraction > 0)")
        feats = extract_split_features(cfg, ds, backbone, show_progress=show_progress)
        text = ids = None
        if cfg.model.lambda_align > 0:
            captions, _ = caption_dataset(cfg, ds, show_progress)
            text, ids = target_embeddings(cfg, captions, embed_captions(cfg, captions, show_progress),
                                          lambda ds=ds: {s: dataset_attributes(ds, s) for s in ds.splits})
        name, k = _safe_name(ds.name), 2
        while any(s.name == name for s in out):
            name, k = f"{_safe_name(ds.name)}_{k}", k + 1
        out.append(SubjectData(name, ds, feats, text, spec, text_ids=ids))
    return out, backbone


def _summary(s: SubjectData, pred: np.ndarray) -> tuple[dict[str, Any], np.ndarray]:
    """Test summary (mean/median r and accuracy, per ROI) of one subject's predictions, and per-voxel r."""
    from llmvem.evaluate.metrics import evaluate_predictions

    ds = s.dataset
    ev = evaluate_predictions(ds.test.responses, pred, held_out_noise_ceiling(ds)[0], ds.roi_masks, ds.hemisphere)
    keys = ("mean_r", "median_r", "mean_accuracy", "median_accuracy")
    return {**{k: ev["summary"][k] for k in keys if k in ev["summary"]}, "per_roi": ev["summary"]["per_roi"]}, ev["r"]


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

    out_dir = Path(out_dir)
    prepare_run_folder(out_dir, resume, overwrite, outputs=MULTI_OUTPUTS)
    say = on_stage or log.info
    save_config(config, out_dir / "config.yaml")
    write_json(out_dir / "versions.json", versions(config.seed))
    if subjects and all(isinstance(s, str) for s in subjects):
        prepared, backbone = prepare_subjects(config, [str(s) for s in subjects], show_progress, on_stage)
    elif all(isinstance(s, SubjectData) for s in subjects):
        prepared = [s for s in subjects if isinstance(s, SubjectData)]
    else:
        raise ConfigError("subjects: expected dataset specs (str) or SubjectData, not a mix")
    if not prepared:
        raise ConfigError("--subjects: expected at least one dataset spec")
    for s in prepared:
        if s.dataset.test.responses is None:
            raise DataValidationError(s.dataset.source, "test.responses", f"subject {s.name}: withheld; "
                                      "evaluation needs test responses")

    def encoder(folder: Path) -> MultiSubjectEncoder:
        return MultiSubjectEncoder(config, out_dir=folder, resume=resume, show_progress=show_progress)

    seconds: dict[str, float] = {}
    say(f"training {len(prepared)} subjects jointly")
    t = time.perf_counter()
    joint = encoder(out_dir / "joint").fit(prepared, backbone).predictions_
    seconds["joint"] = time.perf_counter() - t
    sep: dict[str, dict[str, np.ndarray]] = {}
    if separate:
        t = time.perf_counter()
        for s in prepared:
            say(f"training {s.name} alone")
            sep[s.name] = encoder(out_dir / "separate" / s.name).fit([s], backbone).predictions_[s.name]
        seconds["separate"] = time.perf_counter() - t

    say("evaluating each subject on its test split")
    per: dict[str, Any] = {}
    for s in prepared:
        ds = s.dataset
        noise_ceiling, nc_source = held_out_noise_ceiling(ds)
        entry: dict[str, Any] = {"spec": s.spec, "dataset": ds.name, "n_train": len(ds.train), "n_val": len(ds.val),
                                 "n_test": len(ds.test), "n_voxels": ds.n_voxels, "noise_ceiling_source": nc_source}
        entry["joint"], r_joint = _summary(s, joint[s.name]["test"])
        voxel = {"r__joint": r_joint}
        if separate:
            entry["separate"], voxel["r__separate"] = _summary(s, sep[s.name]["test"])
            if config.evaluate.bootstrap > 0:
                res = paired_bootstrap(ds.test.responses, sep[s.name]["test"], joint[s.name]["test"],
                                       n_boot=config.evaluate.bootstrap, seed=config.seed,
                                       noise_ceiling=noise_ceiling, roi_masks=ds.roi_masks)
                entry["joint_vs_separate"] = flatten_comparison(res)
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
    rows = []
    for name, e in summary["subjects"].items():
        cells = [name, str(e["n_train"]), str(e["n_voxels"]), fmt_number(e["joint"]["mean_r"])]
        if separate:
            c = e.get("joint_vs_separate")
            cells.append(fmt_number(e["separate"]["mean_r"]))
            if c is not None:
                cells += [fmt_number(c["diff"], 4, True), fmt_ci(c["ci_low"], c["ci_high"]), f"{c['p_value']:.3g}",
                          fmt_number(100 * c["fraction_improved"], 1)]
            else:
                cells += [fmt_number(e["joint"]["mean_r"] - e["separate"]["mean_r"], 4, True), "", "", ""]
        rows.append(cells)
    mean = summary["mean"]
    cells = ["**mean**", "", "", fmt_number(mean["joint"]["mean_r"])]
    if separate:
        cells += [fmt_number(mean["separate"]["mean_r"]),
                  fmt_number(mean["joint"]["mean_r"] - mean["separate"]["mean_r"], 4, True), "", "", ""]
    rows.append(cells)
    return markdown_table(header, rows)
