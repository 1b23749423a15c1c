"""The one ridge solver of llmvem: voxelwise ridge with the regularisation chosen by K-fold cross-validation or
by exact leave-one-out, per voxel or shared by all voxels.

Every ridge of the package goes through :class:`RidgeCV` (the ridge baseline, the feature-matched and banded
ridges of :mod:`llmvem.model.banded`, the spatial readout's ridge start, text-to-brain): one decomposition
code, one α grid (:data:`DEFAULT_ALPHAS`).

The baseline encoding model of the field: linear readout from fixed image features to every voxel, one alpha per
voxel. It gives the same answer as ``himalaya.ridge.RidgeCV`` (same folds, alphas and scoring) and is written so
an NSD-sized problem (≈10,000 images × 40,000 voxels × 2,048 features) runs on one CPU or GPU:

- Per fold, one eigendecomposition of the smaller Gram matrix (``XᵀX`` or ``XXᵀ``, in float64) gives a thin
  SVD ``X_train = U S Vᵀ``. The validation predictions for every alpha are then
  ``Ŷ(α) = (X_val V) diag(s / (s² + α)) (Uᵀ Y_train)``: the voxel-dependent work per alpha is one
  ``(n_val × rank) @ (rank × n_voxels)`` product, cheaper than himalaya's ``(n_val × n_train)`` one.
- Responses are processed in blocks of voxels (outer loop), folds and alphas inside. Only one block of
  responses, one block of predictions and the per-fold factors live at once; the full
  ``(n_alphas, n_samples, n_voxels)`` array is never built, so peak memory stays well below 3× the
  response matrix. Float32 responses are read in place, never copied whole.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch

from llmvem.errors import DataValidationError, LLMVEMError
from llmvem.utils import progress, resolve_device

Scoring = Literal["r2", "neg_mse"]

#: The α grid of llmvem for z-scored features: the powers of ten from 1e-2 to 1e7 (``evaluate.ridge_alphas``
#: defaults to it; the ridge baseline, feature-matched and banded ridges use it).
DEFAULT_ALPHAS = 10.0 ** np.arange(-2, 8)
#: The grid for inputs that are not z-scored, as multiples of the mean squared row norm of the design (for
#: unit-norm embeddings, the penalties themselves): half-decades from 1e-4 to 1e4 (text-to-brain readouts).
RELATIVE_ALPHAS = 10.0 ** np.arange(-4, 4.25, 0.5)
#: ``cv`` value of exact leave-one-out.
LOO = "loo"
#: Bytes of one block of responses :class:`RidgeCV` scores at a time (its fold copies and residuals scale with
#: it): 32 MiB keeps the products efficient (~950 voxels per block at NSD size) and the scratch near 0.1 GB.
_VOXEL_BLOCK_BYTES = 32 * 2**20


class RowStack:
    """Several response matrices stacked by rows without copying them: ``RowStack([Y_train, Y_val])`` reads like
    ``np.concatenate([Y_train, Y_val])`` to :meth:`RidgeCV.fit`, which only takes voxel blocks ``Y[:, a:b]`` (each
    block is then concatenated, 128 MiB at a time). At NSD size that is 1.4 GB of responses never duplicated.

    Parameters
    ----------
    parts : sequence of array of shape (n_i, n_voxels)
        Same number of columns and dtype.
    """

    ndim = 2

    def __init__(self, parts: Sequence[np.ndarray]):
        self.parts = [np.asarray(p) for p in parts]
        if not self.parts or any(p.ndim != 2 for p in self.parts):
            raise DataValidationError(None, "Y", "expected one or more 2-d response matrices")
        cols = {p.shape[1] for p in self.parts}
        dtypes = {p.dtype for p in self.parts}
        if len(cols) != 1 or len(dtypes) != 1:
            raise DataValidationError(None, "Y", f"parts differ in voxels {sorted(cols)} or dtype {dtypes}; "
                                      "expected the same")
        self.shape = (sum(p.shape[0] for p in self.parts), cols.pop())
        self.dtype = dtypes.pop()

    def __getitem__(self, key: tuple[slice, slice]) -> np.ndarray:
        rows, cols = key
        if rows != slice(None):
            raise IndexError("RowStack: only Y[:, columns] is supported")
        if len(self.parts) == 1:
            return self.parts[0][:, cols]
        return np.concatenate([p[:, cols] for p in self.parts])


@dataclass
class _Factors:
    """Thin SVD of a centred training design: ``Xc = U diag(s) Vᵀ`` (rank-truncated), plus projections."""

    U: torch.Tensor  # (n_train, rank)
    s: torch.Tensor  # (rank,)
    V: torch.Tensor  # (n_features, rank)


def _thin_svd(Xc: torch.Tensor, dtype: torch.dtype, with_u: bool = True) -> _Factors:
    """Thin SVD of ``Xc`` (n, p) through the eigendecomposition of its smaller Gram matrix, in float64
    (``with_u=False`` with ``p <= n``: ``U`` (n, p) is not formed and is left empty).

    Directions whose squared singular value is below ``s²_max · max(n, p) · eps64 · 10`` are dropped: the ridge
    solution has no component along the null space of the training design, so dropping them is exact, and it
    keeps float rounding in those directions from being amplified by ``1 / alpha``.
    """
    X64 = Xc.to(torch.float64)
    n, p = X64.shape
    if p <= n:
        lam, V = torch.linalg.eigh(X64.T @ X64)
    else:
        lam, U = torch.linalg.eigh(X64 @ X64.T)
    lam_max = float(lam.max()) if lam.numel() else 0.0
    keep = lam > max(lam_max * max(n, p) * np.finfo(np.float64).eps * 10.0, 0.0)
    lam = lam[keep]
    s = torch.sqrt(lam)
    if p <= n:
        V = V[:, keep]
        U = (X64 @ V) / s if with_u else torch.empty(0, dtype=torch.float64)
    else:
        U = U[:, keep]
        V = (X64.T @ U) / s
    return _Factors(U=U.to(dtype), s=s, V=V.to(dtype))


def _gram_factors(K: torch.Tensor, dtype: torch.dtype) -> _Factors:
    """``U`` and ``s`` of a design from its (centred) Gram matrix ``K = X Xᵀ`` in float64 (``V`` is left empty:
    the design is not known); directions dropped as in :func:`_thin_svd`."""
    n = K.shape[0]
    lam, U = torch.linalg.eigh(K.to(torch.float64))
    lam_max = float(lam.max()) if lam.numel() else 0.0
    keep = lam > max(lam_max * n * np.finfo(np.float64).eps * 10.0, 0.0)
    return _Factors(U=U[:, keep].to(dtype), s=torch.sqrt(lam[keep]), V=torch.empty(0, dtype=dtype))


def resolve_folds(cv: Any, n_samples: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Folds as a list of (train, validation) index arrays; an int means unshuffled ``KFold(n_splits=cv)``."""
    if isinstance(cv, (int, np.integer)):
        if cv < 2:
            raise DataValidationError(None, "cv", f"expected at least 2 folds, got {cv}")
        if cv > n_samples:
            raise DataValidationError(None, "cv", f"{cv} folds but only {n_samples} samples")
        from sklearn.model_selection import KFold

        splits: Iterable = KFold(n_splits=int(cv)).split(np.zeros((n_samples, 1)))
    elif hasattr(cv, "split"):
        splits = cv.split(np.zeros((n_samples, 1)))
    else:
        splits = cv
    folds = []
    for i, (train, val) in enumerate(splits):
        train = np.asarray(train, dtype=np.int64)
        val = np.asarray(val, dtype=np.int64)
        if train.size == 0 or val.size == 0:
            raise DataValidationError(None, "cv", f"fold {i} has an empty training or validation set")
        if max(train.max(), val.max()) >= n_samples or min(train.min(), val.min()) < 0:
            raise DataValidationError(None, "cv", f"fold {i} indexes outside 0..{n_samples - 1}")
        folds.append((train, val))
    if not folds:
        raise DataValidationError(None, "cv", "the splitter produced no folds")
    return folds


