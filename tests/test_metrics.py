"""Per-voxel metrics: Pearson r, noise-normalised accuracy, explained variance, summaries."""

from __future__ import annotations

import json

import numpy as np
import pytest
from scipy import stats
from sklearn.metrics import r2_score

from llmvem.errors import DataValidationError
from llmvem.evaluate import metrics
from llmvem.evaluate.metrics import (
    evaluate_predictions,
    explained_variance,
    noise_normalized_accuracy,
    pearson_r,
    summarize,
)


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((50, 7))
    p = 0.6 * y + rng.standard_normal((50, 7))
    return y, p


def test_pearson_matches_scipy_per_column(data):
    y, p = data
    r = pearson_r(y, p)
    expected = [stats.pearsonr(y[:, j], p[:, j])[0] for j in range(y.shape[1])]
    assert r.shape == (7,)
    assert r.dtype == np.float64
    np.testing.assert_allclose(r, expected, rtol=1e-12, atol=1e-12)


def test_pearson_hand_values():
    y = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0]])
    p = np.array([[2.0, 3.0], [4.0, 2.0], [6.0, 1.0]])
    np.testing.assert_allclose(pearson_r(y, p), [1.0, -1.0])
    # 1-D inputs are one voxel
    np.testing.assert_allclose(pearson_r([1, 2, 3, 4], [1, 3, 2, 4]), [0.8])


def test_pearson_float32_accumulates_in_float64_and_blocks(monkeypatch):
    rng = np.random.default_rng(1)
    # a large offset makes float32 single-pass sums lose the signal; float64 two-pass keeps it
    y = (1e4 + rng.standard_normal((400, 30))).astype(np.float32)
    p = (y + rng.standard_normal((400, 30)).astype(np.float32))
    ref = pearson_r(y.astype(np.float64), p.astype(np.float64))
    monkeypatch.setattr(metrics, "_BLOCK_BYTES", 400 * 8 * 7)  # blocks of 7 voxels
    r = pearson_r(y, p)
    np.testing.assert_allclose(r, ref, atol=1e-12)
    assert 0.6 < r.mean() < 0.8


def test_pearson_constant_columns_are_zero_and_nan_propagates():
    y = np.array([[0.1, 1.0, 1.0], [0.1, 2.0, np.nan], [0.1, 3.0, 3.0]], dtype=np.float32)
    p = np.array([[1.0, 5.0, 1.0], [2.0, 5.0, 2.0], [3.0, 5.0, 3.0]], dtype=np.float32)
    r = pearson_r(y, p)
    assert r[0] == 0.0 and r[1] == 0.0
    assert np.isnan(r[2])


def test_pearson_shape_errors_name_the_array():
    with pytest.raises(DataValidationError, match=r"y_pred: expected the shape of y_true \(4, 3\)"):
        pearson_r(np.zeros((4, 3)), np.zeros((4, 2)))
    with pytest.raises(DataValidationError, match="y_true: expected shape"):
        pearson_r(np.zeros((2, 2, 2)), np.zeros((2, 2, 2)))
    with pytest.raises(DataValidationError, match="at least 2 samples"):
        pearson_r(np.zeros((1, 3)), np.zeros((1, 3)))


def test_noise_normalized_accuracy_algonauts_rules():
    r = np.array([0.5, -0.3, 0.9, 0.2, 0.1, np.nan])
    nc = np.array([0.5, 0.5, 0.5, 0.0, 1.0, 0.5])
    acc = noise_normalized_accuracy(r, nc)
    np.testing.assert_allclose(acc[:5], [50.0, 0.0, 100.0, 100.0, 1.0])  # 100·.25/.5; r<0→0; capped; NC=0; 100·.01/1
    assert np.isnan(acc[5])
    # NC = 0 is replaced by 1e-14, so r = 0 stays 0 there (not NaN)
    assert noise_normalized_accuracy(np.array([0.0]), np.array([0.0]))[0] == 0.0


def test_noise_normalized_accuracy_rejects_percent_ceilings():
    with pytest.raises(DataValidationError, match="divide it by 100"):
        noise_normalized_accuracy(np.array([0.5, 0.4]), np.array([45.0, 30.0]))
    with pytest.raises(DataValidationError, match=r"noise_ceiling: expected shape \(2,\)"):
        noise_normalized_accuracy(np.array([0.5, 0.4]), np.array([0.4, 0.3, 0.2]))


