"""``evaluate.per_voxel_choice`` on the user's path: ``run_experiment`` with a spatial readout adds the pooled λ = 0
model and a per-voxel choice between it and the spatial λ = 0 model (reusing both fitted models), records the
choice per ROI, and predicts each voxel from its chosen model; without a spatial readout the switch is refused."""

from __future__ import annotations

import json

import numpy as np
import pytest
import yaml

import llmvem.cli.train  # noqa: F401  (registers the command)
from llmvem.cli import main
from llmvem.config import apply_overrides, load_config
from llmvem.errors import ConfigError
from llmvem.evaluate.metrics import pearson_r
from llmvem.pipeline import PER_VOXEL_CHOICE, POOLED_LAMBDA0, experiment_models, run_experiment

SPATIAL = ["backbone.spatial_layers=[layer2@grid4]", "model.spatial_readout=factorized"]


def _config_file(tmp, cache) -> str:
    # tiny virtual brain (early-visual + semantic voxels), a random 48 px ResNet, stage 1 on cached features only
    cfg = {"data": {"spec": "virtual", "n_train": 60, "n_test": 30, "image_size": 48, "seed": 0},
           "captions": {"backend": "dataset"},
           "backbone": {"name": "timm:resnet10t", "pretrained": False, "image_size": 48,
                        "layers": ["layer2", "pooled"], "batch_size": 64},
           "model": {"readout_l2": 0.1, "lambda_align": 0.0, "feature_dropout": 0.0},
           "train": {"device": "cpu", "stage1": {"epochs": 4, "batch_size": 16, "lr": 0.003,
                                                 "early_stopping_patience": None},
                     "stage2": {"epochs": 0}},
           "evaluate": {"bootstrap": 30, "baselines": ["lambda0"], "text_to_brain": False},
           "cache_dir": str(cache)}
    path = tmp / "choice.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.mark.slow  # ~10 s: two stage-1 models on a 60-image virtual brain
def test_run_experiment_adds_the_per_voxel_choice_of_pooled_and_spatial(tmp_path):
    import llmvem.train.trainer

    cfg = apply_overrides(load_config(_config_file(tmp_path, tmp_path / "cache")),
                          [*SPATIAL, "evaluate.per_voxel_choice=true"])
    assert list(experiment_models(cfg)) == ["llmvem_lambda0", POOLED_LAMBDA0, PER_VOXEL_CHOICE]
    trained = []
    real = llmvem.train.trainer.train_encoding_model

    def counting(config, *a, **kw):
        trained.append(config.model.spatial_readout)
        return real(config, *a, **kw)

    mp = pytest.MonkeyPatch()
    mp.setattr(llmvem.train.trainer, "train_encoding_model", counting)
    try:
        metrics = run_experiment(cfg, tmp_path / "run", report=False, show_progress=False)
    finally:
        mp.undo()
    assert sorted(trained) == ["factorized", "none"]  # each candidate trained once: the choice reuses both
    run = tmp_path / "run"
    rec = metrics["models"][PER_VOXEL_CHOICE]
    assert rec["val_in_fit"] is True and metrics["selected_model"] != PER_VOXEL_CHOICE
    assert metrics["models"][POOLED_LAMBDA0]["lambda"] is None  # not a point of the λ curve
    assert [c["lambda"] for c in json.loads((run / "lambda_curve.json").read_text())] == [0.0]
    # each voxel takes the candidate with the higher validation r; test predictions are that candidate's
    pred = {n: {s: np.load(run / "models" / n / f"predictions_{s}.npy") for s in ("val", "test")}
            for n in (POOLED_LAMBDA0, "llmvem_lambda0", PER_VOXEL_CHOICE)}
    saved = json.loads((run / "models" / PER_VOXEL_CHOICE / "per_voxel_choice.json").read_text())
    assert saved["candidates"] == ["pooled", "spatial"] and saved["reused"] == ["pooled", "spatial"]
    choice = np.asarray(saved["choice"])
    from llmvem.inputs import load_config_dataset

    ds = load_config_dataset(cfg).with_validation_split(cfg.data.val_fraction, cfg.data.seed)
    r_val = np.stack([pearson_r(ds.val.responses, pred[n]["val"]) for n in (POOLED_LAMBDA0, "llmvem_lambda0")])
    np.testing.assert_array_equal(choice, np.argmax(np.where(np.isfinite(r_val), r_val, -np.inf), axis=0))
    assert 0 < choice.mean() < 1  # both candidates win somewhere
    for split in ("val", "test"):
        expected = np.where(choice[None, :] == 1, pred["llmvem_lambda0"][split], pred[POOLED_LAMBDA0][split])
        np.testing.assert_array_equal(pred[PER_VOXEL_CHOICE][split], expected)
    # fractions per ROI (early visual and semantic voxels) are recorded in metrics.json
    summary = rec["per_voxel_choice"]
    assert summary["candidates"] == ["pooled", "spatial"]
    for roi in ("early_visual", "semantic"):
        mask = ds.roi_masks[roi]
        assert summary["fractions_per_roi"][roi]["spatial"] == pytest.approx(float(np.mean(choice[mask] == 1)))
        assert sum(summary["fractions_per_roi"][roi].values()) == pytest.approx(1.0)
    assert summary["fractions"]["spatial"] == pytest.approx(float(choice.mean()))
    # the choice is bootstrapped against the pooled model
    assert (POOLED_LAMBDA0, PER_VOXEL_CHOICE) in [(c["a"], c["b"]) for c in metrics["comparisons"]]


def test_per_voxel_choice_without_spatial_readout_is_refused_naming_the_field(tmp_path, capsys):
    path = _config_file(tmp_path, tmp_path / "cache")
    with pytest.raises(ConfigError, match=r"evaluate\.per_voxel_choice.*model\.spatial_readout"):
        apply_overrides(load_config(path), ["evaluate.per_voxel_choice=true"])
    out = tmp_path / "run"
    code = main(["train", "--config", path, "--out", str(out), "--no-progress",
                 "--set", "evaluate.per_voxel_choice=true"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "evaluate.per_voxel_choice" in err[0]
    assert not out.exists()
    # a config assembled in Python (no validation on assignment across sections) is refused by the experiment
    cfg = load_config(path)
    cfg.evaluate.per_voxel_choice = True
    with pytest.raises(ConfigError, match=r"evaluate\.per_voxel_choice"):
        experiment_models(cfg)
