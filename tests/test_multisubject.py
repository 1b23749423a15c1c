"""Several subjects trained jointly: the network, the interleaved training loop, stage 2, ``llmvem train-multi``."""

from __future__ import annotations

import csv
import json
import math
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from test_model_network import TinyBackbone
from test_train_trainer import make_dataset

from llmvem.cli import main
from llmvem.config import RunConfig, apply_overrides
from llmvem.data import load_dataset
from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.data.splits import shared_test_fraction, split_by_image_key
from llmvem.errors import ConfigError, DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.model import LLMVEM
from llmvem.train.multisubject import (
    SubjectData,
    train_multisubject,
)
from llmvem.train.task import EncodingTask
from llmvem.train.tensors import predict_network
from llmvem.utils import STD_FLOOR

CPU = torch.device("cpu")


def shared_subjects(n_subjects=3, n_train=24, d=40, rank=2, noise=0.5, seed=0, n_val=20, n_test=80):
    """Subjects who saw different images but whose responses all read out the same rank-2 projection W of the
    image features (each through its own voxel weights): what a shared core can pool across subjects."""
    rng = np.random.default_rng(seed)
    w = rng.normal(size=(d, rank))
    out = []
    for s in range(n_subjects):
        n = n_train + n_val + n_test
        x = rng.normal(size=(n, d)).astype(np.float32)
        a = rng.normal(size=(rank, 12 + 4 * s))
        y = (x @ w @ a) / np.sqrt(d * rank) + noise * rng.normal(size=(n, a.shape[1]))
        ids = [f"s{s}_{i:03d}" for i in range(n)]
        imgs = np.zeros((n, 4, 4, 3), np.uint8)
        cut = [0, n_train, n_train + n_val, n]
        splits, feats = {}, {}
        for name, lo, hi in zip(("train", "val", "test"), cut[:-1], cut[1:], strict=True):
            splits[name] = Split(ArrayImages(imgs[lo:hi], ids[lo:hi]), y[lo:hi].astype(np.float32))
            feats[name] = {"block0": x[lo:hi, :8], "pooled": x[lo:hi, 8:]}
        out.append(SubjectData(f"sub{s}", EncodingDataset(f"sub{s}", splits), feats))
    return out


def stage1_config(*extra: str) -> RunConfig:
    return apply_overrides(RunConfig(), [
        "backbone.layers=[block0, pooled]", "model.lambda_align=0", "train.device=cpu", "train.stage1.epochs=40",
        "train.stage1.lr=0.03", "train.stage1.batch_size=16", "train.stage1.weight_decay=0.01",
        "train.stage1.early_stopping_patience=null", "train.stage2.epochs=0", "multisubject.core_dim=4", *extra])


pytestmark = pytest.mark.usefixtures("one_torch_thread")


# --------------------------------------------------------------------------------------------- network
def test_network_routes_each_subject_to_its_readout_through_the_shared_core():
    torch.manual_seed(0)
    net = LLMVEM({"block0": 8, "pooled": 16}, keys={"a": (12, 40), "b": (30, 20)}, core="linear", core_dim=6,
                 text_dim=10)
    feats = {"block0": torch.randn(5, 8), "pooled": torch.randn(5, 16)}
    out_a = net(features=feats, with_embedding=True, key="a")
    out_b = net(features=feats, key="b")
    assert out_a.voxels.shape == (5, 12) and out_b.voxels.shape == (5, 30)
    assert out_a.readout_input.shape == (5, 6) and torch.equal(out_a.readout_input, out_b.readout_input)
    assert out_a.embedding.shape == (5, 10)
    np.testing.assert_allclose(out_a.embedding.norm(dim=1).detach().numpy(), 1.0, rtol=1e-5)
    assert net.readouts["a"].n_components == 12 and net.readouts["b"].n_components == 20  # min(n_train, n_vox)
    pred = predict_network(net, 5, CPU, features=feats, batch_size=2, key="b")
    np.testing.assert_allclose(pred, out_b.voxels.detach().numpy(), rtol=1e-6)
    assert net.training  # predicting restores the network's mode
    with pytest.raises(KeyError, match="unknown data key 'c'"):
        net(features=feats, key="c")
    with pytest.raises(KeyError, match="2 data keys"):
        net(features=feats)  # no fallback with several keys
    with pytest.raises(ValueError, match="letters, digits"):
        LLMVEM({"pooled": 4}, keys={"v4.1": (3, 10)})


