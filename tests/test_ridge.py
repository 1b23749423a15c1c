"""Voxelwise RidgeCV: agreement with himalaya's RidgeCV and scikit-learn's Ridge, memory-safe blocking, errors."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from sklearn.linear_model import Ridge
from sklearn.model_selection import KFold

from llmvem.errors import DataValidationError, LLMVEMError
from llmvem.model.ridge import RidgeCV

himalaya_ridge = pytest.importorskip("himalaya.ridge")
from himalaya.scoring import r2_score as himalaya_r2  # noqa: E402

ALPHAS = np.logspace(-2, 4, 7)


def make_problem(n: int, p: int, v: int, seed: int = 0, offset: float = 3.0):
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, p)) + rng.uniform(-2, 2, p)
    W = rng.standard_normal((p, v)) * rng.uniform(0.0, 1.0, v) ** 2
    noise = rng.standard_normal((n, v)) * rng.uniform(0.3, 6.0, v)
    return X, X @ W + noise + offset


def himalaya_fit(X, Y, scoring, cv=5, fit_intercept=True):
    params = dict(score_func=himalaya_r2) if scoring == "r2" else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "n_samples < n_features" advice
        return himalaya_ridge.RidgeCV(alphas=ALPHAS, cv=cv, fit_intercept=fit_intercept,
                                      solver_params=params).fit(X, Y)


@pytest.mark.parametrize("scoring", ["r2", "neg_mse"])
@pytest.mark.parametrize("shape", [(60, 8, 12), (40, 70, 9)], ids=["primal n>p", "dual p>n"])
def test_matches_himalaya_float64(scoring, shape):
    n, p, v = shape
    X, Y = make_problem(n, p, v)
    ref = himalaya_fit(X, Y, scoring)
    ours = RidgeCV(alphas=ALPHAS, cv=5, scoring=scoring, dtype=torch.float64, device="cpu").fit(X, Y)
    np.testing.assert_allclose(ours.best_alphas_, np.asarray(ref.best_alphas_), rtol=1e-10)
    assert len(np.unique(ours.best_alphas_)) >= 3  # the test really exercises per-voxel alphas
    X_new, _ = make_problem(15, p, v, seed=1)
    np.testing.assert_allclose(ours.predict(X_new), ref.predict(X_new), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(ours.coef_, ref.coef_, rtol=1e-8, atol=1e-10)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-8, atol=1e-10)
    # himalaya's cv_scores_ is the best averaged score plus its tie-break slope log(alpha)·1e-10
    np.testing.assert_allclose(ours.best_scores_, np.asarray(ref.cv_scores_), atol=1e-8)
    assert ours.cv_scores_.shape == (len(ALPHAS), v)
    np.testing.assert_array_equal(ours.cv_scores_.max(0), ours.best_scores_)


def test_matches_himalaya_float32_blocks_and_explicit_kfold():
    X, Y = make_problem(120, 20, 37, seed=2)
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)
    cv = KFold(n_splits=4)
    ref = himalaya_fit(X32, Y32, "r2", cv=cv)
    ours = RidgeCV(alphas=ALPHAS, cv=cv, device="cpu", voxel_batch=5).fit(X32, Y32)
    assert ours.coef_.dtype == np.float32
    assert ours.n_splits_ == 4
    np.testing.assert_allclose(ours.best_alphas_, np.asarray(ref.best_alphas_), rtol=1e-5)
    pred_ref = ref.predict(X32)
    np.testing.assert_allclose(ours.predict(X32), pred_ref, rtol=1e-4, atol=1e-4 * np.abs(pred_ref).max())


def test_fixed_alpha_matches_sklearn_ridge():
    X, Y = make_problem(50, 10, 6, seed=3)
    for fit_intercept in (True, False):
        ours = RidgeCV(alphas=[7.5], cv=3, fit_intercept=fit_intercept, dtype=torch.float64).fit(X, Y)
        sk = Ridge(alpha=7.5, fit_intercept=fit_intercept).fit(X, Y)
        np.testing.assert_allclose(ours.coef_, sk.coef_.T, rtol=1e-10, atol=1e-12)
        np.testing.assert_allclose(ours.intercept_, sk.intercept_ if fit_intercept else 0.0, atol=1e-10)
        np.testing.assert_allclose(ours.predict(X), sk.predict(X), rtol=1e-10, atol=1e-10)
        assert np.all(ours.best_alphas_ == 7.5)


def test_cv_scores_equal_brute_force_per_fold_ridge():
    """cv_scores_ is the fold-averaged R² of a ridge refit on each training fold (oracle: scikit-learn)."""
    X, Y = make_problem(45, 6, 4, seed=4)
    alphas = [0.1, 10.0, 1000.0]
    ours = RidgeCV(alphas=alphas, cv=3, dtype=torch.float64).fit(X, Y)
    expected = np.zeros((3, 4))
    for train, val in KFold(3).split(X):
        for k, a in enumerate(alphas):
            pred = Ridge(alpha=a).fit(X[train], Y[train]).predict(X[val])
            yv = Y[val]
            expected[k] += 1 - ((yv - pred) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(ours.cv_scores_, expected / 3, rtol=1e-10)
    np.testing.assert_array_equal(ours.best_alphas_, np.asarray(alphas)[np.argmax(expected, axis=0)])


def test_kfold_scores_from_one_product_per_block_hold_with_large_offsets_in_float32():
    """With no more features than samples the folds keep no U (n_train × p): each fold's training part of
    G = Xcᵀ Yc is G minus its validation rows'. Features and responses far from 0 must not cancel in float32."""
    from llmvem.model.ridge import RidgePath

    rng = np.random.default_rng(7)
    X = (rng.standard_normal((90, 8)) + 40.0).astype(np.float32)
    Y = (X @ rng.standard_normal((8, 5)) + rng.standard_normal((90, 5)) + 1000.0).astype(np.float32)
    alphas = [0.1, 10.0, 1000.0]
    ours = RidgeCV(alphas=alphas, cv=3, progress_bar=False, voxel_batch=2).fit(X, Y)
    expected = np.zeros((3, 5))
    for train, val in KFold(3).split(X):
        for k, a in enumerate(alphas):
            pred = Ridge(alpha=a).fit(X[train].astype(np.float64), Y[train]).predict(X[val].astype(np.float64))
            yv = Y[val].astype(np.float64)
            expected[k] += 1 - ((yv - pred) ** 2).sum(0) / ((yv - yv.mean(0)) ** 2).sum(0)
    np.testing.assert_allclose(ours.cv_scores_, expected / 3, atol=2e-4)
    best = np.asarray(alphas)[np.argmax(expected, axis=0)]
    np.testing.assert_array_equal(ours.best_alphas_, best)
    ref = np.stack([Ridge(alpha=a).fit(X.astype(np.float64), Y[:, j]).predict(X.astype(np.float64))
                    for j, a in enumerate(best)], 1)
    np.testing.assert_allclose(ours.predict(X), ref, rtol=0, atol=2e-3)  # responses ~1000: float32 rounding
    path = RidgePath(torch.from_numpy(X), [(tr, va) for tr, va in KFold(3).split(X)], np.asarray(alphas))
    assert path.primal and path.full.U.numel() == 0
    assert all(part[3].shape == (8, 8) for part in path.fold_parts)  # V / s (p, rank), no U kept


