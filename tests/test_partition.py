"""Variance partitioning (llmvem.evaluate.partition): planted unique and shared parts are recovered, the stated
corrections hold, and the runner records it per ROI (metrics.json, voxel_metrics.npz) with evaluate.variance_partition."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_experiment import tiny_inputs
from test_train_trainer import tiny_config

from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.errors import DataValidationError
from llmvem.evaluate.partition import VariancePartition, partition_r2
from llmvem.experiment import run_models
from llmvem.inputs import PreparedInputs
from llmvem.pipeline import experiment_models


def test_partition_arithmetic_and_corrections():
    j, a, b = np.array([0.5, 0.3, 0.1, -0.2]), np.array([0.4, 0.35, -0.1, -0.3]), np.array([0.2, 0.0, 0.05, -0.1])
    raw = partition_r2(j, a, b, corrected=False)
    np.testing.assert_allclose(raw["unique_image"], j - b)
    np.testing.assert_allclose(raw["unique_language"], j - a)
    np.testing.assert_allclose(raw["shared"], a + b - j)
    fixed = partition_r2(j, a, b)
    assert all((v >= 0).all() for v in fixed.values())
    # voxel 1: the joint R² (0.3) below the image model's (0.35) is raised to it: no unique language, no negative
    assert fixed["unique_language"][1] == 0 and fixed["unique_image"][1] == pytest.approx(0.35)
    assert all(v[3] == 0 for v in fixed.values())  # nothing explained: nothing to share out


def planted_inputs(n=240, seed=0):
    """Image band X (12 dims), language band T (8 dims); voxel groups: image-only, language-only, shared (a
    direction present in both bands), noise."""
    rng = np.random.default_rng(seed)
    common = rng.standard_normal((n, 1))
    X = np.hstack([rng.standard_normal((n, 11)), common])
    T = np.hstack([rng.standard_normal((n, 7)), common])
    T = T / np.linalg.norm(T, axis=1, keepdims=True)
    y = np.hstack([X[:, :3] @ rng.standard_normal((3, 4)), 3 * T[:, :3] @ rng.standard_normal((3, 4)),
                   np.repeat(common, 4, axis=1), np.zeros((n, 4))]) + 0.5 * rng.standard_normal((n, 16))
    cut = {"train": slice(0, 160), "val": slice(160, 190), "test": slice(190, n)}
    imgs = ArrayImages(np.zeros((n, 4, 4, 3), np.uint8))
    splits = {k: Split(imgs.subset(np.arange(n)[sl]), y[sl].astype(np.float32)) for k, sl in cut.items()}
    masks = {g: np.repeat(np.arange(4) == i, 4) for i, g in enumerate(("image", "language", "shared", "noise"))}
    ds = EncodingDataset("planted", splits, roi_masks=masks)
    return PreparedInputs(ds, {k: [["x"]] * (sl.stop - sl.start) for k, sl in cut.items()}, {},
                          {k: T[sl].astype(np.float32) for k, sl in cut.items()}, None,
                          {k: {"feat": X[sl].astype(np.float32)} for k, sl in cut.items()}, {})


def test_planted_unique_and_shared_variance_is_recovered():
    inputs = planted_inputs()
    vp = VariancePartition(["feat"], cv=4, n_iter=10, device="cpu").fit_inputs(inputs)
    rois = vp.summary(inputs)["per_roi"]
    assert rois["image"]["unique_image_r2"] > 0.3 and rois["image"]["unique_language_r2"] < 0.05
    assert rois["language"]["unique_language_r2"] > 0.3 and rois["language"]["unique_image_r2"] < 0.05
    assert rois["shared"]["shared_r2"] > 0.3 and rois["shared"]["shared_r2"] > 3 * max(
        rois["shared"]["unique_image_r2"], rois["shared"]["unique_language_r2"])
    assert max(rois["noise"][f"{p}_r2"] for p in ("unique_image", "unique_language", "shared")) < 0.05
    assert rois["all"]["n_voxels"] == 16
    with pytest.raises(DataValidationError, match="held-out"):
        vp.test_r2(inputs, "train")


def test_runner_records_the_partition_per_roi(tmp_path):
    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=2", "evaluate.bootstrap=0",
                      "evaluate.ridge_folds=3", "evaluate.ridge_device=cpu", "evaluate.text_to_brain=false",
                      "evaluate.variance_partition=true", "evaluate.baselines=[ridge]", "evaluate.compare_lambdas=[]")
    run_models(cfg, tiny_inputs(), {k: v for k, v in experiment_models(cfg, [0.0]).items() if k == "ridge"},
               tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    vp = m["variance_partition"]
    assert {"unique_image_r2", "unique_language_r2", "shared_r2", "joint_r2"} <= set(vp["per_roi"]["all"])
    assert vp["split"] == "test" and "floored" in vp["correction"] and "voxels" not in vp
    z = np.load(tmp_path / "run" / "voxel_metrics.npz")
    assert z["partition__unique_language_r2"].shape == (10,) and (z["partition__shared_r2"] >= 0).all()
    assert "variance_partition" in m["timing"]["stages"]


def test_report_shows_the_partition(tmp_path):
    from llmvem.report import write_report

    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=2", "evaluate.bootstrap=0",
                      "evaluate.ridge_folds=3", "evaluate.ridge_device=cpu", "evaluate.text_to_brain=false",
                      "evaluate.variance_partition=true", "evaluate.baselines=[ridge]", "evaluate.compare_lambdas=[]")
    run_models(cfg, tiny_inputs(), {k: v for k, v in experiment_models(cfg, [0.0]).items() if k == "ridge"},
               tmp_path / "run")
    m = json.loads((tmp_path / "run" / "metrics.json").read_text())
    html = write_report([tmp_path / "run"]).read_text(encoding="utf-8")
    assert "<h2" in html and "Variance partition" in html and "unique to caption embeddings" in html
    assert f"{m['variance_partition']['per_roi']['all']['joint_r2']:.3f}" in html
    assert (tmp_path / "run" / "report" / "partition.png").is_file()
