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
import logging
import math
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmvem.data.algonauts import FSAVERAGE_N_VERTICES, HEMISPHERES
from llmvem.data.safe_load import load_array
from llmvem.errors import DataValidationError, OutputPathError, quote
from llmvem.report.roi import roi_values
from llmvem.report.runfolder import RunResults, load_run
from llmvem.report.untrusted import load_run_array, read_run_json
from llmvem.utils import atomic_write, follow_umask

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
        shape = load_array(fmri, "training fmri", mmap=True).shape
        if len(shape) != 2:
            raise DataValidationError(fmri, "training fmri", f"shape {shape}; expected (n_images, n_vertices)")
        n_vertices[h] = int(shape[1])
        mask_path = subject / "roi_masks" / f"{h}.all-vertices_fsaverage_space.npy"
        fs_index[h] = None
        if mask_path.is_file():
            fs_index[h] = np.flatnonzero(load_array(mask_path, "fsaverage mask", ndim=1))
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
    ids = read_run_json(ids_path)
    if not isinstance(ids, list) or not all(isinstance(i, str) for i in ids):
        raise DataValidationError(ids_path, "ids", "expected a JSON list of image ids (strings)")
    ids = [i.rsplit(".", 1)[0] if i.lower().endswith(_IMAGE_SUFFIXES) else i for i in ids]
    pred = load_run_array(pred_path, "challenge test predictions")
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


def _vertex_maps(run: RunResults) -> dict[str, np.ndarray]:
    """``vertex_metrics/<model>/<h>_<metric>[_fsaverage].npy`` (relative to the subject folder) → array.

    Model names are one path component (checked by :func:`llmvem.report.runfolder.load_run`), so every path
    stays inside the subject folder.
    """
    vox = run.voxels
    assert vox is not None and vox.hemisphere is not None
    maps: dict[str, np.ndarray] = {}
    for model in run.models:
        metrics = {"r": vox.r[model]} | ({"accuracy": vox.accuracy[model]} if model in vox.accuracy else {})
        for metric, values in metrics.items():
            for h in HEMISPHERES:
                sel = vox.hemisphere == h
                base = f"vertex_metrics/{model}/{h}_{metric}"
                maps[f"{base}.npy"] = values[sel].astype(np.float32)
                if vox.fsaverage_index is not None:
                    full = np.full(FSAVERAGE_N_VERTICES, np.nan, dtype=np.float32)
                    full[vox.fsaverage_index[sel]] = values[sel]
                    maps[f"{base}_fsaverage.npy"] = full
    return maps


def _check_destinations(out: Path, relative: Sequence[str]) -> None:
    """Refuse, before anything is written, an export whose files could not all be put in place: ``out`` or a
    folder on the way is a file, a file's place is taken by a folder, or ``out``'s parent is not writable."""
    if out.exists() and not out.is_dir():
        raise OutputPathError(f"{quote(str(out))}: exists and is not a folder; expected an export folder")
    for rel in relative:
        target = out / rel
        if target.is_dir():
            raise OutputPathError(f"{quote(str(target))}: is a folder where the export writes a file; move it away "
                                  "or choose another export folder")
        for parent in list(target.relative_to(out).parents)[:-1]:
            if (out / parent).exists() and not (out / parent).is_dir():
                raise OutputPathError(f"{quote(str(out / parent))}: is a file where the export needs a folder")
    probe = out
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputPathError(f"{quote(str(out))}: folder {probe} is not writable")


def _publish(staging: Path, out: Path) -> None:
    """Move the finished export from ``staging`` to ``out``: one rename when ``out`` is new, else file by file
    (each an atomic replace) into the existing folder."""
    if not out.exists():
        out.parent.mkdir(parents=True, exist_ok=True)
        os.rename(staging, out)
        return
    for path in sorted(p for p in staging.rglob("*") if not p.is_dir()):
        target = out / path.relative_to(staging)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.replace(path, target)
    shutil.rmtree(staging, ignore_errors=True)


