"""Read and validate a run folder written by the pipeline (``llmvem demo``, ``llmvem sweep``).

The layout (the contract between the pipeline and the report)::

    RUN/
      metrics.json              required: dataset, models, comparisons, timing, captions
      config.yaml               the configuration that made the run (any YAML)
      versions.json             package versions (a dict)
      voxel_metrics.npz         r__<model>, accuracy__<model>, roi__<name>, noise_ceiling, hemisphere,
                                fsaverage_index (all per voxel)
      models/<model>/curves.csv optional training curves
      lambda_curve.json         optional mean r against the alignment weight lambda
      gallery.json + gallery/   optional caption gallery with PNG thumbnails
      extra_sections/*.json     optional extra report sections {"title", "blocks", "figures"} (data, see
                                :mod:`llmvem.report.blocks`)

Only ``metrics.json`` is required; every other file is optional and the report omits what it cannot draw.
A file that is present but malformed raises :class:`~llmvem.errors.DataValidationError` naming the file,
the field and what was expected.

Trust boundary: run folders are copied between people, so nothing in one is trusted. This module is the one
place that reads them, and every value passes the checks of :mod:`llmvem.report.untrusted`: names that become
paths (models, ROIs, hemispheres) are one path component, JSON is bounded in size and depth, numbers are finite
or NaN within their range (correlations in [-1, 1]), arrays load without pickles; report sections are data that
the report renders escaped (:mod:`llmvem.report.blocks`), never stored HTML.
"""

from __future__ import annotations

import csv
import math
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError, quote
from llmvem.report.blocks import blocks_from_html, parse_blocks
from llmvem.report.untrusted import (
    ANY_BOUNDS,
    R_BOUNDS,
    UNIT_BOUNDS,
    bounded_number,
    check_name,
    load_run_array,
    read_run_json,
    read_text_bounded,
)

#: Columns every ``models/<model>/curves.csv`` must have.
CURVE_COLUMNS = ("stage", "epoch", "step", "train_loss", "val_mean_r", "lr")

_SUMMARY_KEYS = ("mean_r", "median_r", "mean_accuracy", "median_accuracy")



# ---------------------------------------------------------------------------------------------- dataclasses
@dataclass
class RegionMetrics:
    """Summary metrics of one model over one set of voxels (all voxels, an ROI or a hemisphere).

    Accuracies are noise-normalised, in percent; NaN when absent. ``mean_r_ci`` is a (low, high) confidence
    interval of ``mean_r`` recorded by the pipeline (bootstrap over test images), or None.
    """

    mean_r: float
    median_r: float = math.nan
    mean_accuracy: float = math.nan
    median_accuracy: float = math.nan
    n_voxels: int | None = None
    mean_r_ci: tuple[float, float] | None = None


@dataclass
class ModelResult:
    """Metrics of one model of a run (an entry of ``metrics.json["models"]``)."""

    name: str
    label: str
    kind: str
    lam: float | None
    overall: RegionMetrics
    per_roi: dict[str, RegionMetrics] = field(default_factory=dict)
    per_hemisphere: dict[str, RegionMetrics] = field(default_factory=dict)
    #: Mean r on the validation split (``metrics.json`` ``val_mean_r``); NaN when the run did not record it.
    val_mean_r: float = math.nan
    #: True when the model was fitted on the validation split (``val_in_fit``): its validation r is in-sample.
    val_in_fit: bool = False


@dataclass
class ComparisonStats:
    """Paired statistics of model ``b`` against model ``a`` (``diff`` is b − a)."""

    diff: float
    ci_low: float
    ci_high: float
    p_value: float
    fraction_improved: float = math.nan


@dataclass
class Comparison:
    """One entry of ``metrics.json["comparisons"]``."""

    a: str
    b: str
    metric: str
    overall: ComparisonStats
    per_roi: dict[str, ComparisonStats] = field(default_factory=dict)


