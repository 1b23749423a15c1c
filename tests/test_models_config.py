"""``evaluate.models``: the benchmark's models (layer choice, banded ridge, seed ensemble, blend, feature-matched
ridge) declared in a config, fitted by the one runner, written to the run folder and served by ``predict``."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_experiment import tiny_inputs
from test_train_trainer import tiny_config

from llmvem.composite import Blend, ChooseOnValidation, SeedEnsemble, simplex_grid
from llmvem.config import apply_overrides
from llmvem.errors import ConfigError
from llmvem.evaluate.metrics import pearson_r
from llmvem.experiment import run_models
from llmvem.pipeline import experiment_layers, experiment_models, experiment_pairs

MODELS = ("evaluate.models=["
          "{name: ridge_sets, kind: ridge, layer_sets: [[block0], [pooled], [block0, pooled]]},"
          "{name: banded, kind: banded_ridge, bands: [[block0], [pooled]], n_iter: 4},"
          "{name: net, kind: llmvem, lambda_align: 0, seeds: 2, set: {model.readout_l2: 0.1}},"
          "{name: net_blend, kind: blend, members: [net, ridge_sets], compare_to: [net, ridge_sets]}]")


def _config(*extra):
    return tiny_config("train.stage2.epochs=0", "train.stage1.epochs=3", "evaluate.bootstrap=20",
                       "evaluate.ridge_folds=3", "evaluate.ridge_device=cpu", "evaluate.text_to_brain=false",
                       MODELS, *extra)


def test_models_config_builds_the_estimators_in_order():
    cfg = _config()
    models = experiment_models(cfg)
    assert list(models) == ["ridge_sets", "banded", "net", "net_blend"]
    assert isinstance(models["ridge_sets"].estimator, ChooseOnValidation)
    ens = models["net"].estimator
    assert isinstance(ens, SeedEnsemble) and ens.n_seeds == 2
    assert ens.estimator.config.model.readout_l2 == 0.1 and ens.estimator.config.model.lambda_align == 0
    assert isinstance(models["net_blend"].estimator, Blend) and models["net_blend"].reuses == {"net": "net",
                                                                                            "ridge_sets": "ridge_sets"}
    assert experiment_pairs(list(models), cfg) == [("net", "net_blend"), ("ridge_sets", "net_blend")]
    assert experiment_layers(cfg) == ["block0", "pooled"]
    with pytest.raises(ConfigError, match=r"\(net\)\.set"):
        experiment_models(apply_overrides(cfg, ["evaluate.models=[{name: net, kind: llmvem, set: {model.nope: 1}}]"]))


def test_declared_models_fit_save_choose_and_predict(tmp_path, monkeypatch):
    from test_train_trainer import backbone

    import llmvem.inputs
    from llmvem.explain.predictions import predict_images, resolve_model_dir

    # the run's backbone, as predict rebuilds it for the ridges, is the tiny test backbone (cache in tmp_path)
    monkeypatch.setattr(llmvem.inputs, "load_config_backbone", lambda cfg: backbone())
    cfg = _config(f"cache_dir={tmp_path / 'cache'}")
    inputs = tiny_inputs()
    run = run_models(cfg, inputs, experiment_models(cfg), tmp_path / "run", pairs=experiment_pairs([], cfg))
    out = tmp_path / "run"
    m = json.loads((out / "metrics.json").read_text())
    recs = m["models"]
    ds = inputs.dataset
    # layer choice: chosen on validation from train-only fits, then refitted on train + val
    choice = recs["ridge_sets"]["details"]
    assert choice["chosen"] == max(choice["val_mean_r"], key=choice["val_mean_r"].get)
    assert recs["ridge_sets"]["val_in_fit"] and (out / "models" / "ridge_sets" / "ridge.npz").is_file()
    # banded ridge: per-band weights recorded
    assert len(recs["banded"]["bands"]["mean_gamma"]) == 2 and recs["banded"]["val_in_fit"]
    # seed ensemble: members in seed<i>/, the average is the model's prediction
    members = [np.load(out / "models" / "net" / f"seed{i}" / "predictions_test.npy") for i in range(2)]
    assert not np.allclose(members[0], members[1])  # two seeds, two networks
    np.testing.assert_allclose(run.predictions["net"]["test"], np.mean(members, axis=0), rtol=1e-5)
    assert recs["net"]["details"]["seeds"] == [cfg.seed, cfg.seed + 1]
    # blend: weights from the ridge's train-only validation predictions; its val r is out of fold
    blend = recs["net_blend"]["details"]
    w = blend["weights"]
    assert pytest.approx(sum(w.values())) == 1.0 and not recs["net_blend"]["val_in_fit"]
    ridge_test = run.predictions["ridge_sets"]["test"]
    np.testing.assert_allclose(run.predictions["net_blend"]["test"],
                               w["net"] * run.predictions["net"]["test"] + w["ridge_sets"] * ridge_test, rtol=1e-5)
    assert blend["val_mean_r_in_sample"] >= recs["net_blend"]["val_mean_r"] - 1e-9
    # comparisons as declared; the chosen model is never the in-sample ridge
    assert [(c["a"], c["b"]) for c in m["comparisons"]] == [("net", "net_blend"), ("ridge_sets", "net_blend")]
    assert m["selected_model"] in ("banded", "net", "net_blend") or m["selected_model"] is None
    assert "ridge_sets" in m["selection"]["excluded"]
    # predict serves every declared model from the run folder as the runner predicted it
    for name in ("ridge_sets", "banded", "net", "net_blend"):
        folder = resolve_model_dir(out, name)
        pred = predict_images(folder, ds.test.images, device="cpu")
        np.testing.assert_allclose(pred, run.predictions[name]["test"], rtol=1e-3, atol=1e-4)
    assert resolve_model_dir(out).name == m["selected_model"]


def test_blend_weights_are_chosen_on_heldout_validation_predictions(tmp_path):
    """A member fitted on train + val contributes its train-only validation predictions to the weight choice."""
    from llmvem.estimators import RidgeEncoder

    inputs = tiny_inputs()
    y = inputs.dataset.val.responses
    good = RidgeEncoder(layers=["block0", "pooled"], cv=3, device="cpu")
    weak = RidgeEncoder(layers=["pooled"], cv=3, device="cpu", fit_splits=("train",))
    blend = Blend({"good": good, "weak": weak}).fit_inputs(inputs)
    train_only = RidgeEncoder(layers=["block0", "pooled"], cv=3, device="cpu", fit_splits=("train",))
    held = train_only.fit_inputs(inputs).predict_inputs(inputs)["val"]
    weak_val = blend.members_["weak"].predict_inputs(inputs)["val"]
    grid = simplex_grid(2)
    scores = [float(np.nanmean(pearson_r(y, a * held + b * weak_val))) for a, b in grid]
    assert blend.weights_["good"] == pytest.approx(grid[int(np.argmax(scores))][0])
    assert simplex_grid(3, 0.5).tolist() == [[0, 0, 1], [0, 0.5, 0.5], [0, 1, 0], [0.5, 0, 0.5], [0.5, 0.5, 0],
                                             [1, 0, 0]]
