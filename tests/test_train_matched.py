"""Matched training (issue 25): a caption stream joins the voxel steps instead of adding steps, the voxel and the
contrastive gradients are clipped separately, and caption identity comes from the text."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
from test_align_stream import core_config, fit, make_stream
from test_train_trainer import tiny_config
from torch.utils.data import DistributedSampler

from llmvem.embed.text import caption_ids, normalize_caption
from llmvem.model.losses import group_ids_from_embeddings, info_nce
from llmvem.train.distributed import DistInfo
from llmvem.train.steps import GroupGrads, KeyCycler, extra_batch_counts, resolve_ratio, unit_schedule
from llmvem.train.task import KeyData

CPU = DistInfo(device=torch.device("cpu"))


# ------------------------------------------------------------------------------------------ schedule
def test_with_the_default_ratio_every_stream_row_is_visited_once_per_epoch():
    sampler = DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=3, drop_last=False)
    cycler = KeyCycler(sampler, 16)  # 4 batches per pass (16, 16, 16, 2)
    voxel = [("main", torch.tensor([i])) for i in range(7)]
    ratio = resolve_ratio(None, cycler.per_pass, len(voxel))
    for epoch in range(3):
        units = unit_schedule(voxel, {"s": (cycler, ratio)}, epoch * len(voxel))
        assert [u[-1] for u in units] == voxel  # the voxel batches, in order, last in their unit
        rows = torch.cat([b for u in units for k, b in u if k == "s"]).tolist()
        assert sorted(rows) == list(range(50))
    # a fixed ratio: floor((t + 1) r) - floor(t r) batches at step t, the same at every epoch
    assert extra_batch_counts(resolve_ratio(0.5, 4, 7), 0, 7) == [0, 1, 0, 1, 0, 1, 0]
    assert sum(extra_batch_counts(resolve_ratio(2.5, 4, 7), 7, 7)) == math.floor(14 * 2.5) - math.floor(7 * 2.5)
    # a pure function of the position: a resumed run draws the same batches
    again = KeyCycler(DistributedSampler(range(50), num_replicas=1, rank=0, shuffle=True, seed=3), 16)
    assert all(torch.equal(x, y) for x, y in zip(again.batches(5, 6), cycler.batches(5, 6), strict=True))


def test_a_stream_takes_the_voxel_steps_and_schedule_of_the_model_without_it(tmp_path):
    zero = fit(tmp_path, "zero", core_config("model.lambda_align=0"))
    aligned = fit(tmp_path, "aligned", core_config(), make_stream())  # 64 images / 16 = 4 steps; stream 48 / 16
    for res in (zero, aligned):
        st = res.stages["stage1"]
        assert st["steps_per_epoch"] == 4 and st["voxel_batches_per_epoch"] == 4 and st["epoch"] == "voxel_steps"
    assert aligned.stages["stage1"]["extra_batches_per_epoch"] == {"align_stream": 3}
    assert [(r["step"], r["lr"]) for r in aligned.curves] == [(r["step"], r["lr"]) for r in zero.curves]
    saved = json.loads((tmp_path / "aligned" / "training.json").read_text())
    assert saved["steps_per_epoch"] == {"stage1": 4}
    assert set(aligned.stages["stage1"]["clipped_fraction"]) == {"voxel", "align"}
    assert set(zero.stages["stage1"]["clipped_fraction"]) == {"global"}  # one loss group: ordinary clipping
    # before matching every stream batch was a step of its own: 4 + 3 steps, another cosine schedule
    old = fit(tmp_path, "old", core_config("train.epoch=all_batches"), make_stream())
    assert old.stages["stage1"]["steps_per_epoch"] == 7
    half = make_stream()
    half.ratio = 0.5
    assert fit(tmp_path, "half", core_config(), half).stages["stage1"]["extra_batches_per_epoch"] == {
        "align_stream": 2.0}


def test_matched_steps_and_per_loss_clipping_leave_the_voxel_path_exactly_as_at_lambda_zero(tmp_path):
    """No core: the contrastive gradient reaches only the head, so a λ > 0 model with a stream must predict exactly
    like λ = 0 without it — if it takes the same voxel steps with the same schedule and its voxel gradient is
    clipped on its own. Extra steps (all_batches) or one global clipping norm break this."""
    flat = ("model.feature_dropout=0", "train.stage2.epochs=0", "train.stage1.lr=0.05", "train.stage1.grad_clip=0.01")
    zero = fit(tmp_path, "zero", tiny_config(*flat, "model.lambda_align=0"), text=False)
    aligned = fit(tmp_path, "aligned", tiny_config(*flat, "model.lambda_align=5"), make_stream())
    np.testing.assert_array_equal(aligned.predictions["test"], zero.predictions["test"])
    assert aligned.stages["stage1"]["clipped_fraction"]["align"] > 0  # clipping was active
    for other in ("train.clip_per_loss=false", "train.epoch=all_batches"):
        changed = fit(tmp_path, other, tiny_config(*flat, "model.lambda_align=5", other), make_stream())
        assert np.abs(changed.predictions["test"] - zero.predictions["test"]).max() > 1e-5, other


def test_each_loss_group_is_clipped_on_its_own():
    w = torch.nn.Parameter(torch.zeros(3))
    grads = GroupGrads([w], CPU)
    # d/dw of (v · w) is v: the voxel gradient has norm 5, the contrastive one norm 0.1
    grads.add({"voxel": (torch.tensor([3.0, 4.0, 0.0]) * w).sum(), "align": (torch.tensor([0.0, 0.0, 0.1]) * w).sum()},
              1.0)
    norms = grads.finish(1.0)
    assert float(norms["voxel"]) == pytest.approx(5.0) and float(norms["align"]) == pytest.approx(0.1)
    np.testing.assert_allclose(w.grad.numpy(), [0.6, 0.8, 0.1], rtol=1e-5)  # voxel clipped to 1, align kept
    unused = torch.nn.Parameter(torch.zeros(2))
    grads = GroupGrads([w, unused], CPU)
    grads.add({"voxel": w.sum()}, 0.5)
    grads.finish(None)
    assert unused.grad is None and w.grad.tolist() == [0.5, 0.5, 0.5]  # an untouched parameter keeps no gradient


# ------------------------------------------------------------------------------------- caption identity
def test_the_same_caption_in_two_differently_padded_batches_is_one_group():
    from llmvem.embed.text import load_text_encoder

    enc = load_text_encoder("minilm", device="cpu")
    cap = "A small red circle on the left, on a blue striped background."
    long = " ".join(["A large green star in the upper right and a small yellow cross at the bottom,"] * 4)
    alone = enc.encode([cap]).embeddings[0]
    padded = enc.encode([long, cap, "a dog"], batch_size=3).embeddings[1]  # padded to the long caption's length
    np.testing.assert_allclose(alone, padded, atol=1e-5)  # the same caption (the bits may differ)
    emb = np.stack([alone, padded, enc.encode(["a dog"]).embeddings[0]])
    ids = caption_ids([[cap], [f"  {cap.upper()} "], ["a dog"]])
    assert ids[0] == ids[1] != ids[2]
    key = KeyData("k", {"train": 3})
    key.set_text({"train": emb}, torch.device("cpu"), {"train": ids})
    groups = key.text_ids["train"]
    assert groups[0] == groups[1] != groups[2]
    # the loss treats them as positives: the same value as with hand-made groups
    img = torch.randn(3, emb.shape[1], generator=torch.Generator().manual_seed(0))
    txt = torch.from_numpy(emb)
    assert float(info_nce(img, txt, 10.0, groups)) == pytest.approx(float(info_nce(img, txt, 10.0,
                                                                                    torch.tensor([0, 0, 1]))))
    if not np.array_equal(alone, padded):  # float equality would have split the group
        assert len(torch.unique(group_ids_from_embeddings(txt))) == 3


def test_caption_ids_follow_the_normalised_caption_set():
    assert normalize_caption("  A  Dog\u00a0runs.\n") == "a dog runs."
    ids = caption_ids([["a dog", "a cat"], ["A cat", "a  dog"], ["a dog"], "a dog"])
    assert ids[0] == ids[1] and ids[2] == ids[3] and ids[0] != ids[2]
    assert ids.dtype == np.int64 and (ids >= 0).all()
    assert caption_ids(["a dog"])[0] == ids[2]  # the same in every call (no per-call vocabulary)
