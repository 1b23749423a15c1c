"""Statistics for comparing two encoding models on the same test images.

:func:`paired_bootstrap` resamples test images with replacement — the same resample for both models, so the
comparison is paired — and recomputes every voxel's Pearson r for both models on each resample. A resample is a
vector of counts ``c`` (how often each image was drawn), so each voxel's resampled r follows from count-weighted
sums; all of them are one matrix product ``C @ Z`` of the ``(n_boot, n_images)`` count matrix with per-voxel
columns (y, y², a, a², ya, ...). That vectorises over voxels and resamples at once, in blocks of voxels.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import (
    NC_FLOOR,
    check_noise_ceiling,
    check_roi_masks,
    noise_normalized_accuracy,
    pearson_r,
)

#: Bytes of float64 scratch one block of voxels may use.
_BLOCK_BYTES = 32 * 2**20


def _check_inputs(y_true: Any, pred_a: Any, pred_b: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    arrays = []
    for name, a in (("y_true", y_true), ("pred_a", pred_a), ("pred_b", pred_b)):
        arr = np.asarray(a)
        if arr.ndim == 1:
            arr = arr[:, None]
        if arr.ndim != 2:
            raise DataValidationError(None, name, f"expected shape (n_images, n_voxels), got {arr.shape}")
        if arrays and arr.shape != arrays[0].shape:
            raise DataValidationError(None, name, f"expected the shape of y_true {arrays[0].shape}, got {arr.shape}")
        if not np.isfinite(arr).all():
            raise DataValidationError(None, name, "contains NaN or Inf; expected finite values")
        arrays.append(arr)
    if arrays[0].shape[0] < 3:
        raise DataValidationError(None, "y_true", f"expected at least 3 images, got {arrays[0].shape[0]}")
    return arrays[0], arrays[1], arrays[2]


def _zscore(a: np.ndarray) -> np.ndarray:
    """Columns centred and scaled to unit variance in float64 (constant columns become 0)."""
    a = a.astype(np.float64)
    a -= a.mean(axis=0)
    sd = np.sqrt((a * a).mean(axis=0))
    sd[sd == 0] = 1.0
    a /= sd
    return a


def _weighted_r(sy: np.ndarray, syy: np.ndarray, sp: np.ndarray, spp: np.ndarray, syp: np.ndarray,
                n: int) -> np.ndarray:
    """Pearson r from count-weighted sums (each of shape (n_boot, n_voxels)); 0 where a variance vanishes."""
    cov = syp - sy * sp / n
    vy = syy - sy * sy / n
    vp = spp - sp * sp / n
    # Inputs are z-scored (total variance n), so 1e-9·n separates "constant in this resample" from rounding.
    ok = (vy > 1e-9 * n) & (vp > 1e-9 * n)
    with np.errstate(invalid="ignore", divide="ignore"):
        r = np.where(ok, cov / np.sqrt(np.where(ok, vy * vp, 1.0)), 0.0)
    return np.clip(r, -1.0, 1.0)



def _check_n_boot(n_boot: Any) -> int:
    if int(n_boot) < 1:
        raise DataValidationError(None, "n_boot", f"expected a positive number of resamples, got {n_boot}")
    return int(n_boot)


def _checked_ceiling(noise_ceiling: Any, n_vox: int) -> np.ndarray | None:
    """The noise ceiling as a finite fraction per voxel (zeros floored at ``NC_FLOOR``), or None."""
    if noise_ceiling is None:
        return None
    nc = check_noise_ceiling(noise_ceiling, n_vox)
    if not np.isfinite(nc).all():
        raise DataValidationError(None, "noise_ceiling", "contains NaN; expected finite values")
    return np.where(nc == 0.0, NC_FLOOR, nc)


def _group_matrix(masks: Mapping[str, np.ndarray], n_vox: int) -> tuple[list[str], np.ndarray, np.ndarray]:
    """Voxel groups as columns: all voxels first, then one per ROI mask.

    Returns
    -------
    names : list of str
        ``"__all__"`` then the mask names.
    G : array of shape (n_voxels, n_groups)
        1.0 where the voxel belongs to the group.
    n_in : array of shape (n_groups,)
        Voxels per group (all positive).
    """
    names = ["__all__", *masks]
    G = np.stack([np.ones(n_vox, dtype=bool), *masks.values()], axis=1).astype(np.float64)
    n_in = G.sum(axis=0)
    if (n_in == 0).any():
        empty = [names[i] for i in np.flatnonzero(n_in == 0)]
        raise DataValidationError(None, "roi_masks", f"ROIs {empty} select no voxel; expected at least one")
    return names, G, n_in


def _resample_counts(n_img: int, n_boot: int, seed: int) -> np.ndarray:
    """How often each image is drawn in each resample (with replacement): array of shape (n_boot, n_images)."""
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, n_img, size=(n_boot, n_img))
    C = np.zeros((n_boot, n_img), dtype=np.float64)
    np.add.at(C, (np.repeat(np.arange(n_boot), n_img), idx.ravel()), 1.0)
    return C


def _resampled_group_means(y_true: np.ndarray, preds: list[np.ndarray], C: np.ndarray, G: np.ndarray,
                           nc: np.ndarray | None) -> dict[str, list[np.ndarray]]:
    """Mean over each voxel group of every model's r (and accuracy) on every resample of the images.

    Parameters
    ----------
    y_true : array of shape (n_images, n_voxels)
    preds : list of arrays of shape (n_images, n_voxels)
    C : array of shape (n_boot, n_images)
        Resample counts (:func:`_resample_counts`); the same for all models, so comparisons are paired.
    G : array of shape (n_voxels, n_groups)
        Group membership (:func:`_group_matrix`).
    nc : array of shape (n_voxels,) or None
        Noise ceiling (fraction, floored); adds ``"accuracy"`` (percent).

    Returns
    -------
    dict
        ``{"r": [array (n_boot, n_groups) per model], "accuracy": [...]}`` (``"accuracy"`` empty without ``nc``).
    """
    n_img, n_vox = y_true.shape
    n_boot, n_groups = C.shape[0], G.shape[1]
    n_in = G.sum(axis=0)
    out: dict[str, list[np.ndarray]] = {"r": [np.zeros((n_boot, n_groups)) for _ in preds],
                                        "accuracy": [np.zeros((n_boot, n_groups)) for _ in preds] if nc is not None
                                        else []}
    cols = 2 + 3 * len(preds)
    step = max(1, _BLOCK_BYTES // (8 * cols * max(n_img, n_boot)))
    for s in range(0, n_vox, step):
        sl = slice(s, min(s + step, n_vox))
        y = _zscore(y_true[:, sl])
        zs = [_zscore(p[:, sl]) for p in preds]
        w = y.shape[1]
        S = C @ np.concatenate([y, y * y, *(part for z in zs for part in (z, z * z, y * z))], axis=1)
        sy, syy = S[:, :w], S[:, w:2 * w]
        for k in range(len(preds)):
            base = (2 + 3 * k) * w
            sp, spp, syp = S[:, base:base + w], S[:, base + w:base + 2 * w], S[:, base + 2 * w:base + 3 * w]
            r = _weighted_r(sy, syy, sp, spp, syp, n_img)
            out["r"][k] += (r @ G[sl]) / n_in
            if nc is not None:
                acc = np.minimum(100.0 * np.maximum(r, 0.0) ** 2 / nc[sl], 100.0)
                out["accuracy"][k] += (acc @ G[sl]) / n_in
        del S
    return out


def bootstrap_p(observed: float, boot: np.ndarray) -> float:
    """Two-sided bootstrap p of an observed difference: twice the (+1 smoothed) fraction of resampled differences
    ``boot`` (array of shape (n_boot,)) on the far side of 0; 1 when ``observed`` is 0."""
    n = boot.size
    if observed > 0:
        k = int(np.sum(boot <= 0))
    elif observed < 0:
        k = int(np.sum(boot >= 0))
    else:
        k = n
    return float(min(1.0, 2.0 * (k + 1) / (n + 1)))


def _comparison(a_obs: float, b_obs: float, boot_a: np.ndarray, boot_b: np.ndarray) -> dict[str, float]:
    diff = boot_b - boot_a
    lo, hi = np.percentile(diff, [2.5, 97.5])
    return {"a": float(a_obs), "b": float(b_obs), "diff": float(b_obs - a_obs), "ci_low": float(lo),
            "ci_high": float(hi), "p_value": bootstrap_p(b_obs - a_obs, diff)}


def paired_bootstrap(y_true: Any, pred_a: Any, pred_b: Any, n_boot: int = 1000, seed: int = 0,
                     noise_ceiling: Any = None, roi_masks: Mapping[str, Any] | None = None) -> dict[str, Any]:
    """Paired bootstrap over test images: is model b better than model a?

    Parameters
    ----------
    y_true : array of shape (n_images, n_voxels)
        Measured test responses.
    pred_a, pred_b : arrays of shape (n_images, n_voxels)
        Predictions of the two models (a is the reference, b the challenger).
    n_boot : int
        Number of resamples of the test images (with replacement; the same resample for both models).
    seed : int
        Seed of the resampling.
    noise_ceiling : array of shape (n_voxels,), optional
        Explainable variance as a fraction (0–1); adds the comparison of mean noise-normalised accuracy (%).
    roi_masks : dict of str to bool array of shape (n_voxels,), optional
        Adds the same comparison restricted to each ROI.

    Returns
    -------
    dict
        ``{"n_boot", "seed", "n_images", "overall": group, "per_roi": {roi: group}}`` where ``group`` is
        ``{"n_voxels", "fraction_improved", "r": cmp, "accuracy": cmp}`` (``"accuracy"`` only with a ceiling).
        ``fraction_improved`` is the fraction of voxels with ``r_b > r_a`` on the full test set. ``cmp`` holds,
        for the mean over the group's voxels of r (or accuracy): ``a`` and ``b`` (observed), ``diff`` = b − a,
        ``ci_low``/``ci_high`` (2.5 and 97.5 percentiles of the resampled differences) and ``p_value``
        (two-sided: ``min(1, 2 (k + 1) / (n_boot + 1))`` with ``k`` the resampled differences on the other side of
        0 from the observed one, or all of them when it is exactly 0). Within a resample, a voxel that happens to
        be constant gets r = 0.
    """
    yt, pa, pb = _check_inputs(y_true, pred_a, pred_b)
    n_img, n_vox = yt.shape
    n_boot = _check_n_boot(n_boot)
    masks = check_roi_masks(roi_masks, n_vox)
    nc = _checked_ceiling(noise_ceiling, n_vox)

    names, G, _ = _group_matrix(masks, n_vox)
    C = _resample_counts(n_img, n_boot, seed)
    boot = _resampled_group_means(yt, [pa, pb], C, G, nc)
    sums = {"ra": boot["r"][0], "rb": boot["r"][1]}
    if nc is not None:
        sums["acc_a"], sums["acc_b"] = boot["accuracy"][0], boot["accuracy"][1]

    r_a, r_b = pearson_r(yt, pa), pearson_r(yt, pb)
    acc_a = acc_b = None
    if nc is not None:
        acc_a = noise_normalized_accuracy(r_a, nc)
        acc_b = noise_normalized_accuracy(r_b, nc)

    def group(j: int) -> dict[str, Any]:
        m = G[:, j].astype(bool)
        out: dict[str, Any] = {
            "n_voxels": int(m.sum()),
            "fraction_improved": float(np.mean(r_b[m] > r_a[m])),
            "r": _comparison(r_a[m].mean(), r_b[m].mean(), sums["ra"][:, j], sums["rb"][:, j]),
        }
        if acc_a is not None and acc_b is not None:
            out["accuracy"] = _comparison(acc_a[m].mean(), acc_b[m].mean(),
                                          sums["acc_a"][:, j], sums["acc_b"][:, j])
        return out

    return {
        "n_boot": n_boot,
        "seed": int(seed),
        "n_images": int(n_img),
        "overall": group(0),
        "per_roi": {name: group(j) for j, name in enumerate(names) if j > 0},
    }


def bootstrap_ci(y_true: Any, pred: Any, n_boot: int = 1000, seed: int = 0, noise_ceiling: Any = None,
                 groups: Mapping[str, Any] | None = None, confidence: float = 0.95) -> dict[str, Any]:
    """Bootstrap confidence intervals over test images of one model's mean r (and accuracy) per voxel group.

    The same resampling as :func:`paired_bootstrap` (images drawn with replacement, every voxel's r recomputed
    on each resample), for a single model: the interval says how much the mean would move with other test images.

    Parameters
    ----------
    y_true : array of shape (n_images, n_voxels)
        Measured test responses.
    pred : array of shape (n_images, n_voxels)
        Predictions of the model.
    n_boot : int
        Resamples of the test images.
    seed : int
        Seed of the resampling (the same seed gives the same resamples as :func:`paired_bootstrap`).
    noise_ceiling : array of shape (n_voxels,), optional
        Explainable variance as a fraction (0–1); adds intervals of the mean noise-normalised accuracy (%).
    groups : dict of str to bool array of shape (n_voxels,), optional
        Voxel groups (ROIs, hemispheres, ROI × hemisphere) that get their own interval.
    confidence : float
        Coverage (0.95: 2.5th to 97.5th percentile of the resampled means).

    Returns
    -------
    dict
        ``{"n_boot", "seed", "n_images", "confidence", "overall": group, "per_group": {name: group}}`` where
        ``group`` is ``{"n_voxels", "r": {"mean", "ci_low", "ci_high"}, "accuracy": {...}}`` (``"accuracy"`` only
        with a ceiling); ``mean`` is the observed mean on all test images.
    """
    yt, p, _ = _check_inputs(y_true, pred, pred)
    n_img, n_vox = yt.shape
    n_boot = _check_n_boot(n_boot)
    if not 0.0 < confidence < 1.0:
        raise DataValidationError(None, "confidence", f"{confidence}; expected a number between 0 and 1")
    masks = check_roi_masks(groups, n_vox)
    nc = _checked_ceiling(noise_ceiling, n_vox)
    names, G, _ = _group_matrix(masks, n_vox)
    boot = _resampled_group_means(yt, [p], _resample_counts(n_img, n_boot, seed), G, nc)
    r = pearson_r(yt, p)
    acc = noise_normalized_accuracy(r, nc) if nc is not None else None
    alpha = 100.0 * (1.0 - confidence) / 2.0

    def interval(observed: np.ndarray, resampled: np.ndarray) -> dict[str, float]:
        lo, hi = np.percentile(resampled, [alpha, 100.0 - alpha])
        return {"mean": float(observed.mean()), "ci_low": float(lo), "ci_high": float(hi)}

    def group(j: int) -> dict[str, Any]:
        m = G[:, j].astype(bool)
        out: dict[str, Any] = {"n_voxels": int(m.sum()), "r": interval(r[m], boot["r"][0][:, j])}
        if acc is not None:
            out["accuracy"] = interval(acc[m], boot["accuracy"][0][:, j])
        return out

    return {"n_boot": n_boot, "seed": int(seed), "n_images": int(n_img), "confidence": float(confidence),
            "overall": group(0), "per_group": {name: group(j) for j, name in enumerate(names) if j > 0}}
