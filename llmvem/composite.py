"""Estimators made of estimators, fitted by the same runner: a choice on validation, a blend, a seed ensemble.

In the shape of scikit-learn's ``StackingRegressor``/``VotingRegressor`` and himalaya's ``BandedRidgeCV``: the
constructor stores the member estimators, ``fit_inputs`` fits them (or takes the ones the experiment runner has
already fitted, through ``fitted``), fitted attributes end in ``_``.

:class:`ChooseOnValidation`
    Fits each candidate on the training split, keeps the one :func:`llmvem.evaluate.selection.choose_model`
    chooses by validation mean r, and refits it on ``refit_splits`` (the layer-set choice of a ridge baseline).
:class:`Blend`
    ``Σ_k w_k · prediction_k`` with weights on a simplex grid chosen by validation mean r, from validation
    predictions of fits that never saw the validation split (a member refitted on train + val contributes the
    validation predictions of its train-only fit). Its own validation r is **out of fold** (the weights of each
    of 5 folds of validation images are chosen on the other 4), so the one selection rule may choose it.
:class:`SeedEnsemble`
    The same estimator trained with ``k`` seeds (``config.seed + i``), predictions averaged; each member trains
    into ``<out_dir>/seed<i>/`` so its own predictions stay in the run folder for seed statistics.

Each writes a small JSON in its model folder (``choice.json``, ``blend.json``, ``ensemble.json``) that
:func:`load_model_folder` reads back, so ``llmvem predict`` serves these models like any other.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator, clone

from llmvem.errors import CheckpointError, DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.ridge_encoders import PREDICT_SPLITS

if TYPE_CHECKING:
    from llmvem.data.images import ImageCollection
    from llmvem.inputs import PreparedInputs

__all__ = ["BLEND_FILE", "CHOICE_FILE", "ENSEMBLE_FILE", "Blend", "ChooseOnValidation", "SeedEnsemble",
           "heldout_val_predictions", "simplex_grid"]

CHOICE_FILE = "choice.json"
BLEND_FILE = "blend.json"
ENSEMBLE_FILE = "ensemble.json"


def _mean_r(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.nanmean(pearson_r(y, pred)))


def _val_responses(inputs: PreparedInputs, what: str) -> np.ndarray:
    ds = inputs.dataset
    if ds.val is None or ds.val.responses is None or len(ds.val.responses) < 5:
        raise DataValidationError(None, "dataset.val", f"{what} needs a validation split with responses (at least "
                                  "5 images)")
    return ds.val.responses


def heldout_val_predictions(estimator: Any, inputs: PreparedInputs) -> np.ndarray:
    """Validation predictions of ``estimator`` (fitted on ``inputs``) from a fit that did not see the validation
    split: its own when it was fitted on train only; the ``heldout_val_`` it kept otherwise; else those of a clone
    refitted on ``("train",)`` (estimators with a ``fit_splits`` parameter)."""
    if "val" not in getattr(estimator, "fit_splits_", ("train",)):
        return estimator.predict_inputs(inputs)["val"]
    kept = getattr(estimator, "heldout_val_", None)
    if kept is not None:
        return kept
    if "fit_splits" not in estimator.get_params():
        raise DataValidationError(None, "estimator", f"{type(estimator).__name__} was fitted on the validation "
                                  "split and cannot be refitted on train only; validation predictions from a "
                                  "train-only fit are needed")
    return clone(estimator).set_params(fit_splits=("train",)).fit_inputs(inputs).predict_inputs(inputs)["val"]


def simplex_grid(n_members: int, step: float = 0.1) -> np.ndarray:
    """Weight vectors on the simplex with the given step, shape (n_points, n_members); for two members
    ``[[0, 1], [0.1, 0.9], ..., [1, 0]]`` (the first member's weight ascending)."""
    k = int(round(1.0 / step))
    if n_members < 1 or k < 1 or abs(k * step - 1.0) > 1e-9:
        raise DataValidationError(None, "weight_step", f"expected 1/step to be a whole number, got {step}")
    pts = [c for c in itertools.product(range(k + 1), repeat=n_members) if sum(c) == k]
    return np.array(sorted(pts), dtype=np.float64) / k


# ---------------------------------------------------------------------------------------------- choice
class ChooseOnValidation(BaseEstimator):
    """One of several candidates, chosen on validation and refitted (e.g. a ridge's layer set).

    Parameters
    ----------
    estimators : dict of name to estimator
        Candidates with a ``fit_splits`` parameter (fitted on ``("train",)`` to be scored, cloned).
    refit_splits : sequence of str
        Splits the chosen candidate is refitted on (default train + val, as the ridge baseline).

    Attributes
    ----------
    chosen_ : str
    estimator_ : the chosen candidate, refitted
    heldout_val_ : array of shape (n_val, n_voxels)
        The chosen candidate's validation predictions from its train-only fit.
    details_ : dict
        ``chosen``, ``reason`` and each candidate's ``val_mean_r`` (recorded in ``metrics.json``).
    fit_splits_ : tuple of str
    """

    def __init__(self, estimators: Mapping[str, Any] | None = None, refit_splits: Sequence[str] = ("train", "val")):
        self.estimators = estimators
        self.refit_splits = refit_splits

    def fit_inputs(self, inputs: PreparedInputs) -> ChooseOnValidation:
        from llmvem.evaluate.selection import choose_model

        if not self.estimators:
            raise DataValidationError(None, "estimators", "expected at least one candidate")
        y_val = _val_responses(inputs, "a choice on validation")
        fitted, val_pred, records = {}, {}, {}
        for name, est in self.estimators.items():
            e = clone(est).set_params(fit_splits=("train",)).fit_inputs(inputs)
            fitted[name], val_pred[name] = e, e.predict_inputs(inputs)["val"]
            records[name] = {"kind": "candidate", "val_mean_r": _mean_r(y_val, val_pred[name])}
        sel = choose_model(records)
        if sel.model is None:
            raise DataValidationError(None, "estimators", f"no candidate could be chosen: {sel.reason()}")
        self.chosen_ = sel.model
        refit = tuple(s for s in self.refit_splits if s in inputs.dataset.splits)
        self.estimator_ = fitted[sel.model] if refit == ("train",) else \
            clone(self.estimators[sel.model]).set_params(fit_splits=refit).fit_inputs(inputs)
        self.heldout_val_ = val_pred[sel.model]
        self.fit_splits_ = self.estimator_.fit_splits_
        self.details_ = {"chosen": sel.model, "reason": sel.reason(),
                         "val_mean_r": {n: r["val_mean_r"] for n, r in records.items()}}
        return self

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        return self.estimator_.predict_inputs(inputs)

    def predict_new(self, images: ImageCollection, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return self.estimator_.predict_new(images, features)

    def save(self, folder: str | Path) -> Path:
        """The chosen estimator saved in ``folder`` as itself (so it loads as that model), plus ``choice.json``."""
        from llmvem.utils import write_json

        self.estimator_.save(folder)
        path = Path(folder) / CHOICE_FILE
        write_json(path, self.details_)
        return path


# ----------------------------------------------------------------------------------------------- blend
class Blend(BaseEstimator):
    """A weighted average of fitted models, the weights chosen on validation from train-only fits.

    Parameters
    ----------
    estimators : dict of name to estimator
        Members (fitted by the runner and passed as ``fitted``, or cloned and fitted here).
    weight_step : float
        Step of the simplex grid of weights (0.1: 11 weightings for two members).
    n_folds : int
        Folds of validation images for the out-of-fold validation predictions.
    seed : int
        Seed of the fold assignment.

    Attributes
    ----------
    names_ : list of str
    weights_ : dict of name to float
        Chosen on all validation images (these make the test predictions).
    val_r_by_weight_ : dict of str to float
        Validation mean r of every weighting on the grid.
    oof_val_ : array of shape (n_val, n_voxels)
        Out-of-fold validation predictions (what ``val_mean_r`` of the blend is computed from).
    details_ : dict
    fit_splits_ : tuple of str
        ``("train",)``: the blend's validation r is out of fold, never in-sample.
    """

    def __init__(self, estimators: Mapping[str, Any] | None = None, weight_step: float = 0.1, n_folds: int = 5,
                 seed: int = 0):
        self.estimators = estimators
        self.weight_step = weight_step
        self.n_folds = n_folds
        self.seed = seed

    def fit_inputs(self, inputs: PreparedInputs, fitted: Mapping[str, Any] | None = None) -> Blend:
        if not self.estimators or len(self.estimators) < 2:
            raise DataValidationError(None, "estimators", "a blend needs at least two members")
        y_val = _val_responses(inputs, "a blend")
        given = dict(fitted or {})
        self.members_ = {n: given[n] if n in given else clone(e).fit_inputs(inputs) for n, e in self.estimators.items()}
        self.names_ = list(self.members_)
        self.reused_ = [n for n in self.names_ if n in given]
        val = np.stack([heldout_val_predictions(self.members_[n], inputs) for n in self.names_]).astype(np.float64)
        grid = simplex_grid(len(self.names_), self.weight_step)

        def best(rows: np.ndarray) -> tuple[int, np.ndarray]:
            scores = np.array([_mean_r(y_val[rows], np.tensordot(w, val[:, rows], 1)) for w in grid])
            return int(np.argmax(scores)), scores  # the first weighting on ties

        k, scores = best(np.arange(len(y_val)))
        self.weights_ = {n: float(w) for n, w in zip(self.names_, grid[k], strict=True)}
        self.val_r_by_weight_ = {",".join(f"{x:g}" for x in w): float(s) for w, s in zip(grid, scores, strict=True)}
        folds = np.random.default_rng(self.seed).permutation(len(y_val)) % max(2, min(self.n_folds, len(y_val)))
        oof = np.empty_like(val[0])
        for f in np.unique(folds):
            j, _ = best(np.flatnonzero(folds != f))
            oof[folds == f] = np.tensordot(grid[j], val[:, folds == f], 1)
        self.oof_val_ = oof.astype(np.float32)
        self.fit_splits_ = ("train",)
        self.details_ = {"members": self.names_, "weights": self.weights_, "val_r_by_weight": self.val_r_by_weight_,
                         "val_mean_r_in_sample": float(scores[k]),
                         "note": "weights chosen on validation from train-only fits; val_mean_r is out-of-fold"}
        return self

    def _combine(self, preds: Sequence[np.ndarray]) -> np.ndarray:
        return np.sum([self.weights_[n] * np.asarray(p, dtype=np.float64) for n, p in zip(self.names_, preds,
                                                                                          strict=True)],
                      axis=0).astype(np.float32)

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        per = [self.members_[n].predict_inputs(inputs) for n in self.names_]
        out = {s: self._combine([p[s] for p in per]) for s in PREDICT_SPLITS if all(s in p for p in per)}
        out["val"] = self.oof_val_
        return out

    def predict_new(self, images: ImageCollection, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._combine([self.members_[n].predict_new(images, features) for n in self.names_])

    def save(self, folder: str | Path) -> Path:
        """``blend.json``: weights, validation scores and each member's folder relative to the run's ``models/``
        (a member the runner fitted is its sibling ``models/<name>/``; the others are saved into
        ``folder/<name>/``)."""
        from llmvem.utils import write_json

        folder = Path(folder)
        where = {n: n for n in self.reused_}
        for n in self.names_:
            if n not in where:
                self.members_[n].save(folder / n)
                where[n] = f"{folder.name}/{n}"
        path = folder / BLEND_FILE
        write_json(path, {**self.details_, "member_folders": where})
        return path


# -------------------------------------------------------------------------------------------- ensemble
class SeedEnsemble(BaseEstimator):
    """``n_seeds`` copies of one estimator trained with seeds ``config.seed + i``, predictions averaged.

    Parameters
    ----------
    estimator : estimator with a ``config`` parameter (:class:`~llmvem.estimators.LLMVEMEncoder`)
    n_seeds : int
    out_dir : path, optional
        Members train into ``out_dir/seed<i>/`` (set by the experiment runner to ``models/<name>/``).
    resume : bool
        Reuse finished member trainings in ``out_dir``.

    Attributes
    ----------
    members_ : list of fitted estimators
    seeds_ : list of int
    details_ : dict
        ``seeds`` and each member's validation mean r.
    fit_splits_ : tuple of str
    """

    def __init__(self, estimator: Any = None, n_seeds: int = 3, out_dir: str | Path | None = None,
                 resume: bool = False):
        self.estimator = estimator
        self.n_seeds = n_seeds
        self.out_dir = out_dir
        self.resume = resume

    def fit_inputs(self, inputs: PreparedInputs) -> SeedEnsemble:
        if self.estimator is None or int(self.n_seeds) < 1:
            raise DataValidationError(None, "n_seeds", f"expected an estimator and n_seeds ≥ 1, got {self.n_seeds}")
        base = self.estimator.get_params()["config"]
        if base is None:
            raise DataValidationError(None, "estimator", "expected an estimator with a config (its seed is varied)")
        self.members_, self.seeds_ = [], []
        ds = inputs.dataset
        val_r = {}
        for i in range(int(self.n_seeds)):
            cfg = base.model_copy(deep=True)
            cfg.seed = base.seed + i
            est = clone(self.estimator).set_params(config=cfg)
            if self.out_dir is not None and "out_dir" in est.get_params():
                est.set_params(out_dir=Path(self.out_dir) / f"seed{i}", resume=self.resume)
            est.fit_inputs(inputs)
            self.members_.append(est)
            self.seeds_.append(cfg.seed)
            if ds.val is not None and ds.val.responses is not None:
                val_r[str(cfg.seed)] = _mean_r(ds.val.responses, est.predict_inputs(inputs)["val"])
        self.fit_splits_ = tuple(sorted({s for m in self.members_ for s in getattr(m, "fit_splits_", ("train",))}))
        self.details_ = {"seeds": self.seeds_, "member_val_mean_r": val_r,
                         "member_folders": [f"seed{i}" for i in range(len(self.members_))]}
        return self

    def _average(self, preds: Sequence[np.ndarray]) -> np.ndarray:
        return np.mean([np.asarray(p, dtype=np.float64) for p in preds], axis=0).astype(np.float32)

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        per = [m.predict_inputs(inputs) for m in self.members_]
        return {s: self._average([p[s] for p in per]) for s in PREDICT_SPLITS if all(s in p for p in per)}

    def predict_new(self, images: ImageCollection, features: Mapping[str, np.ndarray]) -> np.ndarray:
        return self._average([m.predict_new(images, features) for m in self.members_])

    def save(self, folder: str | Path) -> Path:
        """``ensemble.json`` (the members are in ``seed<i>/``)."""
        from llmvem.utils import write_json

        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        if self.out_dir is None:  # members trained in temporary folders: save what can be saved
            for i, m in enumerate(self.members_):
                if hasattr(m, "save"):
                    m.save(folder / f"seed{i}")
        path = folder / ENSEMBLE_FILE
        write_json(path, self.details_)
        return path


# ---------------------------------------------------------------------------------------------- loading
def read_composite(folder: str | Path) -> tuple[str, dict[str, Any]] | None:
    """``("blend" | "ensemble" | "choice", record)`` when ``folder`` holds a composite model, else None.

    Member folders are checked to be plain names or relative paths inside the run's ``models/`` folder.

    Raises
    ------
    CheckpointError
        The JSON is unreadable or names a member folder outside the run folder's ``models/``.
    """
    folder = Path(folder)
    for kind, name in (("blend", BLEND_FILE), ("ensemble", ENSEMBLE_FILE)):
        path = folder / name
        if not path.is_file():
            continue
        try:
            rec = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError, RecursionError) as exc:
            raise CheckpointError(f"{path}: cannot read ({exc}); expected the JSON llmvem wrote") from exc
        members = rec.get("member_folders") if isinstance(rec, dict) else None
        if isinstance(members, dict):
            members = list(members.values())
        if not isinstance(members, list) or not members or not all(isinstance(m, str) for m in members):
            raise CheckpointError(f"{path}: member_folders: expected a list of folder names")
        for m in members:
            target = (folder / m).resolve() if kind == "ensemble" else (folder.parent / m).resolve()
            if folder.parent.resolve() not in target.parents:
                raise CheckpointError(f"{path}: member_folders: {m!r} points outside the run's models/ folder")
        return kind, rec
    return None
