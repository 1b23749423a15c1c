"""Banded ridge: one ridge over several feature spaces ("bands"), each scaled by its own per-voxel weight.

The solver of himalaya's ``BandedRidgeCV`` (= ``GroupRidgeCV``) with ``solver="random_search"``, built on the
project's one ridge solver (:class:`llmvem.model.ridge.RidgePath`): for every candidate weighting ``γ`` of the
bands (points on the simplex, Dirichlet samples as in himalaya's ``generate_dirichlet_samples``, plus the
equal weighting), the design ``[√γ_1 X_1, …, √γ_B X_B]`` is scored by cross-validation for every α of the grid;
each voxel keeps its best ``(γ, α)`` and is refitted on all samples with it. Layers of a network, a map's
resolutions, or image features and caption embeddings are the usual bands; a band whose weight goes to zero for
a voxel is, in effect, left out for that voxel (the variance-partitioning question "does this band add?").

Cost: (folds + 1) decompositions of an n × n (or p × p) Gram matrix per candidate, plus one per chosen
candidate for the refit. At V4 size (≈1,000 images, 20 candidates) a few seconds; at NSD size (≈9,000 images)
the decompositions dominate (minutes each on a CPU): use few candidates, or a GPU (``device="cuda"``).

Examples
--------
>>> from llmvem.model.banded import BandedRidgeCV
>>> model = BandedRidgeCV(n_iter=10, cv=5).fit([X_layer5, X_layer8], Y)     # doctest: +SKIP
>>> model.best_gammas_.shape                                                # doctest: +SKIP
(2, n_voxels)
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from llmvem.errors import DataValidationError, LLMVEMError
from llmvem.model.ridge import DEFAULT_ALPHAS, LOO, RidgePath, Scoring, check_design, resolve_folds
from llmvem.utils import progress, resolve_device

__all__ = ["BandedRidgeCV", "dirichlet_candidates"]


def dirichlet_candidates(n_bands: int, n_iter: int, concentration: Sequence[float] = (0.1, 1.0),
                         random_state: int = 0) -> np.ndarray:
    """Band weightings to try: the equal weighting first, then ``n_iter`` Dirichlet samples cycling through
    ``concentration`` (0.1: near a corner of the simplex, one band dominating; 1: uniform on the simplex), the
    scheme of himalaya's ``generate_dirichlet_samples``. Returns an array of shape (n_iter + 1, n_bands) whose rows
    sum to 1 (just the equal weighting for one band)."""
    equal = np.full((1, n_bands), 1.0 / n_bands)
    if n_bands == 1 or n_iter == 0:
        return equal
    rng = np.random.default_rng(random_state)
    conc = list(concentration)
    per = int(np.ceil(n_iter / len(conc)))
    samples = np.stack([rng.dirichlet([c] * n_bands, per) for c in conc])  # (n_conc, per, n_bands)
    samples = np.swapaxes(samples, 0, 1).reshape(-1, n_bands)[:n_iter]   # alternate between concentrations
    return np.concatenate([equal, samples])


class BandedRidgeCV:
    """Ridge over several feature bands with a per-voxel band weighting and α chosen by cross-validation.

    Parameters
    ----------
    alphas : array of shape (n_alphas,)
        Penalties tried for every weighting (default :data:`llmvem.model.ridge.DEFAULT_ALPHAS`).
    n_iter : int
        Random weightings tried besides the equal one (see :func:`dirichlet_candidates`).
    gammas : array of shape (n_candidates, n_bands), optional
        Explicit weightings instead of the random ones (rows are normalised to sum to 1).
    concentration : sequence of float
        Dirichlet concentrations of the random weightings.
    cv : int, splitter, iterable of folds, or ``"loo"``
        As :class:`~llmvem.model.ridge.RidgeCV`.
    fit_intercept : bool
    scoring : {"r2", "neg_mse"}
    random_state : int
        Seed of the random weightings.
    device : str
    dtype : torch.dtype
        Precision of the products (decompositions are float64).
    voxel_batch : int, optional
        Voxels per block (default: ~128 MiB of responses).
    progress_bar : bool

    Attributes
    ----------
    gammas_ : array of shape (n_candidates, n_bands)
        The weightings tried.
    best_gammas_ : array of shape (n_bands, n_voxels)
        Each voxel's band weighting (a column sums to 1).
    best_alphas_ : array of shape (n_voxels,)
    deltas_ : array of shape (n_bands, n_voxels)
        ``log(γ / α)``: himalaya's log band scalings (the design is ``exp(δ / 2) X`` with unit penalty); ``-inf``
        where a band's weight is 0.
    cv_scores_ : array of shape (n_candidates, n_voxels)
        Each weighting's cross-validated score at its best α.
    best_scores_ : array of shape (n_voxels,)
    coef_ : array of shape (n_features_total, n_voxels)
        Weights on the unscaled features, bands concatenated in order.
    intercept_ : array of shape (n_voxels,)
    band_sizes_ : list of int
        Features per band.
    """

    def __init__(self, alphas: Sequence[float] | np.ndarray = DEFAULT_ALPHAS, n_iter: int = 20,
                 gammas: np.ndarray | None = None, concentration: Sequence[float] = (0.1, 1.0), cv: Any = 5,
                 fit_intercept: bool = True, scoring: Scoring = "r2", random_state: int = 0, device: str = "auto",
                 dtype: torch.dtype = torch.float32, voxel_batch: int | None = None, progress_bar: bool = False):
        self.alphas = alphas
        self.n_iter = n_iter
        self.gammas = gammas
        self.concentration = concentration
        self.cv = cv
        self.fit_intercept = fit_intercept
        self.scoring = scoring
        self.random_state = random_state
        self.device = device
        self.dtype = dtype
        self.voxel_batch = voxel_batch
        self.progress_bar = progress_bar

    def _candidates(self, n_bands: int) -> np.ndarray:
        if self.gammas is None:
            return dirichlet_candidates(n_bands, int(self.n_iter), self.concentration, self.random_state)
        g = np.asarray(self.gammas, dtype=np.float64)
        if g.ndim != 2 or g.shape[1] != n_bands or (g < 0).any() or not (g.sum(1) > 0).all():
            raise DataValidationError(None, "gammas", f"expected non-negative weights of shape (n_candidates, "
                                      f"{n_bands}) with a positive sum per row, got shape {g.shape}")
        return g / g.sum(1, keepdims=True)

    def _bands(self, Xs: Sequence[Any], n_samples: int | None = None) -> list[np.ndarray]:
        if isinstance(Xs, np.ndarray) or not len(Xs):
            raise DataValidationError(None, "Xs", "expected a list of arrays, one (n_samples, n_features_b) per band")
        bands = [check_design(x, f"Xs[{b}]", n_samples) for b, x in enumerate(Xs)]
        n = bands[0].shape[0]
        for b, x in enumerate(bands):
            if x.shape[0] != n:
                raise DataValidationError(None, f"Xs[{b}]", f"{x.shape[0]} samples; expected {n} as in Xs[0]")
        return bands

    def _design(self, bands: list[np.ndarray], gamma: np.ndarray, device: str) -> torch.Tensor:
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        return torch.from_numpy(np.concatenate([np.sqrt(g) * x for g, x in zip(gamma, bands, strict=True)],
                                               axis=1).astype(np_dtype, copy=False)).to(device)

    def fit(self, Xs: Sequence[Any], Y: Any) -> BandedRidgeCV:
        """Choose each voxel's band weighting and α by cross-validation, and refit on all samples.

        Parameters
        ----------
        Xs : list of arrays of shape (n_samples, n_features_b), one per band
        Y : array of shape (n_samples, n_voxels)

        Returns
        -------
        self
        """
        from llmvem.model.ridge import RidgeCV

        alphas = RidgeCV(alphas=self.alphas, cv=self.cv, scoring=self.scoring, dtype=self.dtype,
                         voxel_batch=self.voxel_batch)._check_params()  # one set of parameter checks
        bands = self._bands(Xs)
        n_samples = bands[0].shape[0]
        Y = np.asarray(Y)
        if Y.ndim != 2 or Y.shape[0] != n_samples or not np.issubdtype(Y.dtype, np.number):
            raise DataValidationError(None, "Y", f"expected numbers of shape ({n_samples}, n_voxels), got "
                                      f"{Y.shape} {Y.dtype}")
        if not np.isfinite(Y).all():
            raise DataValidationError(None, "Y", "contains NaN or Inf; expected finite values")
        gammas = self._candidates(len(bands))
        folds = LOO if self.cv == LOO else resolve_folds(self.cv, n_samples)
        device = resolve_device(self.device)
        n_voxels = Y.shape[1]
        itemsize = 4 if self.dtype == torch.float32 else 8
        step = int(self.voxel_batch or max(1, min(n_voxels, (128 * 2**20) // (itemsize * n_samples))))
        blocks = [slice(s, min(s + step, n_voxels)) for s in range(0, n_voxels, step)]
        np_dtype = np.float32 if self.dtype == torch.float32 else np.float64
        tie_break = np.log(alphas) * 1e-10  # the larger α on ties, as RidgeCV

        cand_scores = np.empty((len(gammas), n_voxels))
        cand_alpha = np.empty((len(gammas), n_voxels), dtype=np.int64)
        # more features than samples: the dual form, one Gram matrix per band formed once (K_γ = Σ γ_b K_b)
        grams = None
        if sum(x.shape[1] for x in bands) > n_samples:
            grams = [torch.from_numpy(x).to(device=device, dtype=torch.float64) for x in bands]
            grams = [g @ g.T for g in grams]

        def path_of(gamma: np.ndarray, cv: Any) -> RidgePath:
            if grams is None:
                return RidgePath(self._design(bands, gamma, device), cv, alphas, self.fit_intercept)
            K = sum(float(g) * k for g, k in zip(gamma, grams, strict=True))
            return RidgePath.from_gram(K, cv, alphas, self.fit_intercept, self.dtype)

        with torch.no_grad():
            for c in progress(range(len(gammas)), desc="banded ridge (band weightings)", total=len(gammas),
                              unit="weighting", disable=None if self.progress_bar else True):
                path = path_of(gammas[c], folds)
                for sl in blocks:
                    Yb = torch.from_numpy(np.ascontiguousarray(Y[:, sl], dtype=np_dtype)).to(device)
                    sc = path.scores(Yb, self.scoring).cpu().numpy() + tie_break[:, None]
                    cand_alpha[c, sl] = np.argmax(sc, axis=0)
                    cand_scores[c, sl] = sc[cand_alpha[c, sl], np.arange(sc.shape[1])]
                del path
            best_c = np.argmax(cand_scores, axis=0)  # the first candidate (equal weighting) wins ties
            best_a = cand_alpha[best_c, np.arange(n_voxels)]
            coef = np.zeros((sum(x.shape[1] for x in bands), n_voxels), dtype=np_dtype)
            intercept = np.zeros(n_voxels, dtype=np_dtype)
            designs = None if grams is None else [torch.from_numpy(np.ascontiguousarray(x, dtype=np_dtype)).to(device)
                                                  for x in bands]
            for c in np.unique(best_c):
                vox = np.flatnonzero(best_c == c)
                path = path_of(gammas[c], [])
                scale = np.concatenate([np.full(x.shape[1], np.sqrt(g)) for x, g in zip(bands, gammas[c],
                                                                                        strict=True)])
                for start in range(0, vox.size, step):
                    v = vox[start:start + step]
                    Yb = torch.from_numpy(np.ascontiguousarray(Y[:, v], dtype=np_dtype)).to(device)
                    if designs is None:
                        cb, ib = path.refit(Yb, best_a[v])
                        coef[:, v] = cb.cpu().numpy() * scale[:, None].astype(np_dtype)  # back to unscaled features
                        intercept[v] = ib.cpu().numpy()
                        continue
                    dual, y_mean = path.dual_coef(Yb, best_a[v])  # weights of band b on X_b: γ_b X_bᵀ dual
                    parts = [float(g) * (x.T @ dual) for g, x in zip(gammas[c], designs, strict=True)]
                    cb = torch.cat(parts)
                    mean_x = torch.cat([x.mean(0) for x in designs])
                    coef[:, v] = cb.cpu().numpy()
                    intercept[v] = (y_mean - mean_x @ cb).cpu().numpy() if self.fit_intercept else 0.0
                del path

        self.gammas_ = gammas
        self.best_gammas_ = gammas[best_c].T.copy()
        self.best_alphas_ = alphas[best_a]
        with np.errstate(divide="ignore"):
            self.deltas_ = np.log(self.best_gammas_) - np.log(self.best_alphas_)[None, :]
        self.cv_scores_ = cand_scores - tie_break[cand_alpha]
        self.best_scores_ = self.cv_scores_[best_c, np.arange(n_voxels)]
        self.coef_ = coef
        self.intercept_ = intercept
        self.band_sizes_ = [int(x.shape[1]) for x in bands]
        self.n_features_in_ = int(coef.shape[0])
        return self

    def _check_fitted(self) -> None:
        if not hasattr(self, "coef_"):
            raise LLMVEMError("BandedRidgeCV is not fitted yet; call fit(Xs, Y) before predict")

    def predict(self, Xs: Sequence[Any], split: bool = False) -> np.ndarray:
        """Predicted responses, array of shape (n_samples, n_voxels); with ``split``, each band's share,
        shape (n_bands, n_samples, n_voxels) (their sum plus ``intercept_`` is the prediction)."""
        self._check_fitted()
        bands = self._bands(Xs)
        if [x.shape[1] for x in bands] != self.band_sizes_:
            raise DataValidationError(None, "Xs", f"bands of {[x.shape[1] for x in bands]} features; expected "
                                      f"{self.band_sizes_} as in fit")
        edges = np.cumsum([0, *self.band_sizes_])
        parts = [x.astype(self.coef_.dtype, copy=False) @ self.coef_[edges[b]:edges[b + 1]]
                 for b, x in enumerate(bands)]
        if split:
            return np.stack(parts)
        return np.sum(parts, axis=0) + self.intercept_
