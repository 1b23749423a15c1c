"""Spatial readouts in the network and the trainer: "none" changes nothing; factorized and Gaussian readouts train
in stage 1 from cached maps and in stage 2 from images, find planted retinotopic units that a pooled readout
cannot, and reload from the run folder with the same predictions."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from llmvem.config import RunConfig, apply_overrides
from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.embed.image import load_backbone
from llmvem.errors import ConfigError
from llmvem.evaluate.metrics import pearson_r
from llmvem.model.network import LLMVEM
from llmvem.model.spatial import FlatPlusSpatialReadout, GaussianReadout
from llmvem.train import train_encoding_model
from llmvem.train.load import load_trained_model
from llmvem.train.tensors import backbone_features

SIZE, CELLS, MAP = 32, 4, "layer1@map"  # 32-px images of 4×4 cells; test_resnet layer1 is (32, 8, 8) there


@pytest.fixture(scope="module")
def resnet():
    """A tiny random-init timm CNN (nothing downloads)."""
    return load_backbone("timm:test_resnet", pretrained=False, image_size=SIZE)


def retinotopic_dataset(n_voxels: int = 12, seed: int = 0) -> EncodingDataset:
    """Images of 4×4 cells of random grey levels; each unit responds to the brightness of one cell (a small
    receptive field at a planted position), so the image mean, what a pooled readout sees, explains little."""
    rng = np.random.default_rng(seed)
    n_train, n_val, n_test = 160, 48, 48
    n = n_train + n_val + n_test
    cells = rng.uniform(0, 1, (n, CELLS, CELLS))
    px = SIZE // CELLS
    imgs = np.repeat(np.repeat(cells, px, axis=1), px, axis=2)[..., None].repeat(3, axis=3)
    imgs = np.clip(imgs * 255 + rng.normal(0, 8, imgs.shape), 0, 255).astype(np.uint8)
    where = rng.choice(CELLS * CELLS, n_voxels, replace=False)
    y = cells.reshape(n, -1)[:, where] + 0.05 * rng.normal(size=(n, n_voxels))
    ids = [f"im{i:03d}" for i in range(n)]
    cut = [0, n_train, n_train + n_val, n]
    return EncodingDataset("retino", {name: Split(ArrayImages(imgs[a:b], ids[a:b]), y[a:b].astype(np.float32))
                                      for name, a, b in zip(("train", "val", "test"), cut[:-1], cut[1:],
                                                            strict=True)})


def config(*overrides: str) -> RunConfig:
    base = ["backbone.name=timm:test_resnet", "backbone.pretrained=false", f"backbone.image_size={SIZE}",
            "backbone.layers=[pooled]", f"backbone.spatial_layers=[{MAP}]", "model.lambda_align=0",
            "train.stage1.epochs=25", "train.stage1.batch_size=32", "train.stage1.lr=0.03",
            "train.stage2.epochs=0", "train.stage2.batch_size=32", "train.stage2.lr=0.003",
            "train.stage2.unfreeze_last_n=1", "train.device=cpu"]
    return apply_overrides(RunConfig(), [*base, *overrides])


def cached_features(backbone, ds: EncodingDataset, layers) -> dict[str, dict[str, np.ndarray]]:
    """What the feature cache holds: per split, pooled vectors and (n, C, H, W) maps."""
    out = {}
    for split in ("train", "val", "test"):
        imgs = torch.from_numpy(np.stack([ds.splits[split].images.load_array(i, SIZE)
                                          for i in range(len(ds.splits[split]))]))
        out[split] = {k: v.numpy() for k, v in backbone_features(backbone, imgs, layers, torch.device("cpu"),
                                                                  show_progress=False).items()}
    return out


def test_spatial_readout_none_changes_nothing(tmp_path, resnet):
    """Maps listed in backbone.spatial_layers are ignored while model.spatial_readout is "none": same weights,
    same predictions, bit for bit, as the run without them."""
    ds = retinotopic_dataset()
    feats = cached_features(resnet, ds, ["pooled", MAP])
    plain = config("backbone.spatial_layers=[]", "train.stage1.epochs=3")
    ignored = config("model.spatial_readout=none", "train.stage1.epochs=3")
    a = train_encoding_model(plain, ds, features=feats, backbone=resnet, out_dir=tmp_path / "a",
                             show_progress=False)
    b = train_encoding_model(ignored, ds, features=feats, backbone=resnet, out_dir=tmp_path / "b",
                             show_progress=False)
    np.testing.assert_array_equal(a.predictions["test"], b.predictions["test"])
    sa, sb = a.network.state_dict(), b.network.state_dict()
    assert list(sa) == list(sb) and all(torch.equal(sa[k], sb[k]) for k in sa)
    assert not any("map_norm" in k or "spatial" in k for k in sa)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["factorized", "gaussian"])
def test_spatial_readout_finds_planted_retinotopic_units_and_reloads(tmp_path, resnet, kind):
    ds = retinotopic_dataset()
    feats = cached_features(resnet, ds, ["pooled", MAP])
    y_test = ds.test.responses
    pooled = train_encoding_model(config("backbone.spatial_layers=[]"), ds, features=feats, backbone=resnet,
                                  out_dir=tmp_path / "pooled", show_progress=False)
    r_pooled = float(np.mean(pearson_r(y_test, pooled.predictions["test"])))
    # stage 1 on cached maps (residual: PCA mapping on pooled + spatial readout), then stage 2 from images
    bb = copy.deepcopy(resnet)
    cfg = config(f"model.spatial_readout={kind}", "train.stage2.epochs=1")
    res = train_encoding_model(cfg, ds, features=feats, backbone=bb, out_dir=tmp_path / kind,
                               show_progress=False)
    assert isinstance(res.network.readout, FlatPlusSpatialReadout)
    r1 = res.stages["stage1"]["best_val_mean_r"]
    r_test = float(np.mean(pearson_r(y_test, res.predictions["test"])))
    assert np.isfinite(res.predictions["test"]).all()
    # the pooled readout barely sees a single cell; the spatial readout reads it at its place
    assert r_pooled < 0.45 and r1 > r_pooled + 0.3 and r_test > r_pooled + 0.3, (r_pooled, r1, r_test)
    assert res.stages["stage2"]["epochs_run"] == 1
    # save → reload (the fine-tuned backbone comes from model.safetensors) → same predictions from images
    enc = load_trained_model(tmp_path / kind, backbone=resnet)
    np.testing.assert_allclose(enc.predict(ds.test.images), res.predictions["test"], atol=1e-5)


def test_spatial_readout_alone_from_cached_maps_and_its_penalty(tmp_path, resnet):
    ds = retinotopic_dataset()
    feats = cached_features(resnet, ds, ["pooled", MAP])
    cfg = config("model.spatial_readout=gaussian", "model.spatial_mode=alone", "model.spatial_l1=1e-4")
    res = train_encoding_model(cfg, ds, features=feats, backbone=resnet, out_dir=tmp_path / "alone",
                               show_progress=False)
    net = res.network
    assert isinstance(net.readout, GaussianReadout) and net.readout.in_shapes == {MAP: (32, 8, 8)}
    assert float(net.regularizer().detach()) == pytest.approx(1e-4 * float(net.readout.features[MAP].detach().abs().sum()))
    assert float(np.mean(pearson_r(ds.test.responses, res.predictions["test"]))) > 0.6
    enc = load_trained_model(tmp_path / "alone", backbone=resnet)
    np.testing.assert_allclose(enc.predict(feats["test"]), res.predictions["test"], atol=1e-5)


def test_factorized_readouts_start_from_a_ridge_fit_of_each_keys_maps():
    """``LLMVEM.initialize`` starts factorized readouts at a ridge fit of each key's centred responses on its own
    (standardised) maps (``spatial_init="ridge"``, the default); ``"random"`` keeps the random start."""
    shapes = {"m@grid4": (6, 4, 4)}
    g = torch.Generator().manual_seed(0)
    maps = torch.randn(200, 6, 4, 4, generator=g) * 3 + 1
    y = maps[:, 2, 1, 3:4] * 2.0 - maps[:, 4, 1, 3:4] + 0.05 * torch.randn(200, 1, generator=g)  # one cell
    feats = {"pooled": maps.mean(dim=(2, 3)), **{k: maps for k in shapes}}
    starts = {}
    for init in ("ridge", "random"):
        net = LLMVEM({"pooled": 6}, 1, 200, map_shapes=shapes, spatial_readout="factorized", spatial_init=init,
                     alignment=False).eval()
        net.initialize(y, feats["pooled"], {"main": {k: feats[k] for k in shapes}})
        with torch.no_grad():
            starts[init] = net.readout.spatial(net.maps(feats))[:, 0]
    r = np.corrcoef(starts["ridge"].numpy(), (y - y.mean(0))[:, 0].numpy())[0, 1]
    assert r > 0.95 and float(starts["random"].abs().max()) < 0.05, (r, float(starts["random"].abs().max()))
    with pytest.raises(ValueError, match="spatial_init: expected 'ridge' or 'random'"):
        LLMVEM({"pooled": 6}, 1, 200, map_shapes=shapes, spatial_readout="factorized", spatial_init="pca")
    assert RunConfig().model.spatial_init == "ridge"


def test_keyed_spatial_readouts_and_config_errors():
    shapes = {"b@grid4": (6, 4, 4), "c@map": (5, 8, 8)}
    net = LLMVEM({"pooled": 10}, keys={"s1": (7, 30), "s2": (9, 30)}, map_shapes=shapes, spatial_readout="factorized",
                 alignment=False)
    assert net.readouts["s1"].spatial.in_shapes == shapes and net.readouts["s2"].n_voxels == 9
    assert net.required_layers(False) == ["pooled", "b@grid4", "c@map"]
    g = torch.Generator().manual_seed(0)
    feats = {"pooled": torch.randn(30, 10, generator=g), "b@grid4": torch.randn(30, 6, 4, 4, generator=g) * 5 + 2,
             "c@map": torch.randn(30, 5, 8, 8, generator=g)}
    net.initialize({"s1": torch.randn(30, 7, generator=g), "s2": torch.randn(30, 9, generator=g)},
                   feats["pooled"], {"s1": {k: feats[k] for k in shapes}, "s2": {k: feats[k] for k in shapes}})
    z = net.maps(feats)["b@grid4"]
    torch.testing.assert_close(z.mean(dim=(0, 2, 3)), torch.zeros(6), atol=1e-5, rtol=0)
    assert net(features=feats, key="s2").voxels.shape == (30, 9)
    back = LLMVEM.from_state_dict(RunConfig().model.model_copy(update={"spatial_readout": "factorized"}),
                                  net.state_dict(), {"pooled": 10}, map_shapes=shapes)
    net.eval(), back.eval()
    torch.testing.assert_close(back(features=feats, key="s1").voxels, net(features=feats, key="s1").voxels)
    with pytest.raises(ConfigError, match="backbone.spatial_layers"):
        apply_overrides(RunConfig(), ["model.spatial_readout=gaussian"])
    with pytest.raises(ValueError, match="map_shapes"):
        LLMVEM({"pooled": 10}, 5, 20, spatial_readout="gaussian", alignment=False)
