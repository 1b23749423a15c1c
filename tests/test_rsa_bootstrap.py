"""llmvem.evaluate.rsa's bootstrap over images: resampled pairs, per-row intervals, paired deltas against a baseline
(planted RDMs; the 92-image benchmark's real rows are checked in test_bench_smoke.py)."""

from __future__ import annotations

import numpy as np
import pytest

from llmvem.errors import DataValidationError
from llmvem.evaluate.rsa import compare_rdms, image_bootstrap, rdm, resample_pairs, rsa_rows


def test_resampled_pairs_are_distinct_images_and_all_pairs_give_compare_rdms():
    rng = np.random.default_rng(0)
    n = 30
    latent = rng.normal(size=(n, 5))
    target, noise = rdm(latent), rdm(rng.normal(size=(n, 5)))
    a, b = resample_pairs(n, np.random.default_rng(1))
    assert len(a) > 0 and np.all(a != b) and a.max() < n
    boot = image_bootstrap({"same": target, "random": noise}, {"t": target}, n_boot=200, seed=0)
    np.testing.assert_allclose(boot["same"]["t"], 1.0)  # identical RDMs: r = 1 in every resample
    lo, hi = np.percentile(boot["random"]["t"], [2.5, 97.5])
    assert lo < compare_rdms(noise, target) < hi and lo < 0 < hi and hi - lo < 0.4  # unrelated: CI includes 0
    again = image_bootstrap({"random": noise}, {"t": target}, n_boot=200, seed=0)
    np.testing.assert_array_equal(again["random"]["t"], boot["random"]["t"])  # seeded
    with pytest.raises(DataValidationError, match="square RDMs of one size"):
        image_bootstrap({"m": target[:10, :10]}, {"t": target}, n_boot=5)


def test_rows_against_a_planted_brain_rank_models_and_pair_the_delta():
    """4 noisy subjects of a latent RDM: a model close to the latent beats a noisier one, with a paired delta whose
    CI is above 0; every figure is the mean over subjects of compare_rdms."""
    rng = np.random.default_rng(0)
    latent = rng.normal(size=(30, 5))
    subjects = {s: rdm(latent + rng.normal(scale=1.0, size=latent.shape)) for s in "ABCD"}
    mean = np.mean(list(subjects.values()), axis=0)
    patterns = {"good": latent + rng.normal(scale=0.3, size=latent.shape),
                "poor": latent + rng.normal(scale=3.0, size=latent.shape)}
    rows = rsa_rows(patterns, subjects, mean, rdm(latent), n_boot=200, seed=0, baselines={"good": "poor"})
    good, poor = rows["good"], rows["poor"]
    assert good["hit_subject_mean"] > poor["hit_subject_mean"] + 0.1
    for r in (good, poor):
        assert r["ci"][0] <= r["hit_subject_mean"] <= r["ci"][1]
        assert r["monkey_ci"][0] <= r["monkey"] <= r["monkey_ci"][1] and r["n_boot"] == 200 and r["dim"] == 5
        assert set(r["hit_subjects"]) == set("ABCD")
    assert good["baseline"] == "poor" and good["delta_ci"][0] > 0 and good["delta_p"] < 0.05
    assert good["delta_vs_backbone"] == pytest.approx(good["hit_subject_mean"] - poor["hit_subject_mean"])
    assert "delta_vs_backbone" not in poor
    assert good["hit_subject_mean"] == pytest.approx(np.mean([compare_rdms(rdm(patterns["good"]), s)
                                                              for s in subjects.values()]))
    assert good["human_avg"] == pytest.approx(compare_rdms(rdm(patterns["good"]), mean))
