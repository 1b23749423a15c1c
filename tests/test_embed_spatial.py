"""Spatial layer specs: grids, full maps, class tokens and projections from real backbones, through the cache."""

from __future__ import annotations

import h5py
import numpy as np
import pytest
import torch
from torch.nn import functional as F

from llmvem.data.images import ArrayImages
from llmvem.embed.cache import FeatureCache, compute_features
from llmvem.embed.image import load_backbone
from llmvem.embed.spatial import LayerSpec, parse_layer_spec, projection_matrix, random_projection
from llmvem.errors import ConfigError

TINY_VIT = dict(embed_dim=32, depth=3, num_heads=2, img_size=28)  # 14-px patches of EVA02 → 2×2 patch grid


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def test_layer_spec_syntax():
    assert parse_layer_spec("block5") == LayerSpec("block5", "mean", None)
    assert parse_layer_spec("block5@mean").name == "block5"
    assert parse_layer_spec("block5@grid4") == LayerSpec("block5", "grid", 4)
    assert parse_layer_spec("stage2@map") == LayerSpec("stage2", "map", None)
    assert parse_layer_spec("block11@cls").name == "block11@cls"
    assert parse_layer_spec("block5@proj512").size == 512
    assert parse_layer_spec("block5@grid4").spatial and not parse_layer_spec("block5@proj8").spatial
    for bad, match in [("block5@grid", "size"), ("block5@grid0", "size"), ("block5@map3", "no size"),
                       ("block5@pool", "cannot parse"), ("pooled@grid2", "final embedding"), ("a b", "parse")]:
        with pytest.raises(ConfigError, match=match):
            parse_layer_spec(bad)


def test_random_projection_is_seeded_and_preserves_norms_on_average():
    p = random_projection(4000, 256, 7)
    assert p.shape == (256, 4000)
    torch.testing.assert_close(p.to_dense(), random_projection.__wrapped__(4000, 256, 7).to_dense())
    assert not torch.equal(p.to_dense(), random_projection.__wrapped__(4000, 256, 8).to_dense())
    assert abs(p._nnz() / 256 - 4000 ** 0.5) < 10  # ~√d non-zeros per row
    x = torch.randn(4000, 50, generator=torch.Generator().manual_seed(0))
    ratio = (torch.sparse.mm(p, x).norm(dim=0) / x.norm(dim=0)).mean().item()
    assert ratio == pytest.approx(1.0, abs=0.05)


@pytest.fixture(scope="module")
def lite0():
    return load_backbone("efficientnet_lite0")


def test_efficientnet_grid_map_and_projection_are_the_block_map(lite0):
    x = lite0.preprocess(_images(2, 96))
    captured = {}
    hook = lite0.net._blocks[8].register_forward_hook(lambda m, i, o: captured.setdefault("map", o))
    try:
        with torch.no_grad():
            out = lite0(x, ["block8", "block8@grid4", "block8@grid1", "block8@map", "block8@proj64",
                            "head@grid2"])
    finally:
        hook.remove()
    fmap = captured["map"]
    assert fmap.shape == (2, 112, 14, 14)
    torch.testing.assert_close(out["block8@map"], fmap)
    torch.testing.assert_close(out["block8"], fmap.mean(dim=(2, 3)))
    assert out["block8@grid4"].shape == (2, 112, 4, 4)
    # 14 = 4 + 3 + 4 + 3 rows: adaptive pooling averages uneven windows; the top-left cell is rows/cols 0..3
    torch.testing.assert_close(out["block8@grid4"][:, :, 0, 0], fmap[:, :, :4, :4].mean(dim=(2, 3)))
    torch.testing.assert_close(out["block8@grid1"].flatten(1), out["block8"])
    assert out["head@grid2"].shape == (2, 1280, 2, 2)
    proj = projection_matrix(parse_layer_spec("block8@proj64"), 112 * 14 * 14)
    torch.testing.assert_close(out["block8@proj64"], (proj @ fmap.flatten(1).t()).t())
    # 64 numbers instead of 21 952 keep the distance between the two images (JL: within ~3/√64)
    d_map, d_proj = (fmap[0] - fmap[1]).norm(), (out["block8@proj64"][0] - out["block8@proj64"][1]).norm()
    assert abs(d_proj / d_map - 1) < 0.4
    assert lite0.layer_shape("block8@grid4") == (112, 4, 4) and lite0.layer_dim("block8@grid4") == 112 * 16
    assert lite0.layer_shape("block12@map") == (192, 7, 7) and lite0.layer_dim("block12") == 192
    with pytest.raises(ConfigError, match="class token"):
        lite0(x, ["block8@cls"])


