"""Export a run in the field's forms: Algonauts 2023 submission files, per-vertex maps, a tidy per-ROI table.

Input contract (one run folder per subject, written by the experiment runner)::

    RUN/
      metrics.json, voxel_metrics.npz         as read by :func:`llmvem.report.load_run`; voxel_metrics.npz must
                                              carry ``hemisphere`` (lh voxels first) and ``fsaverage_index``
      challenge_test_ids.json                 ids (file stems, no extension) of the challenge test images, in
                                              the row order of the prediction files below
      models/<model>/predictions_challenge_test.npy
                                              float array (n_challenge_test_images, n_voxels): predicted
                                              responses to the challenge test images (whose fMRI is withheld)
      test_responses.npy + models/<model>/predictions_test.npy
                                              optional: intervals over test images in results.csv

What :func:`export_algonauts` writes under ``OUT/<subject>/`` (subject = the subject folder's name)::

    lh_pred_test.npy, rh_pred_test.npy        float32 (n_challenge_test_images, n_vertices_<h>): challenge vertex
                                              order, challenge test image order (sorted file names), the
                                              submission format of the Algonauts 2023 challenge
    vertex_metrics/<model>/<h>_<metric>.npy   float32 (n_vertices_<h>,): per-vertex test r / accuracy (%)
    vertex_metrics/<model>/<h>_<metric>_fsaverage.npy
                                              float32 (163842,): the same on the full fsaverage mesh, NaN off the
                                              challenge vertices
and ``OUT/results.csv`` (plus ``results.parquet`` when pyarrow is installed): one row per model × subject × ROI
(``all voxels`` included) × hemisphere × metric with columns :data:`RESULT_COLUMNS`.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmvem.data.algonauts import FSAVERAGE_N_VERTICES, HEMISPHERES
from llmvem.errors import DataValidationError
from llmvem.report.roi import roi_values
from llmvem.report.runfolder import RunResults, load_run
from llmvem.utils import atomic_write

logger = logging.getLogger(__name__)

RESULT_COLUMNS = ("model", "subject", "roi", "roi_class", "hemisphere", "metric", "value", "ci_low", "ci_high")
CHALLENGE_IDS = "challenge_test_ids.json"
CHALLENGE_PREDICTIONS = "predictions_challenge_test.npy"
_IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class SubjectLayout:
    """What an Algonauts subject folder says about the submission shapes.

    Attributes
    ----------
    name : str
        Folder name (``subj01``).
    n_vertices : dict of "lh"/"rh" to int
        Challenge vertices per hemisphere (columns of ``<h>_training_fmri.npy``).
    fsaverage_index : dict of "lh"/"rh" to int array or None
        Full-fsaverage vertex of each challenge vertex (from ``roi_masks/<h>.all-vertices_fsaverage_space.npy``).
    test_ids : list of str
        Challenge test image ids (stems) in challenge order (sorted file names).
    """

    name: str
    n_vertices: dict[str, int]
    fsaverage_index: dict[str, np.ndarray | None]
    test_ids: list[str]


def read_subject_layout(subject_dir: str | Path) -> SubjectLayout:
    """Shapes and orders of an Algonauts 2023 subject folder, reading headers only (no fMRI is loaded).

    Raises
    ------
    DataValidationError
        The folder is not an Algonauts subject folder (names the missing file).
    """
    subject = Path(subject_dir)
    if not subject.is_dir():
        raise DataValidationError(subject, "subject folder", "not a directory; expected an Algonauts subjNN folder")
    n_vertices, fs_index = {}, {}
    for h in HEMISPHERES:
        fmri = subject / "training_split" / "training_fmri" / f"{h}_training_fmri.npy"
        if not fmri.is_file():
            raise DataValidationError(fmri, "training fmri", "missing; expected an Algonauts subjNN folder with "
                                      f"training_split/training_fmri/{h}_training_fmri.npy")
        shape = np.load(fmri, mmap_mode="r", allow_pickle=False).shape
        if len(shape) != 2:
            raise DataValidationError(fmri, "training fmri", f"shape {shape}; expected (n_images, n_vertices)")
        n_vertices[h] = int(shape[1])
        mask_path = subject / "roi_masks" / f"{h}.all-vertices_fsaverage_space.npy"
        fs_index[h] = None
        if mask_path.is_file():
            fs_index[h] = np.flatnonzero(np.load(mask_path, allow_pickle=False))
    test_dir = subject / "test_split" / "test_images"
    if not test_dir.is_dir():
        raise DataValidationError(test_dir, "challenge test images", "missing; expected test_split/test_images")
    ids = sorted(p.stem for p in test_dir.iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    if not ids:
        raise DataValidationError(test_dir, "challenge test images", "no image files; expected test-*.png")
    return SubjectLayout(subject.name, n_vertices, fs_index, ids)


def _check_run_matches(run: RunResults, layout: SubjectLayout, subject_dir: Path) -> None:
    vox = run.voxels
    npz = run.path / "voxel_metrics.npz"
    if vox is None or vox.hemisphere is None:
        raise DataValidationError(npz, "hemisphere", "missing; an Algonauts export needs voxel_metrics.npz with "
                                  "the hemisphere of every voxel")
    counts = {h: int((vox.hemisphere == h).sum()) for h in HEMISPHERES}
    expected = np.repeat(np.array(HEMISPHERES), [layout.n_vertices[h] for h in HEMISPHERES])
    if counts != layout.n_vertices or not np.array_equal(vox.hemisphere, expected):
        raise DataValidationError(subject_dir, "vertices", f"the run has {counts['lh']} lh + {counts['rh']} rh voxels"
                                  f" but this subject has {layout.n_vertices['lh']} + {layout.n_vertices['rh']} (lh "
                                  "first); is this the subject the run was trained on?")
    if vox.fsaverage_index is not None and all(layout.fsaverage_index[h] is not None for h in HEMISPHERES):
        subject_index = np.concatenate([layout.fsaverage_index[h] for h in HEMISPHERES])
        if not np.array_equal(vox.fsaverage_index, subject_index):
            raise DataValidationError(subject_dir, "fsaverage vertices", "the run's voxels sit on other fsaverage "
                                      "vertices than this subject's challenge vertices; expected the subject the "
                                      "run was trained on")


def choose_model(run: RunResults) -> str:
    """The model :func:`llmvem.evaluate.selection.choose_model` chooses on validation for ``run`` — the one the
    CLI summary and the report name (a ridge fitted on train + val is not eligible: its validation r is in-sample).

    Raises
    ------
    DataValidationError
        No model is eligible (none recorded a validation mean r outside its fit); the message says why and
        that ``--model`` names one.
    """
    from llmvem.evaluate.selection import choose_model as choose

    sel = choose(run.models)
    if sel.model is None:
        raise DataValidationError(run.path / "metrics.json", "models", f"{sel.reason()}; name the model to "
                                  "submit with --model")
    logger.info("%s: exporting %s (%s)", run.path, sel.model, sel.reason())
    return sel.model


def choose_selection_reason(run: RunResults) -> str:
    """Why :func:`choose_model` chose the model of ``run`` (one sentence, as the report says it)."""
    from llmvem.evaluate.selection import choose_model as choose

    return choose(run.models).reason()


def _challenge_predictions(run: RunResults, model: str, layout: SubjectLayout) -> np.ndarray:
    """Predictions of ``model`` for the challenge test images, rows in the challenge order."""
    ids_path = run.path / CHALLENGE_IDS
    pred_path = run.path / "models" / model / CHALLENGE_PREDICTIONS
    if not pred_path.is_file() or not ids_path.is_file():
        raise DataValidationError(pred_path if not pred_path.is_file() else ids_path, "challenge test predictions",
                                  f"missing; the run has no predictions for the challenge test images (expected "
                                  f"models/<model>/{CHALLENGE_PREDICTIONS} and {CHALLENGE_IDS})")
    try:
        ids = json.loads(ids_path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise DataValidationError(ids_path, "ids", f"not a JSON list of image ids ({exc})") from exc
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataValidationError(ids_path, "ids", "expected a JSON list of image ids (strings)")
    ids = [i.rsplit(".", 1)[0] if i.lower().endswith(_IMAGE_SUFFIXES) else i for i in ids]
    pred = np.load(pred_path, mmap_mode="r", allow_pickle=False)
    n_vox = sum(layout.n_vertices.values())
    if pred.shape != (len(ids), n_vox):
        raise DataValidationError(pred_path, "shape", f"{pred.shape}; expected ({len(ids)} images in "
                                  f"{CHALLENGE_IDS}, {n_vox} voxels)")
    if sorted(ids) != layout.test_ids:
        missing = sorted(set(layout.test_ids) - set(ids))[:3]
        extra = sorted(set(ids) - set(layout.test_ids))[:3]
        raise DataValidationError(ids_path, "ids", f"do not match the subject's {len(layout.test_ids)} challenge "
                                  f"test images (missing {missing}, unknown {extra}); expected the same images")
    order = np.argsort(np.array(ids))
    out = np.asarray(pred[order], dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataValidationError(pred_path, "values", "NaN or Inf predictions; expected finite values")
    return out


def _save(path: Path, array: np.ndarray) -> None:
    with atomic_write(path, "wb") as fh:
        np.save(fh, array)


def _vertex_maps(run: RunResults, folder: Path) -> list[Path]:
    vox = run.voxels
    assert vox is not None and vox.hemisphere is not None
    written = []
    for model in run.models:
        metrics = {"r": vox.r[model]} | ({"accuracy": vox.accuracy[model]} if model in vox.accuracy else {})
        for metric, values in metrics.items():
            for h in HEMISPHERES:
                sel = vox.hemisphere == h
                base = folder / "vertex_metrics" / model
                _save(base / f"{h}_{metric}.npy", values[sel].astype(np.float32))
                written.append(base / f"{h}_{metric}.npy")
                if vox.fsaverage_index is not None:
                    full = np.full(FSAVERAGE_N_VERTICES, np.nan, dtype=np.float32)
                    full[vox.fsaverage_index[sel]] = values[sel]
                    _save(base / f"{h}_{metric}_fsaverage.npy", full)
                    written.append(base / f"{h}_{metric}_fsaverage.npy")
    return written


def result_rows(run: RunResults, subject: str, n_boot: int = 1000, seed: int = 0) -> list[dict[str, object]]:
    """The tidy per-ROI rows of one run: every model × ROI (and ``all voxels``) × hemisphere × metric.

    Metrics are ``r`` (mean Pearson r) and, with a noise ceiling, ``accuracy`` (mean noise-normalised accuracy,
    percent); intervals are over test images (see :func:`llmvem.report.roi.roi_values`), empty when unknown.
    """
    metrics = ["r"] + (["accuracy"] if run.voxels is not None and run.voxels.accuracy else [])
    rows = []
    for v in roi_values(run, metrics=metrics, n_boot=n_boot, seed=seed):  # type: ignore[arg-type]
        rows.append({"model": v.model, "subject": subject, "roi": v.roi, "roi_class": v.roi_class,
                     "hemisphere": v.hemisphere, "metric": v.metric, "value": v.mean,
                     "ci_low": v.ci[0] if v.ci else math.nan, "ci_high": v.ci[1] if v.ci else math.nan})
    return rows


def write_results_table(rows: Sequence[dict[str, object]], out_dir: Path) -> list[Path]:
    """``results.csv`` (NaN as an empty cell) and, when pyarrow is installed, ``results.parquet``."""
    csv_path = out_dir / "results.csv"
    with atomic_write(csv_path, newline="", encoding="utf-8") as fh:
        writer = csv.DictWriter(fh, fieldnames=list(RESULT_COLUMNS))
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()})
    written = [csv_path]
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
    except ImportError:
        logger.info("pyarrow is not installed: results.parquet not written (results.csv holds the same rows)")
        return written
    table = pa.table({c: [r[c] for r in rows] for c in RESULT_COLUMNS})
    pq.write_table(table, out_dir / "results.parquet")
    return written + [out_dir / "results.parquet"]


def export_algonauts(runs: Sequence[str | Path], subject_dirs: Sequence[str | Path], out_dir: str | Path,
                     model: str | None = None, n_boot: int = 1000, seed: int = 0) -> dict[str, object]:
    """Write Algonauts 2023 submission files, per-vertex maps and the tidy results table (see module docstring).

    Parameters
    ----------
    runs : sequence of path
        Run folders, one per subject.
    subject_dirs : sequence of path
        The Algonauts ``subjNN`` folders, in the order of ``runs``.
    out_dir : path
        Export folder (created).
    model : str, optional
        Model whose challenge predictions are submitted; default :func:`choose_model` per run.
    n_boot, seed : int
        Image bootstrap of the intervals in the results table.

    Returns
    -------
    dict
        ``{"subjects": {name: {"model", "files"}}, "results": [paths]}``.

    Raises
    ------
    DataValidationError
        A run or subject folder is missing, they do not belong together, or the run has no challenge test
        predictions.
    """
    if len(runs) != len(subject_dirs):
        raise DataValidationError(None, "subject folders", f"{len(subject_dirs)} given for {len(runs)} runs; "
                                  "expected one --subject-dir per run, in the same order")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    summary: dict[str, object] = {"subjects": {}}
    rows: list[dict[str, object]] = []
    prepared = []
    for run_dir, subject_dir in zip(runs, subject_dirs, strict=True):  # check everything before writing
        run, layout = load_run(run_dir), read_subject_layout(subject_dir)
        _check_run_matches(run, layout, Path(subject_dir))
        name = model or choose_model(run)
        if name not in run.models:
            raise DataValidationError(run.path / "metrics.json", "models", f"no model {name!r}; expected one of "
                                      f"{sorted(run.models)}")
        prepared.append((run, layout, name, _challenge_predictions(run, name, layout)))
    for run, layout, name, pred in prepared:
        folder = out / layout.name
        files = []
        offset = 0
        for h in HEMISPHERES:
            n = layout.n_vertices[h]
            _save(folder / f"{h}_pred_test.npy", pred[:, offset:offset + n])
            files.append(folder / f"{h}_pred_test.npy")
            offset += n
        files += _vertex_maps(run, folder)
        rows += result_rows(run, layout.name, n_boot=n_boot, seed=seed)
        why = "named with --model" if model else choose_selection_reason(run)
        summary["subjects"][layout.name] = {"model": name, "why": why, "files": files}  # type: ignore[index]
    summary["results"] = write_results_table(rows, out)
    return summary