@dataclass
class VoxelMetrics:
    """Per-voxel arrays of ``voxel_metrics.npz``.

    Attributes
    ----------
    r : dict of model name to array of shape (n_voxels,)
    accuracy : dict of model name to array of shape (n_voxels,)
        Noise-normalised accuracy (percent); only the models that have one.
    roi_masks : dict of ROI name to bool array of shape (n_voxels,)
    noise_ceiling : array of shape (n_voxels,) or None
    hemisphere : str array of shape (n_voxels,) with "lh"/"rh", or None
    fsaverage_index : int array of shape (n_voxels,) or None
        Vertex of each voxel in the full fsaverage mesh of its hemisphere.
    """

    n_voxels: int
    r: dict[str, np.ndarray]
    accuracy: dict[str, np.ndarray] = field(default_factory=dict)
    roi_masks: dict[str, np.ndarray] = field(default_factory=dict)
    noise_ceiling: np.ndarray | None = None
    hemisphere: np.ndarray | None = None
    fsaverage_index: np.ndarray | None = None


@dataclass
class TrainingCurves:
    """One ``models/<model>/curves.csv``: a float array per numeric column, ``stage`` as strings.

    Empty cells are NaN. ``columns`` keeps the file's column order.
    """

    path: Path
    stage: list[str]
    columns: dict[str, np.ndarray]

    def __len__(self) -> int:
        return len(self.stage)


@dataclass
class LambdaPoint:
    """One point of ``lambda_curve.json``: mean r of the model trained with alignment weight ``lam``."""

    lam: float
    mean_r: float
    model: str | None = None
    mean_r_ci: tuple[float, float] | None = None
    per_roi: dict[str, float] = field(default_factory=dict)


@dataclass
class GalleryItem:
    """One thumbnail of ``gallery.json`` and its captions, keyed by caption source."""

    image: Path
    id: str
    captions: dict[str, list[str]]


@dataclass
class ExtraSection:
    """A section added by later stages: checked data blocks (:mod:`llmvem.report.blocks`, rendered escaped by the
    report; never stored HTML) and figure files inside the run folder."""

    path: Path
    title: str
    blocks: list[dict[str, Any]]
    figures: list[Path]


@dataclass
class RunResults:
    """Everything the report needs from one run folder (see the module docstring for the layout)."""

    path: Path
    name: str
    dataset: dict[str, Any]
    models: dict[str, ModelResult]
    comparisons: list[Comparison] = field(default_factory=list)
    timing: dict[str, Any] = field(default_factory=dict)
    captions_info: dict[str, Any] = field(default_factory=dict)
    config_text: str | None = None
    versions: dict[str, Any] | None = None
    voxels: VoxelMetrics | None = None
    curves: dict[str, TrainingCurves] = field(default_factory=dict)
    lambda_curve: list[LambdaPoint] | None = None
    gallery: list[GalleryItem] | None = None
    extra_sections: list[ExtraSection] = field(default_factory=list)
    #: ``metrics.json["variance_partition"]["per_roi"]``: {roi: {unique_image_r2, shared_r2, ...}}, or None.
    variance_partition: dict[str, dict[str, float]] | None = None


# ------------------------------------------------------------------------------------------------ helpers
def _required(obj: dict[str, Any], key: str, source: Path, prefix: str) -> Any:
    if key not in obj:
        raise DataValidationError(source, f"{prefix}{key}", "missing; expected a value")
    return obj[key]


