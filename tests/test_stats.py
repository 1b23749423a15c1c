"""Paired bootstrap comparison of two models on the same test images."""

from __future__ import annotations

import json

import numpy as np
import pytest

from llmvem.errors import DataValidationError
from llmvem.evaluate import stats as stats_mod
from llmvem.evaluate.metrics import noise_normalized_accuracy, pearson_r
from llmvem.evaluate.stats import paired_bootstrap


@pytest.fixture
def responses():
    rng = np.random.default_rng(0)
    y = rng.standard_normal((60, 40))
    return rng, y


def test_identical_models_give_zero_difference_and_p_one(responses):
    rng, y = responses
    a = y + rng.standard_normal(y.shape)
    out = paired_bootstrap(y, a, a.copy(), n_boot=200, seed=1, noise_ceiling=np.full(40, 0.6))
    r = out["overall"]["r"]
    assert r["diff"] == 0.0 and r["ci_low"] == 0.0 and r["ci_high"] == 0.0
    assert r["p_value"] == 1.0
    assert out["overall"]["fraction_improved"] == 0.0
    assert out["overall"]["accuracy"]["p_value"] == 1.0


def test_better_model_is_detected(responses):
    rng, y = responses
    a = rng.standard_normal(y.shape)  # unrelated to the truth
    b = y + 0.5 * rng.standard_normal(y.shape)
    rois = {"first": np.arange(40) < 10, "rest": np.arange(40) >= 10}
    out = paired_bootstrap(y, a, b, n_boot=300, seed=0, noise_ceiling=np.full(40, 0.9), roi_masks=rois)
    o = out["overall"]
    assert o["r"]["diff"] == pytest.approx(pearson_r(y, b).mean() - pearson_r(y, a).mean())
    assert o["r"]["diff"] > 0.8
    assert o["r"]["ci_low"] > 0.0 and o["r"]["ci_low"] < o["r"]["diff"] < o["r"]["ci_high"]
    assert o["r"]["p_value"] < 0.01
    assert o["r"]["p_value"] == pytest.approx(2 / 301)  # no resample on the other side: 2·(0+1)/(n+1)
    assert o["fraction_improved"] == 1.0
    acc_b = noise_normalized_accuracy(pearson_r(y, b), np.full(40, 0.9)).mean()
    assert o["accuracy"]["b"] == pytest.approx(acc_b)
    assert o["accuracy"]["ci_low"] > 0
    # the reversed comparison mirrors the numbers
    rev = paired_bootstrap(y, b, a, n_boot=300, seed=0)["overall"]["r"]
    assert rev["diff"] == pytest.approx(-o["r"]["diff"])
    assert rev["ci_high"] == pytest.approx(-o["r"]["ci_low"])
    assert rev["p_value"] == o["r"]["p_value"]
    for name, mask in rois.items():
        g = out["per_roi"][name]
        assert g["n_voxels"] == int(mask.sum())
        assert g["r"]["a"] == pytest.approx(pearson_r(y, a)[mask].mean())
    json.dumps(out, allow_nan=False)


def test_equal_models_give_large_p_and_ci_covering_zero(responses):
    rng, y = responses
    a = y + rng.standard_normal(y.shape)
    b = y + rng.standard_normal(y.shape)  # same quality, independent errors
    o = paired_bootstrap(y, a, b, n_boot=400, seed=3)["overall"]
    assert o["r"]["ci_low"] < 0 < o["r"]["ci_high"]
    assert o["r"]["p_value"] > 0.1
    assert 0.2 < o["fraction_improved"] < 0.8


def test_bootstrap_distribution_matches_loop_over_resamples(monkeypatch, responses):
    """The vectorised weighted-sum r equals recomputing pearson_r on each resampled set of images."""
    rng, y = responses
    a = y + rng.standard_normal(y.shape)
    b = y + 2 * rng.standard_normal(y.shape)
    n_boot, seed = 25, 7
    monkeypatch.setattr(stats_mod, "_BLOCK_BYTES", 8 * 8 * 60 * 9)  # blocks of 9 voxels
    out = paired_bootstrap(y, a, b, n_boot=n_boot, seed=seed)
    idx = np.random.default_rng(seed).integers(0, 60, size=(n_boot, 60))
    diffs = np.array([pearson_r(y[i], b[i]).mean() - pearson_r(y[i], a[i]).mean() for i in idx])
    lo, hi = np.percentile(diffs, [2.5, 97.5])
    assert out["overall"]["r"]["ci_low"] == pytest.approx(lo, abs=1e-10)
    assert out["overall"]["r"]["ci_high"] == pytest.approx(hi, abs=1e-10)


def test_same_seed_same_answer_and_seed_matters(responses):
    rng, y = responses
    a, b = y + rng.standard_normal(y.shape), y + 1.2 * rng.standard_normal(y.shape)
    one = paired_bootstrap(y, a, b, n_boot=100, seed=5)
    assert one == paired_bootstrap(y, a, b, n_boot=100, seed=5)
    assert one["overall"]["r"]["ci_low"] != paired_bootstrap(y, a, b, n_boot=100, seed=6)["overall"]["r"]["ci_low"]


def test_validation_errors():
    y = np.zeros((10, 3))
    with pytest.raises(DataValidationError, match=r"pred_b: expected the shape of y_true \(10, 3\)"):
        paired_bootstrap(y, y, np.zeros((10, 2)))
    with pytest.raises(DataValidationError, match="n_boot"):
        paired_bootstrap(y, y, y, n_boot=0)
    with pytest.raises(DataValidationError, match="select no voxel"):
        paired_bootstrap(y + np.arange(10)[:, None], y, y, roi_masks={"x": np.zeros(3, dtype=bool)})
    with pytest.raises(DataValidationError, match="divide it by 100"):
        paired_bootstrap(y, y, y, noise_ceiling=np.full(3, 40.0))


def test_bootstrap_ci_over_images_brackets_the_mean_and_matches_paired_resamples(responses):
    from llmvem.evaluate.stats import bootstrap_ci

    rng, y = responses
    pred = y + rng.standard_normal(y.shape)
    rois = {"first": np.arange(40) < 10}
    out = bootstrap_ci(y, pred, n_boot=300, seed=2, noise_ceiling=np.full(40, 0.8), groups=rois)
    r = pearson_r(y, pred)
    o = out["overall"]
    assert o["r"]["mean"] == pytest.approx(r.mean())
    assert o["r"]["ci_low"] < o["r"]["mean"] < o["r"]["ci_high"]
    # 60 images: the standard error of a mean r near 0.7 is a few hundredths, not the voxel spread
    assert 0.01 < o["r"]["ci_high"] - o["r"]["ci_low"] < 0.2
    g = out["per_group"]["first"]
    assert g["n_voxels"] == 10 and g["r"]["mean"] == pytest.approx(r[:10].mean())
    assert g["accuracy"]["mean"] == pytest.approx(noise_normalized_accuracy(r, np.full(40, 0.8))[:10].mean())
    # same seed, same resamples: the paired comparison against a constant-offset copy has zero-width intervals
    # and the single-model bootstrap of either model agrees with the paired one's resampled means
    paired = paired_bootstrap(y, pred, pred + 1.0, n_boot=300, seed=2)
    assert paired["overall"]["r"]["ci_low"] == pytest.approx(0.0, abs=1e-12)
    with pytest.raises(DataValidationError, match="confidence"):
        bootstrap_ci(y, pred, confidence=1.5)
