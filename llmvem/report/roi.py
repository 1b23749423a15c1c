"""Per-ROI × hemisphere figures of a run: which value, which interval, which ROI class.

The report and the exporter both need, per model, ROI and hemisphere: the mean test r (or noise-normalised
accuracy) and a confidence interval computed **over test images** (never over voxels). This module computes
them once from a parsed run folder:

* means come from the per-voxel arrays of ``voxel_metrics.npz`` (exactly what the run recorded per voxel);
* intervals come from :func:`llmvem.evaluate.stats.bootstrap_ci` when the run folder holds the test responses
  (``test_responses.npy``, shape (n_test_images, n_voxels)) beside each model's ``models/<m>/predictions_test.npy``;
  otherwise from the ``mean_r_ci`` the run recorded for ROIs pooled over hemispheres; otherwise none.

ROI classes follow the Algonauts 2023 release (``prf-visualrois``, ``floc-*``, ``streams``): the run's
``metrics.json["dataset"]["roi_classes"]`` when recorded, else the release's names, else a ``class/name`` prefix.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

import numpy as np

from llmvem.errors import DataValidationError
from llmvem.report.runfolder import ModelResult, RunResults
from llmvem.report.untrusted import load_run_array

logger = logging.getLogger(__name__)

#: ROI names of the Algonauts 2023 release, per class (31 ROIs, the order of the release's mapping files).
ALGONAUTS_ROI_CLASSES: dict[str, tuple[str, ...]] = {
    "prf-visualrois": ("V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"),
    "floc-bodies": ("EBA", "FBA-1", "FBA-2", "mTL-bodies"),
    "floc-faces": ("OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"),
    "floc-places": ("OPA", "PPA", "RSC"),
    "floc-words": ("OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"),
    "streams": ("early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"),
}
OTHER_CLASS = "other"
ALL_VOXELS = "all voxels"
#: Resamples and seed of the image bootstrap the report runs when the run folder has the test responses.
N_BOOT = 1000
BOOT_SEED = 0
TEST_RESPONSES = "test_responses.npy"

Metric = Literal["accuracy", "r"]
CiSource = Literal["images", "run", "none"]


@dataclass
class RoiValue:
    """One bar: the mean ``metric`` of ``model`` over the voxels of ``roi`` in ``hemisphere``.

    ``hemisphere`` is "lh", "rh" or "both"; ``ci`` is a (low, high) interval over test images or None;
    ``ci_source`` says where it came from ("images": bootstrapped here, "run": recorded by the run, "none").
    """

    model: str
    roi: str
    roi_class: str
    hemisphere: str
    metric: Metric
    mean: float
    ci: tuple[float, float] | None
    ci_source: CiSource
    n_voxels: int


def roi_classes(names: Iterable[str], recorded: Mapping[str, Sequence[str]] | None = None) -> dict[str, str]:
    """ROI class of each ROI name, in the release's class order.

    Parameters
    ----------
    names : iterable of str
        ROI names as the run stores them (``"FFA-1"``, ``"floc-faces/OFA"``, ...).
    recorded : dict of class to list of ROI names, optional
        The classes the dataset recorded (``metrics.json["dataset"]["roi_classes"]``); they win.

    Returns
    -------
    dict of str to str
        ROI name → class; ``"other"`` for a name no source knows.
    """
    known = {roi: cls for cls, rois in ALGONAUTS_ROI_CLASSES.items() for roi in rois}
    given = {roi: cls for cls, rois in (recorded or {}).items() for roi in rois}
    out = {}
    for name in names:
        prefix = name.split("/", 1)[0] if "/" in name else None
        out[name] = given.get(name) or (prefix if prefix in ALGONAUTS_ROI_CLASSES else None) or known.get(
            name, OTHER_CLASS)
    return out


def class_order(classes: Iterable[str]) -> list[str]:
    """Classes in the release's order, then the others sorted, ``"other"`` last."""
    present = set(classes)
    ordered = [c for c in ALGONAUTS_ROI_CLASSES if c in present]
    return ordered + sorted(present - set(ordered) - {OTHER_CLASS}) + ([OTHER_CLASS] if OTHER_CLASS in present else [])


def run_metric(run: RunResults) -> Metric:
    """``"accuracy"`` when every model has per-voxel noise-normalised accuracy, else ``"r"``."""
    vox = run.voxels
    if vox is not None and vox.accuracy and all(m in vox.accuracy for m in run.models):
        return "accuracy"
    if vox is None and all(math.isfinite(m.overall.mean_accuracy) for m in run.models.values()):
        return "accuracy"
    return "r"


def _test_responses(run: RunResults) -> np.ndarray | None:
    path = run.path / TEST_RESPONSES
    if not path.is_file():
        return None
    y = load_run_array(path, "test responses")  # never unpickled; object dtypes refused before mapping
    if y.ndim != 2 or (run.voxels is not None and y.shape[1] != run.voxels.n_voxels):
        raise DataValidationError(path, "shape", f"{y.shape}; expected (n_test_images, n_voxels) with the "
                                  "voxels of voxel_metrics.npz")
    return y


def _predictions(run: RunResults, model: str, shape: tuple[int, ...]) -> np.ndarray | None:
    path = run.path / "models" / model / "predictions_test.npy"
    if not path.is_file():
        return None
    pred = load_run_array(path, "test predictions")
    if pred.shape != shape:
        raise DataValidationError(path, "shape", f"{pred.shape}; expected {shape} like {TEST_RESPONSES}")
    return pred