def result_rows(run: RunResults, subject: str, n_boot: int = 1000, seed: int = 0) -> list[dict[str, object]]:
    """The tidy per-ROI rows of one run: every model × ROI (and ``all voxels``) × hemisphere × metric.

    Metrics are ``r`` (mean Pearson r) and, with a noise ceiling, ``accuracy`` (mean noise-normalised accuracy,
    percent); intervals are over test images (see :func:`llmvem.report.roi.roi_values`), empty when unknown. A run
    with a variance partition adds model ``variance_partition`` rows (``unique_image_r2``, ``shared_r2``,
    ``unique_language_r2`` per ROI, hemisphere ``both``).
    """
    metrics = ["r"] + (["accuracy"] if run.voxels is not None and run.voxels.accuracy else [])
    rows = []
    for v in roi_values(run, metrics=metrics, n_boot=n_boot, seed=seed):  # type: ignore[arg-type]
        rows.append({"model": v.model, "subject": subject, "roi": v.roi, "roi_class": v.roi_class,
                     "hemisphere": v.hemisphere, "metric": v.metric, "value": v.mean,
                     "ci_low": v.ci[0] if v.ci else math.nan, "ci_high": v.ci[1] if v.ci else math.nan})
    classes = {roi: cls for cls, rois in (run.dataset.get("roi_classes") or {}).items() for roi in rois}
    for roi, rec in (run.variance_partition or {}).items():  # evaluate.variance_partition: both hemispheres
        for metric in ("unique_image_r2", "shared_r2", "unique_language_r2"):
            rows.append({"model": "variance_partition", "subject": subject, "roi": "all voxels" if roi == "all"
                         else roi, "roi_class": "all" if roi == "all" else classes.get(roi, ""), "hemisphere": "both",
                         "metric": metric, "value": rec[metric], "ci_low": math.nan, "ci_high": math.nan})
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
    if isinstance(n_boot, bool) or not isinstance(n_boot, int) or n_boot < 1:
        raise DataValidationError(None, "n_boot", f"{quote(n_boot)}; expected a positive number of resamples")
    out = Path(out_dir)
    summary: dict[str, object] = {"subjects": {}}
    rows: list[dict[str, object]] = []
    arrays: dict[str, np.ndarray] = {}  # path relative to out -> array
    for run_dir, subject_dir in zip(runs, subject_dirs, strict=True):  # everything is checked before writing
        run, layout = load_run(run_dir), read_subject_layout(subject_dir)
        _check_run_matches(run, layout, Path(subject_dir))
        if layout.name in summary["subjects"]:  # type: ignore[operator]
            raise DataValidationError(subject_dir, "subject folder", f"{layout.name!r} is given twice; expected one "
                                      "run per subject")
        name = model or choose_model(run)
        if name not in run.models:
            raise DataValidationError(run.path / "metrics.json", "models", f"no model {quote(name)}; expected one "
                                      f"of {sorted(run.models)}")
        pred = _challenge_predictions(run, name, layout)
        files = {}
        offset = 0
        for h in HEMISPHERES:
            n = layout.n_vertices[h]
            files[f"{layout.name}/{h}_pred_test.npy"] = pred[:, offset:offset + n]
            offset += n
        files |= {f"{layout.name}/{rel}": a for rel, a in _vertex_maps(run).items()}
        arrays |= files
        rows += result_rows(run, layout.name, n_boot=n_boot, seed=seed)
        why = "named with --model" if model else choose_selection_reason(run)
        summary["subjects"][layout.name] = {"model": name, "why": why,  # type: ignore[index]
                                            "files": [out / rel for rel in files]}
    _check_destinations(out, [*arrays, "results.csv", "results.parquet"])
    # Written into a staging folder beside --out and moved into place at the end: a refused or interrupted
    # export leaves nothing (not even an empty --out), a finished one is complete.
    probe = out.parent
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.export-", dir=probe))
    try:
        follow_umask(staging, folder=True)
        for rel, array in arrays.items():
            _save(staging / rel, array)
        results = write_results_table(rows, staging)
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    summary["results"] = [out / p.relative_to(staging) for p in results]
    return summary
