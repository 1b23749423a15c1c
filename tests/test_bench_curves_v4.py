"""bench/bench_curves_v4.py: the V4 learning-curve benchmark's size bookkeeping, and its --smoke run (keys, sizes,
CI order, plot). The smoke run needs ../shared/data (V4 + Flickr8k) and is skipped without it."""

from __future__ import annotations

import importlib
import json
import sys

import numpy as np
import pytest
from conftest import REPO_ROOT, needs_shared
from test_train_trainer import make_dataset

from llmvem.inputs import PreparedInputs


@pytest.fixture(scope="module")
def bench():
    if str(REPO_ROOT / "bench") not in sys.path:
        sys.path.insert(0, str(REPO_ROOT / "bench"))
    return importlib.import_module("bench_curves_v4")


def test_sizes_are_increasing_and_subsets_nested(bench):
    assert bench.training_sizes(["400", "50", "all", "100", "2000"], 900) == [("50", 50), ("100", 100),
                                                                              ("400", 400), ("all", 900)]
    assert bench.training_sizes(["50", "900"], 900) == [("50", 50)]  # 900 is "all", not asked for
    ds, text = make_dataset()
    n_all = len(ds.train)
    feats = {s: {"x": np.arange(len(ds.splits[s]) * 2, dtype=np.float32).reshape(-1, 2)} for s in ds.splits}
    inputs = PreparedInputs(ds, {s: [[f"{s}{i}"] for i in range(len(ds.splits[s]))] for s in ds.splits}, {}, text,
                            None, feats)  # type: ignore[arg-type]
    small, large = bench.subset_inputs(inputs, 10), bench.subset_inputs(inputs, 20)
    ids_small, ids_large = small.dataset.train.images.ids, large.dataset.train.images.ids
    assert len(ids_small) == 10 and len(ids_large) == 20 and set(ids_small) <= set(ids_large)  # nested
    # every per-image field is cut with the same rows; validation and test are untouched
    rows = [ds.train.images.ids.index(i) for i in ids_small]
    np.testing.assert_array_equal(small.dataset.train.responses, ds.train.responses[rows])
    np.testing.assert_array_equal(small.features["train"]["x"], feats["train"]["x"][rows])
    np.testing.assert_array_equal(small.text_embeddings["train"], text["train"][rows])
    assert small.captions["train"] == [[f"train{r}"] for r in rows]
    assert small.dataset.test is ds.test and small.features["val"] is feats["val"]
    assert small.align_streams is inputs.align_streams  # one stream load shared by every size
    assert bench.subset_inputs(inputs, n_all) is inputs


@pytest.mark.slow  # ~30 s idle: one session cut to 80 images, 3 sizes × 4 models, 40 stream images
def test_smoke_run_writes_curves_with_ordered_cis_and_a_plot(bench, tmp_path, capsys):
    needs_shared("v4_cowley2023")
    needs_shared("flickr8k_1000")
    out = tmp_path / "curves.json"
    res = bench.main(["--smoke", "--cache-dir", str(tmp_path / "cache"), "--out", str(out)])
    saved = json.loads(out.read_text())
    assert set(saved) == {"benchmark", "date", "command", "machine", "settings", "sessions", "pooled", "seconds_total"}
    st = saved["settings"]
    assert st["lambda_chosen"] == {"aligned": 1.0, "aligned_stream": 1.0} and set(st["lambda_val_r"]) == {
        "aligned", "aligned_stream"}
    assert st["stream"]["n_images"] == 40 and st["stream"]["spec"].endswith("flickr8k_1000")
    assert "model.core=linear" in st["overrides"] and "train.stage2.epochs=0" in st["overrides"]
    s = saved["sessions"]["210325"]
    # 640 images -> 80 kept: 60 train, 7 val, 13 test; sizes 10 < 20 < all (= 60), nested subsets of train
    assert (s["n_train_all"], s["n_val"], s["n_test"], s["n_neurons"]) == (60, 7, 13, 50)
    assert [(c["size"], c["n_train"]) for c in s["sizes"]] == [("10", 10), ("20", 20), ("all", 60)]
    cells = s["sizes"] + saved["pooled"]["sizes"]
    assert [c["size"] for c in saved["pooled"]["sizes"]] == ["10", "20", "all"]
    for c in cells:
        assert set(c["models"]) == set(bench.MODELS) and set(c["vs_lambda0"]) == set(bench.MODELS) - {"lambda0"}
        for m in c["models"].values():
            assert m["ci"][0] <= m["mean_r"] <= m["ci"][1] and -1 <= m["mean_r"] <= 1
        for name, d in c["vs_lambda0"].items():
            assert d["ci"][0] <= d["diff"] <= d["ci"][1] and 0 < d["p"] <= 1
            assert d["diff"] == pytest.approx(c["models"][name]["mean_r"] - c["models"]["lambda0"]["mean_r"],
                                              abs=1e-6)
    # frozen-feature ridge predicts V4 even from 10 images
    assert all(c["models"]["ridge"]["mean_r"] > 0.1 for c in s["sizes"])
    assert res["pooled"]["sizes"][-1]["n_train"] == {"210325": 60}
    assert out.with_suffix(".png").stat().st_size > 10_000
    printed = capsys.readouterr().out
    assert "λ chosen on validation at n = all: aligned 1, aligned_stream 1" in printed
    assert "LLM-VEM λ>0 + Flickr8k stream" in printed
