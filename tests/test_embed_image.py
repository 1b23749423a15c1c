"""Image backbones: tiny timm and transformers models through the real code paths, EfficientNet-Lite0 weights."""

from __future__ import annotations

import csv
import pickle
from collections import defaultdict

import numpy as np
import pytest
import torch
from conftest import needs_shared
from PIL import Image

from llmvem.embed.base import ImageBackbone
from llmvem.embed.efficientnet import (
    EFFICIENTNET_LITE_MEAN,
    EfficientNetLite0Backbone,
    load_efficientnet_lite0_model,
)
from llmvem.embed.image import HFVisionBackbone, TimmBackbone, load_backbone
from llmvem.errors import ConfigError, ModelLoadError, UnsafeFileError

TINY_EVA = dict(embed_dim=32, depth=3, num_heads=2, img_size=28)


def _images(n: int, size: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8))


def _assert_partition(backbone: ImageBackbone) -> list[set[int]]:
    """blocks() must cover every parameter exactly once (so freezing by blocks misses nothing)."""
    groups = [{id(p) for p in g.parameters()} for g in backbone.blocks()]
    all_params = {id(p) for p in backbone.parameters()}
    assert all(groups), "empty block"
    assert sum(len(g) for g in groups) == len(all_params)
    assert set().union(*groups) == all_params
    return groups


# ------------------------------------------------------------------------------------------------------ timm
@pytest.fixture(scope="module")
def eva() -> TimmBackbone:
    return load_backbone("timm:eva02_base_patch14_224.mim_in22k", pretrained=False, **TINY_EVA)  # type: ignore


def test_timm_eva02_features_layers_and_preprocessing(eva):
    assert eva.image_size == 28 and eva.feature_dim == 32
    assert eva.layer_names == ["block0", "block1", "block2"]
    assert eva.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))  # EVA02's CLIP statistics
    x = eva.preprocess(_images(3, 40))
    assert x.shape == (3, 3, 28, 28)
    captured = {}
    hook = eva.model.blocks[1].register_forward_hook(lambda m, i, o: captured.setdefault("b1", o))
    try:
        with torch.no_grad():
            out = eva(x, ["block1", "pooled"])
    finally:
        hook.remove()
    assert set(out) == {"pooled", "block1"} and out["block1"].shape == (3, 32)
    # block1 = mean over the 4 patch tokens of the block output, class token excluded.
    tokens = captured["b1"]
    assert tokens.shape == (3, 1 + 4, 32)
    torch.testing.assert_close(out["block1"], tokens[:, 1:].mean(dim=1))
    with torch.no_grad():
        torch.testing.assert_close(out["pooled"], eva.model(x))  # timm's own pooled output (num_classes=0)
    assert eva.layer_dim("block2") == 32


def test_timm_preprocess_normalises_with_model_statistics(eva):
    grey = torch.full((1, 28, 28, 3), 128, dtype=torch.uint8)
    x = eva.preprocess(grey)
    expected = (128 / 255 - torch.tensor(eva.mean)) / torch.tensor(eva.std)
    torch.testing.assert_close(x[0, :, 5, 5], expected.float())


def test_timm_random_init_is_seeded(eva):
    x = eva.preprocess(_images(2, 28))
    same = TimmBackbone("eva02_base_patch14_224.mim_in22k", **TINY_EVA)
    other = TimmBackbone("eva02_base_patch14_224.mim_in22k", init_seed=1, **TINY_EVA)
    with torch.no_grad():
        torch.testing.assert_close(same(x)["pooled"], eva(x)["pooled"])
        assert not torch.allclose(other(x)["pooled"], eva(x)["pooled"])
    assert same.config_dict() == eva.config_dict()
    assert other.config_dict()["init_seed"] == 1


def test_timm_blocks_partition_parameters_with_final_norm_last(eva):
    groups = _assert_partition(eva)
    assert len(groups) == 1 + 3  # stem (patch embed, cls token, pos embed) + 3 blocks
    final_norm = eva.model.fc_norm if not isinstance(eva.model.fc_norm, torch.nn.Identity) else eva.model.norm
    assert {id(p) for p in final_norm.parameters()} <= groups[-1]
    assert id(eva.model.cls_token) in groups[0]


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_timm_local_weights_file(tmp_path, suffix):
    source = TimmBackbone("eva02_base_patch14_224.mim_in22k", init_seed=7, **TINY_EVA)
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in source.model.state_dict().items()}, str(path))
    else:
        torch.save(source.model.state_dict(), path)
    loaded = load_backbone("timm:eva02_base_patch14_224.mim_in22k", pretrained=False, weights=path,
                           **TINY_EVA)  # type: ignore[arg-type]
    x = loaded.preprocess(_images(2, 28))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x)["pooled"], source(x)["pooled"])
    cfg = loaded.config_dict()
    assert cfg["weights"]["path"] == str(path) and len(cfg["weights"]["sha256"]) == 16 and cfg["init_seed"] is None