def _recorded(model: ModelResult, roi: str | None, metric: Metric) -> tuple[float, tuple[float, float] | None]:
    region = model.overall if roi is None else model.per_roi.get(roi)
    if region is None:
        return math.nan, None
    mean = region.mean_accuracy if metric == "accuracy" else region.mean_r
    return mean, (region.mean_r_ci if metric == "r" else None)


def roi_values(run: RunResults, metrics: Sequence[Metric] | None = None, n_boot: int = N_BOOT,
               seed: int = BOOT_SEED, show_progress: bool = False) -> list[RoiValue]:
    """Every (model, ROI, hemisphere) value of a run, with intervals over test images where they can be had.

    Parameters
    ----------
    run : RunResults
        A parsed run folder.
    metrics : sequence of {"accuracy", "r"}, optional
        Default: the one of :func:`run_metric`. All come from one bootstrap per model.
    n_boot, seed : int
        Image bootstrap (only when the run folder has ``test_responses.npy`` and the models' test predictions).
    show_progress : bool
        Progress bar over the models being bootstrapped.

    Returns
    -------
    list of RoiValue
        Per model and metric: ``"all voxels"`` then every ROI, per hemisphere ("lh", "rh") when the voxels carry
        one, else pooled ("both").
    """
    from llmvem.evaluate.stats import bootstrap_ci
    from llmvem.utils import progress

    metrics = list(metrics or [run_metric(run)])
    vox = run.voxels
    rois = list(dict.fromkeys([r for m in run.models.values() for r in m.per_roi]
                              + (list(vox.roi_masks) if vox else [])))
    classes = roi_classes(rois, run.dataset.get("roi_classes") if isinstance(run.dataset, dict) else None)
    out: list[RoiValue] = []
    if vox is None:  # only metrics.json: pooled hemispheres, recorded intervals
        for model in run.models.values():
            for metric in metrics:
                for roi in [None, *rois]:
                    mean, ci = _recorded(model, roi, metric)
                    region = model.overall if roi is None else model.per_roi.get(roi)
                    out.append(RoiValue(model.name, roi or ALL_VOXELS, "all" if roi is None else classes[roi],
                                        "both", metric, mean, ci, "run" if ci else "none",
                                        (region.n_voxels or 0) if region else 0))
        return out

    hemis = sorted(set(vox.hemisphere.tolist())) if vox.hemisphere is not None else ["both"]
    groups: dict[tuple[str, str], np.ndarray] = {}
    for roi in [None, *rois]:
        base = np.ones(vox.n_voxels, bool) if roi is None else vox.roi_masks.get(roi)
        if base is None:
            continue
        for h in hemis:
            mask = base if h == "both" else base & (vox.hemisphere == h)
            if mask.any():
                groups[(roi or ALL_VOXELS, h)] = mask
    y = _test_responses(run)
    nc = vox.noise_ceiling
    for model in progress(run.models.values(), desc="ROI intervals", unit="model", disable=not show_progress):
        boot = None
        pred = _predictions(run, model.name, y.shape) if y is not None else None
        if y is not None and pred is not None:
            boot = bootstrap_ci(np.asarray(y), np.asarray(pred), n_boot=n_boot, seed=seed,
                                noise_ceiling=nc if "accuracy" in metrics else None,
                                groups={f"{r}|{h}": m for (r, h), m in groups.items()})["per_group"]
        for metric in metrics:
            per_voxel = vox.accuracy[model.name] if metric == "accuracy" else vox.r[model.name]
            for (roi, h), mask in groups.items():
                mean = float(np.nanmean(per_voxel[mask]))
                ci, src = None, "none"
                if boot is not None:
                    g = boot[f"{roi}|{h}"][metric]
                    ci, src = (g["ci_low"], g["ci_high"]), "images"
                elif h == "both" or len(hemis) == 1:
                    _, ci = _recorded(model, None if roi == ALL_VOXELS else roi, metric)
                    src = "run" if ci else "none"
                out.append(RoiValue(model.name, roi, "all" if roi == ALL_VOXELS else classes[roi], h, metric,
                                    mean, ci, src, int(mask.sum())))
    return out


def interval_note(values: Sequence[RoiValue], labels: Mapping[str, str]) -> str:
    """One sentence saying where the error bars come from, naming the models of each source."""
    by_source: dict[str, list[str]] = {}
    for v in values:
        names = by_source.setdefault(v.ci_source, [])
        if labels.get(v.model, v.model) not in names:
            names.append(labels.get(v.model, v.model))
    said = []
    if "images" in by_source:
        said.append(f"95% bootstrap intervals over test images ({N_BOOT} resamples, seed {BOOT_SEED}) computed "
                    f"from the run's test predictions ({', '.join(by_source['images'])})")
    if "run" in by_source:
        said.append("95% bootstrap intervals over test images as recorded by the run ("
                    + ", ".join(by_source["run"]) + ")")
    if "none" in by_source:
        said.append(f"no interval where the run folder has neither {TEST_RESPONSES} with test predictions nor a "
                    "recorded interval (" + ", ".join(by_source["none"]) + ")")
    return "Error bars: " + "; ".join(said) + "." if said else ""

