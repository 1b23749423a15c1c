"""bench/bench_shared_core_v4.py is a thin client of llmvem: ``llmvem train`` per session (separate), ``train-multi``
(joint), ``train-multi`` on the other sessions then ``train --init-core`` (loso); the package's selection rule and
pooled statistics, strict JSON and a ledger line. Run on three fake sessions in the Cowley et al. layout."""

from __future__ import annotations

import csv
import importlib.util

import numpy as np
import pytest
from conftest import REPO_ROOT
from test_multisubject import make_v4_session

from llmvem.evaluate.metrics import pearson_r
from llmvem.provenance import read_results


def _load():
    spec = importlib.util.spec_from_file_location("bench_shared_core_v4",
                                                  REPO_ROOT / "bench" / "bench_shared_core_v4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_shared_core_benchmark_arms_are_the_package_paths(tmp_path, capsys, one_torch_thread):
    data = tmp_path / "v4"
    weights = np.random.default_rng(0).normal(size=(6, 8))
    for i, (name, n) in enumerate((("s1", 36), ("s2", 30), ("s3", 30))):
        make_v4_session(data, name, n, weights, i + 1)
    bench = _load()
    out, ledger, runs = tmp_path / "core.json", tmp_path / "ledger.csv", tmp_path / "runs"
    res = bench.main(["--data", str(data), "--seeds", "2", "--cache-dir", str(tmp_path / "cache"),
                      "--runs-dir", str(runs), "--results", str(out), "--ledger", str(ledger),
                      "--bootstrap", "20", "--threads", "1", "--set", "train.stage1.epochs=2",
                      "--set", "train.stage2.epochs=1", "--set", "backbone.batch_size=64"])
    saved = read_results(out)  # strict JSON
    assert saved["n_seeds"] == 2 and saved["seeds"] == [0, 1]
    assert set(saved["arms"]) >= {"separate", "joint", "loso"}
    for arm in ("separate", "joint", "loso"):
        assert set(saved["arms"][arm]) >= {"mean_of_means", "mean_of_medians"}
    sessions = ["s1", "s2", "s3"]
    for s in sessions:
        y = np.load(runs / "separate" / s / "test_responses.npy")
        # joint: the train-multi run's own predictions of the session, on the same test images
        joint = [np.load(runs / "joint" / f"seed{k}" / "joint" / "predictions" / f"v4_{s}_test.npy")
                 for k in range(2)]
        assert saved["sessions"]["joint"][s]["mean_r"] == pytest.approx(
            np.mean([np.nanmean(pearson_r(y, p)) for p in joint]))
        # loso: the core never saw the session, and the session was fitted on that core
        core = runs / "loso" / f"core_without_{s}"
        assert sorted(read_results(core / "summary.json")["subjects"]) == [f"v4_{x}" for x in sessions if x != s]
        metrics = read_results(runs / "loso" / s / "metrics.json")
        assert saved["sessions"]["loso"][s]["model"] == metrics["selection"]["model"]
        assert metrics["selection"]["model"] in ("spatial", "spatial_frozen")
    mean = np.mean([saved["sessions"]["loso"][s]["mean_r"] for s in sessions])
    assert saved["arms"]["loso"]["mean_of_means"] == pytest.approx(mean)
    c = saved["comparisons"]["loso_vs_separate"]
    assert c["pooled"]["n_seeds"] == 2 and c["pooled"]["ci"][0] <= c["pooled"]["delta_mean_r"] <= c["pooled"]["ci"][1]
    assert c["sessions"]["s1"]["diff"] == pytest.approx(saved["sessions"]["loso"]["s1"]["mean_r"]
                                                         - saved["sessions"]["separate"]["s1"]["mean_r"])
    with open(ledger, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["benchmark"] == "bench_shared_core_v4" and rows[0]["sessions"] == "s1 s2 s3"
    printed = capsys.readouterr().out
    assert "loso_vs_separate" in printed and res is not None
