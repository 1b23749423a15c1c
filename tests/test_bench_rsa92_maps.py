"""bench/bench_rsa92.py --flickr-maps (issue 25 item 5): the map-reading Flickr8k-aligned encoder's rows on the
92 images, on tiny sizes (40 Flickr8k images, 1-2 epochs, 50 bootstrap resamples), written to tmp_path only.

The real-data test is skipped when ``../shared/data`` lacks the 92-image set or Flickr8k; the argument checks
need no data.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
from conftest import REPO_ROOT, needs_shared

from llmvem.provenance import read_results


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_rsa92", REPO_ROOT / "bench" / "bench_rsa92.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench():
    return _load_bench()


def test_map_candidates_are_parsed_and_non_maps_refused(bench, capsys):
    args = bench.parse_args(["--flickr-maps", "block12@grid4, block14@grid4", "--flickr-maps", "block12@map",
                             "--flickr-epochs", "3,7"])
    assert args.flickr_maps == [("block12@grid4", "block14@grid4"), ("block12@map",)]
    assert args.flickr_epochs == (3, 7)
    assert args.out == bench.DEFAULT_MAPS_OUT  # its own results file, not rsa92.json
    assert bench.parse_args([]).out == bench.DEFAULT_OUT
    for bad in (["--flickr-maps", "block12"], ["--flickr-maps", "block12@grid"], ["--flickr-maps", ","],
                ["--flickr-maps", "block12@grid2", "--flickr-epochs", "0"]):
        with pytest.raises(SystemExit):
            bench.parse_args(bad)
    assert "is not a map" in capsys.readouterr().err


def test_map_reading_rows_on_tiny_sizes(bench, tmp_path, capsys):
    data = needs_shared("kriegeskorte92")
    flickr = needs_shared("flickr8k_1000")
    out, ledger = tmp_path / "maps.json", tmp_path / "ledger.csv"
    candidates = ["block12@grid2,block14@grid2", "block12@grid4"]
    res = bench.main(["--data", str(data), "--flickr", str(flickr), "--flickr-maps", candidates[0],
                      "--flickr-maps", candidates[1], "--alignment-mode", "smoke", "--cache-dir",
                      str(tmp_path / "cache"), "--out", str(out), "--ledger", str(ledger)])
    printed = capsys.readouterr().out
    saved = read_results(out)  # strict JSON
    assert saved["benchmark"] == "kriegeskorte92_rsa_map_aligned" and saved["seeds"] == [0]
    rows = res["rows"]
    embedding, core, inputs = bench.MAP_ROWS
    assert set(saved["rows"]) == set(rows)
    assert saved["rows"][embedding]["delta_ci"] == pytest.approx(rows[embedding]["delta_ci"])
    info = res["flickr8k_maps"]
    # the chosen candidate is one of those given; every candidate × epoch has its held-out top-1 recorded
    assert ",".join(info["layers"]) in candidates and info["epochs"] in (1, 2)
    assert set(info["heldout_top1"]) == set(candidates)
    assert all(set(v) == {"1", "2"} for v in info["heldout_top1"].values())
    assert info["n_images"] == 36 and info["n_heldout"] == 4 and info["chance_top1"] == pytest.approx(0.25)
    assert set(rows) == {embedding, core, inputs, *(f"backbone224_{s}" for s in info["layers"])}
    grid_dims = {"block12@grid2": 192 * 4, "block14@grid2": 192 * 4, "block12@grid4": 192 * 16}
    assert rows[inputs]["dim"] == sum(grid_dims[s] for s in info["layers"])
    assert rows[embedding]["dim"] == 384 and rows[core]["dim"] == 256  # MiniLM's size, the core's units
    for name, row in rows.items():
        assert row["ci"][0] <= row["hit_subject_mean"] <= row["ci"][1], name
        assert row["human_avg_ci"][0] <= row["human_avg"] <= row["human_avg_ci"][1], name
        assert row["hit_subject_mean"] == pytest.approx(np.mean(list(row["hit_subjects"].values())))
        assert -1 < row["monkey"] < 1 and row["n_boot"] == 50
    # the paired Δ: both encoder rows against the input maps they read, and only those
    for name in (embedding, core):
        r = rows[name]
        assert r["baseline"] == inputs
        assert r["delta_vs_backbone"] == pytest.approx(r["hit_subject_mean"] - rows[inputs]["hit_subject_mean"])
        assert r["delta_ci"][0] <= r["delta_vs_backbone"] <= r["delta_ci"][1]
    assert "baseline" not in rows[inputs]
    # block12's 2×2 map is a fixed number of this data set (0.427 with the mean human RDM, as in rsa92.json)
    if "backbone224_block12@grid2" in rows:
        assert rows["backbone224_block12@grid2"]["human_avg"] == pytest.approx(0.427, abs=0.01)
    # one test read in the given ledger; the table names the rows and its Δ column
    lines = ledger.read_text(encoding="utf-8").splitlines()
    assert len(lines) == 2 and "map-reading" in lines[1] and "bench_rsa92" in lines[1]
    assert "Δ vs input maps" in printed and embedding in printed and inputs in printed


def test_map_mode_without_flickr_data_writes_nothing(bench, tmp_path, capsys):
    data = needs_shared("kriegeskorte92")
    out = tmp_path / "maps.json"
    assert bench.main(["--data", str(data), "--flickr", str(tmp_path / "absent"), "--flickr-maps", "block12@grid2",
                       "--out", str(out), "--ledger", str(tmp_path / "ledger.csv")]) is None
    assert "Flickr8k folder" in capsys.readouterr().out
    assert not out.exists() and not (tmp_path / "ledger.csv").exists()
