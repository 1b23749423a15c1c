"""Statistics over run folders (llmvem.evaluate.pooled, ``llmvem compare``): per session, over sessions, pooled
over neurons with test images and seeds resampled."""

from __future__ import annotations

import numpy as np
import pytest

from llmvem.cli import main
from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.pooled import compare_runs, model_seeds, run_model_summary, session_tests


def fake_session(root, name, n_img, n_vox, seed, gain):
    """A run folder: responses, a ridge (one prediction) and a 3-seed ensemble better by ``gain``."""
    rng = np.random.default_rng(seed)
    run = root / name
    y = rng.standard_normal((n_img, n_vox)).astype(np.float32)
    np.save((run.mkdir(parents=True) or run) / "test_responses.npy", y)
    (run / "models" / "ridge").mkdir(parents=True)
    np.save(run / "models" / "ridge" / "predictions_test.npy", (y + 2.0 * rng.standard_normal(y.shape)).astype(np.float32))
    members = []
    for k in range(3):
        d = run / "models" / "net" / f"seed{k}"
        d.mkdir(parents=True)
        p = (y + (2.0 - gain) * rng.standard_normal(y.shape)).astype(np.float32)
        np.save(d / "predictions_test.npy", p)
        members.append(p)
    np.save(run / "models" / "net" / "predictions_test.npy", np.mean(members, axis=0))
    return run


def test_compare_runs_per_session_over_sessions_and_pooled(tmp_path, capsys):
    runs = [fake_session(tmp_path, f"s{i}", 40 + 10 * i, 6 + i, i, 0.8) for i in range(4)]
    res = compare_runs(runs, "ridge", "net", n_boot=300)
    for run in runs:  # per session: the mean over seeds of mean r, against the ridge's
        y = np.load(run / "test_responses.npy")
        ridge = np.nanmean(pearson_r(y, np.load(run / "models" / "ridge" / "predictions_test.npy")))
        net = np.mean([np.nanmean(pearson_r(y, p)) for p in model_seeds(run, "net")])
        assert res["sessions"][run.name]["diff"] == pytest.approx(net - ridge, rel=1e-6)
        assert res["sessions"][run.name]["n_seeds"] == 3
    assert res["over_sessions"]["n_improved"] == 4 and res["over_sessions"]["sign_test_p"] == pytest.approx(0.125)
    pooled = res["pooled"]
    assert pooled["n_seeds"] == 3 and pooled["n_voxels"] == sum(6 + i for i in range(4))
    assert pooled["ci"][0] > 0 and pooled["ci"][0] < pooled["delta_mean_r"] < pooled["ci"][1]
    # the ensembles' averaged predictions are a different (better) model than one network per seed
    ens = compare_runs(runs, "ridge", "net", n_boot=50, members=False)
    assert ens["pooled"]["n_seeds"] == 1 and ens["pooled"]["delta_mean_r"] > pooled["delta_mean_r"]
    summary = run_model_summary(runs[0], "net")
    assert len(summary["member_mean_r"]) == 3 and summary["mean_r"] > summary["one_network_mean_r"]
    assert main(["compare", *map(str, runs), "--a", "ridge", "--b", "net", "--n-boot", "50"]) == 0
    out = capsys.readouterr().out
    assert "sessions better 4/4" in out and "3 seeds" in out and "s3" in out


def test_session_tests_and_bad_runs(tmp_path):
    t = session_tests([0.01, 0.02, -0.005, 0.03])
    assert (t["n_improved"], t["n_worse"], t["n_sessions"]) == (3, 1, 4) and 0 < t["wilcoxon_p"] < 1
    assert session_tests([0.0, 0.0])["wilcoxon_p"] is None and session_tests([])["mean_diff"] is None
    run = fake_session(tmp_path, "s", 20, 4, 0, 0.5)
    with pytest.raises(DataValidationError, match="no such model"):
        compare_runs([run], "ridge", "nope")
    with pytest.raises(DataValidationError):
        compare_runs([run], "ridge", "../../etc")
    np.save(run / "models" / "ridge" / "predictions_test.npy", np.zeros((3, 3), np.float32))
    with pytest.raises(DataValidationError, match="shape"):
        compare_runs([run], "ridge", "net")
