"""bench/bench_v4.py is a thin client of llmvem: the shipped v4_spatial models through run_experiment, one ordinary
run folder per session, the package's selection rule and pooled statistics, strict JSON and a ledger line.

The real-data run uses one session cut to 60 images with quick training (skipped when ``../shared/data`` is absent).
"""

from __future__ import annotations

import csv
import importlib.util

import pytest
from conftest import REPO_ROOT, needs_shared

from llmvem.config import load_config
from llmvem.provenance import read_results


def _load():
    spec = importlib.util.spec_from_file_location("bench_v4", REPO_ROOT / "bench" / "bench_v4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_v4_benchmark_is_the_package_path_on_a_tiny_subset(tmp_path, capsys):
    data = needs_shared("v4_cowley2023")
    bench = _load()
    out, ledger, runs = tmp_path / "v4.json", tmp_path / "ledger.csv", tmp_path / "runs"
    res = bench.main(["--data", str(data), "--sessions", "210325", "--max-images", "60", "--quick", "--seeds", "2",
                      "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(runs), "--out", str(out),
                      "--ledger", str(ledger), "--bootstrap", "30", "--threads", "1"])
    assert read_results(out) == read_results(out)  # strict JSON (NaN and Infinity refused)
    saved = read_results(out)
    for key in ("date", "commit", "command", "config_hash", "machine", "seeds"):
        assert saved[key], key
    assert saved["seeds"] == [0, 1]
    s = saved["sessions"]["210325"]
    names = [e.name for e in load_config("v4_spatial").evaluate.models]
    assert list(s["models"]) == names
    # the run folder is the one a user gets: metrics.json chose on validation, never a ridge refitted on val
    metrics = read_results(runs / "210325" / "metrics.json")
    assert s["selection"]["model"] == metrics["selection"]["model"]
    assert s["selection"]["model"] not in ("ridge_grid", "ridge_inputs", "banded_inputs")
    assert s["models"]["ridge_inputs"]["val_in_fit"] and not s["models"]["spatial_blend"]["val_in_fit"]
    assert len(s["models"]["spatial"]["member_mean_r"]) == 2  # one network per seed, kept for the statistics
    assert s["models"]["ridge_grid"]["details"]["chosen"] in s["models"]["ridge_grid"]["details"]["val_mean_r"]
    # pooled comparisons as the config declares them; the spatial network's over seeds × images
    assert set(res["pooled"]) == {"spatial_vs_ridge_grid", "spatial_vs_ridge_inputs", "spatial_vs_banded_inputs",
                                  "spatial_vs_spatial_start", "spatial_blend_vs_spatial",
                                  "spatial_blend_vs_ridge_grid"}
    one = res["pooled"]["spatial_vs_ridge_inputs"]["one_network"]["pooled"]
    assert one["n_seeds"] == 2 and one["ci"][0] <= one["delta_mean_r"] <= one["ci"][1]
    assert "ensemble" in res["pooled"]["spatial_vs_ridge_inputs"]
    with open(ledger, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == 1 and rows[0]["benchmark"] == "bench_v4" and rows[0]["sessions"] == "210325"
    assert rows[0]["config_hash"] == saved["config_hash"]
    printed = capsys.readouterr().out
    assert "spatial_vs_ridge_inputs (one network)" in printed and "chosen (val)" in printed


def test_validation_runs_read_no_test_split(tmp_path, monkeypatch):
    """--split val: the JSON holds validation figures only and no ledger line is written."""
    bench = _load()
    args = bench.parse_args(["--split", "val", "--seeds", "1"])
    cfg = bench.session_config(args, "210322")
    assert cfg.data.spec.endswith(":210322") and all(e.seeds == 1 for e in cfg.evaluate.models if e.kind == "llmvem")
    metrics = {"dataset": {"n_voxels": 3}, "selection": {"model": "spatial", "reason": "r", "val_mean_r": 0.5},
               "models": {"spatial": {"val_mean_r": 0.5, "mean_r": 0.9, "median_r": 0.9}}}
    rec = bench.session_record(tmp_path, metrics, "val")
    assert rec["models"]["spatial"] == {"val_mean_r": 0.5, "val_in_fit": False}
    assert "val_mean_r" not in rec["selection"] and "mean_r" not in str(rec["models"]).replace("val_mean_r", "")


def test_benchmark_exits_cleanly_without_data(tmp_path, capsys):
    assert _load().main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "v4.json")]) is None
    assert "bench_v4: data folder" in capsys.readouterr().out and not (tmp_path / "v4.json").exists()
