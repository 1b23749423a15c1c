"""The two-stage trainer: λ = 0 equivalence, resume, early stopping, ridge parity, run folder, outputs."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
import torch
from test_model_network import TinyBackbone

from llmvem.config import RunConfig, apply_overrides
from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.errors import CheckpointError, ConfigError, DataValidationError, RunFolderError
from llmvem.estimators import LLMVEMEncoder
from llmvem.evaluate.metrics import pearson_r
from llmvem.train import train_encoding_model
from llmvem.train.schedule import lr_factor

CURVE_COLUMNS = ("stage", "epoch", "step", "train_loss", "val_mean_r", "lr")  # what the report reads


def make_dataset(n_train=64, n_val=16, n_test=16, n_voxels=10, n_categories=5, seed=0):
    """Tiny images whose responses are linear in simple image statistics, plus caption embeddings that are
    identical within a category (so identical captions occur in every batch)."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    cats = rng.integers(0, n_categories, n)
    base = rng.integers(0, 256, (n_categories, 3))
    imgs = np.clip(base[cats][:, None, None, :] + rng.normal(0, 40, (n, 16, 16, 3)), 0, 255).astype(np.uint8)
    stats = np.concatenate([imgs.mean((1, 2)), imgs[:, :8].mean((1, 2)), imgs[:, :, :8].mean((1, 2))], 1) / 255
    y = stats @ rng.normal(size=(9, n_voxels)) + 0.05 * rng.normal(size=(n, n_voxels))
    ids = [f"im{i:03d}" for i in range(n)]
    cut = [0, n_train, n_train + n_val, n]
    splits = {name: Split(ArrayImages(imgs[a:b], ids[a:b]), y[a:b].astype(np.float32))
              for name, a, b in zip(("train", "val", "test"), cut[:-1], cut[1:], strict=True)}
    ds = EncodingDataset("tiny", splits)
    cat_emb = rng.normal(size=(n_categories, 8)).astype(np.float32)
    cat_emb /= np.linalg.norm(cat_emb, axis=1, keepdims=True)
    text = {name: cat_emb[cats[a:b]] for name, a, b in zip(("train", "val", "test"), cut[:-1], cut[1:], strict=True)}
    return ds, text


def tiny_config(*overrides: str) -> RunConfig:
    base = ["backbone.layers=[block0, pooled]", "train.stage1.epochs=3", "train.stage1.batch_size=16",
            "train.stage1.lr=0.01", "train.stage2.epochs=2", "train.stage2.batch_size=16",
            "train.stage2.unfreeze_last_n=1", "train.stage2.lr=0.003", "model.lambda_align=0.5",
            "model.feature_dropout=0.2", "train.stage2.augment=true", "train.device=cpu"]
    return apply_overrides(RunConfig(), [*base, *overrides])


def backbone():
    torch.manual_seed(1234)
    return TinyBackbone()


def run(tmp_path, name, cfg=None, text=True, ds=None, **kw):
    ds_, text_ = make_dataset()
    ds = ds or ds_
    cfg = cfg or tiny_config()
    return train_encoding_model(cfg, ds, text_embeddings=text_ if text else None, backbone=kw.pop("bb", backbone()),
                                out_dir=tmp_path / name, show_progress=False, **kw)


# ------------------------------------------------------------------------------------------------ λ = 0
def test_lambda_zero_equals_the_model_without_alignment_head(tmp_path):
    cfg = tiny_config("model.lambda_align=0")
    with_head = run(tmp_path, "a", cfg)
    no_head = run(tmp_path, "b", cfg, alignment_head=False)
    no_text = run(tmp_path, "c", cfg, text=False)
    assert with_head.network.head is not None and no_head.network.head is None
    for split in ("val", "test"):
        assert np.array_equal(with_head.predictions[split], no_head.predictions[split])
        assert np.array_equal(with_head.predictions[split], no_text.predictions[split])
    # and the alignment really changes the model when λ > 0
    aligned = run(tmp_path, "d", tiny_config())
    assert not np.allclose(aligned.predictions["test"], with_head.predictions["test"])
    assert all(r["train_align_loss"] is None for r in with_head.curves)
    assert all(r["train_align_loss"] > 0 for r in aligned.curves)


