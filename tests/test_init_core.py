"""A new session fitted on a core trained on other sessions: ``llmvem train-multi`` (shared fine-tuned backbone,
per-session spatial readouts, each session's own split) then ``llmvem train --init-core`` on a session the core
never saw, through the CLI as README documents."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_multisubject import make_v4_session

from llmvem.cli import main
from llmvem.config import load_config
from llmvem.data import load_dataset
from llmvem.data.splits import check_split_agreement
from llmvem.embed.cache import FeatureCache
from llmvem.errors import ConfigError, DataValidationError
from llmvem.inputs import load_config_backbone
from llmvem.train.checkpoint import load_weights
from llmvem.train.core_init import load_core

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def sessions(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4core")
    weights = np.random.default_rng(0).normal(size=(6, 8))
    for i, (name, n) in enumerate((("s1", 48), ("s2", 42), ("s3", 36))):
        make_v4_session(root, name, n, weights, i + 1)
    return root


def _config(path, cache) -> str:
    spatial = ["block5@grid2"]
    cfg = {"backbone": {"name": "efficientnet_lite0", "layers": ["block5", "pooled"], "image_size": 32,
                        "batch_size": 64, "spatial_layers": spatial},
           "model": {"lambda_align": 0.0, "readout_l2": 0.1, "spatial_readout": "factorized",
                     "spatial_mode": "residual"},
           "multisubject": {"core": "none", "split": "dataset"}, "captions": {"backend": "labels"},
           "train": {"device": "cpu",
                     "stage1": {"epochs": 3, "batch_size": 16, "lr": 0.003, "early_stopping_patience": None},
                     "stage2": {"epochs": 1, "batch_size": 16, "lr": 1e-3, "backbone_lr": 1e-3,
                                "unfreeze_last_n": 2, "early_stopping_patience": None}},
           "evaluate": {"bootstrap": 0, "text_to_brain": False,
                        "models": [{"name": "ridge_block5", "kind": "ridge", "layers": ["block5", "block5@grid2"]},
                                   {"name": "ridge_pooled", "kind": "ridge", "layers": ["pooled"]},
                                   {"name": "spatial", "kind": "llmvem", "lambda_align": 0.0},
                                   {"name": "spatial_frozen", "kind": "llmvem", "lambda_align": 0.0,
                                    "set": {"train.stage2.epochs": 0}}]},
           "data": {"val_fraction": 0.2}, "cache_dir": str(cache)}
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


@pytest.fixture(scope="module")
def core_run(sessions, tmp_path_factory):
    """A core fine-tuned on sessions s1 and s2 (stage 2), each session keeping its own split."""
    tmp = tmp_path_factory.mktemp("core")
    cfg = _config(tmp / "cfg.yaml", tmp / "cache")
    out = tmp / "core"
    assert main(["train-multi", "--config", cfg, "--subjects", f"v4:{sessions}:s1,v4:{sessions}:s2",
                 "--out", str(out), "--no-progress"]) == 0
    return cfg, out


def test_train_multi_keeps_each_sessions_own_split_and_fine_tunes_one_shared_backbone(sessions, core_run):
    cfg, out = core_run
    summary = json.loads((out / "summary.json").read_text())
    for session in ("s1", "s2"):
        own = load_dataset(f"v4:{sessions}:{session}", val_fraction=0.2, seed=0)
        entry = summary["subjects"][f"v4_{session}"]
        assert (entry["n_train"], entry["n_val"], entry["n_test"]) == (len(own.train), len(own.val), len(own.test))
    state = load_weights(out / "joint" / "model.safetensors")
    # no shared core layer: the sessions share only the backbone, and each has a flat + spatial readout
    assert not any(k.startswith("core.") for k in state)
    assert any(k.startswith("readouts.v4_s1.spatial.") for k in state)
    assert any(k.startswith("readouts.v4_s2.spatial.") for k in state)
    pretrained = load_config_backbone(load_config(cfg)).state_dict()
    tuned = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    assert set(tuned) == set(pretrained)
    changed = [k for k in tuned if not torch.equal(tuned[k], pretrained[k])]
    assert changed and len(changed) < len(tuned)  # the last blocks were fine-tuned, the first ones kept


def test_a_new_session_is_fitted_on_the_core_through_the_cli(sessions, core_run, tmp_path, capsys):
    cfg, core = core_run
    run = tmp_path / "s3_core"
    assert main(["train", "--config", cfg, "--init-core", str(core), "--set", f"data.spec=v4:{sessions}:s3",
                 "--out", str(run), "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    saved = load_config(run / "config.yaml")
    assert saved.backbone.init_core == str(core.resolve())  # absolute: predict/export find it from anywhere
    # the backbone that made the features is the core's fine-tuned backbone, under its own cache key
    backbone = load_config_backbone(saved)
    state = load_weights(core / "joint" / "model.safetensors")
    for k, v in backbone.state_dict().items():
        assert torch.equal(v, state[f"backbone.{k}"])
    assert "+core:" in backbone.model_id
    ids = {e["model_id"] for e in FeatureCache(Path(saved.cache_dir) / "features.h5").info()}
    assert backbone.model_id in ids and "efficientnet_lite0" in ids
    metrics = json.loads((run / "metrics.json").read_text())
    assert set(metrics["models"]) == {"ridge_block5", "ridge_pooled", "spatial", "spatial_frozen"}
    for name in metrics["models"]:
        assert f"{name}: val mean r" in stdout
        assert np.isfinite(metrics["models"][name]["mean_r"])
    # predict serves both networks from the run folder: the fine-tuned one from its own weights, the frozen one
    # from the core the config names
    from PIL import Image

    ds = load_dataset(f"v4:{sessions}:s3", val_fraction=0.2, seed=0)
    folder = tmp_path / "stimuli"
    folder.mkdir()
    for i in range(len(ds.test)):
        Image.fromarray(ds.test.images.load_array(i)).save(folder / f"img{i:02d}.png")
    for name in ("spatial", "spatial_frozen"):
        out = tmp_path / f"{name}.h5"
        assert main(["predict", "--run", str(run), "--model", name, "--images", str(folder), "--out", str(out)]) == 0
        from llmvem.explain.predictions import read_predictions_h5

        np.testing.assert_allclose(read_predictions_h5(out)["responses"],
                                   np.load(run / "models" / name / "predictions_test.npy"), atol=2e-3)
    # the same session on the pretrained backbone: the core changed the features of the blocks stage 2 tuned
    # (the pooled embedding), not those of the frozen early block 5
    plain = tmp_path / "s3_plain"
    assert main(["train", "--config", cfg, "--set", f"data.spec=v4:{sessions}:s3", "--out", str(plain),
                 "--no-progress"]) == 0
    other = json.loads((plain / "metrics.json").read_text())["models"]
    assert other["ridge_block5"]["mean_r"] == pytest.approx(metrics["models"]["ridge_block5"]["mean_r"], abs=1e-6)
    assert abs(other["ridge_pooled"]["mean_r"] - metrics["models"]["ridge_pooled"]["mean_r"]) > 1e-4


def test_init_core_refuses_folders_that_hold_no_fine_tuned_core(sessions, core_run, tmp_path, capsys):
    cfg, core = core_run
    spec = f"data.spec=v4:{sessions}:s3"
    assert main(["train", "--config", cfg, "--init-core", str(tmp_path / "nope"), "--set", spec,
                 "--out", str(tmp_path / "a")]) == 2
    assert "holds no model.safetensors" in capsys.readouterr().err
    assert not (tmp_path / "a").exists()
    stage1 = tmp_path / "stage1"
    assert main(["train-multi", "--config", cfg, "--subjects", f"v4:{sessions}:s1", "--out", str(stage1),
                 "--set", "train.stage2.epochs=0", "--no-progress"]) == 0
    assert main(["train", "--config", cfg, "--init-core", str(stage1), "--set", spec,
                 "--out", str(tmp_path / "b")]) == 2
    assert "without stage 2" in capsys.readouterr().err
    backbone = load_config_backbone(load_config(cfg))
    with pytest.raises(ConfigError, match="fine-tuned backbone 'timm:resnet18'"):
        yaml_cfg = yaml.safe_load((core / "joint" / "config.yaml").read_text())
        yaml_cfg["backbone"]["name"] = "timm:resnet18"
        fake = tmp_path / "fake"
        fake.mkdir()
        (fake / "config.yaml").write_text(yaml.safe_dump(yaml_cfg))
        (fake / "model.safetensors").write_bytes((core / "joint" / "model.safetensors").read_bytes())
        load_core(backbone, fake, "efficientnet_lite0")


def test_own_splits_that_disagree_on_a_shared_image_are_refused(sessions, tmp_path):
    a = load_dataset(f"v4:{sessions}:s1", val_fraction=0.2, seed=0)
    assert check_split_agreement([a, load_dataset(f"v4:{sessions}:s2", val_fraction=0.2, seed=0)], ["a", "b"]) == 0
    # the same images with another test assignment: image 1 is a test image of one, a training image of the other
    b = load_dataset(f"v4:{sessions}:s1", val_fraction=0.2, seed=0, test_every=5)
    with pytest.raises(DataValidationError, match="must be a test image for all subjects or for none"):
        check_split_agreement([a, b], ["a", "b"])
