"""The seeds × images bootstrap (llmvem.evaluate.seeds): observed values, pooling, and what seeds add."""

from __future__ import annotations

import numpy as np
import pytest

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.seeds import seed_bootstrap, seed_mean_ci
from llmvem.evaluate.stats import paired_bootstrap


def _data(n_img=120, n_vox=30, seed=0):
    rng = np.random.default_rng(seed)
    y = rng.normal(size=(n_img, n_vox))
    return rng, y


def test_the_observed_difference_is_the_mean_over_seeds_of_the_mean_r_difference():
    rng, y = _data()
    a = [y + 2.0 * rng.normal(size=y.shape) for _ in range(3)]
    b = [y + 1.5 * rng.normal(size=y.shape) for _ in range(3)]
    res = seed_bootstrap(y, a, b, n_boot=100)
    per_seed = [pearson_r(y, b[k]).mean() - pearson_r(y, a[k]).mean() for k in range(3)]
    assert res["per_seed_delta"] == pytest.approx(per_seed)
    assert res["delta_mean_r"] == pytest.approx(np.mean(per_seed))
    assert res["a_mean_r"] == pytest.approx(np.mean([pearson_r(y, p).mean() for p in a]))
    assert res["ci"][0] <= res["delta_mean_r"] <= res["ci"][1]
    assert res["n_seeds"] == 3 and res["n_voxels"] == 30 and res["n_images"] == [120]
    assert seed_bootstrap(y, a, b, n_boot=100) == res  # seeded


def test_one_seed_is_the_image_bootstrap():
    rng, y = _data(n_img=200)
    a, b = [y + 2.0 * rng.normal(size=y.shape)], [y + 1.8 * rng.normal(size=y.shape)]
    ours = seed_bootstrap(y, a, b, n_boot=2000)
    ref = paired_bootstrap(y, a[0], b[0], n_boot=2000, seed=1)["overall"]["r"]
    assert ours["delta_mean_r"] == pytest.approx(ref["diff"])
    width, ref_width = ours["ci"][1] - ours["ci"][0], ref["ci_high"] - ref["ci_low"]
    assert width == pytest.approx(ref_width, rel=0.15)  # same quantity, other resamples


def test_seeds_that_disagree_widen_the_interval_to_include_zero():
    """b is better than a with two seeds and worse with the third: any one run's image CI excludes 0 (the test
    images are many), the seed level brings 0 back in."""
    rng, y = _data(n_img=400)
    noise = [1.0, 1.0, 3.0]  # b's noise per seed; a's is 1.6 throughout
    a = [y + 1.6 * rng.normal(size=y.shape) for _ in range(3)]
    b = [y + s * rng.normal(size=y.shape) for s in noise]
    res = seed_bootstrap(y, a, b, n_boot=500)
    assert res["per_seed_delta"][0] > 0 and res["per_seed_delta"][2] < 0
    one = seed_bootstrap(y, a[:1], b[:1], n_boot=500)
    assert one["ci"][0] > 0  # seed 0 alone: "significant"
    assert res["ci"][0] < 0 < res["ci"][1] and res["p"] > 0.05


def test_sessions_pool_over_all_voxels_with_images_resampled_per_session():
    rng, y1 = _data(n_img=80, n_vox=10, seed=1)
    _, y2 = _data(n_img=60, n_vox=30, seed=2)
    a = [[y + 2.0 * rng.normal(size=y.shape) for _ in range(2)] for y in (y1, y2)]
    b = [[y + 1.0 * rng.normal(size=y.shape) for _ in range(2)] for y in (y1, y2)]
    pooled = seed_bootstrap([y1, y2], a, b, n_boot=200)
    parts = [seed_bootstrap(y, a[i], b[i], n_boot=10) for i, y in enumerate((y1, y2))]
    assert pooled["delta_mean_r"] == pytest.approx((10 * parts[0]["delta_mean_r"] + 30 * parts[1]["delta_mean_r"]) / 40)
    assert pooled["n_voxels"] == 40 and pooled["n_images"] == [80, 60] and pooled["ci"][0] > 0
    one = seed_mean_ci([y1, y2], b, n_boot=200)
    assert one["mean_r"] == pytest.approx(pooled["b_mean_r"]) and one["ci"][0] < one["mean_r"] < one["ci"][1]


def test_mismatched_inputs_are_named():
    _, y = _data()
    with pytest.raises(DataValidationError, match=r"seed 1.*shape \(120, 3\)"):
        seed_bootstrap(y, [y, y], [y, y[:, :3]])
    with pytest.raises(DataValidationError, match="the same number"):
        seed_bootstrap(y, [y, y], [y])
    with pytest.raises(DataValidationError, match="n_boot"):
        seed_mean_ci(y, [y], n_boot=0)
