"""Representational similarity analysis: RDMs, their comparison, Algonauts 2019 scores and noise ceilings.

An RDM (representational dissimilarity matrix) of ``n`` stimuli is a symmetric ``(n, n)`` matrix with a zero
diagonal; its *condensed* form is the upper triangle above the diagonal, row by row (``scipy.spatial.distance.
squareform`` order), of length ``n (n - 1) / 2``. Functions accept either form where it makes sense.

:func:`image_bootstrap` and :func:`rsa_rows` give RSA figures a confidence interval by resampling the **images**
(stimuli) with replacement: every RDM is correlated over the pairs of distinct source images of the resample (a
duplicated image paired with itself has no dissimilarity), the same resamples for every row, so differences between
rows are paired.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Literal

import numpy as np
from scipy import stats

from llmvem.errors import DataValidationError

__all__ = ["algonauts2019_score", "compare_rdms", "image_bootstrap", "leave_one_subject_out_ceiling", "rdm",
           "resample_pairs", "rsa_rows", "upper"]

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


# ------------------------------------------------------------------------------------ bootstrap over images
def resample_pairs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Source images of the pairs of one bootstrap resample of ``n`` images.

    The images are drawn with replacement; the pairs are those of the resampled RDM's upper triangle whose two
    source images differ.

    Returns
    -------
    a, b : int arrays of shape (n_pairs,)
        Row and column (source image indices) of each kept pair, ``a != b``.
    """
    idx = rng.integers(0, n, n)
    iu, ju = np.triu_indices(n, k=1)
    a, b = idx[iu], idx[ju]
    keep = a != b
    return a[keep], b[keep]


def _unit_ranks(v: np.ndarray) -> np.ndarray:
    """Centred, unit-norm ranks of ``v`` (the Spearman r of two such vectors is their dot product); NaN when
    ``v`` is constant."""
    r = stats.rankdata(v)
    r -= r.mean()
    norm = np.linalg.norm(r)
    return r / norm if norm > 0 else r * np.nan


def image_bootstrap(model_rdms: Mapping[str, Any], target_rdms: Mapping[str, Any], n_boot: int, seed: int = 0
                    ) -> dict[str, dict[str, np.ndarray]]:
    """Spearman r of every model RDM with every target RDM on bootstrap resamples of the images.

    Parameters
    ----------
    model_rdms, target_rdms : mapping of name to array of shape (n, n)
        Square RDMs of the same ``n`` images.
    n_boot : int
        Resamples, the same for every model and target (differences between models are paired).
    seed : int

    Returns
    -------
    dict of model name to dict of target name to array of shape (n_boot,)
    """
    targets_sq = {t: np.asarray(r, dtype=np.float64) for t, r in target_rdms.items()}
    models_sq = {m: np.asarray(r, dtype=np.float64) for m, r in model_rdms.items()}
    shapes = {r.shape for r in (*targets_sq.values(), *models_sq.values())}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2 or len(set(next(iter(shapes)))) != 1:
        raise DataValidationError(None, "rdms", f"expected square RDMs of one size, got shapes {sorted(shapes)}")
    n = next(iter(shapes))[0]
    rng = np.random.default_rng(seed)
    out = {m: {t: np.empty(int(n_boot)) for t in targets_sq} for m in models_sq}
    for k in range(int(n_boot)):
        a, b = resample_pairs(n, rng)
        targets = {t: _unit_ranks(r[a, b]) for t, r in targets_sq.items()}
        for m, r in models_sq.items():
            mr = _unit_ranks(r[a, b])
            for t, tr in targets.items():
                out[m][t][k] = float(mr @ tr)
    return out


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def rsa_rows(patterns: Mapping[str, Any], subject_rdms: Mapping[str, Any], human_mean: Any, monkey: Any,
             n_boot: int, seed: int = 0, baselines: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Score each pattern's RDM against several subjects' RDMs, their mean and a second species' RDM, with 95%
    intervals of a bootstrap over the images (:func:`image_bootstrap`).

    Parameters
    ----------
    patterns : mapping of row name to array of shape (n, ...)
        One feature vector per image (flattened beyond the first axis by :func:`rdm`).
    subject_rdms : mapping of subject name to array of shape (n, n)
        E.g. the 4 human IT RDMs of the 92-image set (:func:`llmvem.data.rdm_sets.load_kriegeskorte92`).
    human_mean, monkey : array of shape (n, n)
        The subject-averaged RDM and the monkey IT RDM.
    n_boot : int
    seed : int
    baselines : mapping of row name to the row name of its own backbone features, optional
        Adds ``baseline``, ``delta_vs_backbone`` (row − baseline in ``hit_subject_mean``), ``delta_ci`` and
        ``delta_p`` (paired, two-sided).

    Returns
    -------
    dict of row name to dict
        ``hit_subject_mean`` (mean over subjects of the Spearman r), ``ci``, ``human_avg``, ``human_avg_ci``,
        ``monkey``, ``monkey_ci``, ``hit_subjects`` (per subject), ``dim`` (features per image), ``n_boot`` (and
        the delta fields).
    """
    from llmvem.evaluate.stats import bootstrap_p

    subjects = {f"subject:{s}": np.asarray(m) for s, m in subject_rdms.items()}
    targets = {**subjects, "human_avg": np.asarray(human_mean), "monkey": np.asarray(monkey)}
    rdms = {name: rdm(x) for name, x in patterns.items()}
    boot = image_bootstrap(rdms, targets, n_boot, seed)
    rows: dict[str, dict[str, Any]] = {}
    subject_mean_boot: dict[str, np.ndarray] = {}
    for name, m in rdms.items():
        subj = {t.split(":", 1)[1]: compare_rdms(m, r) for t, r in subjects.items()}
        subject_mean_boot[name] = np.mean([boot[name][t] for t in subjects], axis=0)
        rows[name] = {"hit_subject_mean": float(np.mean(list(subj.values()))), "ci": _ci(subject_mean_boot[name]),
                      "human_avg": compare_rdms(m, targets["human_avg"]), "human_avg_ci": _ci(boot[name]["human_avg"]),
                      "monkey": compare_rdms(m, targets["monkey"]), "monkey_ci": _ci(boot[name]["monkey"]),
                      "hit_subjects": subj, "dim": int(np.prod(np.shape(patterns[name])[1:])), "n_boot": int(n_boot)}
    for name, base in (baselines or {}).items():
        if name in rows and base in rows:
            delta = rows[name]["hit_subject_mean"] - rows[base]["hit_subject_mean"]
            diffs = subject_mean_boot[name] - subject_mean_boot[base]
            rows[name].update(baseline=base, delta_vs_backbone=delta, delta_ci=_ci(diffs),
                              delta_p=bootstrap_p(delta, diffs))
    return rows
