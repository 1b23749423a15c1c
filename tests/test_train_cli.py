"""``llmvem train``: config + overrides → run folder; used folders refused; resume; errors as exit code 2."""

from __future__ import annotations

import json

import pytest
import yaml
from test_train_trainer import backbone, make_dataset

import llmvem.cli.train  # noqa: F401  (registers the command until llmvem/cli/__init__.py imports it)
import llmvem.inputs
from llmvem.cli import main


@pytest.fixture
def fake_inputs(monkeypatch):
    """Replace the (slow, captioning + embedding) input preparation by the tiny test dataset."""
    calls = []

    def prepare_inputs(config, show_progress=True, dataset=None, other_captions="stop"):
        calls.append(config)
        ds, text = make_dataset()
        captions = {s: [["an image"]] * len(ds.splits[s]) for s in ds.splits}
        return llmvem.inputs.PreparedInputs(dataset=ds, captions=captions,
                                              caption_info={"backend": "dataset", "model_id": "test"},
                                              text_embeddings=text,
                                              backbone=backbone(), features=frozen_features(ds))

    monkeypatch.setattr(llmvem.inputs, "prepare_inputs", prepare_inputs)
    return calls


def frozen_features(ds):
    """Features of the frozen tiny backbone, as the feature cache would give them."""
    import numpy as np
    import torch

    bb = backbone().eval()
    with torch.no_grad():
        return {s: {k: v.numpy().astype(np.float32) for k, v in
                    bb(bb.preprocess(torch.from_numpy(ds.splits[s].images.array)), ["block0", "pooled"]).items()}
                for s in ("train", "val", "test")}


def _config(tmp_path):
    cfg = {"backbone": {"layers": ["block0", "pooled"]},
           "model": {"lambda_align": 0.5},
           "train": {"device": "cpu", "stage1": {"epochs": 2, "batch_size": 16, "lr": 0.01},
                     "stage2": {"epochs": 1, "batch_size": 16, "unfreeze_last_n": 1}}}
    path = tmp_path / "cfg.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


def test_train_command_writes_a_run_folder_with_overrides(tmp_path, fake_inputs, capsys):
    out = tmp_path / "run"
    code = main(["train", "--config", str(_config(tmp_path)), "--out", str(out), "--no-progress",
                 "--set", "train.stage1.epochs=3", "--set", "model.lambda_align=0.25"])
    assert code == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["train"]["stage1"]["epochs"] == 3 and saved["model"]["lambda_align"] == 0.25
    assert fake_inputs[0].train.stage1.epochs == 3
    stdout = capsys.readouterr().out
    assert "val mean r" in stdout and "stage1: 3 epochs" in stdout and "stage2: 1 epochs" in stdout
    summary = json.loads((out / "models" / "llmvem_lambda0.25" / "training.json").read_text())
    assert summary["lambda_align"] == 0.25
    # a complete run folder: ridge and LLM-VEM scored on test, the validation-chosen model named
    metrics = json.loads((out / "metrics.json").read_text())
    assert set(metrics["models"]) == {"ridge", "llmvem_lambda0.25"}
    assert metrics["selected_model"] == "llmvem_lambda0.25"  # the ridge is fitted on val: not chosen by it
    assert "mean_r" in metrics["models"]["ridge"] and (out / "test_responses.npy").is_file()
    assert (out / "models" / "ridge" / "ridge.npz").is_file()
    assert "selected: llmvem_lambda0.25 (chosen on validation among llmvem_lambda0.25; ridge not eligible: " \
           "fitted on val)" in stdout


def test_used_folder_is_refused_before_preparing_inputs_then_resumed(tmp_path, fake_inputs, capsys):
    out = tmp_path / "run"
    cfg = str(_config(tmp_path))
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 0
    n_calls = len(fake_inputs)
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "already exists" in err and "--resume" in err
    assert len(fake_inputs) == n_calls  # refused before the slow preparation
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress", "--resume"]) == 0
    assert main(["train", "--config", cfg, "--out", str(out), "--no-progress", "--overwrite"]) == 0


def test_bad_config_and_bad_override_exit_with_code_2(tmp_path, fake_inputs, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  stage1:\n    epoch: 3\n")
    assert main(["train", "--config", str(bad), "--out", str(tmp_path / "x")]) == 2
    assert "train.stage1.epoch: unknown key" in capsys.readouterr().err
    assert main(["train", "--config", "demo", "--out", str(tmp_path / "y"), "--set", "model.readout=ridge"]) == 2
    assert "model.readout" in capsys.readouterr().err
    assert not fake_inputs
