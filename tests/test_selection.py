"""Selection on validation only (demo summary, sweep table, metrics.json) and held-out noise ceilings."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_experiment import tiny_inputs
from test_train_trainer import tiny_config

from llmvem.cli.run import _print_summary, _print_sweep_selection
from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.data.noise_ceiling import (
    SOURCE_KEY,
    algonauts_noise_ceiling,
    held_out_noise_ceiling,
    split_half_noise_ceiling,
)
from llmvem.data.splits import split_by_image_key
from llmvem.estimators import model_name
from llmvem.evaluate.selection import choose_model, selection_line
from llmvem.experiment import run_models
from llmvem.pipeline import experiment_models


def _models(**val_test):
    """ridge (in fit, best val r) + LLM-VEM models {λ: (val r, test r)}."""
    out = {"ridge": {"label": "Ridge", "kind": "ridge", "lambda": None, "val_mean_r": 0.99, "val_in_fit": True,
                     "mean_r": 0.70, "median_r": 0.7}}
    for lam, (v, t) in val_test.items():
        lam_f = float(lam.replace("l", "").replace("_", "."))
        out[model_name(lam_f)] = {"label": f"LLM-VEM λ={lam_f:g}", "kind": "llmvem", "lambda": lam_f,
                                  "val_mean_r": v, "val_in_fit": False, "mean_r": t, "median_r": t}
    return out


def test_selection_uses_validation_never_test_nor_an_in_fit_val_r():
    models = _models(l0=(0.58, 0.640), l0_5=(0.61, 0.628), l1=(0.60, 0.700))  # λ=1 has the best *test* r
    sel = choose_model(models)
    assert sel.model == model_name(0.5) and sel.lam == 0.5 and len(sel.candidates) == 3
    assert sel.test_mean_r == 0.628  # reported for the chosen model, not the best test r
    assert sel.excluded == {"ridge": "fitted on val"}
    assert selection_line(sel) == "validation chose λ=0.5 (val mean r 0.610); its test mean r 0.628"
    assert sel.reason() == ("chosen on validation among llmvem_lambda0, llmvem_lambda0.5, llmvem_lambda1; "
                            "ridge not eligible: fitted on val")
    rec = sel.to_record()
    assert rec["model"] == model_name(0.5) and rec["n_candidates"] == 3 and rec["reason"] == sel.reason()
    json.dumps(rec, allow_nan=False)  # strict JSON
    # ties go to the first in order (the smaller λ) and are named; no candidate → None and an honest line
    tie = choose_model(_models(l0=(0.6, 0.1), l1=(0.6, 0.9)))
    assert tie.lam == 0.0 and tie.tied == (model_name(0.0), model_name(1.0))
    assert "tied with llmvem_lambda1" in tie.reason()
    none = choose_model({"ridge": models["ridge"]})
    assert none.model is None and "ridge not eligible: fitted on val" in none.reason()
    assert "validation chose nothing" in selection_line(none)
    no_val = _models(l0=(float("nan"), 0.5))
    assert choose_model(no_val).model is None
    assert choose_model(no_val).excluded[model_name(0.0)] == "no validation mean r"
    # the same rule restricted to some candidates (text-to-brain: λ > 0 only)
    aligned = choose_model(models, among=lambda _n, f: (f["lambda"] or 0) > 0)
    assert aligned.model == model_name(0.5) and model_name(0.0) not in aligned.candidates
    # a ridge fitted on train only is an ordinary candidate
    fair = {**models, "ridge": {**models["ridge"], "val_in_fit": False}}
    assert choose_model(fair).model == "ridge"


def test_the_rule_reads_report_records_as_it_reads_metrics_json(tmp_path):
    """The report's ModelResult objects and metrics.json dicts give the same choice (one rule, two readers)."""
    from llmvem.report.page import chosen_model
    from llmvem.report.runfolder import load_run
    from llmvem.utils import write_json

    models = _models(l0=(0.58, 0.640), l0_5=(0.61, 0.628))
    for m in models.values():
        m["per_roi"] = {}
    write_json(tmp_path / "metrics.json", {"dataset": {"name": "x"}, "models": models, "comparisons": []})
    run = load_run(tmp_path)
    assert chosen_model(run).model == choose_model(models).model == model_name(0.5)
    assert run.models["ridge"].val_in_fit is True


