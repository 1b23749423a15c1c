"""Typed run configuration: loading, errors that name file and key, overrides, round trips."""

from __future__ import annotations

import pytest
import yaml

from llmvem.config import (
    RunConfig,
    apply_overrides,
    config_diff,
    list_shipped_configs,
    load_config,
    save_config,
)
from llmvem.errors import ConfigError


def test_shipped_configs_load_with_their_documented_settings():
    assert {"demo", "algonauts_eva02"} <= set(list_shipped_configs())
    demo = load_config("demo")
    assert demo.data.spec == "virtual"
    assert demo.backbone.name == "efficientnet_lite0"
    assert demo.text.encoder == "minilm"
    assert demo.train.stage1.epochs > 0 and demo.train.stage2.epochs > 0
    gpu = load_config("algonauts_eva02")
    assert gpu.backbone.name == "timm:eva02_base_patch14_224.mim_in22k"
    assert gpu.text.encoder.startswith("clip:")
    assert gpu.model.pca_components == 2048
    assert gpu.train.precision == "bf16"
    assert gpu.train.stage1.batch_size == 128 and gpu.train.stage2.batch_size == 128
    assert gpu.train.stage2.unfreeze_last_n > 0


def test_defaults_match_the_paper_choices():
    cfg = RunConfig()
    assert cfg.model.temperature_init == 0.07
    assert cfg.model.pca_components is None  # → min(2048, n_train, n_voxels)
    assert cfg.train.stage1.schedule == "cosine"
    assert cfg.train.device == "auto" and cfg.train.precision == "auto"


def test_unknown_key_names_file_key_path_and_known_keys(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  stage1:\n    learning_rate: 0.1\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg
    assert "train.stage1.learning_rate" in msg
    assert "unknown key" in msg
    assert "lr" in msg and "epochs" in msg  # the keys that exist


def test_wrong_type_names_key_and_value(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  lambda_align: lots\n")
    with pytest.raises(ConfigError) as exc:
        load_config(path)
    msg = str(exc.value)
    assert str(path) in msg and "model.lambda_align" in msg and "'lots'" in msg


def test_literal_choices_are_enforced(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train:\n  precision: fp16\n")
    with pytest.raises(ConfigError, match=r"train\.precision.*'auto', 'fp32' or 'bf16'"):
        load_config(path)


def test_invalid_yaml_and_missing_file(tmp_path):
    path = tmp_path / "broken.yaml"
    path.write_text("model: [unclosed\n")
    with pytest.raises(ConfigError, match="invalid YAML"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "absent.yaml")


def test_yaml_scientific_notation_is_a_float(tmp_path):
    # PyYAML reads "1e-3" as a string; the typed model must still give a float
    path = tmp_path / "c.yaml"
    path.write_text("train:\n  stage1:\n    lr: 1e-3\n")
    assert load_config(path).train.stage1.lr == pytest.approx(1e-3)


def test_save_load_round_trip(tmp_path):
    cfg = apply_overrides(RunConfig(), ["model.lambda_align=0.25", "backbone.layers=[block3, pooled]"])
    save_config(cfg, tmp_path / "config.yaml")
    back = load_config(tmp_path / "config.yaml")
    assert back == cfg
    raw = yaml.safe_load((tmp_path / "config.yaml").read_text())
    assert raw["model"]["lambda_align"] == 0.25  # every key written, defaults included
    assert "stage2" in raw["train"]


def test_overrides_are_typed_and_validated():
    cfg = apply_overrides(RunConfig(), ["train.stage1.lr=3e-4", "train.compile=true", "model.pca_components=null",
                                        "backbone.name=timm:vit_tiny", "seed=7", "data.spec=123"])
    assert cfg.train.stage1.lr == pytest.approx(3e-4)
    assert cfg.train.compile is True
    assert cfg.model.pca_components is None
    assert cfg.backbone.name == "timm:vit_tiny"
    assert cfg.seed == 7
    assert cfg.data.spec == "123"  # a numeric-looking text value stays text
    free = apply_overrides(RunConfig(), ["data.loader_options.hemispheres=[lh]", "data.loader_options.test_every=6"])
    assert free.data.loader_options == {"hemispheres": ["lh"], "test_every": 6}  # free-form dict: any key
    with pytest.raises(ConfigError, match=r"train\.stage1\.lrr: unknown key; expected one of: .*lr"):
        apply_overrides(RunConfig(), ["train.stage1.lrr=1"])
    with pytest.raises(ConfigError, match="trian: unknown section"):
        apply_overrides(RunConfig(), ["trian.stage1.lr=1"])
    with pytest.raises(ConfigError, match="expected KEY=VALUE"):
        apply_overrides(RunConfig(), ["train.stage1.lr"])
    with pytest.raises(ConfigError, match=r"model\.lambda_align"):
        apply_overrides(RunConfig(), ["model.lambda_align=-1"])


def test_text_encoder_names_are_checked():
    with pytest.raises(ConfigError, match="text.encoder"):
        apply_overrides(RunConfig(), ["text.encoder=bert"])


def test_config_diff_lists_changed_keys_and_honours_ignore():
    a = RunConfig()
    b = apply_overrides(a, ["train.stage1.lr=0.5", "evaluate.bootstrap=10"])
    diffs = config_diff(a, b)
    assert ("train.stage1.lr", a.train.stage1.lr, 0.5) in diffs
    assert [d[0] for d in config_diff(a, b, ignore=("evaluate",))] == ["train.stage1.lr"]