def test_vit_patch_tokens_as_maps_and_class_token():
    vit = load_backbone("timm:eva02_base_patch14_224.mim_in22k", pretrained=False, **TINY_VIT)
    x = vit.preprocess(_images(3, 28))
    captured = {}
    hook = vit.model.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("b1", o))
    try:
        with torch.no_grad():
            out = vit(x, ["block1", "block1@map", "block1@grid1", "block1@cls"])
    finally:
        hook.remove()
    tokens = captured["b1"]  # (3, 1 + 4, 32): class token, then a 2×2 grid of patches, row-major
    assert tokens.shape == (3, 5, 32)
    assert out["block1@map"].shape == (3, 32, 2, 2)
    torch.testing.assert_close(out["block1@map"][:, :, 0, 1], tokens[:, 2])  # row 0, column 1 = patch 1
    torch.testing.assert_close(out["block1@map"][:, :, 1, 0], tokens[:, 3])
    torch.testing.assert_close(out["block1@cls"], tokens[:, 0])
    torch.testing.assert_close(out["block1"], tokens[:, 1:].mean(dim=1))
    torch.testing.assert_close(out["block1@grid1"].flatten(1), out["block1"])


def test_hf_vit_tokens_as_maps(tmp_path):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    net = load_backbone(f"hf:{tmp_path}")
    x = net.preprocess(_images(2, 32))
    with torch.no_grad():
        out = net(x, ["block1@map", "block1@cls", "block1@grid2", "block0"])
        hidden = net.model(pixel_values=x, output_hidden_states=True).hidden_states[2]
    assert out["block1@map"].shape == (2, 32, 4, 4)
    torch.testing.assert_close(out["block1@map"].flatten(2).transpose(1, 2), hidden[:, 1:])
    torch.testing.assert_close(out["block1@cls"], hidden[:, 0])
    torch.testing.assert_close(out["block1@grid2"], F.avg_pool2d(out["block1@map"], 2))


def _tiny_cnn():
    return load_backbone("timm:test_resnet", pretrained=False, image_size=64)


def test_cache_stores_maps_keyed_by_spec_and_float16(tmp_path):
    net = _tiny_cnn()
    images = ArrayImages(_images(5, 64).numpy(), [f"im{i}" for i in range(5)])
    cache = FeatureCache(tmp_path / "features.h5")
    layers = ["pooled", "layer2", "layer2@grid2", "layer2@map"]
    first = compute_features(images, net, layers=layers, cache=cache, device="cpu", dtype="float16",
                             show_progress=False, chunk_size=2)
    assert first.n_computed == 5
    f = first.features
    assert f["layer2"].shape == (5, 48) and f["layer2@grid2"].shape == (5, 48, 2, 2)
    assert f["layer2@map"].shape == (5, 48, 8, 8) and f["layer2@map"].dtype == np.float16
    np.testing.assert_allclose(f["layer2@grid2"].astype(np.float32).mean(axis=(2, 3)),
                               f["layer2"].astype(np.float32), rtol=2e-3, atol=2e-3)
    again = compute_features(images, net, layers=layers, cache=cache, device="cpu", dtype="float16",
                             show_progress=False)
    assert again.n_computed == 0 and again.n_cached == 5 and again.key == first.key
    for k in layers:
        np.testing.assert_array_equal(again.features[k], f[k])
    with h5py.File(cache.path, "r") as h5:
        assert h5[first.key]["layer2@map"].shape == (5, 48, 8, 8)
    grid4 = compute_features(images, net, layers=["pooled", "layer2@grid4"], cache=cache, device="cpu",
                             dtype="float16", show_progress=False)
    assert grid4.key != first.key and grid4.n_computed == 5  # the choice is part of the key
    with pytest.raises(ConfigError, match="unknown layer"):
        compute_features(images, net, layers=["pooled", "layer9@grid2"], cache=cache, show_progress=False)


def test_cli_embed_grids_and_bad_specs(tmp_path, capsys):
    from llmvem.cli import main

    spec = "virtual:n_train=6,n_test=2,image_size=48,n_early=4,n_semantic=4"
    args = ["embed", spec, "--images", "--backbone", "timm:test_resnet", "--random-init", "--layers",
            "pooled,layer2@grid2,layer2@proj16", "--cache", str(tmp_path / "f.h5"), "--device", "cpu"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "layer2@grid2 48×2×2" in out and "layer2@proj16 16-d" in out and "images computed: 8" in out
    assert main(args[:7] + ["pooled,layer2@grid", *args[8:]]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "layer2@grid" in err and "size" in err


def test_backbone_config_spatial_layers_are_maps():
    from pydantic import ValidationError

    from llmvem.config import BackboneConfig

    cfg = BackboneConfig(layers=["pooled", "block8@grid4"], spatial_layers=["block8@grid7", "block12@map"])
    assert cfg.spatial_layers == ["block8@grid7", "block12@map"] and BackboneConfig().spatial_layers == []
    for bad in (["block8"], ["block8@proj64"], ["block8@grid0"], ["block8@map", "block8@map"]):
        with pytest.raises(ValidationError, match="spatial_layers"):
            BackboneConfig(spatial_layers=bad)
