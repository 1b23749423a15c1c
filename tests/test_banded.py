"""Banded ridge (llmvem.model.banded): agreement with himalaya's BandedRidgeCV, band recovery, shapes, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch

from llmvem.errors import DataValidationError
from llmvem.model.banded import BandedRidgeCV, dirichlet_candidates
from llmvem.model.ridge import RidgeCV

ALPHAS = np.logspace(-2, 4, 7)


def two_bands(n=80, p=(6, 9), v=12, seed=0):
    """Voxels 0..5 read band 0 only, 6..11 band 1 only (plus noise)."""
    rng = np.random.default_rng(seed)
    Xs = [rng.standard_normal((n, k)) for k in p]
    Y = np.empty((n, v))
    Y[:, :6] = Xs[0] @ rng.standard_normal((p[0], 6))
    Y[:, 6:] = Xs[1] @ rng.standard_normal((p[1], v - 6))
    return Xs, Y + 0.8 * rng.standard_normal((n, v)) + 2.0


def test_matches_himalaya_banded_ridge_with_the_same_weightings():
    himalaya = pytest.importorskip("himalaya.ridge")
    from himalaya.scoring import r2_score
    from sklearn.model_selection import KFold

    Xs, Y = two_bands()
    gammas = dirichlet_candidates(2, 8, random_state=1)
    ours = BandedRidgeCV(alphas=ALPHAS, gammas=gammas, cv=KFold(5), dtype=torch.float64, device="cpu").fit(Xs, Y)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = himalaya.BandedRidgeCV(groups="input", fit_intercept=True, cv=KFold(5), solver_params=dict(
            n_iter=gammas, alphas=ALPHAS, score_func=r2_score, progress_bar=False)).fit(Xs, Y)
    np.testing.assert_allclose(ours.deltas_, np.asarray(ref.deltas_), rtol=1e-8)
    np.testing.assert_allclose(ours.cv_scores_, np.asarray(ref.cv_scores_), atol=1e-8)
    np.testing.assert_allclose(ours.coef_, np.asarray(ref.coef_), rtol=1e-6, atol=1e-8)
    Xn, _ = two_bands(n=10, seed=3)
    np.testing.assert_allclose(ours.predict(Xn), ref.predict(Xn), rtol=1e-6, atol=1e-8)
    coef = np.asarray(ref.coef_)  # himalaya splits only without an intercept: split its weights by band
    expected = np.stack([Xn[0] @ coef[:6], Xn[1] @ coef[6:]])
    np.testing.assert_allclose(ours.predict(Xn, split=True), expected, rtol=1e-6, atol=1e-8)


def test_each_voxel_weights_the_band_that_drives_it_and_beats_plain_ridge():
    Xs, Y = two_bands(n=120, p=(10, 40))
    banded = BandedRidgeCV(alphas=ALPHAS, n_iter=30, cv=5, dtype=torch.float64, device="cpu").fit(Xs, Y)
    assert banded.best_gammas_.shape == (2, 12) and np.allclose(banded.best_gammas_.sum(0), 1.0)
    assert (banded.best_gammas_[0, :6] > 0.5).all() and (banded.best_gammas_[1, 6:] > 0.5).all()
    plain = RidgeCV(alphas=ALPHAS, cv=5, dtype=torch.float64, device="cpu").fit(np.hstack(Xs), Y)
    # the equal weighting is a candidate, so the banded CV score is never below the plain ridge's
    assert (banded.best_scores_ >= plain.best_scores_ - 1e-9).all()
    assert banded.best_scores_[:6].mean() > plain.best_scores_[:6].mean()
    # split predictions add up to the prediction
    split = banded.predict(Xs, split=True)
    np.testing.assert_allclose(split.sum(0) + banded.intercept_, banded.predict(Xs), rtol=1e-10)


def test_one_band_is_ridge_and_loo_works():
    Xs, Y = two_bands()
    one = BandedRidgeCV(alphas=ALPHAS, cv="loo", dtype=torch.float64, device="cpu").fit(Xs[:1], Y)
    ridge = RidgeCV(alphas=ALPHAS, cv="loo", dtype=torch.float64, device="cpu").fit(Xs[0], Y)
    np.testing.assert_allclose(one.coef_, ridge.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_array_equal(one.best_alphas_, ridge.best_alphas_)


def test_errors_name_the_band():
    Xs, Y = two_bands()
    with pytest.raises(DataValidationError, match=r"Xs\[1\]"):
        BandedRidgeCV().fit([Xs[0], Xs[1][:10]], Y)
    with pytest.raises(DataValidationError, match="gammas"):
        BandedRidgeCV(gammas=np.ones((2, 3))).fit(Xs, Y)
    fitted = BandedRidgeCV(n_iter=2, cv=3).fit(Xs, Y)
    with pytest.raises(DataValidationError, match="expected"):
        fitted.predict([Xs[0]])


@pytest.mark.parametrize("cv", [4, "loo"])
def test_dual_gram_path_equals_the_design_path(cv):
    """More features than samples: band Gram matrices formed once give the design path's scores and weights."""
    rng = np.random.default_rng(4)
    Xs = [rng.standard_normal((30, 25)), rng.standard_normal((30, 40))]
    Y = Xs[0] @ rng.standard_normal((25, 5)) + rng.standard_normal((30, 5)) + 1.0
    gammas = dirichlet_candidates(2, 5, random_state=2)
    dual = BandedRidgeCV(alphas=ALPHAS, gammas=gammas, cv=cv, dtype=torch.float64, device="cpu").fit(Xs, Y)
    # the same problem with the bands padded to fewer features than samples takes the design path
    primal = BandedRidgeCV(alphas=ALPHAS, gammas=gammas, cv=cv, dtype=torch.float64, device="cpu")
    import llmvem.model.banded as banded

    real = banded.RidgePath.from_gram
    try:
        banded.RidgePath.from_gram = None  # noqa: B010 (forces a failure if the dual path were taken below)
        Xs_small = [x[:, :10] for x in Xs]
        primal_small = primal.fit(Xs_small, Y)
    finally:
        banded.RidgePath.from_gram = real
    assert primal_small.coef_.shape[0] == 20
    ref = RidgeCV(alphas=ALPHAS, cv=cv, dtype=torch.float64, device="cpu")
    for c, g in enumerate(gammas):
        scaled = np.hstack([np.sqrt(gb) * x for gb, x in zip(g, Xs, strict=True)])
        r = ref.fit(scaled, Y)
        np.testing.assert_allclose(dual.cv_scores_[c], r.cv_scores_.max(0), rtol=1e-6, atol=1e-8)
    v = np.arange(Y.shape[1])
    for j in v:  # each voxel's weights are the plain ridge's on its chosen scaling, back on unscaled features
        g = dual.best_gammas_[:, j]
        scaled = np.hstack([np.sqrt(gb) * x for gb, x in zip(g, Xs, strict=True)])
        r = RidgeCV(alphas=[dual.best_alphas_[j]], cv=cv, dtype=torch.float64, device="cpu").fit(scaled, Y[:, j])
        expect = r.coef_[:, 0] * np.concatenate([np.full(x.shape[1], np.sqrt(gb)) for x, gb in zip(Xs, g, strict=True)])
        np.testing.assert_allclose(dual.coef_[:, j], expect, rtol=1e-6, atol=1e-9)
        np.testing.assert_allclose(dual.intercept_[j], r.intercept_[0], rtol=1e-6, atol=1e-9)