def test_alignment_head_does_not_change_the_rest_of_the_network():
    torch.manual_seed(3)
    with_head = LLMVEM({"pooled": 16}, keys={"a": (12, 40)}, core="linear", text_dim=10)
    torch.manual_seed(3)
    without = LLMVEM({"pooled": 16}, keys={"a": (12, 40)}, core="linear", alignment=False)
    assert with_head.head is not None and without.head is None
    shared = without.state_dict()
    for k, v in shared.items():
        assert torch.equal(with_head.state_dict()[k], v), k


def test_feature_std_is_floored_so_a_unit_silent_in_training_cannot_explode():
    net = LLMVEM({"pooled": 4}, keys={"a": (3, 50)}, core="linear", alignment=False)
    x = torch.randn(50, 4, generator=torch.Generator().manual_seed(0))
    x[:, 3] = 0.0
    x[7, 3] = 1e-4  # active on one training image only: std ~1.4e-5
    net.initialize({"a": torch.randn(50, 3)}, x)
    stds = x.double().std(dim=0, correction=0).float()  # FeatureStandardizer: population std
    floor = STD_FLOOR * float(np.median(stds[stds > 0].numpy()))  # numpy median (mean of the middle two)
    assert float(net.feature_std[3]) == pytest.approx(floor)
    torch.testing.assert_close(net.feature_std[:3], stds[:3])
    # a test image where the unit fires at the training images' typical scale stays a moderate input
    z = (torch.tensor([0.0, 0.0, 0.0, 1.0]) - net.feature_mean) / net.feature_std
    assert float(z[3].abs()) < 20  # |z| would be ~7e4 with the raw std


# -------------------------------------------------------------------------------------------- training
def test_joint_training_beats_separate_training_when_subjects_share_structure(tmp_path):
    subjects = shared_subjects()
    cfg = stage1_config()
    joint = train_multisubject(cfg, subjects, out_dir=tmp_path / "joint", show_progress=False)
    sep = {s.name: train_multisubject(cfg, [s], out_dir=tmp_path / s.name, show_progress=False) for s in subjects}
    r_joint = {s.name: float(np.mean(pearson_r(s.dataset.test.responses, joint.predictions[s.name]["test"])))
               for s in subjects}
    r_sep = {s.name: float(np.mean(pearson_r(s.dataset.test.responses, sep[s.name].predictions[s.name]["test"])))
             for s in subjects}
    for name in r_joint:
        assert joint.metrics["per_subject"][name]["test_mean_r"] == pytest.approx(r_joint[name])
        assert r_joint[name] > r_sep[name] + 0.05, (r_joint, r_sep)
    assert np.mean(list(r_joint.values())) > 0.6 and np.mean(list(r_sep.values())) < 0.55
    # the saved predictions are the returned ones
    np.testing.assert_array_equal(np.load(tmp_path / "joint" / "predictions" / "sub1_test.npy"),
                                  joint.predictions["sub1"]["test"])
    info = json.loads((tmp_path / "joint" / "training.json").read_text())
    assert info["subjects"] == ["sub0", "sub1", "sub2"] and info["core_dim"] == 4
    assert info["metrics"]["val_mean_r"] == pytest.approx(np.mean([joint.metrics["per_subject"][n]["val_mean_r"]
                                                                   for n in r_joint]))
    # training is reproducible
    again = train_multisubject(cfg, subjects, out_dir=tmp_path / "again", show_progress=False)
    np.testing.assert_array_equal(again.predictions["sub2"]["test"], joint.predictions["sub2"]["test"])


