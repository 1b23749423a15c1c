"""Noise ceilings: how much of each voxel's (or neuron's) response variance a perfect model could explain.

Both estimators return the ceiling as a *fraction of variance* (r² units, 0–1) of the response averaged over
repeats, which is what :func:`llmvem.evaluate.metrics.noise_normalized_accuracy` divides by.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from llmvem.errors import DataValidationError

if TYPE_CHECKING:
    from llmvem.data.dataset import EncodingDataset


def _check_repeats(repeats: np.ndarray) -> np.ndarray:
    rep = np.asarray(repeats, dtype=np.float64)
    if rep.ndim != 3:
        raise DataValidationError(None, "repeats", f"expected shape (n_images, n_repeats, n_voxels), got {rep.shape}")
    return rep


def ncsnr(repeats: np.ndarray) -> np.ndarray:
    """Noise-ceiling signal-to-noise ratio (NSD / Algonauts 2023).

    Parameters
    ----------
    repeats : array of shape (n_images, n_repeats, n_voxels)
        Single-trial responses; NaN where an image had fewer repeats.

    Returns
    -------
    array of shape (n_voxels,)
        ``sqrt(max(0, var_total - var_noise) / var_noise)``, where ``var_noise`` is the mean over images (with at
        least two repeats) of the across-repeat variance (ddof=1) and ``var_total`` the variance of all single
        trials. For responses z-scored per voxel this is NSD's ``sqrt(1 - σ²_noise) / σ_noise``.
    """
    rep = _check_repeats(repeats)
    finite = np.isfinite(rep)
    n_valid = finite.sum(axis=1)  # (n_images, n_voxels)
    multi = n_valid >= 2
    if not multi.any():
        raise DataValidationError(None, "repeats", "no image has two or more repeats; cannot estimate noise")
    # Explicit sums instead of nanvar/nanmean: images with < 2 repeats are left out without RuntimeWarnings.
    filled = np.where(finite, rep, 0.0)
    mean = filled.sum(axis=1) / np.maximum(n_valid, 1)
    sq_dev = (np.where(finite, rep - mean[:, None, :], 0.0) ** 2).sum(axis=1)
    var_per_image = sq_dev / np.maximum(n_valid - 1, 1)
    n_multi = multi.sum(axis=0)
    var_noise = np.where(n_multi > 0, (var_per_image * multi).sum(axis=0) / np.maximum(n_multi, 1), np.nan)
    n_total = finite.sum(axis=(0, 1))
    grand = filled.sum(axis=(0, 1)) / np.maximum(n_total, 1)
    var_total = (np.where(finite, rep - grand, 0.0) ** 2).sum(axis=(0, 1)) / np.maximum(n_total - 1, 1)
    var_signal = np.maximum(var_total - var_noise, 0.0)
    # No noise: infinite SNR if there is signal, 0 for a constant voxel (nothing to explain); NaN where no
    # image of the voxel has two repeats (noise unknown).
    out = np.full(rep.shape[-1], np.nan)
    has_noise = var_noise > 0
    out[has_noise] = np.sqrt(var_signal[has_noise] / var_noise[has_noise])
    no_noise = var_noise == 0
    out[no_noise] = np.where(var_signal[no_noise] > 0, np.inf, 0.0)
    # A voxel with one value throughout has nothing to explain; without this, rounding in the means above
    # (x·n/n ≠ x) leaves ~1e-33 "variances" whose ratio is arbitrary (a constant voxel got a ceiling of 1).
    lo = np.where(finite, rep, np.inf).min(axis=(0, 1))
    hi = np.where(finite, rep, -np.inf).max(axis=(0, 1))
    out[lo == hi] = 0.0
    return out


def noise_ceiling_from_ncsnr(snr: np.ndarray, n_repeats: np.ndarray | list[int]) -> np.ndarray:
    """Algonauts 2023 noise ceiling from the ncsnr and the number of repeats of each test image.

    ``NC = ncsnr² / (ncsnr² + (A/3 + B/2 + C) / (A + B + C))`` for A, B, C test images shown 3, 2 and 1 times;
    generalised to any repeat counts as ``mean(1 / n_repeats)``. Returned as a fraction (0–1), not percent.
    """
    n = np.asarray(n_repeats, dtype=np.float64)
    if n.ndim != 1 or (n < 1).any():
        raise DataValidationError(None, "n_repeats", "expected a 1-D array of repeat counts >= 1")
    k = float(np.mean(1.0 / n))
    s2 = np.asarray(snr, dtype=np.float64) ** 2
    with np.errstate(invalid="ignore"):
        nc = np.where(np.isinf(s2), 1.0, s2 / (s2 + k))
    return nc


def algonauts_noise_ceiling(repeats: np.ndarray) -> np.ndarray:
    """Noise ceiling (fraction, shape (n_voxels,)) of the repeat-averaged responses, Algonauts 2023 formula."""
    rep = _check_repeats(repeats)
    n_rep = np.sum(np.isfinite(rep[:, :, 0]), axis=1)
    return noise_ceiling_from_ncsnr(ncsnr(rep), np.maximum(n_rep, 1))


def spearman_brown(r: np.ndarray, factor: float = 2.0) -> np.ndarray:
    """Spearman–Brown prophecy: reliability of a measure ``factor`` times longer, ``f·r / (1 + (f-1)·r)``."""
    r = np.asarray(r, dtype=np.float64)
    return factor * r / (1.0 + (factor - 1.0) * r)


def split_half_noise_ceiling(repeats: np.ndarray, n_splits: int = 20, seed: int = 0) -> np.ndarray:
    """Split-half reliability with Spearman–Brown correction, for spike data with NaN-padded repeats.

    For each of ``n_splits`` random splits, each image's available repeats are shuffled and divided in two
    halves of ``n // 2`` repeats (one is left out when ``n`` is odd); the two half-means are correlated across
    images (per neuron), the mean correlation is stepped up with Spearman–Brown to the full number of repeats
    (factor ``mean(1 / (n // 2)) / mean(1 / n)``, 2 for equal even counts), and negative values are set to 0.

    Returns
    -------
    array of shape (n_voxels,)
        Estimated reliability of the repeat-averaged response (fraction of explainable variance, r² units).
    """
    rep = _check_repeats(repeats)
    n_img, n_rep, n_vox = rep.shape
    finite = np.isfinite(rep).all(axis=2)  # (n_images, n_repeats): a repeat is present for all neurons
    counts = finite.sum(axis=1)
    usable = counts >= 2
    if usable.sum() < 3:
        raise DataValidationError(None, "repeats", "fewer than 3 images with >= 2 repeats; cannot split halves")
    rng = np.random.default_rng(seed)
    rs = np.zeros((n_splits, n_vox))
    for s in range(n_splits):
        a = np.empty((int(usable.sum()), n_vox))
        b = np.empty_like(a)
        for row, i in enumerate(np.flatnonzero(usable)):
            avail = np.flatnonzero(finite[i])
            rng.shuffle(avail)
            h = len(avail) // 2
            a[row] = rep[i, avail[:h]].mean(axis=0)
            b[row] = rep[i, avail[h : 2 * h]].mean(axis=0)
        a -= a.mean(axis=0)
        b -= b.mean(axis=0)
        denom = np.sqrt((a * a).sum(axis=0) * (b * b).sum(axis=0))
        with np.errstate(invalid="ignore", divide="ignore"):
            rs[s] = np.where(denom > 0, (a * b).sum(axis=0) / denom, 0.0)
    # Negative split-half agreement means no reliability: clip before stepping up, because Spearman-Brown with
    # factor f > 2 (odd repeat counts) turns r < -1/(f-1) into a large positive value (r = -0.6, f = 3 -> 9).
    r_half = np.maximum(rs.mean(axis=0), 0.0)
    # Each half averages h = n // 2 repeats; the averaged response has noise variance ∝ mean(1/n). Step up by
    # the ratio of the two (2 when every image has the same even count), so odd counts are not under-credited.
    n_used = counts[usable].astype(np.float64)
    factor = float(np.mean(1.0 / np.floor(n_used / 2)) / np.mean(1.0 / n_used))
    return np.clip(spearman_brown(r_half, factor), 0.0, 1.0)


#: ``EncodingDataset.meta`` keys read by :func:`held_out_noise_ceiling`: the estimator a loader uses for its
#: repeats (``"algonauts"`` default, ``"split_half"`` for spike data), and where a ceiling that is not computed
#: from held-out repeats came from (a sentence for the report).
METHOD_KEY, SOURCE_KEY = "noise_ceiling_method", "noise_ceiling_source"


def held_out_noise_ceiling(dataset: EncodingDataset) -> tuple[np.ndarray | None, str]:
    """The noise ceiling of the images actually held out for evaluation, and a sentence saying where it came from.

    When the test split has single-trial repeats (at least two for some image), the ceiling is computed from
    those repeats only (:func:`algonauts_noise_ceiling`, or :func:`split_half_noise_ceiling` when
    ``meta["noise_ceiling_method"] == "split_half"``), so it describes the test images and not the whole set.
    Otherwise the dataset's own ``noise_ceiling`` is used and the sentence says it is a whole-set ceiling (or
    repeats its ``meta["noise_ceiling_source"]``), e.g. the NSD ceilings shipped with the Algonauts challenge
    folders. A ceiling given in a file (``meta["noise_ceiling_source"]`` set by the loader) wins over repeats.

    Parameters
    ----------
    dataset : EncodingDataset

    Returns
    -------
    noise_ceiling : array of shape (n_voxels,), fraction of variance (0-1), or None
    source : str
        E.g. ``"held-out repeats: 40 test images, Algonauts 2023 formula"`` or ``"none: ..."``.
    """
    given = dataset.meta.get(SOURCE_KEY)
    rep = dataset.test.repeats
    if rep is not None and not given:
        n_rep = np.isfinite(rep).all(axis=2).sum(axis=1)  # repeats present for every voxel, per image
        method = dataset.meta.get(METHOD_KEY, "algonauts")
        enough = (n_rep >= 2).sum() >= 3 if method == "split_half" else (n_rep >= 2).any()
        if enough:
            if method == "split_half":
                nc = split_half_noise_ceiling(rep, seed=int(dataset.meta.get("seed", 0)))
                name = "split-half reliability, Spearman-Brown corrected"
            else:
                nc = algonauts_noise_ceiling(rep)
                name = "Algonauts 2023 formula"
            if np.isfinite(nc).all():
                return np.clip(nc, 0.0, 1.0), f"held-out repeats: {len(rep)} test images, {name}"
    if dataset.noise_ceiling is None:
        return None, "none: the data have no repeats of the test images and no noise ceiling"
    return dataset.noise_ceiling, given or ("whole set: the ceiling supplied with the data, not computed for the "
                                            "held-out test images")
