"""Text-to-brain readouts: fitting, the modality-gap shift, files, evaluation, the loader, the pipeline section.

The integration tests share one tiny experiment (:func:`tiny_run`, built once per test process by
``run_experiment``): a virtual brain of 150 training / 60 test images (48 px, 40 early-visual + 60 semantic
voxels), its exact scene descriptions as captions, MiniLM, EfficientNet-Lite0 (ImageNet weights) run at 96 px to
keep it fast, and LLM-VEM λ = 0.5 trained 20 stage-1 epochs.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import numpy as np
import pytest

import llmvem.inputs
import llmvem.pipeline
from llmvem.errors import CheckpointError, ConfigError, DataValidationError
from llmvem.estimators import model_name
from llmvem.evaluate.metrics import pearson_r
from llmvem.explain.text_to_brain import (
    READOUT_FILE,
    SUMMARY_FILE,
    LinearReadout,
    TextToBrain,
    aligned_image_outputs,
    evaluate_text_to_brain,
    fit_text_to_brain,
)

LAMBDA = 0.5
MODEL = model_name(LAMBDA)


# ------------------------------------------------------------------------------------ shared tiny run
def small_backbone(config=None):
    """EfficientNet-Lite0 with its ImageNet weights, run at 96 px (≈4× faster than 224 px on a CPU)."""
    from llmvem.embed.efficientnet import EfficientNetLite0Backbone

    backbone = EfficientNetLite0Backbone(pretrained=True)
    backbone.image_size = 96
    return backbone


def tiny_config(cache_dir: Path, **overrides: str):
    from llmvem.config import RunConfig, apply_overrides

    sets = {"data.n_train": "150", "data.n_test": "60", "data.image_size": "48",
            "data.loader_options": "{n_early: 40, n_semantic: 60}", "cache_dir": str(cache_dir),
            "backbone.layers": "[pooled]", "backbone.device": "cpu", "text.device": "cpu",
            "train.stage1.epochs": "20", "train.stage2.epochs": "0", "train.device": "cpu",
            "model.readout_l2": "0.1", "model.lambda_align": str(LAMBDA), "evaluate.baselines": "[]",
            "evaluate.bootstrap": "0", "evaluate.ridge_device": "cpu", "train.checkpoint_every": "100",
            **overrides}
    return apply_overrides(RunConfig(), [f"{k}={v}" for k, v in sets.items()])


_SHARED: dict = {}


def tiny_run() -> Path:
    """Experiment folder of the shared tiny run (built on first use, removed at exit)."""
    if "run" not in _SHARED:
        root = Path(tempfile.mkdtemp(prefix="llmvem-t2b-"))
        atexit.register(shutil.rmtree, root, True)
        with pytest.MonkeyPatch.context() as mp:
            mp.setattr(llmvem.inputs, "load_config_backbone", small_backbone)
            cfg = tiny_config(root / "cache")
            _SHARED["metrics"] = llmvem.pipeline.run_experiment(cfg, root / "run", show_progress=False)
        _SHARED.update(run=root / "run", root=root, config=cfg)
    return _SHARED["run"]


@pytest.fixture
def run_dir(monkeypatch) -> Path:
    """The shared tiny run; the model loader rebuilds the same 96-px backbone."""
    monkeypatch.setattr(llmvem.inputs, "load_config_backbone", small_backbone)
    return tiny_run()


# ------------------------------------------------------------------------------------- synthetic data
def _unit(x: np.ndarray) -> np.ndarray:
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


def _synthetic(n: int = 300, dim: int = 16, n_vox: int = 6, seed: int = 0):
    """Latent content Z drives the responses; image and text embeddings are Z seen from two offset cones."""
    rng = np.random.default_rng(seed)
    Z = rng.normal(size=(n, dim))
    c_img, c_txt = rng.normal(size=dim) * 2.0, rng.normal(size=dim) * 2.0
    A, T = _unit(Z * 0.3 + c_img), _unit(Z * 0.3 + c_txt)
    W = rng.normal(size=(dim, n_vox))
    Y = (Z @ W + 0.3 * rng.normal(size=(n, n_vox))).astype(np.float32) + 5.0
    split = {"train": slice(0, 200), "val": slice(200, 240), "test": slice(240, n)}
    return ({s: A[i] for s, i in split.items()}, {s: T[i] for s, i in split.items()},
            {s: Y[i] for s, i in split.items()}, Z, W)


def _fit_synthetic(**kw) -> tuple[TextToBrain, dict, dict, dict]:
    A, T, Y, _, _ = _synthetic(**kw)
    rois = {"last": np.array([False] * 3 + [True] * 3), "first": np.array([True] * 3 + [False] * 3)}
    t2b = fit_text_to_brain(A, T, Y, text_encoder="minilm", roi_masks=rois, info={"model": "synthetic"})
    return t2b, A, T, Y


# -------------------------------------------------------------------------------------------- unit tests
def test_aligned_readout_predicts_text_and_the_gap_shift_fixes_the_level():
    t2b, A, T, Y = _fit_synthetic()
    assert t2b.info["n_fit"] == 240 and t2b.info["fit_splits"] == ["train", "val"]
    pred = t2b.predict(T["test"], "aligned")
    r = pearson_r(Y["test"], pred)
    assert r.min() > 0.8  # the readout fitted on image embeddings transfers to text embeddings
    # The shift (mean image − mean text embedding) puts text predictions at the response level of the images;
    # without it they land far off, with the same correlation.
    unshifted = t2b.aligned.predict(_unit(T["test"]))
    assert np.abs(pred.mean(0) - Y["test"].mean(0)).max() < 0.5
    assert np.abs(unshifted.mean(0) - Y["test"].mean(0)).max() > 1.0
    np.testing.assert_allclose(pearson_r(Y["test"], unshifted), r, atol=1e-4)
    # The direct text readout works on its own modality.
    assert pearson_r(Y["test"], t2b.predict(T["test"], "text")).min() > 0.8


def test_readout_matches_ridge_cv_and_rows_are_normalised():
    from llmvem.model.ridge import RidgeCV

    t2b, A, T, Y = _fit_synthetic()
    X = np.concatenate([T["train"], T["val"]])
    ridge = RidgeCV(alphas=t2b.info["alphas"], cv=5, device="cpu", progress_bar=False).fit(
        X, np.concatenate([Y["train"], Y["val"]]))
    np.testing.assert_allclose(t2b.text.predict(T["test"]), ridge.predict(T["test"]), rtol=1e-5, atol=1e-4)
    np.testing.assert_array_equal(t2b.text.alphas, ridge.best_alphas_)
    # Embeddings are re-normalised before the readout: scaling the input changes nothing.
    np.testing.assert_allclose(t2b.predict(3.0 * T["test"], "text"), t2b.predict(T["test"], "text"), atol=1e-4)


def test_save_load_roundtrip_is_exact_and_pickle_free(tmp_path):
    t2b, A, T, Y = _fit_synthetic()
    t2b.save(tmp_path, {"n_test": 60})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([READOUT_FILE, SUMMARY_FILE])
    back = TextToBrain.load(tmp_path)
    for readout in ("aligned", "text"):
        np.testing.assert_array_equal(back.predict(T["test"], readout), t2b.predict(T["test"], readout))
    assert back.text_encoder == "minilm" and back.info["model"] == "synthetic"
    assert list(back.roi_masks) == ["last", "first"]  # the dataset's order, not the file's sorted keys
    assert back.roi_masks["last"].tolist() == [False] * 3 + [True] * 3
    summary = json.loads((tmp_path / SUMMARY_FILE).read_text())
    assert "modality-gap" in summary["mapping"]["aligned"] and summary["evaluation"] == {"n_test": 60}
    assert "240 training images" in back.mapping_statement("aligned")


def test_errors_name_what_was_expected(tmp_path):
    t2b, A, T, Y = _fit_synthetic()
    with pytest.raises(DataValidationError, match=r"expected shape \(n_texts, 16\)"):
        t2b.predict(np.zeros((2, 5)), "aligned")
    with pytest.raises(ConfigError, match="readout"):
        t2b.predict(T["test"], "voxels")  # type: ignore[arg-type]
    with pytest.raises(CheckpointError, match="--fit-readouts"):
        TextToBrain.load(tmp_path)
    with pytest.raises(ConfigError, match="test split"):
        fit_text_to_brain(A, T, Y, text_encoder="minilm", fit_splits=("train", "test"))
    with pytest.raises(DataValidationError, match="missing split 'val'"):
        fit_text_to_brain({"train": A["train"]}, T, Y, text_encoder="minilm")
    with pytest.raises(DataValidationError, match="texts"):
        t2b.encode([], encoder=None)


def test_evaluation_scores_each_predictor_per_roi():
    t2b, A, T, Y = _fit_synthetic()
    image_pred = Y["test"] + np.random.default_rng(1).normal(size=Y["test"].shape).astype(np.float32)
    ev = evaluate_text_to_brain(t2b, Y["test"], T["test"], image_predictions=image_pred,
                                aligned_embeddings_test=A["test"], noise_ceiling=np.full(6, 0.9))
    assert list(ev["predictors"]) == ["image", "text_aligned", "text_readout", "aligned_image"]
    assert ev["metric"] == "mean_accuracy" and ev["n_test"] == 60
    r_text = pearson_r(Y["test"], t2b.predict(T["test"], "aligned"))
    s = ev["predictors"]["text_aligned"]["summary"]
    assert s["per_roi"]["first"]["mean_r"] == pytest.approx(r_text[:3].mean(), abs=1e-6)
    assert s["mean_accuracy"] == pytest.approx(np.mean(np.minimum(100 * r_text**2 / 0.9, 100)), rel=1e-5)
    r_img = pearson_r(Y["test"], image_pred)
    assert ev["predictors"]["image"]["summary"]["mean_r"] == pytest.approx(r_img.mean(), abs=1e-6)


def test_linear_readout_checks_its_input():
    ro = LinearReadout(np.ones((3, 2), np.float32), np.array([1.0, -1.0], np.float32), np.ones(2))
    np.testing.assert_allclose(ro.predict(np.array([[1.0, 2.0, 3.0]])), [[7.0, 5.0]])
    with pytest.raises(DataValidationError, match=r"\(n, 3\)"):
        ro.predict(np.ones((1, 4)))


def test_select_text_model_chooses_on_validation_among_aligned_models(tmp_path):
    from llmvem.config import RunConfig
    from llmvem.explain import select_text_model

    for name, lam, val_r in (("llmvem_lambda0", 0.0, 0.9), ("llmvem_lambda0.1", 0.1, 0.3),
                             ("llmvem_lambda0.5", 0.5, 0.4)):
        d = tmp_path / "models" / name
        d.mkdir(parents=True)
        (d / "config.yaml").write_text("{}")
        (d / "model.safetensors").write_bytes(b"")
        (d / "training.json").write_text(json.dumps({"lambda_align": lam, "metrics": {"val_mean_r": val_r}}))
    cfg = RunConfig()
    cfg.model.lambda_align = 0.1  # the configured λ does not override the rule: the best λ > 0 by validation r
    assert select_text_model(tmp_path, cfg).name == "llmvem_lambda0.5"
    cfg.model.lambda_align = 0.0
    assert select_text_model(tmp_path, cfg).name == "llmvem_lambda0.5"
    assert select_text_model(tmp_path / "nowhere", cfg) is None


# ---------------------------------------------------------------------------------- integration (slow)
@pytest.mark.slow
def test_loaded_model_reproduces_the_trained_predictions(run_dir):
    from llmvem.train.load import load_trained_model

    model_dir = run_dir / "models" / MODEL
    enc = load_trained_model(model_dir)
    ds = llmvem.inputs.load_config_dataset(enc.config)
    saved = np.load(model_dir / "predictions_test.npy")
    first = ds.test.images.subset(np.arange(16))
    np.testing.assert_allclose(enc.predict(first), saved[:16], atol=1e-5)
    # The aligned embeddings from images equal those from cached features (same frozen backbone).
    feats = llmvem.inputs.extract_split_features(enc.config, ds, enc.backbone_, show_progress=False)
    _, e_img = aligned_image_outputs(enc, images=first)
    v_feat, e_feat = aligned_image_outputs(enc, features=feats["test"], images=ds.test.images)
    np.testing.assert_allclose(e_img, e_feat[:16], atol=1e-4)
    np.testing.assert_allclose(v_feat, saved, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(e_img, axis=1), 1.0, atol=1e-5)
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_trained_model(run_dir)  # the experiment folder is not a model folder


@pytest.mark.slow
def test_text_predicts_semantic_voxels_and_early_visual_much_less(run_dir):
    """Held-out test images predicted from their captions alone, on the virtual brain."""
    summary = json.loads((run_dir / "models" / MODEL / SUMMARY_FILE).read_text())
    preds = summary["evaluation"]["predictors"]
    roi = {name: {k: p["summary"]["per_roi"][k]["mean_r"] for k in ("early_visual", "semantic")}
           for name, p in preds.items()}
    acc = {name: {k: p["summary"]["per_roi"][k]["mean_accuracy"] for k in ("early_visual", "semantic")}
           for name, p in preds.items()}
    print("mean r per ROI:", json.dumps(roi, indent=1), "\naccuracy %:", json.dumps(acc, indent=1))
    for name in ("text_aligned", "text_readout"):
        assert roi[name]["semantic"] > 0.55  # semantic voxels are predictable from text...
        assert roi[name]["semantic"] > roi[name]["early_visual"] + 0.15  # ...early visual much less so
        assert acc[name]["semantic"] > 2.0 * acc[name]["early_visual"]
    # Relative to the image-driven prediction, text gains on semantic voxels and not on early visual ones.
    gain = {k: roi["text_aligned"][k] - roi["image"][k] for k in ("early_visual", "semantic")}
    assert gain["semantic"] > 0.2 and gain["semantic"] > gain["early_visual"] + 0.2


@pytest.mark.slow
def test_pipeline_writes_both_report_sections(run_dir):
    sections = run_dir / "extra_sections"
    t2b_sec = json.loads((sections / "text_to_brain.json").read_text())
    assert t2b_sec["title"] == "Text-to-brain predictions" and t2b_sec["figures"] == ["text_to_brain_rois.png"]
    assert (sections / "text_to_brain_rois.png").stat().st_size > 5000
    text = json.dumps(t2b_sec["blocks"])  # data blocks, rendered escaped by the report
    assert "modality-gap" in text and "early_visual" in text
    assert (sections / "voxel_descriptions.json").is_file()
    page = (run_dir / "report" / "index.html").read_text(encoding="utf-8")
    assert "Text-to-brain predictions" in page and "Voxel descriptions" in page
    assert "text_to_brain_rois.png" in page
    assert _SHARED["metrics"]["timing"]["stages"]["text_to_brain"] > 0


@pytest.mark.slow
def test_flag_off_leaves_no_sections(tmp_path, monkeypatch):
    monkeypatch.setattr(llmvem.inputs, "load_config_backbone", small_backbone)
    tiny_run()
    cfg = tiny_config(_SHARED["root"] / "cache", **{"evaluate.text_to_brain": "false", "train.stage1.epochs": "1"})
    llmvem.pipeline.run_experiment(cfg, tmp_path / "off", show_progress=False, report=False)
    assert not (tmp_path / "off" / "extra_sections" / "text_to_brain.json").exists()
    assert not (tmp_path / "off" / "models" / MODEL / READOUT_FILE).exists()
