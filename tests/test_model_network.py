"""The LLM-VEM network: feature/image modes, alignment head, λ = 0 equivalence at the network level.

``TinyBackbone`` (a two-block conv net implementing :class:`ImageBackbone`) is shared with the trainer tests.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pytest
import torch
from torch import nn

from llmvem.embed.base import ImageBackbone
from llmvem.model import LLMVEM, contrastive_loss, total_loss


class TinyBackbone(ImageBackbone):
    """Conv(3→8)+BN+ReLU, Conv(8→16, stride 2)+ReLU; 16×16 inputs; layers block0 (8), block1 (16), pooled (16)."""

    def __init__(self, image_size: int = 16):
        super().__init__()
        self.model_id, self.feature_dim, self.image_size = "tiny-test", 16, image_size
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.layer_names = ["block0", "block1", "pooled"]
        self.b0 = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b1 = nn.Sequential(nn.Conv2d(8, 16, 3, stride=2, padding=1), nn.ReLU())

    def features(self, x: torch.Tensor, layers: Sequence[str] = ()) -> dict[str, torch.Tensor]:
        h0 = self.b0(x)
        h1 = self.b1(h0)
        out = {"pooled": h1.mean(dim=(2, 3))}
        if "block0" in layers:
            out["block0"] = h0.mean(dim=(2, 3))
        if "block1" in layers:
            out["block1"] = h1.mean(dim=(2, 3))
        return out

    def blocks(self) -> list[nn.Module]:
        return [self.b0, self.b1]


def _features(n=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"block0": torch.randn(n, 8, generator=g) * 3 + 1, "pooled": torch.randn(n, 16, generator=g)}


def _responses(n=40, v=12, seed=1):
    return torch.randn(n, v, generator=torch.Generator().manual_seed(seed))


def _net(alignment=True, dropout=0.2, **kw):
    return LLMVEM({"block0": 8, "pooled": 16}, n_voxels=12, n_train=40, text_dim=10, feature_dropout=dropout,
                  alignment=alignment, **kw)


def test_head_construction_does_not_touch_the_global_random_stream():
    torch.manual_seed(123)
    with_head = _net(alignment=True)
    after_with = torch.rand(1)
    torch.manual_seed(123)
    without = _net(alignment=False)
    after_without = torch.rand(1)
    assert torch.equal(after_with, after_without)
    for (k, a), (k2, b) in zip(with_head.readout.state_dict().items(), without.readout.state_dict().items(),
                               strict=True):
        assert k == k2 and torch.equal(a, b)
    assert without.head is None and with_head.head is not None


def test_lambda_zero_training_is_identical_with_and_without_the_head():
    feats, y = _features(), _responses()
    text = nn.functional.normalize(torch.randn(40, 10), dim=-1)
    preds = []
    for alignment in (True, False):
        torch.manual_seed(7)
        net = _net(alignment=alignment)
        net.initialize(y, net.concat(feats))
        opt = torch.optim.AdamW([p for p in net.readout.parameters()], lr=1e-2)
        torch.manual_seed(99)  # dropout masks
        for step in range(15):
            idx = torch.arange(step % 4 * 10, step % 4 * 10 + 10)
            out = net(features={k: v[idx] for k, v in feats.items()}, with_embedding=False)
            align = None if not alignment else contrastive_loss(net.head(feats["pooled"][idx]), text[idx], 10.0)
            parts = total_loss(net.voxel_loss(out, y[idx]), align, 0.0)
            opt.zero_grad()
            parts.total.backward()
            opt.step()
        net.eval()
        with torch.no_grad():
            preds.append(net(features=feats).voxels)
    assert torch.equal(preds[0], preds[1])


def test_logit_scale_starts_at_inverse_temperature_and_is_clamped():
    net = _net(temperature_init=0.07)
    assert net.logit_scale().item() == pytest.approx(1 / 0.07, rel=1e-5)
    with torch.no_grad():
        net.log_logit_scale.fill_(math.log(1000.0))
    assert net.logit_scale().item() == pytest.approx(100.0)
    frozen = _net(learn_temperature=False)
    assert not frozen.log_logit_scale.requires_grad


def test_embedding_is_unit_norm_in_text_space_and_readout_shape():
    net = _net()
    net.initialize(_responses(), net.concat(_features()))
    out = net(features=_features(5, seed=3), with_embedding=True)
    assert out.voxels.shape == (5, 12)
    assert out.embedding.shape == (5, 10)
    assert torch.allclose(out.embedding.norm(dim=-1), torch.ones(5), atol=1e-5)
    assert out.logit_scale is not None
    assert out.latent.shape == (5, 12)  # PCA scores: min(2048, 40, 12) components


def test_standardisation_uses_training_statistics():
    feats = _features()
    net = _net(dropout=0.0)
    net.initialize(_responses(), net.concat(feats))
    net.eval()
    z = net(features=feats).readout_input
    assert torch.allclose(z.mean(0), torch.zeros(24), atol=1e-5)
    assert torch.allclose(z.std(0, correction=0), torch.ones(24), atol=1e-4)  # population std (ddof 0)


def test_image_mode_equals_feature_mode_on_the_same_backbone_features():
    torch.manual_seed(0)
    bb = TinyBackbone().eval()
    images = torch.randint(0, 256, (6, 16, 16, 3), dtype=torch.uint8)
    with torch.no_grad():
        feats = bb(bb.preprocess(images), ["block0", "pooled"])
    net = LLMVEM({"block0": 8, "pooled": 16}, n_voxels=5, n_train=6, text_dim=4, backbone=bb)
    net.initialize(torch.randn(6, 5), net.concat(feats))
    net.eval()
    with torch.no_grad():
        a = net(images=images, with_embedding=True)
        b = net(features=feats, with_embedding=True)
    assert torch.allclose(a.voxels, b.voxels, atol=1e-6)
    assert torch.allclose(a.embedding, b.embedding, atol=1e-6)
    assert net.required_layers(with_embedding=True) == ["block0", "pooled"]


def test_missing_layers_and_missing_head_are_clear_errors():
    net = LLMVEM({"block1": 16}, n_voxels=3, n_train=10, alignment=False)
    net.initialize(torch.randn(10, 3), torch.randn(10, 16))
    with pytest.raises(KeyError, match="block1"):
        net(features={"pooled": torch.randn(2, 16)})
    with pytest.raises(RuntimeError, match="without an alignment head"):
        net(features={"block1": torch.randn(2, 16)}, with_embedding=True)
    with pytest.raises(RuntimeError, match="no backbone"):
        net(images=torch.zeros(1, 16, 16, 3, dtype=torch.uint8))


def test_standardisation_floors_tiny_stds_so_test_features_stay_bounded():
    """A feature almost silent in training must not be blown up on a test image (sparse pooled ReLU units)."""
    from llmvem.utils import STD_FLOOR

    rng = np.random.default_rng(0)
    feats = rng.standard_normal((50, 8)).astype(np.float32)
    feats[:, 0] = 0.0
    feats[3, 0] = 1e-4  # nearly silent unit
    net = LLMVEM({"pooled": 8}, n_voxels=5, n_train=50, readout="linear", alignment=False)
    net.initialize(torch.from_numpy(rng.standard_normal((50, 5)).astype(np.float32)), torch.from_numpy(feats))
    stds = feats.astype(np.float64).std(axis=0)
    median = float(np.median(stds[stds > 0]))
    assert float(net.feature_std[0]) >= STD_FLOOR * median * 0.99
    test = torch.zeros(1, 8)
    test[0, 0] = 1.0  # the unit fires on a test image
    z = (test - net.feature_mean) / net.feature_std
    assert float(z.abs().max()) < 1.0 / (STD_FLOOR * median) + 1.0


@pytest.mark.parametrize(("core", "keys", "readout", "projection"),
                         [(None, None, "pca", "linear"), ("mlp", {"s1": (7, 30), "s-2": (4, 20)}, "linear", "mlp")])
def test_saved_state_rebuilds_the_same_network(core, keys, readout, projection):
    from llmvem.config import ModelConfig

    cfg = ModelConfig(core=core, core_dim=5, readout=readout, projection=projection)
    torch.manual_seed(0)
    kw = {"keys": keys} if keys else {"n_voxels": 12, "n_train": 40}
    net = LLMVEM.from_config(cfg, {"block0": 8, "pooled": 16}, text_dim=10, **kw)
    feats = _features()
    names = list(keys) if keys else [None]
    net.initialize({k or "main": torch.randn(40, (keys or {"main": (12, 0)})[k or "main"][0]) for k in names},
                   net.concat(feats))
    back = LLMVEM.from_state_dict(cfg, net.state_dict(), {"block0": 8, "pooled": 16}, n_train=40)
    assert back.keys == net.keys and back.core_dim == net.core_dim and back.head is not None
    net.eval(), back.eval()
    with torch.no_grad():
        for k in names:
            a, b = net(features=feats, with_embedding=True, key=k), back(features=feats, with_embedding=True, key=k)
            assert torch.equal(a.voxels, b.voxels) and torch.equal(a.embedding, b.embedding)
    with pytest.raises(ValueError, match="readout"):
        LLMVEM.from_state_dict(ModelConfig(readout="linear" if readout == "pca" else "pca"), net.state_dict(),
                               {"block0": 8, "pooled": 16})


def test_a_core_feeds_the_readouts_and_the_head_and_the_only_key_is_the_default():
    torch.manual_seed(0)
    net = LLMVEM({"block0": 8}, n_voxels=6, n_train=30, core="linear", core_dim=5, text_dim=4)
    net.eval()
    x = {"block0": torch.randn(3, 8)}
    out = net(features=x, with_embedding=True)  # no 'pooled' needed: the head reads the core
    assert net.keys == ["main"] and out.readout_input.shape == (3, 5) and out.embedding.shape == (3, 4)
    assert out.voxels.shape == (3, 6) and torch.equal(out.voxels, net(features=x, key="main").voxels)
    assert torch.equal(out.readout_input, net.core(x["block0"]))  # standardiser is identity before initialize
    assert net.required_layers(with_embedding=True) == ["block0"]