def test_demo_summary_labels_test_columns_and_says_what_validation_chose(capsys):
    _print_summary({"models": _models(l0=(0.58, 0.640), l0_5=(0.61, 0.628)), "comparisons": []})
    out = capsys.readouterr().out
    assert "test mean r" in out and "val mean r" in out and "0.990 (in fit)" in out
    lines = out.strip().splitlines()
    assert lines[-2] == "validation chose λ=0.5 (val mean r 0.610); its test mean r 0.628"
    assert lines[-1] == ("selection: chosen on validation among llmvem_lambda0, llmvem_lambda0.5; ridge not "
                         "eligible: fitted on val")


def test_sweep_chooses_the_point_and_lambda_on_validation(capsys):
    points = {"feature_dropout0": {"models": _models(l0=(0.50, 0.80), l0_1=(0.52, 0.79))},
              "feature_dropout0.2": {"models": _models(l0=(0.55, 0.60), l0_1=(0.57, 0.61))}}
    _print_sweep_selection(points)
    out = capsys.readouterr().out
    assert "test mean r" in out and out.count("feature_dropout0.2") >= 3
    assert out.strip().splitlines()[-2] == ("validation chose feature_dropout0.2, λ=0.1 (val mean r 0.570); "
                                            "its test mean r 0.610")


