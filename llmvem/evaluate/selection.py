"""Model selection on the validation split only: which λ (and which swept setting) an experiment reports.

The test split is for reporting the chosen model, never for choosing it: picking the best of several λ by test
mean r favours the winner (a winner's curse). Candidates are LLM-VEM models with a recorded validation mean r
that were **not** fitted on the validation split (``val_in_fit`` false); the ridge baseline is fitted on
train + val, so its validation r is in-sample and it is never a candidate (its α is chosen by inner
cross-validation instead).

Examples
--------
>>> models = {"ridge": {"kind": "ridge", "lambda": None, "val_mean_r": 0.9, "val_in_fit": True, "mean_r": 0.5},
...           "llmvem_lambda0": {"kind": "llmvem", "lambda": 0.0, "val_mean_r": 0.58, "mean_r": 0.63},
...           "llmvem_lambda0.5": {"kind": "llmvem", "lambda": 0.5, "val_mean_r": 0.61, "mean_r": 0.628}}
>>> sel = select_on_validation(models)
>>> sel["model"], sel["lambda"]
('llmvem_lambda0.5', 0.5)
>>> selection_line(sel)
'validation chose λ=0.5 (val mean r 0.610); its test mean r 0.628'
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from llmvem.report.tables import fmt_number

__all__ = ["choose_per_voxel", "pick_per_voxel", "select_on_validation", "selection_line"]


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and math.isfinite(x)


def select_on_validation(models: Mapping[str, Mapping[str, Any]], kinds: tuple[str, ...] = ("llmvem",)
                         ) -> dict[str, Any] | None:
    """The model with the highest validation mean r among the candidates of ``models``.

    Parameters
    ----------
    models : dict of name to model record
        The ``models`` of ``metrics.json`` (keys ``kind``, ``lambda``, ``val_mean_r``, ``val_in_fit``,
        ``mean_r`` = test mean r, ``label``). Names may carry a sweep point (``"dropout0.2/llmvem_lambda0.1"``).
    kinds : tuple of str
        Kinds that are candidates (default LLM-VEM models).

    Returns
    -------
    dict or None
        ``basis`` ("validation"), ``model``, ``label``, ``lambda``, ``val_mean_r``, ``test_mean_r`` of the chosen
        model and ``n_candidates``; ties go to the first in order (the smaller λ when sorted). None when no
        model is a candidate (no validation split, or only models fitted on it).
    """
    candidates = [(name, m) for name, m in models.items()
                  if m.get("kind") in kinds and _finite(m.get("val_mean_r")) and not m.get("val_in_fit", False)]
    if not candidates:
        return None
    best_name, best = candidates[0]
    for name, m in candidates[1:]:
        if m["val_mean_r"] > best["val_mean_r"]:
            best_name, best = name, m
    return {"basis": "validation", "model": best_name, "label": best.get("label", best_name),
            "lambda": best.get("lambda"), "val_mean_r": float(best["val_mean_r"]),
            "test_mean_r": best.get("mean_r"), "n_candidates": len(candidates)}


def selection_line(selection: Mapping[str, Any] | None, setting: str | None = None) -> str:
    """One line saying what validation chose and its test figure, e.g. ``validation chose λ=0.5 (val mean r
    0.610); its test mean r 0.628``; ``setting`` names the sweep point as well. Says so when nothing could be
    chosen."""
    if selection is None:
        return ("validation chose nothing: no LLM-VEM model recorded a validation mean r outside its fit "
                "(no validation split?); the test figures above are not a selection")
    lam = selection.get("lambda")
    what = f"λ={lam:g}" if lam is not None else str(selection.get("label", selection.get("model")))
    if setting:
        what = f"{setting}, {what}"
    return (f"validation chose {what} (val mean r {fmt_number(selection['val_mean_r'])}); "
            f"its test mean r {fmt_number(selection.get('test_mean_r'))}")


def choose_per_voxel(y_val: np.ndarray, val_predictions: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Each voxel's best candidate by validation Pearson r (a voxel whose r is undefined everywhere gets 0).

    Parameters
    ----------
    y_val : array of shape (n_val, n_voxels)
    val_predictions : list of arrays of shape (n_val, n_voxels), one per candidate

    Returns
    -------
    choice : array of int, shape (n_voxels,)
        Index of each voxel's candidate.
    val_r : array of shape (n_candidates, n_voxels)
        Validation r of every candidate (-inf where undefined).
    """
    from llmvem.evaluate.metrics import pearson_r

    r = np.stack([pearson_r(y_val, p) for p in val_predictions])
    r = np.where(np.isfinite(r), r, -np.inf)
    return np.argmax(r, axis=0), r


def pick_per_voxel(predictions: list[np.ndarray], choice: np.ndarray) -> np.ndarray:
    """Predictions of shape (n, n_voxels) assembled voxel by voxel from the candidates ``choice`` names."""
    stacked = np.stack([np.asarray(p) for p in predictions])
    return np.take_along_axis(stacked, np.asarray(choice)[None, None, :], axis=0)[0]
