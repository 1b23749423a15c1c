"""The experiment runner: one run folder written once, validation r per model, comparisons, resume."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_train_cli import frozen_features
from test_train_trainer import backbone, make_dataset, tiny_config

from llmvem.estimators import model_name
from llmvem.experiment import EXPERIMENT_OUTPUTS, default_pairs, run_models
from llmvem.inputs import PreparedInputs
from llmvem.pipeline import experiment_models


def tiny_inputs():
    ds, text = make_dataset()
    captions = {s: [[f"image {i}"] for i in range(len(ds.splits[s]))] for s in ds.splits}
    return PreparedInputs(ds, captions, {"backend": "file", "model_id": "tiny", "config_hash": "x"}, text,
                          backbone(), frozen_features(ds))


def test_default_pairs():
    names = ["ridge", model_name(0), model_name(0.1), model_name(1)]
    assert default_pairs(names) == [(model_name(0), model_name(0.1)), (model_name(0), model_name(1)),
                                    ("ridge", model_name(0)), ("ridge", model_name(0.1)), ("ridge", model_name(1))]


def test_run_folder_written_once_with_validation_r(tmp_path, monkeypatch):
    import llmvem.experiment

    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=2", "evaluate.bootstrap=20",
                      "evaluate.ridge_folds=3", "evaluate.ridge_device=cpu", "backbone.layers=[block0]",
                      "evaluate.compare_lambdas=[]", "model.lambda_align=0.5")
    models = experiment_models(cfg)
    assert list(models) == ["ridge", model_name(0), model_name(0.5)]
    writes: list[str] = []
    real = llmvem.experiment.write_json
    monkeypatch.setattr(llmvem.experiment, "write_json", lambda p, o: (writes.append(p.name), real(p, o)))
    run = run_models(cfg, tiny_inputs(), models, tmp_path / "run")
    assert sorted(writes) == ["gallery.json", "lambda_curve.json", "metrics.json", "versions.json"]  # each once
    out = tmp_path / "run"
    assert {p.name for p in out.iterdir()} <= set(EXPERIMENT_OUTPUTS)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(run.metrics))
    for name in models:  # predictions once per model: the trainer's, or the runner's for ridge
        np.testing.assert_allclose(np.load(out / "models" / name / "predictions_test.npy"),
                                   run.predictions[name]["test"], atol=1e-6)
    ridge, lam = metrics["models"]["ridge"], metrics["models"][model_name(0.5)]
    assert ridge["val_in_fit"] is True and lam["val_in_fit"] is False
    from llmvem.evaluate.metrics import pearson_r

    ds = run.estimators["ridge"]
    val = tiny_inputs().dataset.val.responses
    assert lam["val_mean_r"] == pytest.approx(float(np.nanmean(pearson_r(val, run.predictions[model_name(0.5)]["val"]))))
    assert ds.fit_splits_ == ("train", "val")
    assert [(c["a"], c["b"]) for c in metrics["comparisons"]] == default_pairs(list(models))
    curve = json.loads((out / "lambda_curve.json").read_text())
    assert [c["lambda"] for c in curve] == [0.0, 0.5]
    # the refused folder fails before any work, resume reuses the finished trainings
    with pytest.raises(Exception, match="already exists"):
        run_models(cfg, lambda: pytest.fail("prepared"), models, out)
    again = run_models(cfg, tiny_inputs(), models, out, resume=True)
    for name in models:
        np.testing.assert_allclose(again.predictions[name]["test"], run.predictions[name]["test"], atol=1e-6)


def planted_two_layer_inputs(seed=0):
    """Voxels 0-4 driven by layer A, voxels 5-9 by layer B (independent random features)."""
    from llmvem.data.dataset import EncodingDataset, Split
    from llmvem.data.images import ArrayImages

    rng = np.random.default_rng(seed)
    sizes = {"train": 120, "val": 60, "test": 60}
    splits, feats = {}, {}
    for s, n in sizes.items():
        a, b = rng.normal(size=(n, 6)).astype(np.float32), rng.normal(size=(n, 6)).astype(np.float32)
        y = np.concatenate([a @ np.ones((6, 5)), b @ np.ones((6, 5))], 1) + rng.normal(0, 1.0, (n, 10))
        splits[s] = Split(ArrayImages(np.zeros((n, 4, 4, 3), np.uint8), [f"{s}{i}" for i in range(n)]),
                          y.astype(np.float32))
        feats[s] = {"A": a, "B": b}
    captions = {s: [[f"image {i}"] for i in range(n)] for s, n in sizes.items()}
    return PreparedInputs(EncodingDataset("planted", splits), captions,
                          {"backend": "file", "model_id": "planted", "config_hash": "x"}, {}, None, feats)


def test_per_voxel_choice_picks_each_voxels_model_on_validation_through_run_models(tmp_path):
    from llmvem.errors import DataValidationError
    from llmvem.estimators import PerVoxelChoice, RidgeEncoder
    from llmvem.evaluate.metrics import pearson_r
    from llmvem.experiment import ModelSpec

    inputs = planted_two_layer_inputs()
    cands = {n: RidgeEncoder(layers=[n], cv=3, device="cpu", fit_splits=("train",)) for n in ("A", "B")}
    models = {"ridge_A": ModelSpec(cands["A"], "ridge on A", "ridge"),
              "ridge_B": ModelSpec(cands["B"], "ridge on B", "ridge"),
              "choice": ModelSpec(PerVoxelChoice(cands), "per-voxel choice", "ridge")}
    cfg = tiny_config("evaluate.bootstrap=50")
    run = run_models(cfg, inputs, models, tmp_path / "run")
    est = run.estimators["choice"]
    assert est.names_ == ["A", "B"] and est.choice_.tolist() == [0] * 5 + [1] * 5
    assert est.fractions() == {"A": 0.5, "B": 0.5} and est.fit_splits_ == ("train", "val")
    y = inputs.dataset.test.responses
    pa, pb, pc = (run.predictions[k]["test"] for k in ("ridge_A", "ridge_B", "choice"))
    np.testing.assert_array_equal(pc, np.concatenate([pa[:, :5], pb[:, 5:]], 1))
    r = {k: float(np.mean(pearson_r(y, p))) for k, p in (("A", pa), ("B", pb), ("choice", pc))}
    assert r["choice"] > max(r["A"], r["B"]) + 0.3  # each half-model is near chance on the other half
    rec = run.metrics["models"]["choice"]
    assert rec["val_in_fit"] is True and run.metrics["selected_model"] != "choice"  # in-sample val never chooses
    saved = json.loads((tmp_path / "run" / "models" / "choice" / "per_voxel_choice.json").read_text())
    assert saved["candidates"] == ["A", "B"] and saved["choice"] == est.choice_.tolist()
    with pytest.raises(DataValidationError, match="validation split"):  # a candidate that saw val is refused
        PerVoxelChoice({"A": RidgeEncoder(layers=["A"], cv=3, device="cpu")}).fit_inputs(inputs)