def test_explained_variance_matches_sklearn(data):
    y, p = data
    ev = explained_variance(y, p)
    np.testing.assert_allclose(ev, r2_score(y, p, multioutput="raw_values"), rtol=1e-12)
    assert explained_variance(y, y).tolist() == [1.0] * 7
    # predicting the mean gives 0; a constant y gives 0 by convention
    np.testing.assert_allclose(explained_variance(y, np.broadcast_to(y.mean(0), y.shape)), 0.0, atol=1e-12)
    assert explained_variance(np.ones((5, 1)), np.arange(5.0)[:, None])[0] == 0.0


def test_summarize_overall_roi_hemisphere_nan_safe():
    v = np.array([1.0, 2.0, 3.0, np.nan, 5.0, 6.0])
    rois = {"V1": np.array([1, 1, 1, 0, 0, 0]), "FFA": np.array([0, 0, 0, 1, 1, 1], dtype=bool),
            "empty": np.zeros(6, dtype=bool)}
    hemi = np.array(["lh", "rh", "lh", "rh", "lh", "rh"])
    s = summarize(v, rois, hemi)
    assert s["mean"] == pytest.approx(3.4) and s["median"] == pytest.approx(3.0) and s["n_voxels"] == 6
    assert s["per_roi"]["V1"] == {"mean": 2.0, "median": 2.0, "n_voxels": 3}
    assert s["per_roi"]["FFA"] == {"mean": 5.5, "median": 5.5, "n_voxels": 3}
    assert s["per_roi"]["empty"] == {"mean": None, "median": None, "n_voxels": 0}
    assert s["per_hemisphere"]["lh"]["mean"] == pytest.approx(3.0)
    assert s["per_hemisphere"]["rh"]["mean"] == pytest.approx(4.0)
    assert s["per_roi_hemisphere"]["FFA"]["rh"] == {"mean": 6.0, "median": 6.0, "n_voxels": 2}
    assert "lh" in s["per_roi_hemisphere"]["V1"] and s["per_roi_hemisphere"]["V1"]["lh"]["mean"] == 2.0
    assert s["per_roi_hemisphere"]["empty"] == {}
    json.dumps(s, allow_nan=False)  # JSON-friendly: plain floats / None
    assert all(type(x) in (float, type(None)) for x in (s["mean"], s["per_roi"]["V1"]["mean"]))


def test_summarize_validation():
    with pytest.raises(DataValidationError, match=r"roi_masks\['V1'\]: expected shape \(3,\)"):
        summarize(np.zeros(3), {"V1": np.ones(4, dtype=bool)})
    with pytest.raises(DataValidationError, match="boolean mask"):
        summarize(np.zeros(3), {"V1": np.array([0, 2, 1])})
    with pytest.raises(DataValidationError, match="'lh' or 'rh'"):
        summarize(np.zeros(3), hemisphere=np.array(["lh", "left", "rh"]))


def test_evaluate_predictions_summary_keys_and_values():
    rng = np.random.default_rng(3)
    n, v = 80, 6
    y = rng.standard_normal((n, v))
    noise = rng.standard_normal((n, v))
    pred = y + noise * np.array([0.2, 0.5, 1.0, 2.0, 4.0, 8.0])
    nc = np.full(v, 0.5)
    rois = {"early": np.array([1, 1, 1, 0, 0, 0], dtype=bool), "late": np.array([0, 0, 0, 1, 1, 1], dtype=bool)}
    hemi = np.array(["lh", "rh"] * 3)
    out = evaluate_predictions(y, pred, noise_ceiling=nc, roi_masks=rois, hemisphere=hemi)
    r = out["r"]
    np.testing.assert_allclose(r, pearson_r(y, pred))
    assert np.all(np.diff(r) < 0)  # more noise, lower r
    np.testing.assert_allclose(out["accuracy"], np.minimum(100 * np.clip(r, 0, None) ** 2 / 0.5, 100))
    s = out["summary"]
    assert s["mean_r"] == pytest.approx(r.mean()) and s["median_r"] == pytest.approx(np.median(r))
    assert s["mean_accuracy"] == pytest.approx(out["accuracy"].mean())
    assert s["per_roi"]["early"]["mean_r"] == pytest.approx(r[:3].mean())
    assert s["per_roi"]["late"]["n_voxels"] == 3
    assert s["per_roi"]["early"]["mean_accuracy"] > s["per_roi"]["late"]["mean_accuracy"]
    assert s["per_hemisphere"]["lh"]["mean_r"] == pytest.approx(r[[0, 2, 4]].mean())
    assert s["per_roi_hemisphere"]["late"]["rh"]["median_r"] == pytest.approx(np.median(r[[3, 5]]))
    json.dumps(s, allow_nan=False)

    plain = evaluate_predictions(y, pred)
    assert plain["accuracy"] is None
    assert "mean_accuracy" not in plain["summary"] and plain["summary"]["per_roi"] == {}
