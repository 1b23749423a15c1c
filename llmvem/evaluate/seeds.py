"""Statistics over training seeds *and* test images: how sure a difference of mean r is when both are samples.

A model trained with one seed is one draw of the training process; a confidence interval that resamples only the
test images of one run says nothing about the next seed. :func:`seed_bootstrap` compares two models trained with
the same seeds (``preds_a[k]`` and ``preds_b[k]`` share seed ``k``: the same initialisation and data order) by a
two-level bootstrap: each resample draws the seeds with replacement (the pairs ``(a_k, b_k)`` together) and the
test images with replacement (the same images for every model and seed, within each session), and recomputes

``Δ = mean over the drawn seeds of [mean r of b_k − mean r of a_k]``,

the mean r being over all voxels of all sessions (each voxel weighs the same; images are resampled within each
session, the seeds once for all sessions, as one replicate of the whole experiment). With 3 seeds the seed level has
only 10 distinct draws, so the interval is wide when seeds disagree — which is the point. :func:`seed_mean_ci` is
the same bootstrap of one model's mean r.

Examples
--------
>>> import numpy as np
>>> rng = np.random.default_rng(0)
>>> y = rng.normal(size=(50, 4))
>>> a = [y + rng.normal(size=y.shape) * 2 for _ in range(3)]
>>> b = [y + rng.normal(size=y.shape) for _ in range(3)]
>>> res = seed_bootstrap(y, a, b, n_boot=200)
>>> res["delta_mean_r"] > 0 and res["ci"][0] > 0
True
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r

__all__ = ["seed_bootstrap", "seed_mean_ci"]


def _sessions(y_true: Any, preds: Sequence[Any]) -> tuple[list[np.ndarray], list[list[np.ndarray]]]:
    """(sessions' responses, [model][session][seed] predictions) with every shape checked."""
    ys = [np.asarray(y_true, dtype=np.float64)] if not isinstance(y_true, list | tuple) else \
        [np.asarray(y, dtype=np.float64) for y in y_true]
    out: list[list[list[np.ndarray]]] = []
    for m, p in enumerate(preds):
        per_session = [p] if not isinstance(y_true, list | tuple) else list(p)
        if len(per_session) != len(ys):
            raise DataValidationError(None, f"predictions[{m}]", f"{len(per_session)} sessions, expected {len(ys)}")
        out.append([[np.asarray(x, dtype=np.float64) for x in seeds] for seeds in per_session])
    n_seeds = {len(seeds) for model in out for seeds in model}
    if len(n_seeds) != 1 or 0 in n_seeds:
        raise DataValidationError(None, "predictions", f"seeds per session and model {sorted(n_seeds)}; expected "
                                  "the same number (>= 1) for every model and session, paired by position")
    for s, y in enumerate(ys):
        if y.ndim != 2:
            raise DataValidationError(None, f"y_true[{s}]", f"expected shape (n_images, n_voxels), got {y.shape}")
        for m, model in enumerate(out):
            for k, x in enumerate(model[s]):
                if x.shape != y.shape:
                    raise DataValidationError(None, f"predictions[{m}] session {s} seed {k}",
                                              f"shape {x.shape}, expected {y.shape}")
    return ys, out  # type: ignore[return-value]


def _resampled_sums(ys: list[np.ndarray], models: list[list[list[np.ndarray]]], n_boot: int, seed: int
                    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, int]:
    """Observed and resampled per-seed sums of r over all voxels, and the seed draws.

    Returns
    -------
    observed : array (n_models, n_seeds)
    boot : array (n_boot, n_models, n_seeds)
        Sums of r over voxels (a NaN r counts as 0) on each image resample.
    seed_weights : array (n_boot, n_seeds)
        How often each seed is drawn in each resample (sums to n_seeds).
    n_voxels : int
    """
    rng = np.random.default_rng(seed)
    n_models, n_seeds = len(models), len(models[0][0])
    seed_weights = np.zeros((n_boot, n_seeds))
    draws = rng.integers(0, n_seeds, size=(n_boot, n_seeds))
    for k in range(n_seeds):
        seed_weights[:, k] = (draws == k).sum(axis=1)
    observed = np.zeros((n_models, n_seeds))
    boot = np.zeros((n_boot, n_models, n_seeds))
    n_vox = 0
    for s, y in enumerate(ys):
        n_vox += y.shape[1]
        for m in range(n_models):
            for k in range(n_seeds):
                observed[m, k] += np.nansum(pearson_r(y, models[m][s][k]))
        for b in range(n_boot):
            idx = rng.integers(0, len(y), size=len(y))
            yb = y[idx]
            for m in range(n_models):
                for k in range(n_seeds):
                    boot[b, m, k] += np.nansum(pearson_r(yb, models[m][s][k][idx]))
    return observed, boot, seed_weights, n_vox


def _p_value(observed: float, boot: np.ndarray) -> float:
    """Two-sided bootstrap p (+1 smoothed), as :func:`llmvem.evaluate.stats.paired_bootstrap` reports it."""
    if observed > 0:
        k = int(np.sum(boot <= 0))
    elif observed < 0:
        k = int(np.sum(boot >= 0))
    else:
        k = boot.size
    return float(min(1.0, 2.0 * (k + 1) / (boot.size + 1)))


def seed_bootstrap(y_true: Any, preds_a: Sequence[Any], preds_b: Sequence[Any], n_boot: int = 1000,
                   seed: int = 0) -> dict[str, Any]:
    """Difference of mean r (b − a) over seeds × test images, by a two-level paired bootstrap (module docstring).

    Parameters
    ----------
    y_true : array of shape (n_images, n_voxels), or list of such arrays (one per session)
    preds_a, preds_b : list (n_seeds) of arrays of the shape of ``y_true``; with sessions, a list (n_sessions)
        of such lists
        The two models' test predictions, ``preds_a[k]`` paired with ``preds_b[k]`` (the same seed).
    n_boot : int
    seed : int
        Seed of the resampling.

    Returns
    -------
    dict
        ``delta_mean_r`` (mean over seeds of b − a), ``ci`` ([2.5%, 97.5%]), ``p`` (two-sided), ``a_mean_r``,
        ``b_mean_r``, ``per_seed_delta`` (list), ``n_seeds``, ``n_voxels``, ``n_images`` (per session),
        ``n_boot``.
    """
    if int(n_boot) < 1:
        raise DataValidationError(None, "n_boot", f"got {n_boot}, expected >= 1")
    ys, models = _sessions(y_true, [preds_a, preds_b])
    observed, boot, weights, n_vox = _resampled_sums(ys, models, int(n_boot), seed)
    n_seeds = observed.shape[1]
    per_seed = (observed[1] - observed[0]) / n_vox
    diff = ((boot[:, 1] - boot[:, 0]) * weights).sum(axis=1) / (n_seeds * n_vox)
    delta = float(per_seed.mean())
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"delta_mean_r": delta, "ci": [float(lo), float(hi)], "p": _p_value(delta, diff),
            "a_mean_r": float(observed[0].mean() / n_vox), "b_mean_r": float(observed[1].mean() / n_vox),
            "per_seed_delta": [float(d) for d in per_seed], "n_seeds": int(n_seeds), "n_voxels": int(n_vox),
            "n_images": [int(len(y)) for y in ys], "n_boot": int(n_boot)}


def seed_mean_ci(y_true: Any, preds: Sequence[Any], n_boot: int = 1000, seed: int = 0) -> dict[str, Any]:
    """Mean r of one model over seeds, with the 95% interval of the same two-level bootstrap.

    Arguments as :func:`seed_bootstrap` (one model). Returns ``mean_r``, ``ci``, ``per_seed_mean_r``,
    ``n_seeds``, ``n_voxels``.
    """
    if int(n_boot) < 1:
        raise DataValidationError(None, "n_boot", f"got {n_boot}, expected >= 1")
    ys, models = _sessions(y_true, [preds])
    observed, boot, weights, n_vox = _resampled_sums(ys, models, int(n_boot), seed)
    n_seeds = observed.shape[1]
    dist = (boot[:, 0] * weights).sum(axis=1) / (n_seeds * n_vox)
    lo, hi = np.percentile(dist, [2.5, 97.5])
    return {"mean_r": float(observed[0].mean() / n_vox), "ci": [float(lo), float(hi)],
            "per_seed_mean_r": [float(v) for v in observed[0] / n_vox], "n_seeds": int(n_seeds),
            "n_voxels": int(n_vox)}
