"""The captioned-image stream (captions-only data key), virtual scenes, captioned folders, the inert-λ warning."""

from __future__ import annotations

import logging

import numpy as np
import pytest
from test_train_trainer import backbone, make_dataset, tiny_config

from llmvem.config import RunConfig, apply_overrides
from llmvem.data.captioned import load_captioned_images
from llmvem.data.images import ArrayImages
from llmvem.data.virtual_brain import make_virtual_scenes
from llmvem.errors import DataValidationError
from llmvem.train import train_encoding_model
from llmvem.train.stream import CaptionStream
from llmvem.train.trainer import alignment_is_inert


def make_stream(n=48, dim=8, weight=1.0, seed=5):
    rng = np.random.default_rng(seed)
    imgs = rng.integers(0, 256, (n, 16, 16, 3)).astype(np.uint8)
    text = rng.normal(size=(n, dim)).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    return CaptionStream(ArrayImages(imgs, [f"s{i}" for i in range(n)]), text, weight=weight, batch_size=16)


def core_config(*extra: str) -> RunConfig:
    return tiny_config("model.core=linear", "model.core_dim=6", "train.stage2.epochs=0", "model.feature_dropout=0",
                       "train.stage2.augment=false", *extra)


def fit(tmp_path, name, cfg, stream=None, text=True):
    ds, emb = make_dataset()
    return train_encoding_model(cfg, ds, text_embeddings=emb if text else None, backbone=backbone(),
                                out_dir=tmp_path / name, show_progress=False, align_stream=stream)


def test_the_stream_changes_predictions_only_when_it_can(tmp_path):
    cfg = core_config()
    plain = fit(tmp_path, "plain", cfg)
    streamed = fit(tmp_path, "streamed", cfg, make_stream())
    assert not np.allclose(plain.predictions["test"], streamed.predictions["test"])
    assert all(r["train_align_loss"] > 0 for r in streamed.curves)
    # weight 0: bit-identical to no stream
    off = fit(tmp_path, "off", cfg, make_stream(weight=0.0))
    for split in ("val", "test"):
        np.testing.assert_array_equal(off.predictions[split], plain.predictions[split])
    # λ = 0: bit-identical to λ = 0 without the stream (the stream is not even visited)
    cfg0 = core_config("model.lambda_align=0")
    zero = fit(tmp_path, "zero", cfg0, text=False)
    zero_stream = fit(tmp_path, "zero_stream", cfg0, make_stream(), text=False)
    for split in ("val", "test"):
        np.testing.assert_array_equal(zero.predictions[split], zero_stream.predictions[split])
    assert len(zero.curves) == len(zero_stream.curves)


def test_the_stream_trains_in_stage_2_too(tmp_path):
    cfg = tiny_config("model.core=linear", "model.core_dim=6", "train.stage1.epochs=1", "train.stage2.epochs=1",
                      "train.stage2.augment=false", "model.feature_dropout=0")
    plain = fit(tmp_path, "plain", cfg)
    streamed = fit(tmp_path, "streamed", cfg, make_stream())
    assert not np.allclose(plain.predictions["test"], streamed.predictions["test"])


def test_a_stream_of_the_wrong_size_is_refused(tmp_path):
    with pytest.raises(DataValidationError, match="align_stream.text_embeddings"):
        fit(tmp_path, "bad", core_config(), make_stream(dim=5))


def test_virtual_scenes_are_deterministic_and_described_exactly():
    images, descriptions, scenes = make_virtual_scenes(12, image_size=24, seed=3)
    again, descriptions2, _ = make_virtual_scenes(12, image_size=24, seed=3)
    np.testing.assert_array_equal(images.array, again.array)
    assert descriptions == descriptions2 and len(set(descriptions)) > 6
    other, other_desc, _ = make_virtual_scenes(12, image_size=24, seed=4)
    assert other_desc != descriptions
    for d, s in zip(descriptions, scenes, strict=True):
        assert d == s.description()
        for obj in s.objects:
            assert f"{obj.size} {obj.colour} {obj.category}" in d
    assert images.array.shape == (12, 24, 24, 3)
    spec = load_captioned_images("virtual-scenes:n=12,seed=3", image_size=24)
    assert [c[0] for c in spec.captions] == descriptions
    np.testing.assert_array_equal(spec.images.array, images.array)
    assert len(load_captioned_images("virtual-scenes:n=12,seed=3", image_size=24, max_images=5)) == 5
    with pytest.raises(DataValidationError, match="unknown"):
        load_captioned_images("virtual-scenes:n=12,colour=red")


def test_a_captioned_folder_is_read_by_file_name_or_stem(tmp_path):
    from PIL import Image

    (tmp_path / "images").mkdir()
    for name in ("a.jpg", "b.png", "c.jpg"):
        Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "images" / name)
    (tmp_path / "captions.csv").write_text("image,caption\na.jpg,one\na.jpg,two\nb,three\n")
    data = load_captioned_images(str(tmp_path))
    assert data.images.ids == ["a", "b"] and data.captions == [["one", "two"], ["three"]]
    with pytest.raises(DataValidationError, match="images/"):
        load_captioned_images(str(tmp_path / "images"))


def test_the_warning_fires_exactly_when_lambda_cannot_change_a_prediction(tmp_path, caplog):
    cases = {("model.core=null", "train.stage2.epochs=0", "model.lambda_align=0.5"): True,
             ("model.core=null", "train.stage2.epochs=0", "model.lambda_align=0"): False,
             ("model.core=linear", "train.stage2.epochs=0", "model.lambda_align=0.5"): False,
             ("model.core=null", "train.stage2.epochs=1", "model.lambda_align=0.5"): False}
    for overrides, inert in cases.items():
        assert alignment_is_inert(apply_overrides(RunConfig(), list(overrides))) is inert
    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=1")
    with caplog.at_level(logging.WARNING, logger="llmvem.train.trainer"):
        fit(tmp_path, "inert", cfg)
    lines = [r for r in caplog.records if "cannot change any prediction" in r.getMessage()]
    assert len(lines) == 1
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="llmvem.train.trainer"):
        fit(tmp_path, "core", core_config("train.stage1.epochs=1"))
    assert not [r for r in caplog.records if "cannot change any prediction" in r.getMessage()]
