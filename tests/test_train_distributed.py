"""Two CPU processes under torchrun (gloo): gathered-negatives loss equals the single-process loss on the same
global batch, and DDP training reproduces single-process training with the same global batch, for one data key
(one subject) and for several (joint multi-subject training with the alignment loss, stages 1 and 2)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from test_train_trainer import backbone, make_dataset, tiny_config

from llmvem.model.losses import info_nce
from llmvem.train import train_encoding_model

pytestmark = pytest.mark.slow

TESTS_DIR = Path(__file__).resolve().parent
OVERRIDES = ["model.feature_dropout=0", "train.stage2.augment=false"]

WORKER = textwrap.dedent('''
    import json, os, sys
    import torch
    import torch.distributed as dist
    from llmvem.model.losses import contrastive_loss
    from llmvem.train import train_encoding_model
    from test_train_distributed import OVERRIDES, global_batch
    from test_train_trainer import backbone, make_dataset, tiny_config

    out = sys.argv[1]
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()

    # 1. the contrastive loss on this process's half of a fixed global batch, negatives gathered
    img, txt, ids = global_batch()
    n = img.shape[0] // world
    local = img[rank * n:(rank + 1) * n].clone().requires_grad_(True)
    loss = contrastive_loss(local, txt[rank * n:(rank + 1) * n], torch.tensor(1 / 0.07), ids[rank * n:(rank + 1) * n])
    loss.backward()
    with open(os.path.join(out, f"loss_rank{rank}.json"), "w") as fh:
        json.dump({"loss": loss.item(), "grad": local.grad.tolist(), "world": world}, fh)

    # 2. a full two-stage training run (the trainer joins the existing process group)
    ds, text = make_dataset()
    train_encoding_model(tiny_config(*OVERRIDES), ds, text, backbone(), out_dir=os.path.join(out, "run"),
                         show_progress=False)

    # 3. joint training of two subjects (two data keys, a shared core, lambda > 0)
    from test_train_distributed import multi_config
    from test_multisubject import tiny_backbone_subjects
    from llmvem.train.multisubject import train_multisubject
    bb = backbone()
    train_multisubject(multi_config(), tiny_backbone_subjects(bb), bb, out_dir=os.path.join(out, "multi"),
                       show_progress=False)
    dist.destroy_process_group()
''')


def multi_config():
    from test_multisubject import stage1_config

    return stage1_config("model.lambda_align=0.3", "train.stage1.epochs=3", "train.stage2.epochs=1",
                         "train.stage2.unfreeze_last_n=1", "train.stage2.batch_size=16", "train.stage2.lr=0.003",
                         *OVERRIDES)


def global_batch():
    """A fixed batch of 8 with identical captions across the two halves (rows 1, 5, 6 and rows 2, 7)."""
    g = torch.Generator().manual_seed(11)
    img = torch.randn(8, 6, generator=g)
    txt = torch.nn.functional.normalize(torch.randn(8, 6, generator=g), dim=-1)
    txt[5] = txt[1]
    txt[6] = txt[1]
    txt[7] = txt[2]
    ids = torch.tensor([0, 1, 2, 3, 4, 1, 1, 2])
    return img, txt, ids


@pytest.fixture(scope="module")
def torchrun_out(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddp")
    script = out / "worker.py"
    script.write_text(WORKER)
    env = dict(os.environ, OMP_NUM_THREADS="1", LLMVEM_NO_PROGRESS="1",
               PYTHONPATH=os.pathsep.join([str(TESTS_DIR), str(TESTS_DIR.parent), os.environ.get("PYTHONPATH", "")]))
    for key in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(script),
           str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return out


def test_gathered_negatives_loss_equals_single_process_loss(torchrun_out):
    img, txt, ids = global_batch()
    ref_img = img.clone().requires_grad_(True)
    ref = info_nce(ref_img, txt, torch.tensor(1 / 0.07), ids)
    ref.backward()
    for rank in (0, 1):
        got = json.loads((torchrun_out / f"loss_rank{rank}.json").read_text())
        assert got["world"] == 2
        assert got["loss"] == pytest.approx(ref.item(), rel=1e-6)
        # every process computes the global loss; the gather's backward sums over processes, and DDP's
        # averaging then divides by 2: so the local gradient is 2x the single-process gradient of these rows
        grad = torch.tensor(got["grad"])
        np.testing.assert_allclose(grad / 2, ref_img.grad[rank * 4:(rank + 1) * 4], rtol=1e-5, atol=1e-7)


def test_ddp_training_matches_single_process_training(torchrun_out, tmp_path):
    run = torchrun_out / "run"
    assert json.loads((run / "training.json").read_text())["world_size"] == 2
    ds, text = make_dataset()
    single = train_encoding_model(tiny_config(*OVERRIDES), ds, text, backbone(), out_dir=tmp_path / "single",
                                  show_progress=False)
    ddp_pred = np.load(run / "predictions_test.npy")
    np.testing.assert_allclose(ddp_pred, single.predictions["test"], atol=2e-5, rtol=1e-4)
    ddp_curves = (run / "curves.csv").read_text().splitlines()
    assert len(ddp_curves) == len(single.curves) + 1


def test_ddp_joint_training_of_two_subjects_matches_single_process(torchrun_out, tmp_path):
    from test_multisubject import tiny_backbone_subjects

    from llmvem.train.multisubject import train_multisubject

    run = torchrun_out / "multi"
    info = json.loads((run / "training.json").read_text())
    assert info["world_size"] == 2 and info["subjects"] == ["tiny0", "tiny1"]
    bb = backbone()
    single = train_multisubject(multi_config(), tiny_backbone_subjects(bb), bb, out_dir=tmp_path / "single",
                                show_progress=False)
    for name in ("tiny0", "tiny1"):
        np.testing.assert_allclose(np.load(run / "predictions" / f"{name}_test.npy"),
                                   single.predictions[name]["test"], atol=5e-5, rtol=1e-4)
    import csv

    with open(run / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert len(rows) == len(single.curves) == 4
    for row, ref in zip(rows, single.curves, strict=True):  # the InfoNCE is over the global batch on each rank
        assert float(row["val_mean_r"]) == pytest.approx(ref["val_mean_r"], abs=1e-4)
        assert float(row["train_align_loss"]) == pytest.approx(ref["train_align_loss"], rel=1e-4)