def check_design(X: Any, name: str = "X", n_samples: int | None = None, n_features: int | None = None) -> np.ndarray:
    """``X`` as a finite 2-D numeric array of the expected shape; otherwise a DataValidationError naming ``name``."""
    arr = np.asarray(X)
    if arr.ndim != 2:
        raise DataValidationError(None, name, f"expected shape (n_samples, n_features), got {arr.shape}")
    if n_samples is not None and arr.shape[0] != n_samples:
        raise DataValidationError(None, name, f"expected shape ({n_samples}, n_features), got {arr.shape}")
    if n_features is not None and arr.shape[1] != n_features:
        raise DataValidationError(
            None, name, f"expected shape (n_samples, {n_features}) as in fit, got {arr.shape}")
    if not np.issubdtype(arr.dtype, np.number):
        raise DataValidationError(None, name, f"expected numbers, got dtype {arr.dtype}")
    if not np.isfinite(arr).all():
        raise DataValidationError(None, name, "contains NaN or Inf; expected finite values")
    return arr


def _add_fold_scores(out: torch.Tensor, Yva: torch.Tensor, scale: torch.Tensor, A: torch.Tensor, w: torch.Tensor,
                     B: torch.Tensor, scoring: Scoring, eps: float) -> None:
    """Add one fold's score of every α to ``out`` (n_alphas, n_block): ``Yva`` the validation responses centred
    by the fold's training mean, ``scale`` their magnitude before centring, ``A`` = X_val,c V, ``w`` the weights
    (rank, n_alphas) and ``B`` = U_trᵀ Y_tr,c (rank, n_block)."""
    if scoring == "r2":
        ss = ((Yva - Yva.mean(0)) ** 2).sum(0).to(torch.float64)
        # a voxel constant on this fold has R² 0; rounding of its mean must not count as variance
        varies = ss > Yva.shape[0] * (16 * eps * scale.to(torch.float64)) ** 2
        ss = torch.where(varies, ss, 1.0)
    for k in range(w.shape[1]):
        resid = torch.addmm(Yva, A * w[:, k], B, beta=1.0, alpha=-1.0)
        sse = (resid * resid).sum(0).to(torch.float64)
        out[k] += torch.where(varies, 1.0 - sse / ss, 0.0) if scoring == "r2" else -sse / Yva.shape[0]