def test_recovers_weights_and_picks_small_alpha_for_clean_voxels():
    rng = np.random.default_rng(5)
    X = rng.standard_normal((300, 5))
    W = rng.standard_normal((5, 2))
    Y = X @ W
    Y[:, 1] = rng.standard_normal(300) * 10  # pure noise voxel
    Y[:, 0] += 0.01 * rng.standard_normal(300)
    m = RidgeCV(alphas=np.logspace(-2, 6, 9), cv=5, dtype=torch.float64).fit(X, Y)
    assert m.best_alphas_[0] <= 1.0
    assert m.best_alphas_[1] >= 1e3
    np.testing.assert_allclose(m.coef_[:, 0], W[:, 0], atol=5e-3)
    assert m.best_scores_[0] > 0.999 and m.best_scores_[1] < 0.01
    assert m.score(X, Y)[0] > 0.999


def test_one_dimensional_y_and_rank_deficient_x():
    rng = np.random.default_rng(6)
    base = rng.standard_normal((40, 3))
    X = np.concatenate([base, base[:, :1] * 2.0], axis=1)  # 4th column duplicates the 1st: rank 3
    y = base @ np.array([1.0, -2.0, 0.5]) + 0.1 * rng.standard_normal(40)
    m = RidgeCV(alphas=[1e-2, 1.0], cv=4, dtype=torch.float64).fit(X, y)
    sk = Ridge(alpha=float(m.best_alphas_[0])).fit(X, y)
    pred = m.predict(X)
    assert pred.shape == (40,)
    np.testing.assert_allclose(pred, sk.predict(X), atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_constant_voxel_scores_zero_and_predicts_its_mean(dtype):
    X, Y = make_problem(30, 4, 3, seed=7)
    Y[:, 2] = 0.1  # not exactly representable: its float mean has rounding error
    m = RidgeCV(alphas=ALPHAS, cv=3, dtype=dtype).fit(X, Y)
    np.testing.assert_array_equal(m.cv_scores_[:, 2], 0.0)
    assert m.best_alphas_[2] == ALPHAS[-1]  # ties go to the largest alpha
    np.testing.assert_allclose(m.predict(X)[:, 2], 0.1, rtol=1e-6)


def test_errors_name_array_and_expected_shape():
    X, Y = make_problem(20, 3, 2)
    with pytest.raises(DataValidationError, match=r"Y: expected shape \(20, n_voxels\)"):
        RidgeCV().fit(X, Y[:15])
    with pytest.raises(DataValidationError, match=r"X: expected shape \(n_samples, n_features\)"):
        RidgeCV().fit(X[:, 0], Y)
    with pytest.raises(DataValidationError, match="alphas: expected positive"):
        RidgeCV(alphas=[1.0, -1.0]).fit(X, Y)
    with pytest.raises(DataValidationError, match="Y: contains NaN"):
        Y2 = Y.copy()
        Y2[3, 1] = np.nan
        RidgeCV(cv=2).fit(X, Y2)
    with pytest.raises(DataValidationError, match="cv: 30 folds but only 20 samples"):
        RidgeCV(cv=30).fit(X, Y)
    with pytest.raises(LLMVEMError, match="not fitted"):
        RidgeCV().predict(X)
    m = RidgeCV(cv=2).fit(X, Y)
    with pytest.raises(DataValidationError, match=r"X: expected shape \(n_samples, 3\) as in fit"):
        m.predict(X[:, :2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_matches_cpu():
    X, Y = make_problem(200, 30, 50, seed=8)
    cpu = RidgeCV(alphas=ALPHAS, device="cpu", dtype=torch.float64).fit(X, Y)
    gpu = RidgeCV(alphas=ALPHAS, device="cuda", dtype=torch.float64).fit(X, Y)
    np.testing.assert_allclose(gpu.predict(X), cpu.predict(X), rtol=1e-8, atol=1e-8)
    np.testing.assert_array_equal(gpu.best_alphas_, cpu.best_alphas_)


def test_inputs_are_not_modified():
    X, Y = make_problem(40, 5, 6, seed=9)
    X32, Y32 = X.astype(np.float32), Y.astype(np.float32)  # float32 C-ordered: read in place, not copied
    X_before, Y_before = X32.copy(), Y32.copy()
    RidgeCV(alphas=ALPHAS, cv=4).fit(X32, Y32)
    np.testing.assert_array_equal(X32, X_before)
    np.testing.assert_array_equal(Y32, Y_before)


@pytest.mark.parametrize("fit_intercept", [True, False])
@pytest.mark.parametrize("shape", [(30, 6, 5), (25, 40, 4)], ids=["primal n>p", "dual p>n"])
def test_leave_one_out_scores_equal_brute_force_refits(fit_intercept, shape):
    """cv="loo" is exact: each sample's residual equals that of a ridge refitted without it."""
    n, p, v = shape
    X, Y = make_problem(n, p, v, seed=5)
    alphas = np.logspace(-1, 3, 5)
    ours = RidgeCV(alphas=alphas, cv="loo", scoring="neg_mse", fit_intercept=fit_intercept,
                   dtype=torch.float64, device="cpu").fit(X, Y)
    expected = np.zeros((len(alphas), v))
    for k, a in enumerate(alphas):
        for i in range(n):
            keep = np.arange(n) != i
            ref = Ridge(alpha=a, fit_intercept=fit_intercept).fit(X[keep], Y[keep])
            expected[k] -= (Y[i] - ref.predict(X[i:i + 1])[0]) ** 2 / n
    np.testing.assert_allclose(ours.cv_scores_, expected, rtol=1e-7)
    assert ours.n_splits_ == n
    # the refit is the ordinary ridge on all samples with each voxel's alpha
    for j in range(v):
        ref = Ridge(alpha=ours.best_alphas_[j], fit_intercept=fit_intercept).fit(X, Y[:, j])
        np.testing.assert_allclose(ours.coef_[:, j], ref.coef_, rtol=1e-7, atol=1e-9)


def test_shared_alpha_matches_sklearn_leave_one_out():
    from sklearn.linear_model import RidgeCV as SkRidgeCV

    X, Y = make_problem(50, 12, 8, seed=3)
    alphas = np.logspace(-2, 4, 13)
    ours = RidgeCV(alphas=alphas, cv="loo", scoring="neg_mse", local_alpha=False, dtype=torch.float64,
                   device="cpu").fit(X, Y)
    ref = SkRidgeCV(alphas=alphas, alpha_per_target=False).fit(X, Y)
    assert len(np.unique(ours.best_alphas_)) == 1 and ours.best_alphas_[0] == pytest.approx(ref.alpha_)
    np.testing.assert_allclose(ours.coef_, ref.coef_.T, rtol=1e-7, atol=1e-9)
    np.testing.assert_allclose(ours.intercept_, ref.intercept_, rtol=1e-7, atol=1e-9)
    # per-voxel α by the same leave-one-out scores: as sklearn's alpha_per_target
    per = RidgeCV(alphas=alphas, cv="loo", scoring="neg_mse", dtype=torch.float64, device="cpu").fit(X, Y)
    ref_per = SkRidgeCV(alphas=alphas, alpha_per_target=True).fit(X, Y)
    np.testing.assert_allclose(per.best_alphas_, ref_per.alpha_)
    # blocks do not change a shared α (it needs every voxel's score before the refit)
    blocked = RidgeCV(alphas=alphas, cv="loo", scoring="neg_mse", local_alpha=False, dtype=torch.float64,
                      device="cpu", voxel_batch=3).fit(X, Y)
    np.testing.assert_allclose(blocked.coef_, ours.coef_, rtol=1e-10)


def test_leave_one_out_refuses_bad_cv_and_tiny_data():
    X, Y = make_problem(10, 3, 2)
    with pytest.raises(DataValidationError, match="cv"):
        RidgeCV(cv="lOO").fit(X, Y)
    with pytest.raises(DataValidationError, match="at least 3 samples"):
        RidgeCV(cv="loo").fit(X[:2], Y[:2])


def test_row_stack_of_splits_gives_the_fit_of_their_concatenation_without_copying_them():
    from llmvem.model.ridge import RowStack

    rng = np.random.default_rng(3)
    X = rng.normal(size=(70, 12))
    Y = (X @ rng.normal(size=(12, 300)) + rng.normal(size=(70, 300))).astype(np.float32)
    parts = [Y[:50].copy(), Y[50:].copy()]
    whole = RidgeCV(cv=5, voxel_batch=64).fit(X, Y)
    stacked = RidgeCV(cv=5, voxel_batch=64).fit(X, RowStack(parts))
    np.testing.assert_array_equal(stacked.best_alphas_, whole.best_alphas_)
    np.testing.assert_allclose(stacked.coef_, whole.coef_, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(stacked.predict(X), whole.predict(X), rtol=1e-5, atol=1e-6)
    block = RowStack(parts)[:, 10:20]
    assert block.shape == (70, 10) and np.shares_memory(parts[0], RowStack(parts[:1])[:, 10:20])
    with pytest.raises(DataValidationError, match="differ"):
        RowStack([parts[0], parts[1][:, :5]])
    with pytest.raises(IndexError):
        RowStack(parts)[:10, :]