class _Boom:
    def __reduce__(self):
        return (open, ("/proc/self/never-created-by-llmvem", "w"))


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")
def test_timm_refuses_pickled_code_and_missing_files(tmp_path):
    evil = tmp_path / "evil.pth"
    with open(evil, "wb") as fh:
        pickle.dump({"weight": _Boom()}, fh)
    with pytest.raises(UnsafeFileError, match="evil.pth"):
        TimmBackbone("eva02_base_patch14_224.mim_in22k", weights=evil, **TINY_EVA)
    with pytest.raises(ModelLoadError, match="missing.safetensors"):
        TimmBackbone("eva02_base_patch14_224.mim_in22k", weights=tmp_path / "missing.safetensors", **TINY_EVA)


def test_timm_pretrained_without_cached_weights_says_what_to_do(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelLoadError, match="weights=<local .safetensors/.pth file>"):
        TimmBackbone("eva02_base_patch14_224.mim_in22k", pretrained=True, **TINY_EVA)


def test_timm_cnn_stage_layers():
    net = load_backbone("timm:test_resnet", pretrained=False, image_size=64)
    assert net.layer_names == ["act1", "layer1", "layer2", "layer3", "layer4"]
    assert net.image_size == 64
    x = net.preprocess(_images(2, 64))
    with torch.no_grad():
        out = net(x, ["layer2", "layer4"])
        maps = net.model.forward_intermediates(x, indices=[2], intermediates_only=True)
    assert out["layer2"].shape == (2, 48) and out["layer4"].shape == (2, 96)
    torch.testing.assert_close(out["layer2"], maps[0].mean(dim=(2, 3)))
    groups = _assert_partition(net)
    assert len(groups) == 5  # stem + layer1..4
    with pytest.raises(ConfigError, match="block0"):
        net(x, ["block0"])


# ------------------------------------------------------------------------------------------------ transformers
@pytest.fixture(scope="module")
def tiny_clip_vision_dir(tmp_path_factory):
    from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

    path = tmp_path_factory.mktemp("tiny_clip_vision")
    torch.manual_seed(0)
    config = CLIPVisionConfig(hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=2,
                              image_size=32, patch_size=8, projection_dim=16)
    CLIPVisionModelWithProjection(config).save_pretrained(path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(path)
    return path


def test_hf_clip_vision_from_user_folder(tiny_clip_vision_dir):
    net = load_backbone(f"hf:{tiny_clip_vision_dir}")
    assert isinstance(net, HFVisionBackbone)
    assert net.image_size == 32 and net.feature_dim == 16 and net.layer_names == ["block0", "block1"]
    assert net.mean == pytest.approx((0.48145466, 0.4578275, 0.40821073))
    x = net.preprocess(_images(2, 50))
    with torch.no_grad():
        out = net(x, ["block0", "block1"])
        ref = net.model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(out["pooled"], ref.image_embeds)
    # 16 patches + 1 class token; the layer mean skips the class token.
    assert ref.hidden_states[1].shape == (2, 17, 32)
    torch.testing.assert_close(out["block0"], ref.hidden_states[1][:, 1:].mean(dim=1))
    torch.testing.assert_close(out["block1"], ref.hidden_states[2][:, 1:].mean(dim=1))
    groups = _assert_partition(net)
    assert len(groups) == 3
    assert {id(p) for p in net.model.visual_projection.parameters()} <= groups[-1]


def test_hf_vision_tower_of_a_full_clip_checkpoint(tmp_path):
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    config = CLIPConfig(text_config=dict(vocab_size=50, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                         num_attention_heads=2),
                        vision_config=dict(hidden_size=32, intermediate_size=37, num_hidden_layers=2,
                                           num_attention_heads=2, image_size=32, patch_size=8),
                        projection_dim=24)
    torch.manual_seed(0)
    full = CLIPModel(config).eval()
    full.save_pretrained(tmp_path)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    net = load_backbone(f"hf:{tmp_path}")
    assert net.feature_dim == 24 and net.config_dict()["model_type"] == "clip_vision_model"
    x = net.preprocess(_images(2, 32))
    with torch.no_grad():
        ref = full.get_image_features(pixel_values=x)
        torch.testing.assert_close(net(x)["pooled"], getattr(ref, "pooler_output", ref))


def test_hf_dinov2_from_user_folder(tmp_path):
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, mlp_ratio=2,
                             image_size=28, patch_size=7)).save_pretrained(tmp_path)
    BitImageProcessor(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28},
                      image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225]).save_pretrained(tmp_path)
    net = HFVisionBackbone(str(tmp_path))
    assert net.image_size == 28 and net.feature_dim == 32 and net.layer_names == ["block0", "block1", "block2"]
    x = net.preprocess(_images(2, 28))
    with torch.no_grad():
        out = net(x, ["block2"])
        ref = net.model(pixel_values=x, output_hidden_states=True)
    torch.testing.assert_close(out["pooled"], ref.pooler_output)
    torch.testing.assert_close(out["block2"], ref.hidden_states[3][:, 1:].mean(dim=1))
    assert len(_assert_partition(net)) == 4
    assert net.config_dict()["model_type"] == "dinov2"


