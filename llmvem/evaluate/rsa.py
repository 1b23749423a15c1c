"""Representational similarity analysis: RDMs, their comparison, Algonauts 2019 scores and noise ceilings.

An RDM (representational dissimilarity matrix) of ``n`` stimuli is a symmetric ``(n, n)`` matrix with a zero
diagonal; its *condensed* form is the upper triangle above the diagonal, row by row (``scipy.spatial.distance.
squareform`` order), of length ``n (n - 1) / 2``. Functions accept either form where it makes sense.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np
from scipy import stats

from llmvem.errors import DataValidationError

Method = Literal["spearman", "pearson"]


def rdm(patterns: Any) -> np.ndarray:
    """Correlation-distance RDM: ``1 - Pearson r`` between the response patterns of every pair of stimuli.

    Parameters
    ----------
    patterns : array of shape (n_stimuli, n_features) or (n_stimuli, C, H, W)
        One row per stimulus (voxels, neurons or model units as features). Feature grids and full feature maps
        (n_stimuli, C, H, W) are flattened, so the RDM compares stimuli unit by unit at every position.

    Returns
    -------
    array of shape (n_stimuli, n_stimuli), float64
        Symmetric, exactly zero on the diagonal, values in [0, 2].

    Raises
    ------
    DataValidationError
        When ``patterns`` is not 2-D with at least 2 stimuli and 2 features, holds NaN/Inf, or a stimulus has the
        same value on every feature (its correlation is undefined).
    """
    x = np.asarray(patterns, dtype=np.float64)
    if x.ndim > 2 and x.shape[0] >= 2:
        x = x.reshape(x.shape[0], -1)
    if x.ndim != 2 or x.shape[0] < 2 or x.shape[1] < 2:
        raise DataValidationError(
            None, "patterns", f"expected shape (n_stimuli >= 2, n_features >= 2) or (n_stimuli, C, H, W), got "
            f"{np.shape(patterns)}")
    if not np.isfinite(x).all():
        raise DataValidationError(None, "patterns", "contains NaN or Inf; expected finite values")
    const = np.flatnonzero(np.max(x, axis=1) == np.min(x, axis=1))
    if const.size:
        raise DataValidationError(
            None, "patterns", f"stimulus rows {const[:5].tolist()} are constant over features; "
            "their correlation distance is undefined")
    x = x - x.mean(axis=1, keepdims=True)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    d = 1.0 - x @ x.T
    d = (d + d.T) / 2.0
    np.fill_diagonal(d, 0.0)
    return np.clip(d, 0.0, 2.0)


def upper(rdm_matrix: Any) -> np.ndarray:
    """Condensed upper triangle (above the diagonal) of a square RDM, in ``scipy.spatial.distance.squareform``
    order.

    Parameters
    ----------
    rdm_matrix : array of shape (n, n)

    Returns
    -------
    array of shape (n * (n - 1) // 2,)
    """
    m = np.asarray(rdm_matrix)
    if m.ndim != 2 or m.shape[0] != m.shape[1]:
        raise DataValidationError(None, "rdm", f"expected a square matrix of shape (n, n), got {m.shape}")
    return m[np.triu_indices(m.shape[0], k=1)]


def _condensed(a: Any, name: str) -> np.ndarray:
    arr = np.asarray(a, dtype=np.float64)
    if arr.ndim == 2:
        return upper(arr)
    if arr.ndim == 1:
        n = (1 + np.sqrt(1 + 8 * arr.size)) / 2
        if arr.size == 0 or n != int(n):
            raise DataValidationError(
                None, name, f"a condensed RDM needs n (n - 1) / 2 entries for some n, got {arr.size}")
        return arr
    raise DataValidationError(None, name, f"expected an (n, n) RDM or its condensed vector, got shape {arr.shape}")


def _as_rdm_stack(subject_rdms: Any) -> np.ndarray:
    """(n_subjects, n_pairs) condensed RDMs from (n_subjects, n, n) or (n_subjects, n_pairs)."""
    arr = np.asarray(subject_rdms, dtype=np.float64)
    if arr.ndim == 3:
        if arr.shape[1] != arr.shape[2]:
            raise DataValidationError(
                None, "subject_rdms", f"expected shape (n_subjects, n, n), got {arr.shape}")
        iu = np.triu_indices(arr.shape[1], k=1)
        arr = arr[:, iu[0], iu[1]]
    elif arr.ndim != 2:
        raise DataValidationError(
            None, "subject_rdms", f"expected shape (n_subjects, n, n) or (n_subjects, n_pairs), got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DataValidationError(None, "subject_rdms", "contains NaN or Inf; expected finite values")
    return arr


def compare_rdms(a: Any, b: Any, method: Method = "spearman") -> float:
    """Correlation between two RDMs over their upper triangles.

    Parameters
    ----------
    a, b : array of shape (n, n) or (n * (n - 1) // 2,)
        RDMs, square or condensed (can be mixed).
    method : {"spearman", "pearson"}
        Spearman rank correlation (ties get average ranks, as in ``scipy.stats.spearmanr``) or Pearson.

    Returns
    -------
    float
        Correlation in [-1, 1]; NaN when either RDM is constant.
    """
    va, vb = _condensed(a, "a"), _condensed(b, "b")
    if va.shape != vb.shape:
        raise DataValidationError(None, "b", f"expected {va.size} dissimilarities like a, got {vb.size}")
    if method not in ("spearman", "pearson"):
        raise DataValidationError(None, "method", f"expected 'spearman' or 'pearson', got {method!r}")
    if method == "spearman":
        va, vb = stats.rankdata(va), stats.rankdata(vb)
    va = va - va.mean()
    vb = vb - vb.mean()
    den = np.sqrt((va @ va) * (vb @ vb))
    if den == 0:
        return float("nan")
    return float(np.clip((va @ vb) / den, -1.0, 1.0))


def algonauts2019_score(model_rdm: Any, subject_rdms: Any, noise_ceiling_r2: float) -> float:
    """Algonauts 2019 fMRI score of a model RDM, in percent of the noise ceiling.

    ``100 · mean_s(ρ_s²) / NC`` where ``ρ_s`` is the Spearman correlation between the model RDM and subject
    ``s``'s RDM and ``NC`` the noise ceiling in the same squared-correlation (R²) units, as in the challenge's
    evaluation script. Note that squaring ignores the sign: an anti-correlated RDM scores like a correlated one
    (the challenge does the same); check :func:`compare_rdms` when that matters.

    Parameters
    ----------
    model_rdm : array of shape (n, n) or (n_pairs,)
    subject_rdms : array of shape (n_subjects, n, n) or (n_subjects, n_pairs)
    noise_ceiling_r2 : float
        Noise ceiling as a squared correlation, > 0 (e.g. 0.1589 for the challenge's 92-image EVC set).

    Returns
    -------
    float
        Percent of the noise ceiling (can exceed 100 when the model beats the ceiling estimate).
    """
    if not np.isfinite(noise_ceiling_r2) or noise_ceiling_r2 <= 0:
        raise DataValidationError(None, "noise_ceiling_r2", f"expected a positive R², got {noise_ceiling_r2}")
    subs = _as_rdm_stack(subject_rdms)
    model = _condensed(model_rdm, "model_rdm")
    if model.size != subs.shape[1]:
        raise DataValidationError(
            None, "model_rdm", f"expected {subs.shape[1]} dissimilarities like the subject RDMs, got {model.size}")
    rho = np.array([compare_rdms(model, s) for s in subs])
    return float(100.0 * np.mean(rho**2) / noise_ceiling_r2)


def leave_one_subject_out_ceiling(subject_rdms: Any, method: Method = "spearman") -> tuple[float, float]:
    """Lower and upper bounds of the RSA noise ceiling (Nili et al. 2014), averaged over subjects.

    Parameters
    ----------
    subject_rdms : array of shape (n_subjects, n, n) or (n_subjects, n_pairs)
        At least 2 subjects.
    method : {"spearman", "pearson"}

    Returns
    -------
    lower : float
        Mean over subjects of the correlation between a subject's RDM and the mean RDM of the *other* subjects.
    upper : float
        Mean over subjects of the correlation between a subject's RDM and the mean RDM of *all* subjects
        (itself included). In correlation units; square them for an R² ceiling.
    """
    subs = _as_rdm_stack(subject_rdms)
    n_sub = subs.shape[0]
    if n_sub < 2:
        raise DataValidationError(None, "subject_rdms", f"expected at least 2 subjects, got {n_sub}")
    total = subs.sum(axis=0)
    mean_all = total / n_sub
    lower = [compare_rdms(subs[i], (total - subs[i]) / (n_sub - 1), method) for i in range(n_sub)]
    upper_ = [compare_rdms(subs[i], mean_all, method) for i in range(n_sub)]
    return float(np.mean(lower)), float(np.mean(upper_))
