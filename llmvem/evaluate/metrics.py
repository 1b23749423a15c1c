"""Per-voxel prediction metrics and their summaries.

All functions take responses as arrays of shape ``(n_samples, n_voxels)`` (test images × voxels or neurons) and
return one value per voxel. Sums are accumulated in float64 whatever the input dtype, in blocks of voxels so a
float32 ``10,000 × 40,000`` response matrix never gets a full float64 copy.

Conventions
-----------
- A voxel whose responses (or predictions) are constant over samples has no defined correlation; its Pearson r
  is reported as ``0.0`` (not NaN), so it counts as "not predicted" in means. The same voxel's explained
  variance is ``0.0`` when ``y_true`` is constant.
- NaN in the inputs propagates to that voxel's value; the summaries are NaN-safe (they ignore NaN voxels).
- Noise ceilings are a *fraction of variance* (r² units, 0–1), as computed by :mod:`llmvem.data.noise_ceiling`.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError

#: Bytes of float64 scratch memory one block of voxels may use (per operand).
_BLOCK_BYTES = 32 * 2**20

#: Noise ceilings equal to 0 are replaced by this value (Algonauts 2023 challenge code does the same).
NC_FLOOR = 1e-14


def _as_2d(name: str, a: Any) -> np.ndarray:
    arr = np.asarray(a)
    if arr.ndim == 1:
        arr = arr[:, None]
    if arr.ndim != 2:
        raise DataValidationError(None, name, f"expected shape (n_samples, n_voxels), got {arr.shape}")
    if not (np.issubdtype(arr.dtype, np.number) or arr.dtype == bool):
        raise DataValidationError(None, name, f"expected numbers, got dtype {arr.dtype}")
    return arr


def _check_pair(y_true: Any, y_pred: Any) -> tuple[np.ndarray, np.ndarray]:
    yt = _as_2d("y_true", y_true)
    yp = _as_2d("y_pred", y_pred)
    if yt.shape != yp.shape:
        raise DataValidationError(
            None, "y_pred", f"expected the shape of y_true {yt.shape} (n_samples, n_voxels), got {yp.shape}")
    if yt.shape[0] < 2:
        raise DataValidationError(None, "y_true", f"expected at least 2 samples (rows), got shape {yt.shape}")
    return yt, yp


def _voxel_blocks(n_samples: int, n_voxels: int) -> list[slice]:
    step = max(1, _BLOCK_BYTES // (8 * max(n_samples, 1)))
    return [slice(s, min(s + step, n_voxels)) for s in range(0, n_voxels, step)]


def _constant_columns(a: np.ndarray) -> np.ndarray:
    # Exact test (max == min) rather than a variance threshold: the float64 mean of identical float32 values
    # need not equal them, which would leave ~1e-17 residuals and a meaningless ±1 correlation.
    return np.max(a, axis=0) == np.min(a, axis=0)


def pearson_r(y_true: Any, y_pred: Any) -> np.ndarray:
    """Pearson correlation between true and predicted responses, per voxel.

    Parameters
    ----------
    y_true : array of shape (n_samples, n_voxels)
        Measured responses (1-D arrays are treated as one voxel).
    y_pred : array of shape (n_samples, n_voxels)
        Predicted responses.

    Returns
    -------
    r : array of shape (n_voxels,), float64
        Correlation over samples for each voxel, in [-1, 1]. ``0.0`` where either column is constant; NaN where
        a column contains NaN.
    """
    yt, yp = _check_pair(y_true, y_pred)
    n, v = yt.shape
    out = np.empty(v, dtype=np.float64)
    for sl in _voxel_blocks(n, v):
        a = yt[:, sl].astype(np.float64)
        b = yp[:, sl].astype(np.float64)
        const = _constant_columns(a) | _constant_columns(b)
        a -= a.mean(axis=0)
        b -= b.mean(axis=0)
        num = np.einsum("ij,ij->j", a, b)
        den = np.sqrt(np.einsum("ij,ij->j", a, a) * np.einsum("ij,ij->j", b, b))
        with np.errstate(invalid="ignore", divide="ignore"):
            r = num / den
        r[const & ~np.isnan(den)] = 0.0
        out[sl] = np.clip(r, -1.0, 1.0)
    return out


def explained_variance(y_true: Any, y_pred: Any) -> np.ndarray:
    """Coefficient of determination ``1 - SSE / SS`` per voxel (scikit-learn's ``r2_score``, not clipped).

    Parameters
    ----------
    y_true : array of shape (n_samples, n_voxels)
    y_pred : array of shape (n_samples, n_voxels)

    Returns
    -------
    array of shape (n_voxels,), float64
        ``1 - Σ(y - ŷ)² / Σ(y - ȳ)²``; can be negative for predictions worse than the mean. ``0.0`` for voxels
        whose ``y_true`` is constant.
    """
    yt, yp = _check_pair(y_true, y_pred)
    n, v = yt.shape
    out = np.empty(v, dtype=np.float64)
    for sl in _voxel_blocks(n, v):
        a = yt[:, sl].astype(np.float64)
        err = a - yp[:, sl]
        const = _constant_columns(a)
        a -= a.mean(axis=0)
        sse = np.einsum("ij,ij->j", err, err)
        ss = np.einsum("ij,ij->j", a, a)
        with np.errstate(invalid="ignore", divide="ignore"):
            ev = 1.0 - sse / ss
        ev[const & np.isfinite(ss)] = 0.0
        out[sl] = ev
    return out


def check_noise_ceiling(noise_ceiling: Any, n_voxels: int | None = None, name: str = "noise_ceiling") -> np.ndarray:
    """Validate a noise ceiling given as a fraction of variance and return it as float64.

    Raises
    ------
    DataValidationError
        When the shape is not ``(n_voxels,)`` or a finite value lies outside [0, 1] (a ceiling in percent is the
        usual cause; divide it by 100).
    """
    nc = np.asarray(noise_ceiling, dtype=np.float64)
    if nc.ndim != 1 or (n_voxels is not None and nc.shape[0] != n_voxels):
        expected = f"({n_voxels},)" if n_voxels is not None else "(n_voxels,)"
        raise DataValidationError(None, name, f"expected shape {expected}, got {nc.shape}")
    finite = nc[np.isfinite(nc)]
    if finite.size and (finite.min() < 0.0 or finite.max() > 1.0 + 1e-6):
        raise DataValidationError(
            None, name,
            f"expected a fraction of explainable variance in [0, 1], got values in [{finite.min():.4g}, "
            f"{finite.max():.4g}]; if the ceiling is in percent, divide it by 100")
    return nc


def noise_normalized_accuracy(r: Any, noise_ceiling: Any) -> np.ndarray:
    """Noise-normalised encoding accuracy (Algonauts 2023), in percent of the noise ceiling.

    ``100 · r² / NC`` per voxel, with ``r < 0`` set to 0 first, ``NC = 0`` replaced by :data:`NC_FLOOR`
    (1e-14), and the result capped at 100.

    Parameters
    ----------
    r : array of shape (n_voxels,)
        Pearson correlation between measured and predicted test responses.
    noise_ceiling : array of shape (n_voxels,)
        Explainable variance as a fraction (0–1, r² units), e.g. from
        :func:`llmvem.data.noise_ceiling.algonauts_noise_ceiling`. Not percent.

    Returns
    -------
    array of shape (n_voxels,), float64
        Percent in [0, 100]; NaN where ``r`` or the ceiling is NaN.
    """
    r_arr = np.asarray(r, dtype=np.float64)
    if r_arr.ndim != 1:
        raise DataValidationError(None, "r", f"expected shape (n_voxels,), got {r_arr.shape}")
    nc = check_noise_ceiling(noise_ceiling, r_arr.shape[0])
    nc = np.where(nc == 0.0, NC_FLOOR, nc)
    r_pos = np.where(r_arr < 0.0, 0.0, r_arr)
    with np.errstate(over="ignore"):
        acc = 100.0 * r_pos**2 / nc
    return np.minimum(acc, 100.0)


# ----------------------------------------------------------------------------------------------- summaries
def _finite_stats(x: np.ndarray) -> tuple[float | None, float | None]:
    x = x[np.isfinite(x)]
    if x.size == 0:
        return None, None
    return float(np.mean(x)), float(np.median(x))


def check_roi_masks(roi_masks: Mapping[str, Any] | None, n_voxels: int) -> dict[str, np.ndarray]:
    """Validate ROI masks: each a bool (or 0/1) array of shape ``(n_voxels,)``; returns bool arrays."""
    out: dict[str, np.ndarray] = {}
    for name, mask in (roi_masks or {}).items():
        m = np.asarray(mask)
        if m.shape != (n_voxels,):
            raise DataValidationError(None, f"roi_masks[{name!r}]", f"expected shape ({n_voxels},), got {m.shape}")
        if m.dtype != bool:
            if not np.issubdtype(m.dtype, np.number) or not np.isin(m, (0, 1)).all():
                raise DataValidationError(
                    None, f"roi_masks[{name!r}]", f"expected a boolean mask, got dtype {m.dtype} with other values")
            m = m.astype(bool)
        out[str(name)] = m
    return out


def check_hemisphere(hemisphere: Any, n_voxels: int) -> np.ndarray | None:
    """Validate a hemisphere label array of shape ``(n_voxels,)`` holding ``"lh"``/``"rh"``."""
    if hemisphere is None:
        return None
    h = np.asarray(hemisphere).astype(str)
    if h.shape != (n_voxels,):
        raise DataValidationError(None, "hemisphere", f"expected shape ({n_voxels},), got {h.shape}")
    bad = sorted(set(np.unique(h)) - {"lh", "rh"})
    if bad:
        raise DataValidationError(None, "hemisphere", f"expected labels 'lh' or 'rh', got {bad[:5]}")
    return h


def summarize(values: Any, roi_masks: Mapping[str, Any] | None = None, hemisphere: Any = None) -> dict[str, Any]:
    """Mean and median of a per-voxel value overall, per ROI, per hemisphere and per ROI × hemisphere.

    Parameters
    ----------
    values : array of shape (n_voxels,)
        Any per-voxel value (r, accuracy...). NaN voxels are ignored in the statistics.
    roi_masks : dict of str to bool array of shape (n_voxels,), optional
    hemisphere : array of shape (n_voxels,) of ``"lh"``/``"rh"``, optional

    Returns
    -------
    dict
        ``{"mean", "median", "n_voxels", "per_roi": {roi: {...}}, "per_hemisphere": {"lh": {...}, ...},
        "per_roi_hemisphere": {roi: {"lh": {...}, ...}}}``, each inner dict with the same three keys. Values are
        Python floats, or ``None`` where no finite voxel exists (so the dict serialises to JSON as is).
        ``n_voxels`` counts all voxels of the group, NaN included.
    """
    v = np.asarray(values, dtype=np.float64)
    if v.ndim != 1:
        raise DataValidationError(None, "values", f"expected shape (n_voxels,), got {v.shape}")
    masks = check_roi_masks(roi_masks, v.shape[0])
    hemi = check_hemisphere(hemisphere, v.shape[0])

    def stats(mask: np.ndarray | None) -> dict[str, Any]:
        x = v if mask is None else v[mask]
        mean, median = _finite_stats(x)
        return {"mean": mean, "median": median, "n_voxels": int(x.size)}

    out: dict[str, Any] = stats(None)
    out["per_roi"] = {name: stats(m) for name, m in masks.items()}
    out["per_hemisphere"] = {}
    out["per_roi_hemisphere"] = {}
    if hemi is not None:
        out["per_hemisphere"] = {h: stats(hemi == h) for h in ("lh", "rh") if (hemi == h).any()}
        out["per_roi_hemisphere"] = {
            name: {h: stats(m & (hemi == h)) for h in ("lh", "rh") if (m & (hemi == h)).any()}
            for name, m in masks.items()
        }
    return out


def _merge(r_sum: dict[str, Any], acc_sum: dict[str, Any] | None) -> dict[str, Any]:
    out = {"mean_r": r_sum["mean"], "median_r": r_sum["median"]}
    if acc_sum is not None:
        out["mean_accuracy"] = acc_sum["mean"]
        out["median_accuracy"] = acc_sum["median"]
    out["n_voxels"] = r_sum["n_voxels"]
    return out


def evaluate_predictions(y_true: Any, y_pred: Any, noise_ceiling: Any = None,
                         roi_masks: Mapping[str, Any] | None = None, hemisphere: Any = None) -> dict[str, Any]:
    """Score predicted responses against measured ones: per-voxel arrays and a JSON-ready summary.

    Parameters
    ----------
    y_true : array of shape (n_samples, n_voxels)
        Measured test responses (averaged over repeats).
    y_pred : array of shape (n_samples, n_voxels)
        Predicted test responses.
    noise_ceiling : array of shape (n_voxels,), optional
        Explainable variance as a fraction (0–1). When given, the noise-normalised accuracy (percent) is added.
    roi_masks : dict of str to bool array of shape (n_voxels,), optional
    hemisphere : array of shape (n_voxels,) of ``"lh"``/``"rh"``, optional

    Returns
    -------
    dict
        ``"r"``: array (n_voxels,) of Pearson r; ``"accuracy"``: array (n_voxels,) of noise-normalised accuracy
        in percent, or ``None`` without a ceiling; ``"summary"``: dict with ``mean_r``, ``median_r``,
        ``n_voxels``, ``mean_accuracy`` and ``median_accuracy`` (only with a ceiling), ``per_roi``
        {roi: {mean_r, median_r, [mean_accuracy, median_accuracy,] n_voxels}}, ``per_hemisphere``
        {"lh"/"rh": {...}} and ``per_roi_hemisphere`` {roi: {"lh"/"rh": {...}}}.
    """
    r = pearson_r(y_true, y_pred)
    acc = None if noise_ceiling is None else noise_normalized_accuracy(r, noise_ceiling)
    r_sum = summarize(r, roi_masks, hemisphere)
    acc_sum = None if acc is None else summarize(acc, roi_masks, hemisphere)

    summary = _merge(r_sum, acc_sum)
    summary["per_roi"] = {
        name: _merge(r_sum["per_roi"][name], None if acc_sum is None else acc_sum["per_roi"][name])
        for name in r_sum["per_roi"]
    }
    summary["per_hemisphere"] = {
        h: _merge(r_sum["per_hemisphere"][h], None if acc_sum is None else acc_sum["per_hemisphere"][h])
        for h in r_sum["per_hemisphere"]
    }
    summary["per_roi_hemisphere"] = {
        name: {
            h: _merge(hs, None if acc_sum is None else acc_sum["per_roi_hemisphere"][name][h])
            for h, hs in by_h.items()
        }
        for name, by_h in r_sum["per_roi_hemisphere"].items()
    }
    return {"r": r, "accuracy": acc, "summary": summary}
