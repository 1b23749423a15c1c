"""Smoke tests of the bench scripts on tiny data (the thin bench_v4 itself: tests/test_bench_v4.py).

The real-data runs (92-image RSA with its aligned-encoder rows, the V4 λ sweep, the spatial benchmarks) use a
tiny subset (one session, 60-80 images, quick training) and are skipped when ``../shared/data`` is absent; the
table helpers are checked on synthetic numbers. The statistics these scripts call are the package's
(``llmvem.evaluate.rsa``, ``llmvem.evaluate.pooled``) and are tested there (tests/test_rsa_bootstrap.py,
tests/test_pooled.py).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import REPO_ROOT, SHARED_DATA, needs_shared

BENCH = REPO_ROOT / "bench"


def _load(name: str):
    """A bench script as a module (bench scripts import only llmvem: tests/test_bench_layout.py)."""
    spec = importlib.util.spec_from_file_location(name, BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench_v4():
    return _load("bench_v4")


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    """One caption / feature cache shared by the two real-data runs (the RSA run reuses the V4 captions)."""
    return tmp_path_factory.mktemp("bench_cache")


def test_rsa92_benchmark(cache_dir, tmp_path, capsys):
    data = needs_shared("kriegeskorte92")
    v4 = needs_shared("v4_cowley2023")
    bench_rsa = _load("bench_rsa92")
    res = bench_rsa.main(["--data", str(data), "--v4-data", str(v4), "--v4-session", "210325", "--max-images", "60",
                          "--quick", "--cache-dir", str(cache_dir), "--out", str(tmp_path / "rsa.json"),
                          "--runs-dir", str(tmp_path / "runs"), "--ledger", str(tmp_path / "ledger.csv"),
                          "--set", "train.stage1.epochs=5", "--alignment-mode", "smoke"])
    printed = capsys.readouterr().out
    models = res["models"]
    assert res["subjects"] == ["BE", "KO", "SN", "TI"]
    # properties of the data set, measured once: LOSO ceiling of the 4 per-subject human IT RDMs, mIT vs hIT
    assert res["noise_ceiling"]["lower"] == pytest.approx(0.379, abs=0.002)
    assert res["noise_ceiling"]["upper"] == pytest.approx(0.661, abs=0.002)
    assert res["monkey_vs_human"] == pytest.approx(0.439, abs=0.002)
    assert models["reference: animacy"]["human_it_mean"] == pytest.approx(0.588, abs=0.002)
    # EfficientNet-Lite0: block12 is the most IT-like layer (measured r = 0.40 with the mean human RDM, 0.44 with
    # monkey IT), far above its early block2 (0.20)
    b12, b2 = models["EfficientNet-Lite0@224 block12"], models["EfficientNet-Lite0@224 block2"]
    assert b12["human_it_mean"] == pytest.approx(0.400, abs=0.02)
    assert b12["monkey_it"] > 0.35 and b12["human_it_mean"] > b2["human_it_mean"] + 0.1
    expected = {"LLM-VEM λ=0.1 frozen: aligned embedding", "LLM-VEM λ=0.1 finetuned: aligned embedding",
                "LLM-VEM λ=0.1 finetuned: pooled", "LLM-VEM λ=0 finetuned: pooled", "captions (labels) → minilm"}
    assert expected <= set(models)
    assert models["LLM-VEM λ=0.1 frozen: aligned embedding"]["dim"] == 384  # MiniLM's embedding size
    for row in models.values():
        assert -1.0 <= row["human_it_mean"] <= 1.0 and len(row["human_it_subjects"]) == 4
        assert row["human_it_subject_mean"] == pytest.approx(np.mean(list(row["human_it_subjects"].values())))
    assert res["llmvem"]["v4_session"] == "210325" and res["llmvem"]["image_size"] == 112
    assert res["llmvem"]["readout_layers"] == ["block8", "block10", "block12"]  # v4_spatial's pooled layers
    assert "human IT noise ceiling (leave one subject out" in printed
    assert "EfficientNet-Lite0@112 pooled" in printed
    # spatial rows at 224 px: grids and full maps beside the pooled rows (block12: 192 channels on a 7×7 map)
    assert models["EfficientNet-Lite0@224 block12@grid2"]["dim"] == 192 * 4
    assert models["EfficientNet-Lite0@224 block12@map"]["dim"] == 192 * 49
    assert "EfficientNet-Lite0@224 block2@map" in printed
    check_alignment_rows(res["alignment"]["rows"], n_boot=50)
    assert res["alignment"]["settings"]["v4"]["session"] == "210325"
    # the V4 networks are ordinary run folders (main table and aligned-encoder rows); one ledger line (test read)
    assert (tmp_path / "runs" / "210325_encoders" / "metrics.json").is_file()
    assert (tmp_path / "runs" / "210325_alignment_smoke" / "models" / "v4_aligned_flickr").is_dir()
    assert (tmp_path / "ledger.csv").read_text(encoding="utf-8").count("bench_rsa92") == 1
    assert "Language-aligned encoders" in printed and "flickr8k_aligned" in printed


def check_alignment_rows(rows: dict, n_boot: int) -> None:
    """The aligned-encoder rows of bench/bench_rsa92.py (``--alignment-mode smoke``): every row with an ordered CI,
    the fixed numbers of the untrained rows, the dimensions and the paired deltas against the own backbone."""
    expected = {"descriptions_minilm", "label_captions_minilm", "backbone224_block12", "backbone224_block14",
                "backbone224_pooled", "flickr8k_aligned", "flickr8k_aligned_core", "flickr8k_backbone", "v4_backbone",
                "v4_lambda0", "v4_aligned", "v4_aligned_core", "v4_aligned_flickr", "v4_aligned_flickr_core"}
    assert set(rows) == expected
    for name, row in rows.items():
        assert row["ci"][0] <= row["hit_subject_mean"] <= row["ci"][1], name
        assert row["human_avg_ci"][0] <= row["human_avg"] <= row["human_avg_ci"][1], name
        assert row["hit_subject_mean"] == pytest.approx(np.mean(list(row["hit_subjects"].values())))
        assert row["n_boot"] == n_boot
    # untrained rows are fixed numbers of this data set: the shipped descriptions (measured 0.300 subject mean,
    # 0.447 with the mean human RDM) are more IT-like than the label captions (0.106) and than block12 (0.271, as
    # in the bench_rsa92 table)
    assert rows["descriptions_minilm"]["hit_subject_mean"] == pytest.approx(0.300, abs=0.01)
    assert rows["label_captions_minilm"]["hit_subject_mean"] == pytest.approx(0.106, abs=0.01)
    assert rows["backbone224_block12"]["hit_subject_mean"] == pytest.approx(0.271, abs=0.01)
    assert rows["backbone224_block12"]["human_avg"] == pytest.approx(0.400, abs=0.01)
    dims = {"flickr8k_aligned": 384, "flickr8k_aligned_core": 256, "flickr8k_backbone": 192 + 192 + 1280,
            "v4_lambda0": 128, "v4_aligned": 384, "v4_aligned_flickr_core": 128,
            "v4_backbone": 112 + 112 + 192}  # v4_spatial's pooled block8, block10, block12
    assert {k: rows[k]["dim"] for k in dims} == dims
    for name, base in (("flickr8k_aligned", "flickr8k_backbone"), ("v4_aligned_flickr", "v4_backbone")):
        r = rows[name]
        assert r["baseline"] == base and r["delta_ci"][0] <= r["delta_vs_backbone"] <= r["delta_ci"][1]
        assert r["delta_vs_backbone"] == pytest.approx(r["hit_subject_mean"] - rows[base]["hit_subject_mean"])


def test_benchmarks_exit_cleanly_without_data(bench_v4, tmp_path, capsys):
    bench_rsa = _load("bench_rsa92")
    assert bench_v4.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "v4.json")]) is None
    assert bench_rsa.main(["--data", str(tmp_path / "absent"), "--out", str(tmp_path / "r.json")]) is None
    printed = capsys.readouterr().out
    assert "bench_v4: data folder" in printed and "bench_rsa92: data folder" in printed
    assert not (tmp_path / "v4.json").exists()


def test_demo_stage_table():
    bench_demo = _load("bench_demo")
    timing = {"total_s": 100.0, "stages": {"data": 1.0, "captions": 9.0, "ridge": 10.0, "llmvem_lambda0": 80.0}}
    rows = bench_demo.stage_table(timing, wall_s=120.0)
    assert rows[-3:] == [("pipeline total (metrics.json)", 100.0), ("start-up, imports, report, other", 20.0),
                         ("wall time (subprocess)", 120.0)]
    table = bench_demo.format_table(rows, 120.0)
    assert "llmvem_lambda0" in table and "66.7%" in table
    cmd = bench_demo.demo_command(Path("r"), Path("c"), ["train.stage2.epochs=0"])
    assert cmd[3:] == ["demo", "--out", "r", "--no-progress", "--set", "cache_dir=c", "--set", "train.stage2.epochs=0"]


def test_fine_tuning_one_model_leaves_the_shared_backbone_frozen(tmp_path):
    """bench_v4 trains λ = 0 and λ > 0 fine-tuned models from one PreparedInputs: each must start from the same
    frozen backbone (the one the cached features describe), so LLMVEMEncoder.fit_inputs must not fine-tune it in
    place."""
    import torch

    from llmvem.config import apply_overrides, load_config
    from llmvem.estimators import LLMVEMEncoder
    from llmvem.inputs import (
        PreparedInputs,
        extract_split_features,
        load_config_backbone,
        load_config_dataset,
    )

    cfg = apply_overrides(load_config("demo"), [
        "data.n_train=40", "data.n_test=10", "data.image_size=48", "backbone.pretrained=false",
        "backbone.image_size=32", "backbone.layers=[block10, pooled]", "train.stage1.epochs=1",
        "train.stage2.epochs=1", "train.stage2.unfreeze_last_n=2", "train.stage2.backbone_lr=0.01",
        f"cache_dir={tmp_path / 'cache'}"])
    ds = load_config_dataset(cfg)
    backbone = load_config_backbone(cfg)
    feats = extract_split_features(cfg, ds, backbone, show_progress=False)
    rng = np.random.default_rng(0)
    text = {s: rng.normal(size=(len(ds.splits[s]), 8)).astype(np.float32) for s in ds.splits}
    text = {s: t / np.linalg.norm(t, axis=1, keepdims=True) for s, t in text.items()}
    inputs = PreparedInputs(ds, {}, {}, text, backbone, feats)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    cfg.model.lambda_align = 0.1
    preds = LLMVEMEncoder(cfg, out_dir=tmp_path / "run").fit_inputs(inputs).predict_inputs(inputs)
    assert preds["test"].shape == (10, ds.n_voxels)
    after = backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
    # ... while the model itself was fine-tuned: its saved backbone weights differ from the frozen ones
    from llmvem.train.checkpoint import load_weights

    saved = load_weights(tmp_path / "run" / "model.safetensors")
    tuned = [k for k in saved if k.startswith("backbone.") and not torch.equal(saved[k], before[k[len("backbone."):]])]
    assert tuned  # the unfrozen blocks moved


def test_ridge_benchmark_reports_a_failed_worker_and_keeps_the_other_rows(tmp_path):
    """A worker that dies (here: a malformed size; in practice killed for memory) becomes a 'failed' row."""
    bench_ridge = _load("bench_ridge")
    failed = bench_ridge.run_one("llmvem", "not-a-size", str(tmp_path), timeout=120)
    assert failed == {"failed": "exit 1"}
    ok = bench_ridge.run_one("llmvem", "60x7x5", str(tmp_path), timeout=120)
    assert ok["y_bytes"] == 60 * 7 * 4 and ok["seconds"] > 0 and ok["peak_rss"] >= ok["rss_before_fit"]
    assert np.load(tmp_path / "llmvem_pred.npy").shape == (bench_ridge.N_TEST, 7)


@pytest.mark.slow
def test_gpu_check_script_runs_every_step_on_tiny_sizes(tmp_path):
    """bench/gpu_checks.sh is what a short GPU lease runs; its tiny mode runs the same five steps on a CPU."""
    import os
    import subprocess

    from llmvem.provenance import read_results

    results = BENCH / "results"
    before = {p: p.stat().st_mtime_ns for p in results.rglob("*")}
    env = {**os.environ, "LLMVEM_GPU_CHECKS_TINY": "1", "OUT": str(tmp_path), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(BENCH / "gpu_checks.sh")], env=env, capture_output=True, text=True,
                          timeout=600, cwd=REPO_ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    # every file it writes lands in $OUT: bench/results/ is left as it was
    assert {p: p.stat().st_mtime_ns for p in results.rglob("*")} == before
    assert read_results(tmp_path / "train_gpu.json")["benchmark"] == "training_throughput"
    assert read_results(tmp_path / "ridge_gpu.json")["benchmark"] == "ridge_vs_himalaya"
    log = (tmp_path / "gpu_checks.log").read_text()
    for step in ("versions", "cuda-tests", "train", "spatial", "ridge"):
        assert f"== {step}: exit 0 after" in log
    if (SHARED_DATA / "v4_cowley2023").is_dir():  # else the spatial step says so, exit 0
        speed = json.loads((tmp_path / "spatial_speed_gpu.json").read_text(encoding="utf-8"))
        assert list(speed["sessions"]) == ["210325"] and set(speed["medians"]) == {"factorized", "gaussian"}
    assert log.count("eager fp32 timm loop") == 2 and "speed-up x" in log  # frozen and fine-tuned rows
    assert "500x2000x128            himalaya" in log and "== all steps done, status 0" in log


@pytest.mark.slow
def test_alignment_benchmark_smoke_writes_every_key(tmp_path, capsys):
    """bench_alignment (a thin client of llmvem): the matched four-row table of both runs, 3 seeds, strict JSON,
    one ledger line."""
    from llmvem.provenance import read_results

    bench = _load("bench_alignment")
    out, ledger = tmp_path / "alignment.json", tmp_path / "ledger.csv"
    bench.main(["--smoke", "--out", str(out), "--ledger", str(ledger), "--cache-dir", str(tmp_path / "cache")])
    saved = read_results(out)  # strict JSON
    assert saved["benchmark"] == "alignment_positive_control" and saved["seeds"] == [0, 1, 2]
    assert set(saved["matched"]) == {"brain_captions", "extra"}
    for block in saved["matched"].values():
        assert block["n_seeds"] == 3
        rows = block["rows"]
        assert set(rows) >= {"lambda0", "language", "non_language", "shuffled"}
        # matched: every model of the comparison takes the steps of λ = 0 (30 images, batch 32: one step)
        assert {block["steps_per_epoch"][r] for r in ("lambda0", "language", "non_language", "shuffled")} == {1}
        for row in ("language", "non_language", "shuffled"):
            r = rows[row]
            assert r["ci"][0] <= r["delta_mean_r"] <= r["ci"][1]
            assert r["delta_mean_r"] == pytest.approx(np.mean(r["per_seed_delta"]))
            assert r["delta_mean_r"] == pytest.approx(r["mean_r"] - rows["lambda0"]["mean_r"])
            assert 0 < r["p"] <= 1 and len(r["per_seed_delta"]) == 3
        assert block["lambda"]["shuffled"] == block["lambda"]["language"]
    extra = saved["matched"]["extra"]
    assert extra["n_extra"] == 60 and extra["extra_batches_per_epoch"]["language"] == {"align_stream": 1}
    assert extra["steps_per_epoch"]["language_unmatched"] == 2  # the engine before matching: one more step
    assert extra["steps_per_epoch"]["language_global_clip"] == 1
    assert set(extra["clipped_fraction"]["language_global_clip"]) == {"global"}
    assert set(extra["clipped_fraction"]["language"]) == {"voxel", "align"}
    assert ledger.read_text().count("alignment_positive_control") == 1
    assert "Positive control, matched" in capsys.readouterr().out


@pytest.mark.shared_data
def test_v4_lambda_sweep_chooses_on_validation_and_reads_test_once(cache_dir, tmp_path, capsys):
    """bench_lambda_v4 --smoke: λ = 0 and two small λ on 60 images of one session, 3 seeds each."""
    from llmvem.provenance import read_results

    data = needs_shared("v4_cowley2023")
    bench = _load("bench_lambda_v4")
    out, ledger = tmp_path / "lambda.json", tmp_path / "ledger.csv"
    bench.main(["--smoke", "--data", str(data), "--cache-dir", str(cache_dir), "--out", str(out),
                "--ledger", str(ledger), "--threads", "1"])
    saved = read_results(out)
    val = saved["validation"]["pooled_val_mean_r"]
    assert set(val) == {"0", "0.01", "0.3"}
    lam = saved["validation"]["chosen_lambda"]
    assert lam in (0.01, 0.3) and val[f"{lam:g}"] == max(val["0.01"], val["0.3"])  # the validation rule
    test = saved["test"]
    assert test["lambda"] == lam and test["pooled"]["n_seeds"] == 3
    assert test["pooled"]["ci"][0] <= test["pooled"]["delta_mean_r"] <= test["pooled"]["ci"][1]
    session = saved["settings"]["sessions"][0]
    assert len({tuple(v) for v in saved["steps_per_epoch"][session].values()}) == 1  # matched: one schedule for every λ
    assert ledger.read_text().count("v4_lambda_sweep") == 1 and "Test (read once)" in capsys.readouterr().out


@pytest.mark.shared_data
def test_spatial_v4_ridge_on_a_tiny_subset(tmp_path, capsys):
    data = needs_shared("v4_cowley2023")
    bench = _load("bench_spatial_v4")
    assert bench.main(["--data", "/nonexistent/v4"]) is None  # no data: a message, exit 0
    res = bench.main(["--data", str(data), "--session", "210325", "--max-images", "80", "--grids", "2",
                      "--n-boot", "50", "--out", str(tmp_path / "spatial_v4.json"), "--runs-dir",
                      str(tmp_path / "runs"), "--ledger", str(tmp_path / "ledger.csv")])
    # the families are named as the run folder's models (what `llmvem report` shows for the same run)
    fam = res["families"]
    assert set(fam) == {"ridge_pooled", "ridge_grid2"} and res["n_neurons"] == 50
    assert 76 <= sum(res["n_images"].values()) <= 84
    run = tmp_path / "runs" / "210325"
    assert res["run"] == str(run) and set(json.loads((run / "metrics.json").read_text())["models"]) == set(fam)
    dims = {"block5": 80, "block8": 112, "block10": 112, "block12": 192, "block15": 320}
    for name, f in fam.items():
        grid = name == "ridge_grid2"
        assert all(spec.endswith("@grid2") == grid for spec in f["layers"])
        assert f["dim"] == sum(dims[spec.split("@")[0]] * (4 if grid else 1) for spec in f["layers"])
        assert len(f["val_r"]) == 6 and max(f["val_r"].values()) == f["val_r"]["+".join(f["layers"])]
        assert -1.0 < f["test_mean_r"] < 1.0
    assert "vs_pooled" not in fam["ridge_pooled"]
    assert fam["ridge_grid2"]["vs_pooled"]["diff"] == pytest.approx(
        fam["ridge_grid2"]["test_mean_r"] - fam["ridge_pooled"]["test_mean_r"], abs=1e-6)
    assert (tmp_path / "ledger.csv").read_text(encoding="utf-8").count("bench_spatial_v4") == 1
    assert "| ridge_grid2 |" in capsys.readouterr().out


@pytest.mark.slow  # ~30 s: two candidate runs of a pooled and a spatial network on a 60-image virtual brain
def test_spatial_vb_per_voxel_choice_takes_the_better_model_on_validation(tmp_path, capsys):
    """bench_spatial_vb on a tiny virtual brain: one run folder per candidate readout, the candidate chosen on
    validation, and a per-voxel choice (the runner's ``evaluate.per_voxel_choice``) that gives each voxel the
    pooled or the spatial model, whichever predicts its validation images better."""
    from llmvem.evaluate.metrics import pearson_r
    from llmvem.inputs import load_config_dataset
    from llmvem.provenance import read_results

    bench = _load("bench_spatial_vb")
    tiny = ["data.n_train=60", "data.n_test=30", "data.image_size=48", "backbone.name=timm:resnet10t",
            "backbone.pretrained=false", "backbone.image_size=48", "backbone.layers=[layer2,pooled]",
            "backbone.batch_size=64", "captions.backend=dataset", "model.feature_dropout=0",
            "train.stage1.epochs=4", "train.stage1.batch_size=16", "train.stage1.lr=0.003",
            "train.stage1.early_stopping_patience=null"]
    out, ledger = tmp_path / "spatial_vb.json", tmp_path / "ledger.csv"
    res = bench.main(["--maps", "layer2@grid4", "--readouts", "factorized,gaussian", "--n-boot", "30",
                      "--cache-dir", str(tmp_path / "cache"), "--runs-dir", str(tmp_path / "runs"),
                      "--out", str(out), "--ledger", str(ledger), *[a for o in tiny for a in ("--set", o)]])
    assert read_results(out)["chosen"] == res["chosen"]  # strict JSON with the provenance header
    assert ledger.read_text(encoding="utf-8").count("bench_spatial_vb") == 1
    # the candidate readout: the one with the higher validation mean r of its spatial network
    cands = ("factorized on layer2@grid4", "gaussian on layer2@grid4")
    val = {c: res["models"][c]["val_mean_r"] for c in cands}
    assert res["chosen"] == max(val, key=val.get)
    run = Path(res["runs"][res["chosen"]])
    assert (run / "metrics.json").is_file() and (run / "config.yaml").is_file()  # an ordinary run folder
    # per voxel, the choice takes the candidate with the higher validation r, and predicts the test split with it
    from llmvem.config import load_config

    cfg = load_config(run / "config.yaml")
    ds = load_config_dataset(cfg).with_validation_split(cfg.data.val_fraction, cfg.data.seed)
    pred = {n: {s: np.load(run / "models" / n / f"predictions_{s}.npy") for s in ("val", "test")}
            for n in (bench.POOLED, bench.SPATIAL, bench.CHOICE)}
    r_val = np.stack([pearson_r(ds.val.responses, pred[n]["val"]) for n in (bench.POOLED, bench.SPATIAL)])
    spatial = r_val[1] > r_val[0]
    assert 0 < spatial.mean() < 1  # both models win somewhere
    np.testing.assert_array_equal(pred[bench.CHOICE]["test"],
                                  np.where(spatial[None, :], pred[bench.SPATIAL]["test"], pred[bench.POOLED]["test"]))
    fraction = res["per_voxel_choice_fraction_spatial"]
    assert fraction["all"] == pytest.approx(spatial.mean())
    for roi in bench.ROIS:
        assert fraction[roi] == pytest.approx(spatial[ds.roi_masks[roi]].mean())
    # so its validation r is at least either model's (in-sample: it is not eligible for choosing between models)
    choice = res["models"][f"per-voxel choice (pooled or {res['chosen']})"]
    assert choice["val_mean_r"] == pytest.approx(float(np.nanmean(np.max(r_val, axis=0))))
    assert choice["val_mean_r"] >= max(res["models"]["pooled"]["val_mean_r"], val[res["chosen"]])
    # the bootstrap's difference is the difference of the test mean r
    d = res["vs_pooled"][res["chosen"]]["all"]
    assert d["diff"] == pytest.approx(res["models"][res["chosen"]]["test"]["all"] - res["models"]["pooled"]["test"]["all"],
                                      abs=1e-6)
    assert d["ci"][0] <= d["diff"] <= d["ci"][1]
    assert "per-voxel choice: fraction of voxels taking the spatial model" in capsys.readouterr().out


@pytest.mark.shared_data
def test_spatial_speed_benchmark_on_a_tiny_subset(tmp_path, capsys, monkeypatch):
    """bench_spatial_speed: every model's stage seconds and epochs are read from its run, ratios are the quotients
    of those seconds, the fit order rotates with the session index, and the table prints the medians. The run
    reads a staged copy (``--stage``, what a GPU machine gets): the session's files and its caption embeddings,
    so that it never loads the text encoder."""
    import llmvem.embed.text

    data = needs_shared("v4_cowley2023")
    bench = _load("bench_spatial_speed")
    assert bench.main(["--data", str(tmp_path / "absent")]) is None
    with pytest.raises(FileNotFoundError, match="no files of session 999999"):
        bench.main(["--data", str(data), "--sessions", "999999", "--stage", str(tmp_path / "bad")])
    tiny = ["--sessions", "210325", "--max-images", "60"]
    staged = bench.main(["--data", str(data), *tiny, "--stage", str(tmp_path / "stage")])
    copied = [f for f in staged["files"] if f.startswith("v4_cowley2023/")]
    assert sorted(copied) == ["v4_cowley2023/images/images_210325.zip",
                              "v4_cowley2023/responses_raw/responses_210325.npy",
                              "v4_cowley2023/responses_repeat_averaged/responses_210325.npy"]
    for f in copied:
        assert (tmp_path / "stage" / f).read_bytes() == (data / f.split("/", 1)[1]).read_bytes()
    assert sum(f.startswith("cache/text_embeddings/") for f in staged["files"]) == 3  # train, val, test
    assert staged["bytes"] == sum((tmp_path / "stage" / f).stat().st_size for f in staged["files"])

    def no_encoder(*a, **k):
        raise AssertionError("the staged caption embeddings were not found")

    monkeypatch.setattr(llmvem.embed.text, "load_text_encoder", no_encoder)
    out = tmp_path / "speed.json"
    res = bench.main(["--data", str(tmp_path / "stage" / "v4_cowley2023"), *tiny, "--quick",
                      "--cache-dir", str(tmp_path / "stage" / "cache"), "--out", str(out),
                      "--runs-dir", str(tmp_path / "runs")])
    s = res["sessions"]["210325"]
    assert s["order"] == ["pooled", "factorized", "gaussian"]  # session 0: no rotation
    assert s["llmvem_layers"] == ["block8", "block10", "block12"]  # the v4_spatial config's pooled layers
    run = tmp_path / "runs" / "210325"
    assert s["run"] == str(run) and sorted(json.loads((run / "metrics.json").read_text())["models"]) == sorted(s["models"])
    assert s["map_shapes"] == {"block5@grid7": [80, 7, 7], "block8@grid7": [112, 7, 7]}
    assert set(s["models"]) == {name for name, _ in bench.MODELS}
    for name, m in s["models"].items():
        assert m["fit_s"] > m["stage1"]["loop_s"] > 0 and 1 <= m["stage1"]["epochs"] <= 15  # --quick: 15 epochs
        assert ("stage2" in m) == name.endswith("finetuned")
        if "stage2" in m:
            assert m["stage2"]["epochs"] == 1  # fixed: no early stopping in the stage-2 figure
    m = s["models"]
    for kind in bench.READOUTS:
        r = s["ratios"][kind]
        assert r["stage1_loop"] == pytest.approx(m[f"{kind}_frozen"]["stage1"]["loop_s"]
                                                 / m["pooled_frozen"]["stage1"]["loop_s"])
        assert r["stage2_loop"] == pytest.approx(m[f"{kind}_finetuned"]["stage2"]["loop_s"]
                                                 / m["pooled_finetuned"]["stage2"]["loop_s"])
        assert res["medians"][kind]["stage1_fit"]["median"] == pytest.approx(r["stage1_fit"])
    assert s["gemm_floor_ms"] > 0 and s["stage1_steps_per_epoch"] == 1  # 45 training images, batch 64
    printed = capsys.readouterr().out
    assert "| 210325 |" in printed and "| stage1_loop |" in printed
    on_disk = json.loads(out.read_text(encoding="utf-8"))["medians"]
    assert on_disk["gaussian"]["stage1_loop"] == pytest.approx(res["medians"]["gaussian"]["stage1_loop"])


def test_spatial_speed_medians_over_sessions():
    bench = _load("bench_spatial_speed")

    def model(loop1: float, loop2: float, fit: float, epochs: int = 10) -> dict:
        return {"fit_s": fit, "stage1": {"loop_s": loop1, "epochs": epochs, "loop_s_per_epoch": loop1 / epochs},
                "stage2": {"loop_s": loop2, "epochs": 1, "loop_s_per_epoch": loop2}}

    sessions = {}
    for i, k in enumerate((1.0, 2.0, 4.0)):
        models = {"pooled_frozen": model(1.0, 0, 10.0), "pooled_finetuned": model(1.0, 10.0, 20.0)}
        for kind in bench.READOUTS:
            models[f"{kind}_frozen"] = model(3.0 * k, 0, 12.0, epochs=20)
            models[f"{kind}_finetuned"] = model(3.0 * k, 10.0 * k, 30.0)
        sessions[str(i)] = {"ratios": bench.ratios(models)}
    med = bench.medians(sessions)["factorized"]
    assert med["stage1_loop"] == {"median": 6.0, "min": 3.0, "max": 12.0}
    assert med["stage1_loop_per_epoch"]["median"] == pytest.approx(3.0)  # twice the epochs, same time per epoch
    assert med["stage2_loop"] == {"median": 2.0, "min": 1.0, "max": 4.0} and med["stage1_fit"]["median"] == 1.2