def _dict(value: Any, source: Path, fld: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise DataValidationError(source, fld, f"expected an object (dict), got {type(value).__name__}")
    return value


def _list(value: Any, source: Path, fld: str) -> list[Any]:
    if not isinstance(value, list):
        raise DataValidationError(source, fld, f"expected a list, got {type(value).__name__}")
    return value


def _interval(value: Any, source: Path, fld: str, bounds: tuple[float, float] = ANY_BOUNDS) -> tuple[float, float] | None:
    if value is None:
        return None
    if not isinstance(value, list | tuple) or len(value) != 2:
        raise DataValidationError(source, fld, f"expected [low, high], got {quote(value)}")
    lo, hi = (bounded_number(v, source, fld, bounds) for v in value)
    if lo > hi:
        raise DataValidationError(source, fld, f"low {lo} above high {hi}; expected [low, high]")
    return lo, hi


def _region(obj: Any, source: Path, prefix: str) -> RegionMetrics:
    obj = _dict(obj, source, prefix.rstrip("."))
    values = {k: bounded_number(obj.get(k), source, prefix + k, R_BOUNDS if k.endswith("_r") else ANY_BOUNDS)
              for k in _SUMMARY_KEYS}
    if "mean_r" not in obj:
        raise DataValidationError(source, prefix + "mean_r", "missing; expected the mean Pearson r")
    n_vox = obj.get("n_voxels")
    if n_vox is not None and (isinstance(n_vox, bool) or not isinstance(n_vox, int) or n_vox < 0):
        raise DataValidationError(source, prefix + "n_voxels", f"expected a non-negative integer, got {n_vox!r}")
    ci = _interval(obj.get("mean_r_ci"), source, prefix + "mean_r_ci", R_BOUNDS)
    if ci is None and ("ci_low" in obj or "ci_high" in obj):
        ci = _interval([obj.get("ci_low"), obj.get("ci_high")], source, prefix + "ci_low/ci_high", R_BOUNDS)
    return RegionMetrics(n_voxels=n_vox, mean_r_ci=ci, **values)


def _comparison_stats(obj: Any, source: Path, prefix: str) -> ComparisonStats:
    obj = _dict(obj, source, prefix.rstrip("."))
    vals = {}
    for key in ("diff", "ci_low", "ci_high", "p_value"):
        vals[key] = bounded_number(_required(obj, key, source, prefix), source, prefix + key,
                            UNIT_BOUNDS if key == "p_value" else ANY_BOUNDS)
    vals["fraction_improved"] = bounded_number(obj.get("fraction_improved"), source, prefix + "fraction_improved",
                                        UNIT_BOUNDS)
    return ComparisonStats(**vals)


# ----------------------------------------------------------------------------------------- file parsers
def _parse_metrics(path: Path) -> dict[str, Any]:
    data = _dict(read_run_json(path), path, "<top level>")
    models_raw = _dict(_required(data, "models", path, ""), path, "models")
    if not models_raw:
        raise DataValidationError(path, "models", "empty; expected at least one model")
    models: dict[str, ModelResult] = {}
    for name, m in models_raw.items():
        check_name(name, path, f"models.{quote(name)}")
        pre = f"models.{name}."
        m = _dict(m, path, f"models.{name}")
        lam = m.get("lambda")
        lam_f = None if lam is None else bounded_number(lam, path, pre + "lambda")
        if lam_f is not None and not lam_f >= 0:
            raise DataValidationError(path, pre + "lambda", f"{lam!r}; expected a number >= 0 or null")
        per_roi = {check_name(roi, path, f"{pre}per_roi.{quote(roi)}"): _region(v, path, f"{pre}per_roi.{roi}.")
                   for roi, v in _dict(m.get("per_roi", {}), path, pre + "per_roi").items()}
        per_hemi = {check_name(h, path, f"{pre}per_hemisphere.{quote(h)}"):
                    _region(v, path, f"{pre}per_hemisphere.{h}.")
                    for h, v in _dict(m.get("per_hemisphere", {}), path, pre + "per_hemisphere").items()}
        models[name] = ModelResult(
            name=name, label=str(m.get("label") or name), kind=str(m.get("kind") or "unknown"), lam=lam_f,
            overall=_region(m, path, pre), per_roi=per_roi, per_hemisphere=per_hemi,
            val_mean_r=bounded_number(m.get("val_mean_r"), path, pre + "val_mean_r", R_BOUNDS),
            val_in_fit=m.get("val_in_fit") is True)

    comparisons = []
    for i, c in enumerate(_list(data.get("comparisons", []), path, "comparisons")):
        pre = f"comparisons[{i}]."
        c = _dict(c, path, pre.rstrip("."))
        a, b = str(_required(c, "a", path, pre)), str(_required(c, "b", path, pre))
        for key, model in (("a", a), ("b", b)):
            if model not in models:
                raise DataValidationError(path, pre + key, f"model {model!r} is not in models {sorted(models)}")
        per_roi = {check_name(roi, path, f"{pre}per_roi.{quote(roi)}"):
                   _comparison_stats(v, path, f"{pre}per_roi.{roi}.")
                   for roi, v in _dict(c.get("per_roi", {}), path, pre + "per_roi").items()}
        comparisons.append(Comparison(a=a, b=b, metric=str(c.get("metric", "mean_r")),
                                      overall=_comparison_stats(c, path, pre), per_roi=per_roi))
    dataset = _dict(data.get("dataset", {}), path, "dataset")
    for roi in _dict(dataset.get("rois", {}), path, "dataset.rois"):
        check_name(roi, path, f"dataset.rois.{quote(roi)}")
    return {
        "dataset": dataset,
        "models": models,
        "comparisons": comparisons,
        "timing": _dict(data.get("timing", {}), path, "timing"),
        "captions_info": _dict(data.get("captions", {}), path, "captions"),
        "variance_partition": _parse_partition(data.get("variance_partition"), path),
    }


#: The per-ROI fields of ``metrics.json["variance_partition"]`` the report shows (R², each in [-1e3, 1]).
PARTITION_FIELDS = ("unique_image_r2", "shared_r2", "unique_language_r2", "joint_r2", "image_r2", "language_r2")


def _parse_partition(raw: Any, path: Path) -> dict[str, dict[str, float]] | None:
    """``variance_partition.per_roi`` as {roi: {field: float}}; None when the run has none."""
    if raw is None:
        return None
    per_roi = _dict(_dict(raw, path, "variance_partition").get("per_roi", {}), path, "variance_partition.per_roi")
    out = {}
    for roi, rec in per_roi.items():
        check_name(roi, path, f"variance_partition.per_roi.{quote(roi)}")
        rec = _dict(rec, path, f"variance_partition.per_roi.{roi}")
        out[roi] = {k: bounded_number(rec.get(k), path, f"variance_partition.per_roi.{roi}.{k}", (-1e3, 1.0))
                    for k in PARTITION_FIELDS}
    return out


def _parse_voxels(path: Path, models: dict[str, ModelResult]) -> VoxelMetrics:
    try:
        npz = np.load(path, allow_pickle=False)
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DataValidationError(path, "file", f"cannot read as .npz ({exc})") from exc
    with npz:
        arrays: dict[str, np.ndarray] = {}
        for key in npz.files:
            try:
                arrays[key] = npz[key]
            except ValueError as exc:  # object arrays need pickle, which we refuse
                raise DataValidationError(
                    path, key, f"cannot load without pickle ({exc}); save numbers or fixed-width strings") from exc
    n_vox: int | None = None

    def vector(key: str) -> np.ndarray:
        nonlocal n_vox
        a = arrays[key]
        if a.ndim != 1:
            raise DataValidationError(path, key, f"shape {a.shape}, expected (n_voxels,)")
        if n_vox is None:
            n_vox = a.shape[0]
        elif a.shape[0] != n_vox:
            raise DataValidationError(path, key, f"{a.shape[0]} voxels, expected {n_vox} like the other arrays")
        return a

    def floats(key: str, bounds: tuple[float, float] = ANY_BOUNDS) -> np.ndarray:
        a = vector(key)
        if not np.issubdtype(a.dtype, np.number) or np.issubdtype(a.dtype, np.complexfloating):
            raise DataValidationError(path, key, f"dtype {a.dtype}, expected real numbers")
        a = a.astype(np.float64)
        outside = ~np.isnan(a) & ~((a >= bounds[0]) & (a <= bounds[1]))
        if outside.any():
            i = int(np.flatnonzero(outside)[0])
            raise DataValidationError(path, key, f"voxel {i} is {float(a[i])}; expected finite values in "
                                      f"[{bounds[0]:.3g}, {bounds[1]:.3g}] or NaN")
        return a

    r, acc, rois = {}, {}, {}
    for name in models:
        if f"r__{name}" not in arrays:
            raise DataValidationError(path, f"r__{name}", f"missing; expected per-voxel r of model {name!r} "
                                      "(every model in metrics.json needs one)")
        r[name] = floats(f"r__{name}", R_BOUNDS)
        if f"accuracy__{name}" in arrays:
            acc[name] = floats(f"accuracy__{name}")
    for key in arrays:
        if key.startswith("roi__"):
            check_name(key[len("roi__"):], path, quote(key))
            mask = vector(key)
            if mask.dtype != bool:
                if not (np.issubdtype(mask.dtype, np.number) and np.isin(mask, (0, 1)).all()):
                    raise DataValidationError(path, key, "expected a boolean (0/1) mask")
                mask = mask.astype(bool)
            rois[key[len("roi__"):]] = mask
    assert n_vox is not None  # models is never empty
    noise = floats("noise_ceiling") if "noise_ceiling" in arrays else None
    hemi = None
    if "hemisphere" in arrays:
        hemi = vector("hemisphere").astype(str)
        bad = sorted(set(np.unique(hemi).tolist()) - {"lh", "rh"})
        if bad:
            raise DataValidationError(path, "hemisphere", f"values {bad[:5]}; expected 'lh' or 'rh'")
    fs_index = None
    if "fsaverage_index" in arrays:
        fs_index = vector("fsaverage_index")
        if not np.issubdtype(fs_index.dtype, np.integer):
            raise DataValidationError(path, "fsaverage_index", f"dtype {fs_index.dtype}, expected integers")
        if (fs_index < 0).any():
            raise DataValidationError(path, "fsaverage_index", "negative vertex indices; expected >= 0")
        fs_index = fs_index.astype(np.int64)
    return VoxelMetrics(n_voxels=n_vox, r=r, accuracy=acc, roi_masks=rois, noise_ceiling=noise,
                        hemisphere=hemi, fsaverage_index=fs_index)


def _parse_curves(path: Path) -> TrainingCurves:
    try:
        with open(path, newline="", encoding="utf-8") as fh:
            reader = csv.DictReader(fh)
            header = reader.fieldnames or []
            rows = list(reader)
    except (UnicodeDecodeError, csv.Error) as exc:
        raise DataValidationError(path, "file", f"cannot read as CSV ({exc})") from exc
    missing = [c for c in CURVE_COLUMNS if c not in header]
    if missing:
        raise DataValidationError(path, "columns", f"missing {missing}; expected at least {list(CURVE_COLUMNS)}")
    columns: dict[str, np.ndarray] = {}
    for col in header:
        if col == "stage":
            continue
        values = np.full(len(rows), np.nan)
        for i, row in enumerate(rows):
            cell = (row.get(col) or "").strip()
            if cell == "":
                continue
            try:
                values[i] = float(cell)
            except ValueError as exc:
                if col in CURVE_COLUMNS:
                    raise DataValidationError(path, f"row {i + 2}, column {col}",
                                              f"{cell!r} is not a number") from exc
                break  # a non-numeric extra column (a note): leave it out of the plots
        else:
            columns[col] = values
    return TrainingCurves(path=path, stage=[(row.get("stage") or "").strip() for row in rows], columns=columns)


def _parse_lambda_curve(path: Path) -> list[LambdaPoint]:
    points = []
    for i, p in enumerate(_list(read_run_json(path), path, "<top level>")):
        pre = f"[{i}]."
        p = _dict(p, path, f"[{i}]")
        lam = bounded_number(_required(p, "lambda", path, pre), path, pre + "lambda")
        if not lam >= 0:
            raise DataValidationError(path, pre + "lambda", f"{lam}; expected a number >= 0")
        per_roi = {check_name(roi, path, f"{pre}per_roi.{quote(roi)}"): bounded_number(v, path, f"{pre}per_roi.{roi}",
                                                                               R_BOUNDS)
                   for roi, v in _dict(p.get("per_roi", {}), path, pre + "per_roi").items()}
        points.append(LambdaPoint(
            lam=lam, mean_r=bounded_number(_required(p, "mean_r", path, pre), path, pre + "mean_r", R_BOUNDS),
            model=None if p.get("model") is None else str(p["model"]),
            mean_r_ci=_interval(p.get("mean_r_ci"), path, pre + "mean_r_ci", R_BOUNDS), per_roi=per_roi))
    return sorted(points, key=lambda q: q.lam)


def _inside(run: Path, rel: Any, source: Path, fld: str) -> Path:
    """``run / rel`` after checking that ``rel`` is a relative path that stays inside ``run`` and exists."""
    if not isinstance(rel, str) or not rel:
        raise DataValidationError(source, fld, f"expected a relative file path, got {rel!r}")
    target = (run / rel).resolve()
    if Path(rel).is_absolute() or not target.is_relative_to(run.resolve()):
        raise DataValidationError(source, fld, f"{rel!r} points outside the run folder; expected a relative path")
    if not target.is_file():
        raise DataValidationError(source, fld, f"{rel!r}: file {target} does not exist")
    return target


def _parse_gallery(path: Path, run: Path) -> list[GalleryItem]:
    items = []
    for i, g in enumerate(_list(read_run_json(path), path, "<top level>")):
        pre = f"[{i}]."
        g = _dict(g, path, f"[{i}]")
        image = _inside(run, _required(g, "image", path, pre), path, pre + "image")
        captions: dict[str, list[str]] = {}
        for src, caps in _dict(g.get("captions", {}), path, pre + "captions").items():
            if isinstance(caps, str):
                caps = [caps]
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DataValidationError(path, f"{pre}captions.{src}", "expected a list of strings")
            captions[str(src)] = caps
        items.append(GalleryItem(image=image, id=str(g.get("id", image.stem)), captions=captions))
    return items


def _parse_extra_sections(folder: Path, run: Path) -> list[ExtraSection]:
    sections = []
    for path in sorted(folder.glob("*.json")):
        data = _dict(read_run_json(path), path, "<top level>")
        title = data.get("title")
        if not isinstance(title, str) or not title.strip():
            raise DataValidationError(path, "title", f"expected a non-empty string, got {quote(title)}")
        if "blocks" in data:
            blocks = parse_blocks(data["blocks"], path)
        else:  # written by an older llmvem: only the text of its HTML is kept
            body = data.get("html", "")
            if not isinstance(body, str):
                raise DataValidationError(path, "html", f"expected a string, got {type(body).__name__}")
            blocks = blocks_from_html(body)
        figures = []
        for j, fig in enumerate(_list(data.get("figures", []), path, "figures")):
            # Figures are named relative to extra_sections/ (or, failing that, to the run folder).
            base = folder if isinstance(fig, str) and (folder / fig).is_file() else run
            figures.append(_inside(base, fig, path, f"figures[{j}]"))
        sections.append(ExtraSection(path=path, title=title, blocks=blocks, figures=figures))
    return sections


# ---------------------------------------------------------------------------------------------- loader
def load_run(path: str | Path) -> RunResults:
    """Read and validate a run folder.

    Parameters
    ----------
    path : str or Path
        The run folder (the one holding ``metrics.json``).

    Returns
    -------
    RunResults
        Parsed metrics and every optional file that is present (None / empty where absent).

    Raises
    ------
    DataValidationError
        The folder or ``metrics.json`` is missing, or a present file is malformed (the message names the file
        and the field).
    """
    run = Path(path)
    if not run.is_dir():
        raise DataValidationError(run, "run folder", "does not exist or is not a folder; expected a run folder "
                                  "written by `llmvem demo` or `llmvem sweep`")
    metrics_path = run / "metrics.json"
    if not metrics_path.is_file():
        raise DataValidationError(metrics_path, "metrics.json", "missing; expected the run's metrics file "
                                  "(is this a finished run folder?)")
    parsed = _parse_metrics(metrics_path)
    models: dict[str, ModelResult] = parsed["models"]

    config_text = None
    if (run / "config.yaml").is_file():
        config_text = read_text_bounded(run / "config.yaml", "config file", errors="replace")
    versions = None
    if (run / "versions.json").is_file():
        versions = _dict(read_run_json(run / "versions.json"), run / "versions.json", "<top level>")
    voxels = _parse_voxels(run / "voxel_metrics.npz", models) if (run / "voxel_metrics.npz").is_file() else None
    curves = {name: _parse_curves(run / "models" / name / "curves.csv")
              for name in models if (run / "models" / name / "curves.csv").is_file()}
    for array in [run / "test_responses.npy", *(run / "models" / name / f for name in models for f in (
            "predictions_test.npy", "predictions_challenge_test.npy"))]:
        if array.is_file():  # headers only (memory-mapped): a pickled or truncated array is refused up front
            load_run_array(array, array.stem.replace("_", " "))
    lam_path = run / "lambda_curve.json"
    gallery_path = run / "gallery.json"
    extra = run / "extra_sections"
    return RunResults(
        path=run, name=run.resolve().name, dataset=parsed["dataset"], models=models,
        comparisons=parsed["comparisons"], timing=parsed["timing"], captions_info=parsed["captions_info"],
        config_text=config_text, versions=versions, voxels=voxels, curves=curves,
        lambda_curve=_parse_lambda_curve(lam_path) if lam_path.is_file() else None,
        gallery=_parse_gallery(gallery_path, run) if gallery_path.is_file() else None,
        extra_sections=_parse_extra_sections(extra, run) if extra.is_dir() else [],
        variance_partition=parsed["variance_partition"],
    )
