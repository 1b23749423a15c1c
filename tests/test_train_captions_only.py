"""Captions-only training (a caption stream and no subject): the engine trains the core and alignment head alone."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from test_align_stream import make_stream
from test_train_trainer import backbone, tiny_config

from llmvem.data.images import ArrayImages
from llmvem.errors import ConfigError
from llmvem.train import train_alignment_model
from llmvem.train.stream import CaptionStream


def planted_stream(n: int = 96, seed: int = 0) -> CaptionStream:
    """Features of 2 layers whose captions are a fixed linear function of them: a head can learn the mapping."""
    rng = np.random.default_rng(seed)
    feats = {"block0": rng.normal(size=(n, 12)).astype(np.float32), "pooled": rng.normal(size=(n, 20)).astype(np.float32)}
    w = rng.normal(size=(32, 8))
    text = (np.concatenate([feats["block0"], feats["pooled"]], 1) @ w).astype(np.float32)
    text /= np.linalg.norm(text, axis=1, keepdims=True)
    images = ArrayImages(np.zeros((n, 4, 4, 3), np.uint8), [f"p{i}" for i in range(n)])
    return CaptionStream(images, text, feats, weight=1.0, batch_size=32)


def top1(net, stream: CaptionStream) -> float:
    with torch.no_grad():
        out = net(features={k: torch.from_numpy(v) for k, v in stream.features.items()}, with_embedding=True,
                  with_voxels=False)
    sim = out.embedding.numpy() @ stream.text_embeddings.T
    return float(np.mean(sim.argmax(1) == np.arange(len(sim))))


def test_a_captions_only_run_learns_the_planted_mapping_and_keeps_the_last_epoch(tmp_path):
    stream = planted_stream()
    cfg = tiny_config("model.core=linear", "model.core_dim=16", "train.stage1.epochs=40", "train.stage2.epochs=0",
                      "model.feature_dropout=0", "train.stage1.early_stopping_patience=2",
                      "train.stage1.weight_decay=0")
    untrained = train_alignment_model(tiny_config("model.core=linear", "model.core_dim=16", "train.stage1.epochs=1",
                                                  "train.stage1.lr=1e-9", "train.stage2.epochs=0"),
                                      stream, out_dir=tmp_path / "untrained", show_progress=False)
    net = train_alignment_model(cfg, stream, out_dir=tmp_path / "run", show_progress=False)
    assert net.readouts.keys() == set() and net.core is not None  # no voxel readout: only core and head
    # chance is 1/96; the trained head retrieves most captions of its training images, the untrained one almost none
    assert top1(net, stream) > 0.8 and top1(untrained, stream) < 0.1
    training = json.loads((tmp_path / "run" / "training.json").read_text())
    stage = training["stages"]["stage1"]
    # nothing to validate on: all 40 epochs ran (patience 2 did not stop it) and the last one was kept
    assert stage["epochs_run"] == 40 and stage["best_epoch"] == 40 and not stage["early_stopped"]
    assert training["dataset"] == {"name": "align_stream", "n_align_stream": 96}
    assert (tmp_path / "run" / "model.safetensors").is_file()
    curves = (tmp_path / "run" / "curves.csv").read_text().splitlines()
    assert len(curves) == 41 and curves[-1].split(",")[6] == ""  # val_mean_r empty (no responses)
    first, last = (float(c.split(",")[5]) for c in (curves[1], curves[-1]))
    assert last < first  # the contrastive loss fell


def test_a_captions_only_run_needs_lambda_and_a_weight(tmp_path):
    stream = planted_stream(16)
    with pytest.raises(ConfigError, match="lambda_align > 0"):
        train_alignment_model(tiny_config("model.lambda_align=0"), stream, out_dir=tmp_path / "a",
                              show_progress=False)
    off = CaptionStream(stream.images, stream.text_embeddings, stream.features, weight=0.0)
    with pytest.raises(ConfigError, match="stream weight > 0"):
        train_alignment_model(tiny_config(), off, out_dir=tmp_path / "b", show_progress=False)


def test_a_captions_only_run_computes_features_with_the_backbone_and_fine_tunes_it(tmp_path):
    cfg = tiny_config("model.core=linear", "model.core_dim=6", "train.stage1.epochs=1", "train.stage2.epochs=1",
                      "train.stage2.augment=false")
    bb = backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    net = train_alignment_model(cfg, make_stream(n=32), backbone=bb, out_dir=tmp_path / "run", show_progress=False)
    assert any(not torch.equal(before[k], v) for k, v in bb.state_dict().items())  # stage 2 moved the last block
    with torch.no_grad():
        out = net(images=torch.zeros(3, 16, 16, 3, dtype=torch.uint8), with_embedding=True, with_voxels=False)
    assert out.embedding.shape == (3, 8) and out.readout_input.shape == (3, 6)
