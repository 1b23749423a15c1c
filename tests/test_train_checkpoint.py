"""Checkpoints: safe formats only (no unpickling), exact optimizer/RNG round trips, crash-safe pointer."""

from __future__ import annotations

import json
import pickle
import random

import numpy as np
import pytest
import torch

from llmvem.errors import CheckpointError
from llmvem.train.checkpoint import (
    CheckpointManager,
    capture_rng_state,
    load_weights,
    optimizer_state_from_safe,
    optimizer_state_to_safe,
    restore_rng_state,
    save_weights,
)
from llmvem.train.distributed import DistInfo


def _model_and_opt(seed=0):
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 2))
    groups = [{"params": [model[0].weight, model[2].weight], "weight_decay": 0.1, "base_lr": 0.01},
              {"params": [model[0].bias, model[2].bias], "weight_decay": 0.0, "base_lr": 0.01}]
    return model, torch.optim.AdamW(groups, lr=0.01, betas=(0.8, 0.95))


def _steps(model, opt, n, seed):
    g = torch.Generator().manual_seed(seed)
    for _ in range(n):
        x = torch.randn(8, 5, generator=g)
        loss = model(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_optimizer_state_round_trip_continues_identically(tmp_path):
    model, opt = _model_and_opt()
    _steps(model, opt, 5, seed=1)
    tensors, meta = optimizer_state_to_safe(opt.state_dict())
    save_weights(tmp_path / "opt.safetensors", tensors)
    (tmp_path / "opt.json").write_text(json.dumps(meta))
    save_weights(tmp_path / "model.safetensors", model.state_dict())

    model2, opt2 = _model_and_opt(seed=99)  # different init: everything must come from the files
    model2.load_state_dict(load_weights(tmp_path / "model.safetensors"))
    opt2.load_state_dict(optimizer_state_from_safe(load_weights(tmp_path / "opt.safetensors"),
                                                   json.loads((tmp_path / "opt.json").read_text())))
    assert opt2.param_groups[0]["betas"] == (0.8, 0.95) and opt2.param_groups[0]["base_lr"] == 0.01
    _steps(model, opt, 4, seed=2)
    _steps(model2, opt2, 4, seed=2)
    for a, b in zip(model.parameters(), model2.parameters(), strict=True):
        assert torch.equal(a, b)


def test_rng_state_round_trip_for_torch_numpy_and_python():
    torch.manual_seed(3)
    np.random.seed(3)  # noqa: NPY002 - the legacy global state is what we checkpoint
    random.seed(3)
    torch.randn(3), np.random.rand(2), random.random()  # noqa: NPY002
    tensors, meta = capture_rng_state()
    json.dumps(meta)  # JSON-able
    first = (torch.randn(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))  # noqa: NPY002
    torch.manual_seed(0)
    np.random.seed(0)  # noqa: NPY002
    random.seed(0)
    restore_rng_state(tensors, meta)
    again = (torch.randn(4), np.random.rand(4), [random.random() for _ in range(4)], random.gauss(0, 1))  # noqa: NPY002
    assert torch.equal(first[0], again[0])
    np.testing.assert_array_equal(first[1], again[1])
    assert first[2] == again[2] and first[3] == again[3]


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_a_pickle_posing_as_a_checkpoint_is_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"
    fake = tmp_path / "model.safetensors"
    fake.write_bytes(pickle.dumps({"weight": _Evil(marker)}))
    with pytest.raises(CheckpointError, match="model.safetensors.*not a readable safetensors"):
        load_weights(fake)
    assert not marker.exists()
    legacy = tmp_path / "model.pt"
    torch.save({"w": torch.ones(2)}, legacy)
    with pytest.raises(CheckpointError, match="model.pt"):
        load_weights(legacy)
    with pytest.raises(CheckpointError, match="missing"):
        load_weights(tmp_path / "absent.safetensors")


def test_manager_refuses_a_checkpoint_from_another_config_and_names_both(tmp_path):
    info = DistInfo()
    model, opt = _model_and_opt()
    mgr = CheckpointManager(tmp_path / "ck", info, config_hash="aaaa1111")
    path = mgr.save("stage1_epoch0001", model.state_dict(), opt, {"stage": 1, "epoch": 1})
    assert mgr.latest() == path
    other = CheckpointManager(tmp_path / "ck", info, config_hash="bbbb2222")
    with pytest.raises(CheckpointError, match="aaaa1111.*bbbb2222"):
        other.load(path, torch.device("cpu"))
    state_dict, opt_state, state = mgr.load(path, torch.device("cpu"))
    assert state["epoch"] == 1 and opt_state is not None
    assert torch.equal(state_dict["0.weight"], model[0].weight)


def test_latest_pointer_survives_a_crash_while_saving(tmp_path):
    info = DistInfo()
    model, opt = _model_and_opt()
    mgr = CheckpointManager(tmp_path / "ck", info, config_hash="h")
    first = mgr.save("stage1_epoch0001", model.state_dict(), opt, {"stage": 1, "epoch": 1})
    # a later save that died before its state.json and the pointer were written
    half = tmp_path / "ck" / "stage1_epoch0002"
    half.mkdir()
    save_weights(half / "model.safetensors", model.state_dict())
    assert mgr.latest() == first
    second = mgr.save("stage1_epoch0002", model.state_dict(), opt, {"stage": 1, "epoch": 2})
    assert mgr.latest() == second
    assert not first.exists()  # older checkpoints are pruned once the new one is complete