# --------------------------------------------------------------------------------------------- resume
class Interrupt(Exception):
    pass


@pytest.mark.parametrize("event,stage,epoch", [("stage_end", 1, None), ("epoch_end", 1, 2), ("epoch_end", 2, 1)])
def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path, event, stage, epoch):
    full = run(tmp_path, "full")

    def stop(ev, info):
        if ev == event and info["stage"] == stage and (epoch is None or info["epoch"] == epoch):
            raise Interrupt

    with pytest.raises(Interrupt):
        run(tmp_path, "cut", callback=stop)
    assert not (tmp_path / "cut" / "predictions_test.npy").exists()
    resumed = run(tmp_path, "cut", resume=True)
    for split in ("val", "test"):
        np.testing.assert_array_equal(resumed.predictions[split], full.predictions[split])
    assert resumed.metrics["test_mean_r"] == full.metrics["test_mean_r"]
    assert [r["val_mean_r"] for r in resumed.curves] == [r["val_mean_r"] for r in full.curves]
    assert [r["step"] for r in resumed.curves] == [r["step"] for r in full.curves]


def test_resume_with_a_different_config_names_both(tmp_path):
    run(tmp_path, "r", tiny_config("train.stage2.epochs=0"))
    with pytest.raises(CheckpointError) as exc:
        run(tmp_path, "r", tiny_config("train.stage2.epochs=0", "train.stage1.lr=0.5"), resume=True)
    msg = str(exc.value)
    assert "config.yaml" in msg and "train.stage1.lr" in msg and "0.01" in msg and "0.5" in msg
    # settings that do not change the model may differ
    run(tmp_path, "r", tiny_config("train.stage2.epochs=0", "evaluate.bootstrap=5"), resume=True)


def test_existing_run_folder_is_refused_unless_resume_or_overwrite(tmp_path):
    cfg = tiny_config("train.stage2.epochs=0")
    run(tmp_path, "r", cfg)
    (tmp_path / "r" / "notes.txt").write_text("mine")
    with pytest.raises(RunFolderError, match="resume.*overwrite"):
        run(tmp_path, "r", cfg)
    res = run(tmp_path, "r", cfg, overwrite=True)
    assert (tmp_path / "r" / "notes.txt").read_text() == "mine"  # only the trainer's files were replaced
    assert res.curves[0]["epoch"] == 1 and len(res.curves) == 3
    with pytest.raises(ConfigError, match="exclude each other"):
        run(tmp_path, "r", cfg, overwrite=True, resume=True)