def test_metrics_json_records_selection_and_held_out_noise_ceiling(tmp_path):
    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=2", "evaluate.bootstrap=0",
                      "evaluate.ridge_folds=3", "evaluate.ridge_device=cpu", "backbone.layers=[block0]",
                      "evaluate.compare_lambdas=[]", "model.lambda_align=0.5")
    inputs = tiny_inputs()
    ds = inputs.dataset
    rng = np.random.default_rng(0)
    # give the test split repeats (and a stale whole-set ceiling): evaluation must use the test repeats
    rep = ds.test.responses[:, None, :] + rng.normal(0, 0.5, (len(ds.test), 4, ds.n_voxels)).astype(np.float32)
    test = Split(ds.test.images, rep.mean(1), rep)
    inputs.dataset = EncodingDataset(ds.name, {**ds.splits, "test": test}, noise_ceiling=np.full(ds.n_voxels, 0.99))
    run = run_models(cfg, inputs, experiment_models(cfg), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    sel = metrics["selection"]
    vals = {n: m["val_mean_r"] for n, m in metrics["models"].items() if m["kind"] == "llmvem"}
    assert sel["model"] == max(vals, key=vals.get) and sel["basis"] == "validation"
    assert sel["test_mean_r"] == metrics["models"][sel["model"]]["mean_r"]
    assert metrics["dataset"]["noise_ceiling_source"] == f"held-out repeats: {len(ds.test)} test images, Algonauts 2023 formula"
    saved = np.load(tmp_path / "run" / "voxel_metrics.npz")["noise_ceiling"]
    np.testing.assert_allclose(saved, algonauts_noise_ceiling(rep))
    from llmvem.evaluate.metrics import evaluate_predictions

    expected = evaluate_predictions(test.responses, run.predictions["ridge"]["test"], algonauts_noise_ceiling(rep))
    assert metrics["models"]["ridge"]["mean_accuracy"] == pytest.approx(expected["summary"]["mean_accuracy"])


def _ds_with_repeats(n=60, n_rep=4, n_vox=5, seed=0, **kw):
    rng = np.random.default_rng(seed)
    signal = rng.normal(size=(n, n_vox)).astype(np.float32)
    rep = signal[:, None, :] + rng.normal(0, 1.0, (n, n_rep, n_vox)).astype(np.float32)
    images = ArrayImages(rng.integers(0, 256, (n, 4, 4, 3), dtype=np.uint8))
    every = Split(images, rep.mean(1), rep)
    return EncodingDataset("d", {"train": every.subset(np.arange(40)), "test": every.subset(np.arange(40, n))}, **kw)


def test_held_out_noise_ceiling_follows_the_test_images():
    ds = _ds_with_repeats(noise_ceiling=np.full(5, 0.5))
    nc, source = held_out_noise_ceiling(ds)
    np.testing.assert_array_equal(nc, algonauts_noise_ceiling(ds.test.repeats))
    assert source == "held-out repeats: 20 test images, Algonauts 2023 formula"
    # true ceiling 1 / (1 + 1/4) = 0.8 for every voxel
    assert abs(float(nc.mean()) - 0.8) < 0.1
    # after a re-split, the ceiling is that of the new test images
    moved = split_by_image_key(ds, 0.0, 0.3, seed=5)
    np.testing.assert_array_equal(held_out_noise_ceiling(moved)[0], algonauts_noise_ceiling(moved.test.repeats))
    # spike data: the loader's split-half estimator, with the dataset's seed
    ds.meta.update({"noise_ceiling_method": "split_half", "seed": 3})
    nc, source = held_out_noise_ceiling(ds)
    np.testing.assert_array_equal(nc, split_half_noise_ceiling(ds.test.repeats, seed=3))
    assert source.startswith("held-out repeats: 20 test images, split-half")


def test_whole_set_or_given_ceilings_are_labelled_as_such():
    no_rep = _ds_with_repeats(noise_ceiling=np.full(5, 0.5))
    no_rep.splits["test"] = Split(no_rep.test.images, no_rep.test.responses)
    nc, source = held_out_noise_ceiling(no_rep)
    assert np.all(nc == 0.5) and source.startswith("whole set")
    no_rep.meta[SOURCE_KEY] = "whole set: the NSD noise ceiling shipped in the challenge folder"
    assert held_out_noise_ceiling(no_rep)[1] == no_rep.meta[SOURCE_KEY]
    given = _ds_with_repeats(noise_ceiling=np.full(5, 0.3))
    given.meta[SOURCE_KEY] = "given: noise_ceiling.npy"  # a file wins over repeats
    assert np.all(held_out_noise_ceiling(given)[0] == 0.3)
    bare = _ds_with_repeats()
    bare.splits["test"] = Split(bare.test.images, bare.test.responses)
    assert held_out_noise_ceiling(bare) == (None, "none: the data have no repeats of the test images and no "
                                                  "noise ceiling")


def test_demo_folder_summary_and_report_name_the_same_model(tmp_path, capsys):
    """A demo-shaped run (ridge on train + val, λ = 0, λ = 0.5): the CLI summary, metrics.json and the report name
    one model, and the report's alignment comparison is not presented as the choice."""
    import re

    from llmvem.report import write_report

    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=2", "evaluate.bootstrap=0",
                      "evaluate.ridge_folds=3", "evaluate.ridge_device=cpu", "backbone.layers=[block0]",
                      "evaluate.compare_lambdas=[]", "model.lambda_align=0.5", "evaluate.text_to_brain=false")
    run_models(cfg, tiny_inputs(), experiment_models(cfg), tmp_path / "run")
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    _print_summary(metrics)
    out = capsys.readouterr().out
    chosen = metrics["selected_model"]
    assert chosen in (model_name(0.0), model_name(0.5)) and metrics["selection"]["model"] == chosen
    label = metrics["models"][chosen]["label"]
    lam = metrics["models"][chosen]["lambda"]
    assert f"validation chose λ={lam:g}" in out
    page = write_report([tmp_path / "run"]).read_text()
    row = next(r for r in re.findall(r"<tr>.*?</tr>", page) if "(chosen on validation)" in r)
    assert f'<span class="key">{chosen}</span>' in row and page.count("(chosen on validation)") == 1
    assert f"validation chose {label}" in page.replace("&#x27;", "'")
