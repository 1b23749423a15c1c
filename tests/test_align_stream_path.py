"""The alignment stream (``align_data``) on the user's path: ``run_experiment``, ``llmvem train`` and
``LLMVEMEncoder.fit`` load it, λ > 0 models train with it, λ = 0 models ignore it, the run folder records it."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import yaml

import llmvem.cli.train  # noqa: F401  (registers the command)
from llmvem.cli import main
from llmvem.config import apply_overrides, load_config
from llmvem.data.captioned import load_captioned_images
from llmvem.errors import DataValidationError
from llmvem.estimators import LLMVEMEncoder
from llmvem.inputs import prepare_inputs
from llmvem.pipeline import run_experiment

STREAM = "virtual-scenes:n=40,seed=1"


def _config_file(tmp, cache) -> str:
    # tiny virtual brain, a random 48 px ResNet, a shared linear core trained on cached features only (stage 1),
    # so λ reaches the predictions through the core
    cfg = {"data": {"spec": "virtual", "n_train": 60, "n_test": 30, "image_size": 48, "seed": 0},
           "captions": {"backend": "dataset"},
           "backbone": {"name": "timm:resnet10t", "pretrained": False, "image_size": 48,
                        "layers": ["layer2", "pooled"], "batch_size": 64},
           "model": {"readout_l2": 0.1, "lambda_align": 0.5, "core": "linear", "core_dim": 16,
                     "feature_dropout": 0.0},
           "train": {"device": "cpu", "stage1": {"epochs": 4, "batch_size": 16, "lr": 0.003,
                                                 "early_stopping_patience": None},
                     "stage2": {"epochs": 0}},
           "evaluate": {"bootstrap": 50, "baselines": [], "text_to_brain": False},
           "cache_dir": str(cache)}
    path = tmp / "stream.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """The same experiment (λ = 0 and 0.5) without and with the stream, on one set of prepared inputs."""
    tmp = tmp_path_factory.mktemp("stream_path")
    path = _config_file(tmp, tmp / "cache")
    plain = load_config(path)
    streamed = apply_overrides(plain, [f"align_data.spec={STREAM}"])
    inputs = prepare_inputs(plain, show_progress=False)
    said: list[str] = []
    m_plain = run_experiment(plain, tmp / "plain", lambdas=[0, 0.5], report=False, inputs=inputs,
                             show_progress=False)
    m_stream = run_experiment(streamed, tmp / "stream", lambdas=[0, 0.5], report=False, inputs=inputs,
                              show_progress=False, on_stage=said.append)
    return tmp, path, inputs, (m_plain, m_stream), said


def _pred(run, name):
    return np.load(run / "models" / name / "predictions_test.npy")


@pytest.mark.slow  # ~15 s: two experiments of two stage-1 models on a 60-image virtual brain
def test_lambda_positive_trains_with_the_stream_and_lambda_zero_ignores_it(runs):
    tmp, _, _, (m_plain, m_stream), said = runs
    # λ = 0: bit-identical with and without the stream
    for split in ("val", "test"):
        np.testing.assert_array_equal(np.load(tmp / "plain/models/llmvem_lambda0" / f"predictions_{split}.npy"),
                                      np.load(tmp / "stream/models/llmvem_lambda0" / f"predictions_{split}.npy"))
    # λ > 0: the stream's contrastive loss shapes the shared core, so the predictions change
    diff = np.abs(_pred(tmp / "plain", "llmvem_lambda0.5") - _pred(tmp / "stream", "llmvem_lambda0.5")).max()
    assert diff > 1e-4
    # metadata: metrics.json per model and training.json of the trainer
    record = {"spec": STREAM, "n_images": 40, "weight": 1.0, "batch_size": None, "ratio": None,
              "target": "captions"}
    assert m_stream["models"]["llmvem_lambda0.5"]["align_stream"] == record
    assert "align_stream" not in m_stream["models"]["llmvem_lambda0"]
    assert "align_stream" not in m_plain["models"]["llmvem_lambda0.5"]
    trained = json.loads((tmp / "stream/models/llmvem_lambda0.5/training.json").read_text())
    assert trained["align_stream"] == record and trained["dataset"]["n_align_stream"] == 40
    zero = json.loads((tmp / "stream/models/llmvem_lambda0/training.json").read_text())
    assert zero["align_stream"] is None
    # matched epochs: the stream joins the voxel steps, so λ = 0 and λ > 0 + stream take the same steps per epoch
    assert trained["steps_per_epoch"] == zero["steps_per_epoch"] and trained["steps_per_epoch"]["stage1"] >= 1
    assert trained["stages"]["stage1"]["extra_batches_per_epoch"]["align_stream"] >= 1
    assert m_stream["timing"]["stages"]["align_stream"] >= 0
    # the stages say which model uses the stream and which ignores it
    assert f"alignment stream {STREAM}: 40 captioned images, weight 1, for llmvem_lambda0.5" in said
    assert any(line.startswith("llmvem_lambda0 ignores the alignment stream") for line in said)


@pytest.mark.slow  # ~8 s: one CLI training of one stage-1 model
def test_llmvem_train_uses_the_stream_like_run_experiment(runs, capsys):
    tmp, path, _, _, _ = runs
    out = tmp / "cli"
    code = main(["train", "--config", path, "--out", str(out), "--no-progress", "--set", f"align_data.spec={STREAM}"])
    assert code == 0
    stdout = capsys.readouterr().out
    assert f"alignment stream: {STREAM} (40 captioned images, weight 1)" in stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["models"]["llmvem_lambda0.5"]["align_stream"]["n_images"] == 40
    # same config, seed and data as run_experiment's λ = 0.5 model with the stream: the same predictions
    np.testing.assert_allclose(_pred(out, "llmvem_lambda0.5"), _pred(tmp / "stream", "llmvem_lambda0.5"),
                               rtol=0, atol=1e-6)


@pytest.mark.slow  # ~6 s: one estimator fit
def test_estimator_fit_loads_the_stream_of_its_config(runs, caplog):
    tmp, path, inputs, _, _ = runs
    cfg = apply_overrides(load_config(path), [f"align_data.spec={STREAM}"])
    enc = LLMVEMEncoder(cfg).fit(inputs.dataset, inputs.text_embeddings, backbone=inputs.backbone,
                                 features=inputs.features)
    assert enc.align_stream_ == {"spec": STREAM, "n_images": 40, "weight": 1.0, "batch_size": None, "ratio": None,
                                 "target": "captions"}
    np.testing.assert_allclose(enc.result_.predictions["test"], _pred(tmp / "stream", "llmvem_lambda0.5"),
                               rtol=0, atol=1e-6)
    with caplog.at_level(logging.INFO, logger="llmvem.estimators"):
        zero = LLMVEMEncoder(apply_overrides(cfg, ["model.lambda_align=0"])).fit(
            inputs.dataset, backbone=inputs.backbone, features=inputs.features)
    assert zero.align_stream_ is None
    assert [r.getMessage() for r in caplog.records if "ignores the alignment stream" in r.getMessage()] == [
        f"the λ = 0 model ignores the alignment stream ({STREAM}): it adds only the contrastive loss"]
    np.testing.assert_array_equal(zero.result_.predictions["test"], _pred(tmp / "plain", "llmvem_lambda0"))


def test_a_bad_stream_spec_fails_before_training_in_one_line(tmp_path, capsys):
    path = _config_file(tmp_path, tmp_path / "cache")
    out = tmp_path / "run"
    missing = tmp_path / "no_such_folder"
    code = main(["train", "--config", path, "--out", str(out), "--no-progress",
                 "--set", f"align_data.spec={missing}", "--set", "data.n_train=20", "--set", "data.n_test=10"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1
    assert str(missing) in err[0] and "align_data.spec" in err[0] and "is not a folder" in err[0]
    assert not out.exists()  # refused before any model was trained: no half-made run folder


def test_bad_virtual_scene_options_are_named():
    with pytest.raises(DataValidationError, match="option n: got 'abc'; expected an integer >= 2"):
        load_captioned_images("virtual-scenes:n=abc")
    with pytest.raises(DataValidationError, match="option seed"):
        load_captioned_images("virtual-scenes:n=4,seed=0.5")