def test_batches_of_all_subjects_are_interleaved_and_all_visited(tmp_path, monkeypatch):
    subjects = shared_subjects(n_train=40)  # 3 batches of 16 per subject and epoch
    seen: list[tuple[str, int]] = []
    original = EncodingTask.training_forward

    def spy(self, key, batch):
        seen.append((key, len(batch.responses)))
        return original(self, key, batch)

    monkeypatch.setattr(EncodingTask, "training_forward", spy)
    res = train_multisubject(stage1_config("train.stage1.epochs=2"), subjects, out_dir=tmp_path / "j",
                             show_progress=False)
    epoch1 = seen[:9]
    assert sorted(epoch1) == sorted([(f"sub{s}", n) for s in range(3) for n in (16, 16, 8)])
    assert [n for n, _ in epoch1] != sorted(n for n, _ in epoch1)  # not subject after subject
    assert [r["step"] for r in res.curves] == [9, 18]
    with open(tmp_path / "j" / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {"stage", "epoch", "step", "train_loss", "val_mean_r", "lr", "val_r__sub0", "val_r__sub2"} <= set(rows[0])
    assert float(rows[1]["val_mean_r"]) == pytest.approx(np.mean([float(rows[1][f"val_r__sub{s}"]) for s in range(3)]))


def test_each_subject_is_predicted_by_its_own_best_epoch(tmp_path):
    subjects = shared_subjects(n_train=60)
    subjects[2].dataset.splits["train"] = subjects[2].dataset.train.subset(np.arange(12))  # fits fastest, overfits
    subjects[2].features["train"] = {k: v[:12] for k, v in subjects[2].features["train"].items()}
    cfg = stage1_config("train.stage1.epochs=30")
    res = train_multisubject(cfg, subjects, out_dir=tmp_path / "ps", show_progress=False)
    st = res.stages["stage1"]
    best = st["best_epoch_per_key"]
    assert len(set(best.values())) > 1, best  # the subjects peak at different epochs
    for s in subjects:  # each key keeps the epoch of its own best validation r
        assert best[s.name] == 1 + int(np.argmax([r[f"val_r__{s.name}"] for r in res.curves]))
    for s in subjects:
        y = s.dataset.val.responses
        # the selected model reproduces the subject's best validation r of the whole run
        assert float(np.mean(pearson_r(y, res.predictions[s.name]["val"]))) == pytest.approx(
            st["best_val_r_per_key"][s.name], abs=1e-6)
        assert st["best_val_r_per_key"][s.name] == pytest.approx(
            max(r[f"val_r__{s.name}"] for r in res.curves), abs=1e-12)
        feats = {k: torch.as_tensor(v) for k, v in s.features["test"].items()}
        np.testing.assert_allclose(predict_network(res.network_for(s.name), len(s.dataset.test), CPU,
                                                   features=feats, key=s.name), res.predictions[s.name]["test"],
                                   rtol=1e-5)
    mean = train_multisubject(stage1_config("train.stage1.epochs=30", "multisubject.selection=mean"), subjects,
                              out_dir=tmp_path / "m", show_progress=False)
    row = mean.curves[mean.stages["stage1"]["best_epoch"] - 1]
    for s in subjects:  # one epoch for all: the one with the best mean
        assert mean.metrics["per_subject"][s.name]["val_mean_r"] == pytest.approx(row[f"val_r__{s.name}"], abs=1e-6)
        assert mean.metrics["per_subject"][s.name]["val_mean_r"] <= res.metrics["per_subject"][s.name][
            "val_mean_r"] + 1e-9


def test_variance_weighting_puts_subjects_in_different_units_on_one_scale(tmp_path):
    subjects = shared_subjects()
    big = subjects[0]
    for split in big.dataset.splits.values():
        split.responses = split.responses * 1000.0  # e.g. spike counts vs BOLD
    res = train_multisubject(stage1_config("train.stage1.epochs=1"), subjects, out_dir=tmp_path / "w",
                             show_progress=False)
    assert res.curves[0]["train_voxel_loss"] < 3.0  # in units of the responses' variance
    raw = train_multisubject(stage1_config("train.stage1.epochs=1", "multisubject.loss_weighting=none"), subjects,
                             out_dir=tmp_path / "n", show_progress=False)
    assert raw.curves[0]["train_voxel_loss"] > 1e4


def test_alignment_loss_trains_the_shared_head_on_each_subjects_captions(tmp_path):
    subjects = shared_subjects()
    rng = np.random.default_rng(5)
    for s in subjects:  # caption embeddings that describe the images' features
        proj = rng.normal(size=(40, 6))
        s.text_embeddings = {k: (np.concatenate([f["block0"], f["pooled"]], 1) @ proj).astype(np.float32)
                             for k, f in s.features.items()}
    with pytest.raises(ConfigError, match="needs caption embeddings of subject sub0"):
        bare = [SubjectData(s.name, s.dataset, s.features) for s in subjects]
        train_multisubject(stage1_config("model.lambda_align=0.5"), bare, out_dir=tmp_path / "x", show_progress=False)
    res = train_multisubject(stage1_config("model.lambda_align=0.5", "train.stage1.epochs=10"), subjects,
                             out_dir=tmp_path / "a", show_progress=False)
    align = [r["train_align_loss"] for r in res.curves]
    assert align[-1] < align[0] and all(math.isfinite(a) for a in align)
    assert res.network.head is not None and res.network.head.proj.weight.shape == (6, 4)
    plain = train_multisubject(stage1_config("train.stage1.epochs=10"), subjects, out_dir=tmp_path / "p",
                               show_progress=False)
    assert all(r["train_align_loss"] is None for r in plain.curves)
    assert not np.allclose(plain.predictions["sub0"]["test"], res.predictions["sub0"]["test"])


def tiny_backbone_subjects(backbone):
    """Two subjects of tiny images with the features of ``backbone`` (stage 2 runs the images through it)."""
    subjects = []
    for seed in (0, 1):
        ds, text = make_dataset(seed=seed)
        with torch.no_grad():
            feats = {s: {k: v.numpy() for k, v in backbone.eval()(backbone.preprocess(
                torch.from_numpy(ds.splits[s].images.array)), ["block0", "pooled"]).items()}
                for s in ("train", "val", "test")}
        ids = {s: [f"x{seed}_{i}" for i in ds.splits[s].images.ids] for s in ds.splits}
        ds = EncodingDataset(f"tiny{seed}", {s: Split(ArrayImages(ds.splits[s].images.array, ids[s]),
                                                      ds.splits[s].responses) for s in ds.splits})
        subjects.append(SubjectData(f"tiny{seed}", ds, feats, text))
    return subjects


def test_stage2_fine_tunes_a_copy_of_the_shared_backbone(tmp_path):
    torch.manual_seed(1234)
    backbone = TinyBackbone()
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    subjects = tiny_backbone_subjects(backbone)
    cfg = stage1_config("train.stage1.epochs=3", "train.stage2.epochs=2", "train.stage2.unfreeze_last_n=1",
                        "train.stage2.batch_size=16", "train.stage2.lr=0.003", "train.stage2.augment=true")
    res = train_multisubject(cfg, subjects, backbone=backbone, out_dir=tmp_path / "s2", show_progress=False)
    assert [r["stage"] for r in res.curves] == ["stage1"] * 3 + ["stage2"] * 2
    for k, v in backbone.state_dict().items():  # the caller's backbone is untouched
        assert torch.equal(v, before[k]), k
    tuned = res.network.backbone
    assert not torch.equal(tuned.b1[0].weight, before["b1.0.weight"])  # the last block was trained
    assert torch.equal(tuned.b0[0].weight, before["b0.0.weight"])  # the first was not
    # final predictions run the images through the fine-tuned backbone
    imgs = torch.from_numpy(subjects[1].dataset.test.images.array)
    pred = predict_network(res.network_for("tiny1"), len(imgs), CPU, images=imgs, key="tiny1")
    np.testing.assert_allclose(pred, res.predictions["tiny1"]["test"], rtol=1e-5, atol=1e-6)
    with pytest.raises(ConfigError, match="needs|pass backbone"):
        train_multisubject(cfg, subjects, out_dir=tmp_path / "nobb", show_progress=False)


class _Kill(Exception):
    pass


@pytest.mark.parametrize(("event", "stage", "epoch"), [("stage_end", 1, None), ("epoch_end", 2, 1)])
def test_two_subject_run_killed_and_resumed_equals_uninterrupted(tmp_path, event, stage, epoch):
    torch.manual_seed(1234)
    backbone = TinyBackbone()
    subjects = tiny_backbone_subjects(backbone)
    cfg = stage1_config("train.stage1.epochs=3", "train.stage2.epochs=2", "train.stage2.unfreeze_last_n=1",
                        "train.stage2.batch_size=16", "train.stage2.lr=0.003", "train.stage2.augment=true")
    full = train_multisubject(cfg, subjects, backbone=backbone, out_dir=tmp_path / "full", show_progress=False)

    def kill(ev, info):
        if ev == event and info["stage"] == stage and (epoch is None or info["epoch"] == epoch):
            raise _Kill

    with pytest.raises(_Kill):
        train_multisubject(cfg, subjects, backbone=backbone, out_dir=tmp_path / "cut", show_progress=False,
                           callback=kill)
    assert not (tmp_path / "cut" / "training.json").exists()
    torch.manual_seed(999)  # the resumed run must not depend on the process's random state
    resumed = train_multisubject(cfg, subjects, backbone=backbone, out_dir=tmp_path / "cut", resume=True,
                                 show_progress=False)
    assert resumed.metrics == full.metrics
    assert [r["val_mean_r"] for r in resumed.curves] == [r["val_mean_r"] for r in full.curves]
    for name in ("tiny0", "tiny1"):
        for split in ("val", "test"):
            np.testing.assert_array_equal(resumed.predictions[name][split], full.predictions[name][split])
    assert resumed.stages["stage2"]["best_epoch_per_key"] == full.stages["stage2"]["best_epoch_per_key"]


def test_key_schedule_visits_every_batch_once_in_a_seeded_order():
    from llmvem.train.engine import key_schedule

    batches = {"a": list(torch.arange(6).split(2)), "b": list(torch.arange(4).split(2))}
    order = key_schedule(batches, seed=3)
    assert sorted((k, tuple(b.tolist())) for k, b in order) == sorted(
        (k, tuple(b.tolist())) for k, bs in batches.items() for b in bs)
    assert [(k, b.tolist()) for k, b in key_schedule(batches, seed=3)] == [(k, b.tolist()) for k, b in order]
    assert any([(k, b.tolist()) for k, b in key_schedule(batches, seed=s)] != [(k, b.tolist()) for k, b in order]
               for s in range(4, 10))
    one = key_schedule({"a": batches["a"]}, seed=3)  # one key: its own (sampler) order, no extra shuffle
    assert [b.tolist() for _, b in one] == [b.tolist() for b in batches["a"]]


def test_a_captions_only_key_trains_only_the_contrastive_term():
    from llmvem.train.task import Batch

    torch.manual_seed(0)
    net = LLMVEM({"block0": 8}, keys={"brain": (5, 20)}, core="linear", core_dim=6, text_dim=4)
    task = EncodingTask(net, lambda_align=0.5)
    task.set_stage1_trainable(learn_temperature=True)
    feats = {"block0": torch.randn(6, 8)}
    text = torch.nn.functional.normalize(torch.randn(6, 4), dim=1)
    parts = task.training_forward("captions", Batch(features=feats, text=text, text_ids=torch.arange(6)))
    assert parts.voxel.item() == 0.0 and parts.align.item() > 0
    assert parts.total.item() == pytest.approx(0.5 * parts.align.item())
    parts.total.backward()
    assert net.head.proj.weight.grad is not None and net.core.weight.grad is not None
    assert all(p.grad is None for p in net.readouts.parameters())  # no readout for a key without responses
    with pytest.raises(ValueError, match="responses or"):
        task.training_forward("captions", Batch(features=feats))
    # a key with responses and captions: voxel loss (× its weight) + λ · InfoNCE
    weighted = EncodingTask(net, lambda_align=0.5, key_weights={"brain": 2.0})
    y = torch.randn(6, 5)
    both = weighted.training_forward("brain", Batch(features=feats, responses=y, text=text,
                                                    text_ids=torch.arange(6)))
    plain = EncodingTask(net, lambda_align=0.0).training_forward("brain", Batch(features=feats, responses=y))
    assert float(both.voxel) == pytest.approx(2.0 * float(plain.voxel), rel=1e-6)
    assert float(both.total) == pytest.approx(float(both.voxel) + 0.5 * float(both.align), rel=1e-6)


def test_inconsistent_subjects_and_settings_are_refused(tmp_path):
    subjects = shared_subjects()
    odd = subjects[1]
    odd.features = {k: {"block0": f["block0"][:, :5], "pooled": f["pooled"]} for k, f in odd.features.items()}
    with pytest.raises(DataValidationError, match="differ from the other subjects"):
        train_multisubject(stage1_config(), subjects, out_dir=tmp_path / "a", show_progress=False)
    twins = shared_subjects()[:1] * 2
    with pytest.raises(ConfigError, match="unique"):
        train_multisubject(stage1_config(), twins, out_dir=tmp_path / "c", show_progress=False)


# ------------------------------------------------------------------------------------------------- CLI
def make_v4_session(root: Path, session: str, n_images: int, weights: np.ndarray, seed: int) -> None:
    """A fake session in the Cowley et al. layout whose neurons respond to colour statistics of the image."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "responses_repeat_averaged").mkdir(exist_ok=True)
    stats = []
    with zipfile.ZipFile(root / "images" / f"images_{session}.zip", "w") as zf:
        for i in range(n_images):
            base = rng.integers(0, 256, 3)
            arr = np.clip(base + rng.normal(0, 30, (32, 32, 3)), 0, 255).astype(np.uint8)
            arr[:16] = np.clip(arr[:16].astype(int) + rng.integers(-60, 60, 3), 0, 255)
            stats.append(np.concatenate([arr.mean((0, 1)), arr[:16].mean((0, 1))]) / 255)
            tmp = root / "tmp.jpg"
            Image.fromarray(arr).save(tmp)
            zf.write(tmp, f"image{i + 1:04d}.jpg")
            tmp.unlink()
    signal = np.asarray(stats) @ weights[:, : 4 + seed]
    avg = 5 + 3 * signal + 0.3 * rng.normal(size=signal.shape)
    np.save(root / "responses_repeat_averaged" / f"responses_{session}.npy", avg.T)


@pytest.fixture(scope="module")
def v4_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("v4")
    weights = np.random.default_rng(0).normal(size=(6, 8))
    make_v4_session(root, "s1", 60, weights, 1)
    make_v4_session(root, "s2", 48, weights, 2)
    return root


def _cli_config(tmp_path, cache) -> str:
    cfg = {"backbone": {"name": "efficientnet_lite0", "layers": ["block5", "pooled"], "batch_size": 64},
           "model": {"lambda_align": 0.0, "readout_l2": 0.1},
           "multisubject": {"core_dim": 16},
           "train": {"device": "cpu",
                     "stage1": {"epochs": 15, "batch_size": 16, "lr": 0.003, "early_stopping_patience": None},
                     "stage2": {"epochs": 0}},
           "evaluate": {"bootstrap": 100}, "data": {"val_fraction": 0.2}, "cache_dir": str(cache)}
    path = tmp_path / "multi.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_train_multi_command_on_v4_sessions_joint_and_separate(tmp_path, v4_root, capsys):
    out = tmp_path / "multi"
    argv = ["train-multi", "--config", _cli_config(tmp_path, tmp_path / "cache"), "--subjects",
            f"v4:{v4_root}:s1,v4:{v4_root}:s2", "--out", str(out), "--separate", "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    assert list(summary["subjects"]) == ["v4_s1", "v4_s2"]
    # every subject is re-split by image key with one test share, so shared images agree across subjects
    loaded = {s: load_dataset(f"v4:{v4_root}:{s}", val_fraction=0.2, seed=0) for s in ("s1", "s2")}
    test_fraction = shared_test_fraction(list(loaded.values()))
    for name, entry in summary["subjects"].items():
        session = name.split("_")[1]
        ds = split_by_image_key(loaded[session], 0.2, test_fraction, 0)
        assert (entry["n_train"], entry["n_test"], entry["n_voxels"]) == (len(ds.train), len(ds.test), ds.n_voxels)
        joint = np.load(out / "joint" / "predictions" / f"{name}_test.npy")
        alone = np.load(out / "separate" / name / "predictions" / f"{name}_test.npy")
        assert entry["joint"]["mean_r"] == pytest.approx(float(np.mean(pearson_r(ds.test.responses, joint))))
        assert entry["separate"]["mean_r"] == pytest.approx(float(np.mean(pearson_r(ds.test.responses, alone))))
        cmp = entry["joint_vs_separate"]
        assert cmp["diff"] == pytest.approx(entry["joint"]["mean_r"] - entry["separate"]["mean_r"])
        assert cmp["ci_low"] <= cmp["diff"] <= cmp["ci_high"]
        assert entry["joint"]["mean_r"] > 0.3  # the colour-driven neurons are predictable
        assert json.loads((out / "subjects" / f"{name}.json").read_text()) == entry
        assert f"{entry['joint']['mean_r']:.4f}" in stdout and f"{entry['separate']['mean_r']:.4f}" in stdout
    assert summary["mean"]["joint"]["mean_r"] == pytest.approx(
        np.mean([e["joint"]["mean_r"] for e in summary["subjects"].values()]))
    assert (out / "summary.md").read_text().count("\n| v4_s") == 2
    # a used folder is refused; --resume reuses every finished training and gives the same summary
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err
    mtime = (out / "joint" / "model.safetensors").stat().st_mtime_ns
    assert main([*argv, "--resume"]) == 0
    assert json.loads((out / "summary.json").read_text())["subjects"] == summary["subjects"]
    assert (out / "joint" / "model.safetensors").stat().st_mtime_ns == mtime


def test_train_multi_bad_subject_spec_exits_with_code_2(tmp_path, capsys):
    cfg = _cli_config(tmp_path, tmp_path / "cache")
    assert main(["train-multi", "--config", cfg, "--subjects", f"v4:{tmp_path}:nope", "--out",
                 str(tmp_path / "o")]) == 2
    assert "session nope" in capsys.readouterr().err
    assert main(["train-multi", "--config", cfg, "--subjects", " , ", "--out", str(tmp_path / "p")]) == 2
    assert "--subjects" in capsys.readouterr().err