def test_hf_missing_folder_names_the_path(tmp_path):
    with pytest.raises(ModelLoadError, match="nothing_here"):
        load_backbone(f"hf:{tmp_path / 'nothing_here'}")


# ------------------------------------------------------------------------------------------- EfficientNet-Lite0
@pytest.fixture(scope="module")
def lite0() -> EfficientNetLite0Backbone:
    return load_backbone("efficientnet_lite0")  # type: ignore[return-value]


def test_efficientnet_lite0_layers_match_the_reference_network(lite0):
    assert lite0.feature_dim == 1280 and lite0.image_size == 224 and lite0.mean == EFFICIENTNET_LITE_MEAN
    assert lite0.layer_names == [f"block{i}" for i in range(16)] + ["head"]
    x = lite0.preprocess(_images(2, 96))
    with torch.no_grad():
        out = lite0(x, lite0.layer_names)
        reference = load_efficientnet_lite0_model(pretrained=True).extract_features(x).mean(dim=(2, 3))
    torch.testing.assert_close(out["pooled"], reference)
    torch.testing.assert_close(out["head"], out["pooled"])
    widths = [out[f"block{i}"].shape[1] for i in range(16)]
    assert widths == [16, 24, 24, 40, 40, 80, 80, 80, 112, 112, 112, 192, 192, 192, 192, 320]
    groups = _assert_partition(lite0)
    assert len(groups) == 9  # stem, 7 stages, conv head


@pytest.mark.shared_data
def test_efficientnet_lite0_normalisation_classifies_real_dogs(lite0):
    """mean = std = 0.5 is the input scaling these weights expect: dog photos come out as dog breeds."""
    root = needs_shared("flickr8k_1000")
    caps: dict[str, list[str]] = defaultdict(list)
    with open(root / "captions.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            caps[row["image"]].append(row["caption"].lower())
    dogs = [n for n in sorted(caps) if sum(" dog" in c for c in caps[n]) >= 4][:24]
    imgs = torch.from_numpy(np.stack([
        np.asarray(Image.open(root / "images" / n).convert("RGB").resize((224, 224), Image.Resampling.BICUBIC))
        for n in dogs]))
    classifier = load_efficientnet_lite0_model(pretrained=True)
    with torch.no_grad():
        top = classifier(lite0.preprocess(imgs)).argmax(dim=1)
    dog_breed = (top >= 151) & (top <= 268)  # ImageNet classes 151–268 are dog breeds
    # Measured: 20 of these 24 photos (18 with ImageNet statistics); over 150 dog photos 77% vs 71%.
    assert dog_breed.float().mean() >= 0.7


def test_backbone_names_are_validated():
    with pytest.raises(ConfigError, match="unknown name 'resnet50'"):
        load_backbone("resnet50")
    with pytest.raises(ConfigError, match="efficientnet_lite0 takes no weights file"):
        load_backbone("efficientnet_lite0", weights="w.safetensors")
    small = load_backbone("efficientnet_lite0", image_size=112)  # native size of small stimuli (V4: 112 px)
    assert small.image_size == 112 and small.config_dict()["image_size"] == 112
    x = small.preprocess(torch.zeros(2, 150, 150, 3, dtype=torch.uint8))
    assert tuple(x.shape) == (2, 3, 112, 112)
    with torch.no_grad():
        assert small(x, ["block10"])["block10"].shape == (2, 112)
