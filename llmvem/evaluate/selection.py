"""The one model-selection rule of llmvem: which model a run reports, submits and serves, chosen on validation.

Every place that names "the chosen model" — the ``llmvem demo``/``train``/``sweep`` summary, ``metrics.json``
(``selection``, ``selected_model``), the HTML report, ``llmvem export``, the ``predict``/``describe`` defaults,
text-to-brain and the benchmarks — calls :func:`choose_model` on the run's model records, so they agree.

The rule
--------
* The **test split is never read** to choose: only ``val_mean_r`` decides (the chosen model's test mean r is
  reported, nothing else of the test split is looked at).
* A model **fitted on the validation split** (``val_in_fit``: the ridge baseline refitted on train + val, a
  per-voxel choice made by validation r) is **not eligible**: its validation r is in-sample. Hyper-parameters
  chosen on validation (an early-stopping epoch, a ridge layer set, a blend weight scored out-of-fold) do not
  make a model ineligible; fitting on the split does.
* A model without a finite validation mean r is not eligible.
* The highest validation mean r wins; **ties** go to the first model in the run's order (the baselines and the
  smaller λ come first) and are listed in ``tied``.
* When nothing is eligible, nothing is chosen (``model`` is None) and :meth:`Selection.reason` says why.

Examples
--------
>>> models = {"ridge": {"kind": "ridge", "lambda": None, "val_mean_r": 0.9, "val_in_fit": True, "mean_r": 0.5},
...           "llmvem_lambda0": {"kind": "llmvem", "lambda": 0.0, "val_mean_r": 0.58, "mean_r": 0.63},
...           "llmvem_lambda0.5": {"kind": "llmvem", "lambda": 0.5, "val_mean_r": 0.61, "mean_r": 0.628}}
>>> sel = choose_model(models)
>>> sel.model, sel.lam
('llmvem_lambda0.5', 0.5)
>>> sel.reason()
'chosen on validation among llmvem_lambda0, llmvem_lambda0.5; ridge not eligible: fitted on val'
>>> selection_line(sel)
'validation chose λ=0.5 (val mean r 0.610); its test mean r 0.628'
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["Selection", "choose_model", "choose_per_voxel", "pick_per_voxel", "selection_line"]

#: Reasons a model is not eligible, as :meth:`Selection.reason` writes them.
FITTED_ON_VAL = "fitted on val"
NO_VAL_SCORE = "no validation mean r"
NOT_AMONG = "not a candidate here"


def _finite(x: Any) -> bool:
    return isinstance(x, int | float) and not isinstance(x, bool) and math.isfinite(x)


def _fields(name: str, record: Any) -> dict[str, Any]:
    """The fields the rule reads, from a ``metrics.json`` model record (dict) or a report ``ModelResult``."""
    if isinstance(record, Mapping):
        return {"kind": record.get("kind"), "lambda": record.get("lambda"), "label": record.get("label", name),
                "val_mean_r": record.get("val_mean_r"), "val_in_fit": bool(record.get("val_in_fit", False)),
                "test_mean_r": record.get("mean_r")}
    overall = getattr(record, "overall", None)
    return {"kind": getattr(record, "kind", None), "lambda": getattr(record, "lam", None),
            "label": getattr(record, "label", name), "val_mean_r": getattr(record, "val_mean_r", None),
            "val_in_fit": bool(getattr(record, "val_in_fit", False)),
            "test_mean_r": getattr(overall, "mean_r", None)}


@dataclass(frozen=True)
class Selection:
    """What :func:`choose_model` chose, and why.

    Attributes
    ----------
    model : str or None
        Name of the chosen model; None when no model was eligible.
    candidates : tuple of str
        The eligible models, in the run's order.
    excluded : dict of str to str
        Every other model and why it was not eligible (``"fitted on val"``, ``"no validation mean r"``,
        ``"not a candidate here"``).
    tied : tuple of str
        Eligible models whose validation mean r equals the chosen one's (the chosen model first); empty when
        there is no tie.
    label, lam, kind : the chosen model's label, λ (None when it has none) and kind.
    val_mean_r : float or None
        The chosen model's validation mean r (what chose it).
    test_mean_r : float or None
        Its test mean r, reported, never used to choose.
    basis : str
        Always ``"validation"``.
    """

    model: str | None
    candidates: tuple[str, ...] = ()
    excluded: dict[str, str] = field(default_factory=dict)
    tied: tuple[str, ...] = ()
    label: str | None = None
    lam: float | None = None
    kind: str | None = None
    val_mean_r: float | None = None
    test_mean_r: float | None = None
    basis: str = "validation"

    def reason(self) -> str:
        """Why this model, in one sentence: ``chosen on validation among a, b; ridge not eligible: fitted on
        val``; or why nothing was chosen."""
        groups: dict[str, list[str]] = {}
        for name, why in self.excluded.items():
            if why != NOT_AMONG:
                groups.setdefault(why, []).append(name)
        unfit = "; ".join(f"{', '.join(names)} not eligible: {why}" for why, names in groups.items())
        if self.model is None:
            return "nothing chosen: no model has a validation mean r outside its fit" + (f" ({unfit})" if unfit else "")
        text = f"chosen on validation among {', '.join(self.candidates)}"
        if len(self.tied) > 1:
            text += f" (tied with {', '.join(self.tied[1:])}; the first in order is kept)"
        return text + (f"; {unfit}" if unfit else "")

    def to_record(self) -> dict[str, Any]:
        """The ``selection`` record of ``metrics.json`` (JSON-ready)."""
        return {"basis": self.basis, "model": self.model, "label": self.label, "lambda": self.lam,
                "kind": self.kind, "val_mean_r": self.val_mean_r, "test_mean_r": self.test_mean_r,
                "n_candidates": len(self.candidates), "candidates": list(self.candidates),
                "excluded": dict(self.excluded), "tied": list(self.tied), "reason": self.reason()}


def choose_model(models: Mapping[str, Any], among: Sequence[str] | Callable[[str, dict[str, Any]], bool] | None = None
                 ) -> Selection:
    """The model a run reports: the highest validation mean r among the eligible models (see the module rule).

    Parameters
    ----------
    models : dict of name to model record
        In the run's order: the ``models`` of ``metrics.json`` (dicts with ``kind``, ``lambda``, ``label``,
        ``val_mean_r``, ``val_in_fit``, ``mean_r`` = test mean r) or the report's ``ModelResult`` objects.
        Names may carry a sweep point (``"dropout0.2/llmvem_lambda0.1"``).
    among : sequence of names, or callable(name, fields) -> bool, optional
        Restrict the candidates (e.g. the models with λ > 0 for text-to-brain); the others are recorded as
        "not a candidate here". Default: every model.

    Returns
    -------
    Selection
    """
    eligible: list[tuple[str, dict[str, Any]]] = []
    excluded: dict[str, str] = {}
    for name, record in models.items():
        f = _fields(name, record)
        if among is not None and not (among(name, f) if callable(among) else name in among):
            excluded[name] = NOT_AMONG
        elif f["val_in_fit"]:
            excluded[name] = FITTED_ON_VAL
        elif not _finite(f["val_mean_r"]):
            excluded[name] = NO_VAL_SCORE
        else:
            eligible.append((name, f))
    if not eligible:
        return Selection(model=None, excluded=excluded)
    best_name, best = eligible[0]
    for name, f in eligible[1:]:
        if f["val_mean_r"] > best["val_mean_r"]:
            best_name, best = name, f
    tied = tuple(n for n, f in eligible if f["val_mean_r"] == best["val_mean_r"])
    test = best["test_mean_r"]
    return Selection(model=best_name, candidates=tuple(n for n, _ in eligible), excluded=excluded,
                     tied=tied if len(tied) > 1 else (), label=best["label"],
                     lam=None if best["lambda"] is None else float(best["lambda"]), kind=best["kind"],
                     val_mean_r=float(best["val_mean_r"]), test_mean_r=float(test) if _finite(test) else None)


def selection_line(selection: Selection, setting: str | None = None) -> str:
    """One line saying what validation chose and its test figure, e.g. ``validation chose λ=0.5 (val mean r
    0.610); its test mean r 0.628``; ``setting`` names the sweep point as well. Says why when nothing was
    chosen."""
    from llmvem.report.tables import fmt_number  # imported here: llmvem.report imports this module

    if selection.model is None:
        return f"validation chose nothing: {selection.reason()}; the test figures above are not a selection"
    lam = selection.lam
    what = f"λ={lam:g}" if lam is not None and selection.kind == "llmvem" else str(selection.label or selection.model)
    if setting:
        what = f"{setting}, {what}"
    return (f"validation chose {what} (val mean r {fmt_number(selection.val_mean_r)}); "
            f"its test mean r {fmt_number(selection.test_mean_r)}")


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
