"""bench/bench_partition_v4.py on a tiny V4 subset (real data when present): the package's partition per session,
parts that add up to the joint R², a neuron-weighted pooled row, provenance and one ledger line."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "v4_cowley2023"


def _load():
    spec = importlib.util.spec_from_file_location("bench_partition_v4", REPO / "bench" / "bench_partition_v4.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.skipif(not DATA.is_dir(), reason="V4 data (../shared/data/v4_cowley2023) absent")
def test_partition_rows_add_up_and_pool_by_neurons(tmp_path):
    bench = _load()
    out, ledger = tmp_path / "p.json", tmp_path / "ledger.csv"
    res = bench.main(["--sessions", "210325", "--max-images", "90", "--cache-dir", str(tmp_path / "cache"),
                      "--runs-dir", str(tmp_path / "runs"), "--out", str(out), "--ledger", str(ledger),
                      "--threads", "1"])
    saved = json.loads(out.read_text(), parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"))
    assert saved["benchmark"] == "partition_v4" and saved["commit"] and saved["config_hash"]
    row = saved["sessions"]["210325"]
    for k in ("unique_image_r2", "unique_language_r2", "shared_r2"):  # floored at 0 (the stated correction)
        assert row[k] >= 0.0
    raw = row["raw_unique_image_r2"] + row["raw_unique_language_r2"] + row["raw_shared_r2"]
    assert raw == pytest.approx(row["joint_r2"], abs=1e-6)  # before the stated corrections the parts add up
    assert saved["pooled"]["n_voxels"] == row["n_voxels"] > 0
    assert saved["pooled"]["joint_r2"] == pytest.approx(row["joint_r2"])
    assert res["settings"]["image_layers"] == bench.LAYERS
    assert (tmp_path / "runs" / "210325" / "metrics.json").is_file()
    assert ledger.read_text().count("partition_v4") == 1


def test_absent_data_is_a_clean_exit(tmp_path, capsys):
    assert _load().main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "p.json")]) is None
    assert "absent" in capsys.readouterr().out and not (tmp_path / "p.json").exists()
