"""Leakage guards: nothing fitted may depend on the test split.

Each test fits twice, once on the data and once with the **test** responses and test features (and test images)
replaced by extreme values, and asserts that everything fitted is bit-identical: the PCA mean/basis of the
readout, the feature standardiser's statistics, ridge α and weights, and the early-stopping (best) epoch. A leak
(e.g. a standardiser fitted on train + test) makes the second fit differ, so these tests fail.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_train_cli import frozen_features
from test_train_trainer import backbone, make_dataset, tiny_config

from llmvem.data.dataset import Split
from llmvem.data.images import ArrayImages
from llmvem.estimators import LLMVEMEncoder, RidgeEncoder
from llmvem.inputs import PreparedInputs

EXTREME = 1e6


def _poisoned(inputs: PreparedInputs, feature_value: float = EXTREME) -> PreparedInputs:
    """The same inputs with test responses = 1e6 (alternating sign), test features = ``feature_value`` and test
    images = white noise; train and val untouched."""
    ds = inputs.dataset
    test = ds.test
    sign = np.where(np.arange(test.responses.size).reshape(test.responses.shape) % 2 == 0, 1.0, -1.0)
    rng = np.random.default_rng(99)
    images = ArrayImages(rng.integers(0, 256, test.images.array.shape, dtype=np.uint8), test.images.ids)
    poisoned_test = Split(images, (EXTREME * sign).astype(np.float32))
    bad_ds = replace(ds, splits={**ds.splits, "test": poisoned_test})
    features = {**inputs.features,
                "test": {k: np.full_like(v, feature_value) for k, v in inputs.features["test"].items()}}
    text = {**inputs.text_embeddings, "test": np.full_like(inputs.text_embeddings["test"], feature_value)}
    return PreparedInputs(bad_ds, inputs.captions, inputs.caption_info, text, inputs.backbone, features)


@pytest.fixture(scope="module")
def inputs() -> PreparedInputs:
    ds, text = make_dataset()
    return PreparedInputs(ds, {}, {}, text, backbone(), frozen_features(ds))


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    a, b = np.asarray(a), np.asarray(b)
    return a.shape == b.shape and a.dtype == b.dtype and a.tobytes() == b.tobytes()


@pytest.mark.parametrize("feature_value", [EXTREME, np.nan])
def test_ridge_alpha_weights_and_standardiser_ignore_the_test_split(inputs, feature_value):
    clean = RidgeEncoder(layers=["block0", "pooled"], alphas=[0.1, 1.0, 10.0, 100.0], cv=3, device="cpu")
    leaky = RidgeEncoder(**clean.get_params())
    clean.fit_inputs(inputs)
    leaky.fit_inputs(_poisoned(inputs, feature_value))
    for attr in ("mean_", "std_"):
        assert _same(getattr(clean.standardizer_, attr), getattr(leaky.standardizer_, attr)), attr
    for attr in ("best_alphas_", "cv_scores_", "coef_", "intercept_"):
        assert _same(getattr(clean.ridge_, attr), getattr(leaky.ridge_, attr)), attr
    assert clean.fit_splits_ == ("train", "val")  # fitted on train + val, never test
    # the two fits are the same model: identical predictions of the clean val and test features
    p_clean, p_leaky = clean.predict_inputs(inputs), leaky.predict_inputs(inputs)
    assert _same(p_clean["val"], p_leaky["val"]) and _same(p_clean["test"], p_leaky["test"])


def _state(enc: LLMVEMEncoder) -> dict[str, np.ndarray]:
    return {k: v.detach().cpu().numpy() for k, v in enc.network_.state_dict().items()}


@pytest.mark.parametrize("overrides", [
    ("train.stage2.epochs=0", "train.stage1.epochs=6", "train.stage1.early_stopping_patience=2"),
    ("train.stage1.epochs=2", "train.stage2.epochs=2"),
], ids=["stage1", "stage1+stage2"])
def test_llmvem_pca_standardiser_weights_and_best_epoch_ignore_the_test_split(inputs, overrides):
    cfg = tiny_config("model.readout=pca", "seed=0", *overrides)
    clean = LLMVEMEncoder(cfg).fit_inputs(inputs)
    leaky = LLMVEMEncoder(cfg).fit_inputs(_poisoned(inputs))
    a, b = _state(clean), _state(leaky)
    assert set(a) == set(b)
    # the PCA basis/mean of the readout and the standardiser's statistics are buffers of the state dict
    guarded = [k for k in a if k.endswith((".mean", ".basis")) or k.startswith("feature_")]
    assert any(k.endswith(".basis") for k in guarded) and "feature_mean" in guarded, sorted(a)
    for k in guarded:  # PCA mean/basis and standardiser statistics: fitted before training
        assert _same(a[k], b[k]), k
    for stage, summary in clean.result_.stages.items():  # early stopping: the same best epoch and score
        assert summary["best_epoch"] == leaky.result_.stages[stage]["best_epoch"], stage
        assert summary["best_val_mean_r"] == leaky.result_.stages[stage]["best_val_mean_r"], stage
    for k in a:  # and every trained weight
        assert _same(a[k], b[k]), k
    assert _same(clean.result_.predictions["val"], leaky.result_.predictions["val"])
