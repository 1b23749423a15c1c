"""Contrastive alignment loss (multi-positive symmetric InfoNCE) and the combined loss."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from llmvem.model.losses import (
    contrastive_loss,
    gather_no_grad,
    gather_with_grad,
    group_ids_from_embeddings,
    info_nce,
    total_loss,
)


def _loop_info_nce(img, txt, scale, ids):
    """Direct per-row computation: softmax over the batch, targets uniform over same-id rows."""
    def unit(v):
        norm = math.sqrt(sum(x * x for x in v))
        return [x / norm for x in v]

    img = [unit(v) for v in img.tolist()]
    txt = [unit(v) for v in txt.tolist()]
    ids = ids.tolist()
    b = len(img)
    sim = [[scale * sum(a * c for a, c in zip(img[i], txt[j], strict=True)) for j in range(b)] for i in range(b)]
    i2t = 0.0
    for i in range(b):
        log_z = math.log(sum(math.exp(sim[i][j]) for j in range(b)))
        pos = [j for j in range(b) if ids[j] == ids[i]]
        i2t += -sum(sim[i][j] - log_z for j in pos) / len(pos)
    t2i = 0.0
    for j in range(b):
        log_z = math.log(sum(math.exp(sim[i][j]) for i in range(b)))
        pos = [i for i in range(b) if ids[i] == ids[j]]
        t2i += -sum(sim[i][j] - log_z for i in pos) / len(pos)
    return 0.5 * (i2t / b + t2i / b)


@pytest.fixture
def batch():
    g = torch.Generator().manual_seed(0)
    img = torch.randn(7, 5, generator=g)
    txt = torch.randn(7, 5, generator=g)
    # images 1, 4 and 6 share one caption; 2 and 5 share another
    txt[4] = txt[1]
    txt[6] = txt[1]
    txt[5] = txt[2]
    ids = torch.tensor([0, 1, 2, 3, 1, 2, 1])
    return img, txt, ids


def test_info_nce_matches_a_direct_loop_with_identical_caption_positives(batch):
    img, txt, ids = batch
    scale = 1 / 0.07
    got = info_nce(img, txt, torch.tensor(scale), ids)
    assert float(got) == pytest.approx(_loop_info_nce(img, txt, scale, ids), rel=1e-5)


def test_identical_embeddings_give_the_groups_when_ids_are_not_passed(batch):
    img, txt, ids = batch
    derived = group_ids_from_embeddings(F.normalize(txt, dim=-1))
    same = derived.view(-1, 1) == derived.view(1, -1)
    assert torch.equal(same, ids.view(-1, 1) == ids.view(1, -1))
    assert float(info_nce(img, txt, 10.0)) == pytest.approx(float(info_nce(img, txt, 10.0, ids)), rel=1e-6)


def test_without_duplicates_it_is_the_clip_loss():
    g = torch.Generator().manual_seed(1)
    img, txt = torch.randn(6, 4, generator=g), torch.randn(6, 4, generator=g)
    logits = 5.0 * F.normalize(img, dim=-1) @ F.normalize(txt, dim=-1).t()
    labels = torch.arange(6)
    clip = 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels))
    assert float(info_nce(img, txt, 5.0)) == pytest.approx(float(clip), rel=1e-6)


def _optimise_images(txt, ids, steps=120):
    g = torch.Generator().manual_seed(5)
    img = torch.randn(txt.shape, generator=g).requires_grad_(True)
    opt = torch.optim.Adam([img], lr=0.1)
    for _ in range(steps):
        opt.zero_grad()
        info_nce(img, txt, 20.0, ids).backward()
        opt.step()
    return F.normalize(img.detach(), dim=-1)


def test_same_id_rows_are_positives_not_negatives():
    """Two paraphrases of one scene (same id, different embeddings): trained with our targets, each image of
    the scene ends up as close to the other paraphrase as to its own; one-hot CLIP targets push it away."""
    g = torch.Generator().manual_seed(2)
    txt = F.normalize(torch.randn(4, 6, generator=g), dim=-1)
    txt[1] = F.normalize(txt[0] + 0.3 * torch.randn(6, generator=g), dim=0)  # paraphrase of caption 0
    ours = _optimise_images(txt, torch.tensor([0, 0, 1, 2]))
    naive = _optimise_images(txt, torch.arange(4))
    gap_ours = float((ours[0] @ txt[0] - ours[0] @ txt[1]).abs())
    gap_naive = float(naive[0] @ txt[0] - naive[0] @ txt[1])
    assert gap_ours < 0.02
    assert gap_naive > 0.1  # image 0 pushed away from caption 1 although it describes the same scene


def test_bit_identical_captions_give_the_same_loss_either_way(batch):
    """With identical embeddings the softmax cannot tell duplicates apart, so one-hot and uniform targets agree."""
    img, txt, ids = batch
    assert float(info_nce(img, txt, 7.0, ids)) == pytest.approx(float(info_nce(img, txt, 7.0, torch.arange(7))),
                                                                rel=1e-5)


def test_gradients_flow_to_images_and_the_temperature(batch):
    img, txt, ids = batch
    img = img.clone().requires_grad_(True)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = contrastive_loss(img, txt, log_scale.exp(), ids)  # single process: no gather
    loss.backward()
    assert img.grad is not None and torch.isfinite(img.grad).all() and img.grad.abs().sum() > 0
    assert log_scale.grad is not None and torch.isfinite(log_scale.grad)


def test_gather_is_identity_in_one_process():
    x = torch.randn(3, 2)
    assert gather_with_grad(x) is x and gather_no_grad(x) is x


def test_info_nce_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        info_nce(torch.randn(3, 4), torch.randn(3, 5), 1.0)


def test_lambda_zero_total_is_exactly_the_voxel_loss():
    voxel = torch.tensor(0.123456789)
    parts = total_loss(voxel, torch.tensor(float("nan")), 0.0)
    assert torch.equal(parts.total, voxel)  # the NaN alignment term is never added
    parts = total_loss(voxel, torch.tensor(2.0), 0.5, torch.tensor(0.1))
    assert float(parts.total) == pytest.approx(0.123456789 + 1.0 + 0.1)
    with pytest.raises(ValueError, match="needs the alignment loss"):
        total_loss(voxel, None, 0.5)