# -------------------------------------------------------------------------------------------- outputs
def test_run_folder_contents(tmp_path):
    res = run(tmp_path, "out")
    out = tmp_path / "out"
    for name in ("config.yaml", "versions.json", "curves.csv", "training.json", "model.safetensors",
                 "predictions_val.npy", "predictions_test.npy"):
        assert (out / name).is_file(), name
    versions = json.loads((out / "versions.json").read_text())
    assert versions["seed"] == 0 and versions["torch"] == torch.__version__ and "python" in versions
    with open(out / "curves.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert set(CURVE_COLUMNS) <= set(rows[0])
    assert [r["stage"] for r in rows] == ["stage1"] * 3 + ["stage2"] * 2
    assert [int(r["step"]) for r in rows] == [4, 8, 12, 16, 20]  # 64 images / batch 16, cumulative
    pred = np.load(out / "predictions_test.npy")
    assert pred.shape == (16, 10) and pred.dtype == np.float32
    np.testing.assert_array_equal(pred, res.predictions["test"])
    ds, _ = make_dataset()
    assert res.metrics["test_mean_r"] == pytest.approx(float(np.mean(pearson_r(ds.test.responses, pred))))
    # checkpoints hold only safetensors and JSON: nothing that needs unpickling
    files = [p for p in (out / "checkpoints").rglob("*") if p.is_file()]
    assert files and all(p.suffix in (".safetensors", ".json") for p in files)
    summary = json.loads((out / "training.json").read_text())
    assert summary["pca_components"] == 10 and summary["n_features"] == 8 + 16


def test_stage2_fine_tunes_only_the_last_blocks(tmp_path):
    bb = backbone()
    before = {k: v.clone() for k, v in bb.state_dict().items()}
    run(tmp_path, "ft", bb=bb)
    after = bb.state_dict()
    assert torch.equal(before["b0.0.weight"], after["b0.0.weight"])  # frozen first block
    assert torch.equal(before["b0.1.running_mean"], after["b0.1.running_mean"])  # BN statistics frozen
    assert not torch.equal(before["b1.0.weight"], after["b1.0.weight"])  # last block trained


# ------------------------------------------------------------------------------------ optimisation
def test_stage1_reaches_the_ridge_solution_on_a_linear_ground_truth(tmp_path):
    from sklearn.linear_model import RidgeCV

    rng = np.random.default_rng(0)
    n_tr, n_va, n_te, d, v = 300, 60, 100, 20, 15
    X = rng.normal(size=(n_tr + n_va + n_te, d)).astype(np.float32)
    Y = (X @ rng.normal(size=(d, v)) + 2.0 * rng.normal(size=(len(X), v))).astype(np.float32)
    imgs = np.zeros((len(X), 4, 4, 3), np.uint8)
    cut = {"train": slice(0, n_tr), "val": slice(n_tr, n_tr + n_va), "test": slice(n_tr + n_va, None)}
    ids = [f"x{i}" for i in range(len(X))]
    ds = EncodingDataset("linear", {s: Split(ArrayImages(imgs[c], ids[c]), Y[c]) for s, c in cut.items()})
    feats = {s: {"pooled": X[c]} for s, c in cut.items()}
    cfg = apply_overrides(RunConfig(), ["backbone.layers=[pooled]", "model.lambda_align=0", "train.stage2.epochs=0",
                                        "train.stage1.epochs=30", "train.stage1.lr=0.05", "train.stage1.batch_size=32",
                                        "train.stage1.weight_decay=0", "train.stage1.early_stopping_patience=10",
                                        "train.device=cpu"])
    res = train_encoding_model(cfg, ds, features=feats, out_dir=tmp_path / "lin", show_progress=False)
    ridge = RidgeCV(alphas=np.logspace(-2, 4, 13)).fit(X[cut["train"]], Y[cut["train"]])
    r_ridge = float(np.mean(pearson_r(Y[cut["test"]], ridge.predict(X[cut["test"]]))))
    r_ours = res.metrics["test_mean_r"]
    assert r_ridge > 0.8
    assert r_ours > r_ridge - 0.005, (r_ours, r_ridge)


def test_early_stopping_restores_the_best_epoch(tmp_path):
    ds, _ = make_dataset(n_train=32, seed=3)
    rng = np.random.default_rng(0)  # features unrelated to the responses: validation r peaks early
    feats = {s: {"block0": rng.normal(size=(len(ds.splits[s]), 30)).astype(np.float32)} for s in ("train", "val", "test")}
    cfg = apply_overrides(RunConfig(), ["backbone.layers=[block0]", "model.lambda_align=0", "train.stage2.epochs=0",
                                        "train.stage1.epochs=60", "train.stage1.lr=0.05", "train.stage1.batch_size=8",
                                        "train.stage1.early_stopping_patience=3", "train.device=cpu",
                                        "train.stage1.schedule=constant"])
    res = train_encoding_model(cfg, ds, features=feats, out_dir=tmp_path / "es", show_progress=False)
    st = res.stages["stage1"]
    vals = [r["val_mean_r"] for r in res.curves]
    assert st["early_stopped"] and st["epochs_run"] < 60
    assert st["epochs_run"] == st["best_epoch"] + 3
    assert res.metrics["val_mean_r"] == pytest.approx(max(vals), abs=1e-6)
    assert st["best_epoch"] == int(np.argmax(vals)) + 1


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    common = ["model.lambda_align=0", "model.feature_dropout=0", "train.stage2.epochs=0", "train.stage1.epochs=3",
              "train.stage1.grad_clip=null"]
    big = run(tmp_path, "big", tiny_config(*common, "train.stage1.batch_size=16"))
    acc = run(tmp_path, "acc", tiny_config(*common, "train.stage1.batch_size=8", "train.stage1.grad_accum=2"))
    np.testing.assert_allclose(acc.predictions["test"], big.predictions["test"], atol=1e-5)
    assert [r["step"] for r in acc.curves] == [r["step"] for r in big.curves]


def test_lr_schedules():
    cfg = RunConfig().train.stage1
    cos = cfg.model_copy(update={"schedule": "cosine", "warmup_steps": 4})
    assert lr_factor(0, 100, 10, cos) == pytest.approx(0.25)
    assert lr_factor(3, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(4, 100, 10, cos) == pytest.approx(1.0)
    assert lr_factor(52, 100, 10, cos) == pytest.approx(0.5)
    assert lr_factor(100, 100, 10, cos) == pytest.approx(0.0)
    step = cfg.model_copy(update={"schedule": "step", "step_every": 2, "step_gamma": 0.5, "warmup_steps": 0})
    assert [lr_factor(s, 100, 10, step) for s in (0, 19, 20, 45)] == [1.0, 1.0, 0.5, 0.25]


# ------------------------------------------------------------------------------------------ errors
def test_input_errors_name_what_is_wrong(tmp_path):
    ds, text = make_dataset()
    with pytest.raises(ConfigError, match="lambda_align = 0.5 needs caption embeddings"):
        train_encoding_model(tiny_config(), ds, None, backbone(), out_dir=tmp_path / "e1", show_progress=False)
    bad = dict(text, train=text["train"][:5])
    with pytest.raises(DataValidationError, match=r"text_embeddings\['train'\].*\(64, dim\)"):
        train_encoding_model(tiny_config(), ds, bad, backbone(), out_dir=tmp_path / "e2", show_progress=False)
    no_val = EncodingDataset("x", {"train": ds.train, "test": ds.test})
    with pytest.raises(DataValidationError, match="validation split"):
        train_encoding_model(tiny_config(), no_val, text, backbone(), out_dir=tmp_path / "e3", show_progress=False)
    with pytest.raises(ConfigError, match="needs the image backbone"):
        train_encoding_model(tiny_config(), ds, text, None, out_dir=tmp_path / "e4", show_progress=False)
    feats = {s: {"block0": np.zeros((len(ds.splits[s]), 8), np.float32)} for s in ("train", "val", "test")}
    with pytest.raises(DataValidationError, match="'pooled' is missing.*alignment head"):
        train_encoding_model(tiny_config("train.stage2.epochs=0"), ds, text, None, feats, out_dir=tmp_path / "e5",
                             show_progress=False)
    with pytest.raises(ConfigError, match=r"diverged in stage 1, epoch 1.*train\.stage1\.lr"):
        run(tmp_path, "e6", tiny_config("train.stage2.epochs=0", "train.stage1.lr=1e30", "train.stage1.grad_clip=null"))


# ----------------------------------------------------------------------------------------- encoder
def test_encoder_fit_predict_on_features_and_images(tmp_path):
    ds, text = make_dataset()
    enc = LLMVEMEncoder(tiny_config()).fit(ds, text, backbone=backbone())
    pred = enc.predict(ds.test.images)
    np.testing.assert_allclose(pred, enc.result_.predictions["test"], atol=1e-6)
    np.testing.assert_allclose(enc.predict(ds.test.images.array), pred, atol=1e-6)
    assert enc.score(ds.test.images, ds.test.responses).shape == (10,)

    with torch.no_grad():
        bb = backbone().eval()
        feats = {s: {k: v.numpy() for k, v in bb(bb.preprocess(torch.from_numpy(ds.splits[s].images.array)),
                                                  ["block0", "pooled"]).items()} for s in ("train", "val", "test")}
    enc1 = LLMVEMEncoder(tiny_config("train.stage2.epochs=0")).fit(ds, text, features=feats,
                                                                    out_dir=tmp_path / "enc1")
    np.testing.assert_allclose(enc1.predict(feats["test"]), enc1.result_.predictions["test"], atol=1e-6)
    with pytest.raises(RuntimeError, match="pass features"):
        enc1.predict(ds.test.images)
