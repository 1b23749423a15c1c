"""bench/bench_curves_v4.py, a thin client of llmvem: its size bookkeeping, the λ choice over sessions (the
package's selection rule), and its --smoke run (run folders, keys, sizes, CI order, ledger, plot). The smoke run
(~20 s) needs ../shared/data (V4 + Flickr8k) and is skipped without it."""

from __future__ import annotations

import importlib.util

import pytest
from conftest import REPO_ROOT, needs_shared

from llmvem.provenance import read_results


@pytest.fixture(scope="module")
def bench():
    spec = importlib.util.spec_from_file_location("bench_curves_v4", REPO_ROOT / "bench" / "bench_curves_v4.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sizes_are_increasing_and_capped_at_all(bench):
    assert bench.training_sizes(["400", "50", "all", "100", "2000"], 900) == [("50", 50), ("100", 100),
                                                                              ("400", 400), ("all", 900)]
    assert bench.training_sizes(["50", "900"], 900) == [("50", 50)]  # 900 is "all", not asked for
    assert bench.training_sizes(["2000"], 900) == [("all", 900)]  # nothing below all: all


def test_lambda_is_chosen_on_validation_over_all_neurons_of_all_sessions(bench):
    """Session a (10 neurons) prefers λ = 0.3, session b (90 neurons) λ = 3: weighted by neurons, λ = 3 wins for
    the aligned model; for the stream model λ = 3 has no validation score in one session, so it is not eligible."""

    def run(n: int, val: dict[str, float | None]) -> dict:
        return {"dataset": {"n_voxels": n}, "models": {name: {"val_mean_r": v} for name, v in val.items()}}

    metrics = {"a": run(10, {"aligned_lambda0.3": 0.60, "aligned_lambda3": 0.50,
                             "aligned_stream_lambda0.3": 0.55, "aligned_stream_lambda3": None}),
               "b": run(90, {"aligned_lambda0.3": 0.40, "aligned_lambda3": 0.42,
                             "aligned_stream_lambda0.3": 0.40, "aligned_stream_lambda3": 0.45})}
    chosen, scores, reasons = bench.choose_lambdas(metrics, [0.3, 3.0])
    assert chosen == {"aligned": 3.0, "aligned_stream": 0.3}
    assert scores["aligned"]["3"] == pytest.approx((10 * 0.50 + 90 * 0.42) / 100)
    assert scores["aligned"]["0.3"] == pytest.approx((10 * 0.60 + 90 * 0.40) / 100)
    assert scores["aligned_stream"]["3"] is None and "3 not eligible: no validation mean r" in reasons["aligned_stream"]


@pytest.mark.shared_data
def test_smoke_run_writes_run_folders_curves_with_ordered_cis_and_a_plot(bench, tmp_path, capsys):
    needs_shared("v4_cowley2023")
    needs_shared("flickr8k_1000")
    out, ledger, runs = tmp_path / "curves.json", tmp_path / "ledger.csv", tmp_path / "runs"
    res = bench.main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(runs), "--out", str(out),
                      "--ledger", str(ledger), "--threads", "1"])
    saved = read_results(out)  # strict JSON
    assert set(saved) == {"benchmark", "date", "commit", "command", "config_hash", "machine", "seeds", "settings",
                          "sessions", "pooled", "seconds_total"}
    assert saved["command"].startswith("python bench/bench_curves_v4.py --smoke") and saved["seeds"] == [0]
    st = saved["settings"]
    assert st["lambda_chosen"] == {"aligned": 1.0, "aligned_stream": 1.0} and set(st["lambda_val_r"]) == {
        "aligned", "aligned_stream"}
    assert st["stream"]["n_images"] == 40 and st["stream"]["spec"].endswith("flickr8k_1000")
    assert "model.core=linear" in st["overrides"] and "train.stage2.epochs=0" in st["overrides"]
    assert st["readout_layers"] == ["block8", "block10", "block12"]  # v4_spatial's pooled layers
    s = saved["sessions"]["210325"]
    # 640 images -> 80 kept: 60 train, 7 val, 13 test; sizes 10 < 20 < all (= 60)
    assert (s["n_train_all"], s["n_val"], s["n_test"], s["n_neurons"]) == (60, 7, 13, 50)
    assert [(c["size"], c["n_train"]) for c in s["sizes"]] == [("10", 10), ("20", 20), ("all", 60)]
    assert [c["size"] for c in saved["pooled"]["sizes"]] == ["10", "20", "all"]
    for c in s["sizes"]:  # one ordinary run folder per size, with every model the cell reports
        run = runs / "210325" / f"n_{c['size']}"
        assert c["run"] == str(run) and (run / "config.yaml").is_file()
        metrics = read_results(run / "metrics.json")
        assert metrics["dataset"]["n_train"] == c["n_train"] and set(c["model_names"].values()) <= set(
            metrics["models"])
        assert metrics["selection"]["model"] != "ridge"  # fitted on train + val: never chosen on validation
        assert c["models"]["ridge"]["val_in_fit"] and not c["models"]["ridge_train"]["val_in_fit"]
        assert c["ridge_details"]["chosen"] in {"+".join(ls) for ls in bench.RIDGE_LAYER_SETS}
    for c in s["sizes"] + saved["pooled"]["sizes"]:
        assert set(c["models"]) == set(bench.MODELS) and set(c["vs_lambda0"]) == set(bench.MODELS) - {"lambda0"}
        for m in c["models"].values():
            assert m["ci"][0] <= m["mean_r"] <= m["ci"][1] and -1 <= m["mean_r"] <= 1 and m["n_neurons"] == 50
        for name, d in c["vs_lambda0"].items():
            assert d["ci"][0] <= d["diff"] <= d["ci"][1] and 0 < d["p"] <= 1
            assert d["diff"] == pytest.approx(c["models"][name]["mean_r"] - c["models"]["lambda0"]["mean_r"],
                                              abs=1e-6)
    # one session: the pooled cell is that session's
    assert saved["pooled"]["sizes"][0]["models"]["ridge"]["mean_r"] == pytest.approx(
        s["sizes"][0]["models"]["ridge"]["mean_r"])
    # frozen-feature ridge predicts V4 even from 10 images, and gains with more
    ridge = [c["models"]["ridge_train"]["mean_r"] for c in s["sizes"]]
    assert min(ridge) > 0.1 and ridge[-1] > ridge[0]
    assert res["pooled"]["sizes"][-1]["n_train"] == {"210325": 60}
    assert out.with_suffix(".png").stat().st_size > 10_000
    assert ledger.read_text(encoding="utf-8").count("curves_v4") == 1
    printed = capsys.readouterr().out
    assert "λ chosen on validation at n = all: aligned 1, aligned_stream 1" in printed
    assert "LLM-VEM λ>0 + Flickr8k stream" in printed


def test_exits_cleanly_without_data(bench, tmp_path, capsys):
    assert bench.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "c.json")]) is None
    assert "bench_curves_v4: data folder" in capsys.readouterr().out and not (tmp_path / "c.json").exists()