class RidgePath:
    """Ridge fits of one design for every α of a grid: cross-validated scores of response blocks, and refits.

    The decompositions are made once, in float64 (one per fold and one of all samples, or only the latter for
    leave-one-out); each block of responses then costs a few matrix products per α. :class:`RidgeCV` and
    :class:`~llmvem.model.banded.BandedRidgeCV` (one path per band weighting) are built on it.

    Parameters
    ----------
    X : tensor of shape (n_samples, n_features)
        The design, on the device and in the precision of the products (float32 or float64).
    folds : list of (train, validation) index arrays, or ``"loo"``
        Cross-validation folds; ``"loo"``: exact leave-one-out from the decomposition of all samples (the
        residual of sample i left out is ``e_i / (1 - h_ii)``, ``h_ii`` the diagonal of the ridge hat matrix,
        with ``1/n`` added for the unpenalised intercept).
    alphas : array of shape (n_alphas,)
    fit_intercept : bool
    """

    def __init__(self, X: torch.Tensor, folds: list[tuple[np.ndarray, np.ndarray]] | str, alphas: np.ndarray,
                 fit_intercept: bool = True):
        device, dt = X.device, X.dtype
        n_samples, n_features = X.shape
        self.dtype, self.device, self.n_samples = dt, device, n_samples
        self.fit_intercept = fit_intercept
        self.loo = isinstance(folds, str)
        self.n_alphas = len(alphas)
        self.x_mean = X.mean(0) if fit_intercept else torch.zeros(n_features, dtype=dt, device=device)
        alphas_t = torch.as_tensor(alphas, dtype=torch.float64, device=device)
        # K-fold with no more features than samples ("primal"): no fold keeps its U (n_train, p); the scores
        # come from G = Xcᵀ Yc of all samples, each fold's training part being G minus its validation rows'.
        # Per fold then: its training mean of Xc, V / s (p, rank), A = X_val_c V (n_val, rank), weights.
        self.primal = not self.loo and n_features <= n_samples
        self.fold_parts = []
        if self.primal:
            self.Xc = X - self.x_mean if fit_intercept else X  # (n_samples, n_features), kept for Xcᵀ Yc
            for train, val in folds:
                tr = torch.as_tensor(train, device=device)
                va = torch.as_tensor(val, device=device)
                mu = self.Xc[tr].mean(0) if fit_intercept else torch.zeros(n_features, dtype=dt, device=device)
                f = _thin_svd(self.Xc[tr] - mu, dt, with_u=False)
                A = ((self.Xc[va] - mu).to(torch.float64) @ f.V.to(torch.float64)).to(dt)
                w = (f.s[:, None] / (f.s[:, None] ** 2 + alphas_t[None, :])).to(dt)
                self.fold_parts.append((tr, va, mu, (f.V.to(torch.float64) / f.s).to(dt), A, w))
            self.full = _thin_svd(self.Xc, dt, with_u=False)
            self._finish(alphas_t)
            return
        # Otherwise, per fold: A = X_val_c V (n_val, rank), U (n_train, rank), weights (rank, n_alphas).
        if not self.loo:
            for train, val in folds:
                tr = torch.as_tensor(train, device=device)
                va = torch.as_tensor(val, device=device)
                Xtr, Xva = X[tr], X[va]
                if fit_intercept:
                    mu = Xtr.mean(0)
                    Xtr, Xva = Xtr - mu, Xva - mu
                f = _thin_svd(Xtr, dt)
                A = (Xva.to(torch.float64) @ f.V.to(torch.float64)).to(dt)
                w = (f.s[:, None] / (f.s[:, None] ** 2 + alphas_t[None, :])).to(dt)
                self.fold_parts.append((tr, va, f.U, A, w))
        self.full = _thin_svd(X - self.x_mean if fit_intercept else X, dt)
        self._finish(alphas_t)

    def _finish(self, alphas_t: torch.Tensor) -> None:
        """The all-sample weights of every α (and, for leave-one-out, the shrinkage and hat diagonal)."""
        s_full = self.full.s[:, None]
        self.w_full = (s_full / (s_full ** 2 + alphas_t[None, :])).to(self.dtype)
        if self.loo:
            shrink = s_full ** 2 / (s_full ** 2 + alphas_t[None, :])  # (rank, n_alphas), float64
            self.shrink = shrink.to(self.dtype)
            hat = (self.full.U.to(torch.float64) ** 2) @ shrink + (1.0 / self.n_samples if self.fit_intercept else 0.0)
            self.one_minus_hat = (1.0 - hat).clamp_min(1e-12).to(self.dtype)  # (n_samples, n_alphas)

    @classmethod
    def from_gram(cls, K: torch.Tensor, folds: list[tuple[np.ndarray, np.ndarray]] | str, alphas: np.ndarray,
                  fit_intercept: bool = True, dtype: torch.dtype = torch.float32) -> RidgePath:
        """The same path from the Gram matrix ``K = X Xᵀ`` (n_samples, n_samples; float64) instead of ``X``: the
        dual form for designs with many more features than samples, when ``K`` is cheap to form (a sum of band
        kernels, :class:`~llmvem.model.banded.BandedRidgeCV`). Scores are those of the design path; the refit
        gives dual coefficients (:meth:`dual_coef`), so weights are ``Xᵀ dual``."""
        self = cls.__new__(cls)
        device = K.device
        n = K.shape[0]
        K = K.to(torch.float64)
        self.dtype, self.device, self.n_samples = dtype, device, n
        self.fit_intercept = fit_intercept
        self.loo = isinstance(folds, str)
        self.n_alphas = len(alphas)
        self.x_mean = None  # unknown without X; dual_coef returns what is needed instead
        self.primal = False
        alphas_t = torch.as_tensor(alphas, dtype=torch.float64, device=device)

        def centred(rows: torch.Tensor, cols: torch.Tensor) -> torch.Tensor:
            """(X_rows - μ)(X_cols - μ)ᵀ with μ the mean of the ``cols`` samples, from K alone."""
            block = K[rows][:, cols]
            if not fit_intercept:
                return block
            own = K[cols][:, cols]
            return block - block.mean(1, keepdim=True) - own.mean(0)[None, :] + own.mean()

        self.fold_parts = []
        if not self.loo:
            for train, val in folds:
                tr = torch.as_tensor(train, device=device)
                va = torch.as_tensor(val, device=device)
                f = _gram_factors(centred(tr, tr), dtype)
                A = ((centred(va, tr) @ f.U.to(torch.float64)) / f.s[None, :]).to(dtype)
                w = (f.s[:, None] / (f.s[:, None] ** 2 + alphas_t[None, :])).to(dtype)
                self.fold_parts.append((tr, va, f.U, A, w))
        everything = torch.arange(n, device=device)
        self.full = _gram_factors(centred(everything, everything), dtype)
        self._finish(alphas_t)
        return self

    def dual_coef(self, Yb: torch.Tensor, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Dual coefficients (n_samples, n_block) of each voxel refitted on all samples with ``alphas[idx]``, and
        the voxels' means (n_block,): the weights are ``Xᵀ dual`` and the intercept ``ȳ − μ · weights`` (μ the
        mean sample; the dual coefficients sum to 0 with an intercept)."""
        U = self.full.U
        y_mean = Yb.mean(0) if self.fit_intercept else torch.zeros(Yb.shape[1], dtype=self.dtype, device=self.device)
        B = U.T @ (Yb - y_mean)
        W = (self.w_full / self.full.s[:, None].to(self.dtype))[:, torch.as_tensor(idx, device=self.device)]
        return U @ (W * B), y_mean

    def scores(self, Yb: torch.Tensor, scoring: Scoring = "r2") -> torch.Tensor:
        """Cross-validated score of every α for a block of responses.

        Parameters
        ----------
        Yb : tensor of shape (n_samples, n_block)
            Responses (not modified).
        scoring : {"r2", "neg_mse"}

        Returns
        -------
        tensor of shape (n_alphas, n_block), float64
            Averaged over folds (K-fold), or pooled over the left-out samples (leave-one-out).
        """
        eps = torch.finfo(self.dtype).eps
        out = torch.zeros((self.n_alphas, Yb.shape[1]), dtype=torch.float64, device=self.device)
        if self.loo:
            Yc = Yb - Yb.mean(0) if self.fit_intercept else Yb
            scale = Yb.abs().amax(0)
            ss = (Yc * Yc).sum(0).to(torch.float64)
            varies = ss > Yb.shape[0] * (16 * eps * scale.to(torch.float64)) ** 2
            ss = torch.where(varies, ss, 1.0)
            B = self.full.U.T @ Yc
            for k in range(self.n_alphas):
                resid = torch.addmm(Yc, self.full.U * self.shrink[:, k], B, beta=1.0, alpha=-1.0)
                resid /= self.one_minus_hat[:, k:k + 1]
                sse = (resid * resid).sum(0).to(torch.float64)
                out[k] = torch.where(varies, 1.0 - sse / ss, 0.0) if scoring == "r2" else -sse / Yb.shape[0]
            return out
        if self.primal:
            return self._primal_scores(Yb, scoring, eps)
        for tr, va, U, A, w in self.fold_parts:
            Ytr, Yva = Yb[tr], Yb[va]  # fresh copies: centre them in place
            scale = Yva.abs().amax(0)
            if self.fit_intercept:
                m = Ytr.mean(0)
                scale += m.abs()
                Ytr.sub_(m)
                Yva.sub_(m)
            _add_fold_scores(out, Yva, scale, A, w, U.T @ Ytr, scoring, eps)
        return out / len(self.fold_parts)

    def _primal_scores(self, Yb: torch.Tensor, scoring: Scoring, eps: float) -> torch.Tensor:
        """:meth:`scores` of the primal K-fold path: one product ``G = Xcᵀ Yc`` for the block, and per fold
        ``Xc_trᵀ Yc_tr = G − Xc_vaᵀ Yc_va`` centred by the fold's training means (the data are centred by
        their overall means first, so those fold means are small and nothing large cancels in float32)."""
        out = torch.zeros((self.n_alphas, Yb.shape[1]), dtype=torch.float64, device=self.device)
        y_mean = Yb.mean(0) if self.fit_intercept else torch.zeros(Yb.shape[1], dtype=Yb.dtype, device=self.device)
        Yc = Yb - y_mean  # a copy: Yb may be the caller's array
        G = self.Xc.T @ Yc  # (n_features, n_block)
        total = Yc.sum(0)
        for tr, va, mu, Vs, A, w in self.fold_parts:
            Yva = Yc[va]  # a fresh copy: centred in place below
            scale = Yb[va].abs().amax(0)
            Gtr = torch.addmm(G, self.Xc[va].T, Yva, beta=1.0, alpha=-1.0)
            if self.fit_intercept:
                m = (total - Yva.sum(0)) / len(tr)  # the fold's training mean (of the centred responses)
                scale += (m + y_mean).abs()
                Gtr -= len(tr) * mu[:, None] * m[None, :]
                Yva.sub_(m)
            _add_fold_scores(out, Yva, scale, A, w, Vs.T @ Gtr, scoring, eps)  # Vsᵀ Gtr = U_trᵀ Y_tr,c
        return out / len(self.fold_parts)

    def refit(self, Yb: torch.Tensor, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """Weights (n_features, n_block) and intercepts (n_block,) of each voxel of ``Yb`` refitted on all
        samples with its own α (``alphas[idx]``, idx of shape (n_block,))."""
        full = self.full
        y_mean = Yb.mean(0) if self.fit_intercept else None
        if self.primal:  # Uᵀ Yc = (V / s)ᵀ Xcᵀ (Y - 1 ȳᵀ); Xc's column sums are 0 up to rounding, kept here
            G = self.Xc.T @ Yb
            if self.fit_intercept:
                G -= self.Xc.sum(0)[:, None] * y_mean[None, :]
            B = (full.V / full.s[None, :].to(self.dtype)).T @ G
        else:  # coef = V (w[:, idx] ⊙ Uᵀ Yc); Uᵀ(Y - 1 ȳᵀ) = UᵀY - (Uᵀ1) ȳᵀ, without a centred copy of the block
            B = full.U.T @ Yb
            if self.fit_intercept:
                B -= full.U.sum(0)[:, None] * y_mean[None, :]
        W = self.w_full[:, torch.as_tensor(idx, device=self.device)]
        coef = full.V @ (W * B)
        intercept = y_mean - self.x_mean @ coef if self.fit_intercept else torch.zeros(
            Yb.shape[1], dtype=self.dtype, device=self.device)
        return coef, intercept


class RidgeCV:
    """Ridge regression with the alpha chosen by cross-validation: per voxel (default) or one for all voxels.

    Solves ``b* = argmin_b ||X b - y||² + α ||b||²`` for every voxel ``y`` and every ``α`` in ``alphas``,
    scores each ``α`` on held-out samples (K-fold, averaged over folds; or exact leave-one-out), and refits each
    voxel on all samples with its best ``α`` (ties go to the larger ``α``). With K folds it is equivalent to
    ``himalaya.ridge.RidgeCV(alphas, cv=cv, fit_intercept=...)`` with
    ``solver_params=dict(score_func=himalaya.scoring.r2_score)`` (``scoring="r2"``) or with himalaya's default
    score (``scoring="neg_mse"``); with ``cv="loo"`` and ``local_alpha=False`` it chooses the α of
    ``sklearn.linear_model.RidgeCV(alphas, alpha_per_target=False)`` (efficient leave-one-out).

    Parameters
    ----------
    alphas : array of shape (n_alphas,)
        Positive regularisation strengths to try. Default: :data:`DEFAULT_ALPHAS` (``np.logspace(-2, 7, 10)``).
    cv : int, scikit-learn splitter, iterable of (train, validation) index arrays, or ``"loo"``
        Folds. An int ``k`` means ``KFold(n_splits=k)`` without shuffling (contiguous blocks), like himalaya and
        scikit-learn. Shuffle (``KFold(k, shuffle=True, random_state=seed)``) only if samples are exchangeable.
        ``"loo"``: exact leave-one-out from the one decomposition of all samples (one decomposition instead of
        k + 1; the score pools the left-out residuals: ``1 - Σ e_loo² / Σ (y - ȳ)²`` or ``-mean e_loo²``).
    fit_intercept : bool
        Centre X and Y on each training fold (and on all samples for the refit) and fit an intercept.
    scoring : {"r2", "neg_mse"}
        Score used to choose alpha: R² on the validation fold (``1 - SSE / SS``, 0 for a constant voxel), or
        minus the mean squared error (himalaya's default). Both are averaged over folds.
    local_alpha : bool
        One α per voxel (True), or one α for all voxels, the best mean score over voxels (False).
    device : str
        ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    dtype : torch.dtype
        Precision of the voxel-dependent products (the decompositions are always float64).
    voxel_batch : int or None
        Voxels per block. ``None`` picks a block of about 128 MiB of responses.
    progress_bar : bool
        Show a progress bar over voxel blocks (honours ``LLMVEM_NO_PROGRESS``).

    Attributes
    ----------
    best_alphas_ : array of shape (n_voxels,)
        Selected alpha of each voxel (all equal with ``local_alpha=False``).
    coef_ : array of shape (n_features, n_voxels)
        Weights refit on all samples.
    intercept_ : array of shape (n_voxels,)
        Intercept (zeros when ``fit_intercept=False``).
    cv_scores_ : array of shape (n_alphas, n_voxels), float64
        Score of each alpha averaged over folds.
    best_scores_ : array of shape (n_voxels,), float64
        Averaged score of the selected alpha.
    n_features_in_ : int
    """

    def __init__(self, alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS, cv: Any = 5,
                 fit_intercept: bool = True, scoring: Scoring = "r2", device: str = "auto",
                 dtype: torch.dtype = torch.float32, voxel_batch: int | None = None,
                 progress_bar: bool = True, local_alpha: bool = True):
        self.alphas = alphas
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.device = device
        self.dtype = dtype
        self.voxel_batch = voxel_batch
        self.progress_bar = progress_bar
        self.local_alpha = local_alpha

    # ------------------------------------------------------------------------------------------ helpers
    def _check_params(self) -> np.ndarray:
        alphas = np.asarray(self.alphas, dtype=np.float64).ravel()
        if alphas.size == 0 or not np.isfinite(alphas).all() or (alphas <= 0).any():
            raise DataValidationError(None, "alphas", f"expected positive finite values, got {self.alphas!r}")
        if self.scoring not in ("r2", "neg_mse"):
            raise DataValidationError(None, "scoring", f"expected 'r2' or 'neg_mse', got {self.scoring!r}")
        if self.dtype not in (torch.float32, torch.float64):
            raise DataValidationError(None, "dtype", f"expected torch.float32 or torch.float64, got {self.dtype}")
        if self.voxel_batch is not None and int(self.voxel_batch) < 1:
            raise DataValidationError(None, "voxel_batch", f"expected a positive int or None, got {self.voxel_batch}")
        if isinstance(self.cv, str) and self.cv != LOO:
            raise DataValidationError(None, "cv", f"expected a number of folds, a splitter or {LOO!r}, got "
                                      f"{self.cv!r}")
        return alphas

    def _block_size(self, n_samples: int, n_voxels: int) -> int:
        if self.voxel_batch is not None:
            return int(self.voxel_batch)
        itemsize = torch.finfo(self.dtype).bits // 8
        return max(1, min(n_voxels, _VOXEL_BLOCK_BYTES // (itemsize * n_samples)))

    def _to_device(self, a: np.ndarray, device: str) -> torch.Tensor:
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        return torch.from_numpy(np.ascontiguousarray(a, dtype=np_dtype)).to(device)

    # ---------------------------------------------------------------------------------------------- fit
    def fit(self, X: Any, Y: Any) -> RidgeCV:
        """Choose alphas by cross-validation and refit on all samples.

        Parameters
        ----------
        X : array of shape (n_samples, n_features)
            Image features.
        Y : array of shape (n_samples, n_voxels) or (n_samples,), or RowStack
            Responses. A float32 (or float64 with ``dtype=torch.float64``) C-ordered array is read in place;
            a :class:`RowStack` of several splits is read block by block, never concatenated whole.

        Returns
        -------
        self
        """
        alphas = self._check_params()
        X = check_design(X, "X")
        n_samples, n_features = X.shape
        Y = Y if isinstance(Y, RowStack) else np.asarray(Y)
        self._ravel = Y.ndim == 1
        if self._ravel:
            Y = Y[:, None]
        if Y.ndim != 2 or Y.shape[0] != n_samples:
            raise DataValidationError(
                None, "Y", f"expected shape ({n_samples}, n_voxels) to match X {X.shape}, got {Y.shape}")
        if not np.issubdtype(Y.dtype, np.number):
            raise DataValidationError(None, "Y", f"expected numbers, got dtype {Y.dtype}")
        if self.cv == LOO and n_samples < 3:
            raise DataValidationError(None, "cv", f"leave-one-out needs at least 3 samples, got {n_samples}")
        n_voxels = Y.shape[1]
        folds = LOO if self.cv == LOO else resolve_folds(self.cv, n_samples)
        device = resolve_device(self.device)

        with torch.no_grad():
            path = RidgePath(self._to_device(X, device), folds, alphas, self.fit_intercept)
            cv_scores = np.empty((len(alphas), n_voxels), dtype=np.float64)
            best_idx = np.empty(n_voxels, dtype=np.int64)
            coef = np.empty((n_features, n_voxels), dtype=np.float32 if self.dtype == torch.float32 else np.float64)
            intercept = np.zeros(n_voxels, dtype=coef.dtype)
            tie_break = np.log(alphas) * 1e-10  # prefer the larger alpha when scores tie (as himalaya does)

            step = self._block_size(n_samples, n_voxels)
            blocks = [slice(s, min(s + step, n_voxels)) for s in range(0, n_voxels, step)]

            def refit(sl: slice, Yb: torch.Tensor) -> None:
                cb, ib = path.refit(Yb, best_idx[sl])
                coef[:, sl] = cb.cpu().numpy()
                intercept[sl] = ib.cpu().numpy()

            for sl in progress(blocks, desc="ridge CV (voxel blocks)", total=len(blocks), unit="block",
                               disable=None if self.progress_bar else True):
                Yb = self._to_device(Y[:, sl], device)
                if not torch.isfinite(Yb).all():
                    raise DataValidationError(
                        None, "Y", f"contains NaN or Inf in voxels {sl.start}..{sl.stop - 1}; expected finite values")
                sc = path.scores(Yb, self.scoring).cpu().numpy()
                cv_scores[:, sl] = sc
                best_idx[sl] = np.argmax(sc + tie_break[:, None], axis=0)
                if self.local_alpha:
                    refit(sl, Yb)
                del Yb
            if not self.local_alpha:  # one α for every voxel: the best mean score, then a second pass to refit
                best_idx[:] = int(np.argmax(cv_scores.mean(1) + tie_break))
                for sl in blocks:
                    refit(sl, self._to_device(Y[:, sl], device))

        self.alphas_ = alphas
        self.cv_scores_ = cv_scores
        self.best_alphas_ = alphas[best_idx]
        self.best_scores_ = cv_scores[best_idx, np.arange(n_voxels)]
        self.coef_ = coef
        self.intercept_ = intercept
        self.n_features_in_ = n_features
        self.n_splits_ = n_samples if folds == LOO else len(folds)
        return self

    # ------------------------------------------------------------------------------------------ predict
    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise LLMVEMError("RidgeCV is not fitted yet; call fit(X, Y) before predict/score")

    def predict(self, X: Any) -> np.ndarray:
        """Predicted responses.

        Parameters
        ----------
        X : array of shape (n_samples, n_features)

        Returns
        -------
        array of shape (n_samples, n_voxels) (or (n_samples,) when fit on 1-D ``Y``), dtype of ``coef_``
        """
        self._check_fitted()
        X = check_design(X, "X", n_features=self.n_features_in_).astype(self.coef_.dtype, copy=False)
        out = X @ self.coef_ + self.intercept_
        return out[:, 0] if self._ravel else out

    def score(self, X: Any, Y: Any) -> np.ndarray:
        """R² (``1 - SSE / SS``) of the predictions for each voxel, shape (n_voxels,)."""
        from llmvem.evaluate.metrics import explained_variance

        return explained_variance(Y, self.predict(X))
