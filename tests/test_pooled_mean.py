"""llmvem.evaluate.pooled.runs_mean_ci: one model's mean test r over the neurons of several run folders, with the
interval of the bootstrap over test images (within each run) and seeds."""

from __future__ import annotations

import numpy as np
import pytest
from test_pooled import fake_session

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.pooled import model_seeds, runs_mean_ci


def test_mean_over_all_neurons_of_all_runs_with_seeds_and_images_resampled(tmp_path):
    runs = [fake_session(tmp_path, f"s{i}", 40 + 10 * i, 6 + i, i, 0.8) for i in range(3)]
    res = runs_mean_ci(runs, "net", n_boot=200)
    per_seed = [np.concatenate([pearson_r(np.load(r / "test_responses.npy"), model_seeds(r, "net")[k])
                                for r in runs]).mean() for k in range(3)]
    assert res["n_seeds"] == 3 and res["n_voxels"] == 6 + 7 + 8 and res["runs"] == ["s0", "s1", "s2"]
    assert res["mean_r"] == pytest.approx(np.mean(per_seed), rel=1e-6)
    assert res["ci"][0] < res["mean_r"] < res["ci"][1]
    ens = runs_mean_ci(runs, "net", n_boot=50, members=False)  # the averaged ensemble: one prediction per run
    assert ens["n_seeds"] == 1 and ens["mean_r"] > res["mean_r"]
    ridge = runs_mean_ci(runs[:1], "ridge", n_boot=50)  # a deterministic model, one run
    y = np.load(runs[0] / "test_responses.npy")
    assert ridge["mean_r"] == pytest.approx(np.nanmean(pearson_r(y, model_seeds(runs[0], "ridge")[0])), rel=1e-6)
    with pytest.raises(DataValidationError, match="at least one run"):
        runs_mean_ci([], "net")
