"""Estimators: scikit-learn clone/get_params, ridge numbers, validation, fit_inputs/predict_inputs."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.base import clone
from test_train_cli import frozen_features
from test_train_trainer import backbone, make_dataset, tiny_config

from llmvem.errors import DataValidationError
from llmvem.estimators import LLMVEMEncoder, MultiSubjectEncoder, RidgeEncoder
from llmvem.inputs import PreparedInputs
from llmvem.model.ridge import RidgeCV
from llmvem.utils import floored_std


@pytest.mark.parametrize("make", [
    lambda: RidgeEncoder(layers=["block0"], alphas=[0.1, 10.0], cv=3, device="cpu"),
    lambda: LLMVEMEncoder(tiny_config(), out_dir="somewhere", resume=True),
    lambda: MultiSubjectEncoder(tiny_config(), show_progress=True),
])
def test_clone_and_params_round_trip(make):
    est = make()
    params = est.get_params()
    twin = clone(est)
    assert type(twin) is type(est) and twin is not est
    got = twin.get_params()
    assert set(got) == set(params)
    for k, v in params.items():
        assert got[k] == v if not isinstance(v, np.ndarray) else np.array_equal(got[k], v)
    assert not hasattr(twin, "ridge_") and not hasattr(twin, "network_") and not hasattr(twin, "result_")
    key = next(iter(params))
    assert twin.set_params(**{key: params[key]}) is twin
    with pytest.raises(ValueError):
        twin.set_params(no_such_parameter=1)


def test_ridge_encoder_equals_the_former_baseline_and_accepts_layer_dicts():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=(60, 5)) * [1, 2, 3, 1e-4, 5], rng.normal(size=(60, 3))
    Y = a @ rng.normal(size=(5, 4)) + 0.1 * rng.normal(size=(60, 4))
    X = np.concatenate([a, b], 1).astype(np.float32)
    # the ridge baseline of llmvem before the estimators: z-score with floored std, then RidgeCV
    mu, sd = X.mean(0), floored_std(X.std(0)).astype(np.float32)
    ref = RidgeCV(alphas=[0.1, 1, 10], cv=3, device="cpu", progress_bar=False).fit((X - mu) / sd, Y)
    ridge = RidgeEncoder(layers=["a", "b"], alphas=[0.1, 1, 10], cv=3, device="cpu").fit({"a": a, "b": b}, Y)
    np.testing.assert_allclose(ridge.predict({"a": a, "b": b}), ref.predict((X - mu) / sd), rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(ridge.best_alphas_, ref.best_alphas_)
    np.testing.assert_allclose(ridge.predict(X), ridge.predict({"b": b, "a": a}), atol=1e-6)  # layer order kept
    assert ridge.n_features_in_ == 8 and ridge.score(X, Y).shape == (4,) and ridge.score(X, Y).mean() > 0.9


def test_ridge_encoder_errors_name_the_problem():
    with pytest.raises(RuntimeError, match="call fit"):
        RidgeEncoder().predict(np.zeros((2, 3)))
    with pytest.raises(DataValidationError, match="layers"):
        RidgeEncoder().fit({"a": np.zeros((5, 2))}, np.zeros((5, 1)))
    with pytest.raises(DataValidationError, match=r"\(4, n_voxels\)"):
        RidgeEncoder(cv=2).fit(np.zeros((4, 2)), np.zeros((5, 1)))


def test_fit_inputs_predicts_val_and_test_and_records_the_fit_splits():
    ds, text = make_dataset()
    inputs = PreparedInputs(ds, {}, {}, text, backbone(), frozen_features(ds))
    ridge = RidgeEncoder(layers=["block0"], cv=3, device="cpu").fit_inputs(inputs)
    preds = ridge.predict_inputs(inputs)
    assert sorted(preds) == ["test", "val"] and preds["test"].shape == (16, 10)
    assert ridge.fit_splits_ == ("train", "val")
    cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=1")
    enc = LLMVEMEncoder(cfg).fit_inputs(inputs)
    p = enc.predict_inputs(inputs)
    np.testing.assert_allclose(p["test"], enc.predict(inputs.features["test"]), atol=1e-5)
    assert enc.fit_splits_ == ("train",)


def test_ridge_encoder_save_load_round_trip(tmp_path):
    """``llmvem predict --model ridge`` reads a saved ridge: same predictions, same alphas, layers kept."""
    from llmvem.errors import CheckpointError

    rng = np.random.default_rng(0)
    X = {"a": rng.standard_normal((40, 6)).astype(np.float32), "b": rng.standard_normal((40, 3)).astype(np.float32)}
    Y = X["a"][:, :2] @ rng.standard_normal((2, 5)) + 0.1 * rng.standard_normal((40, 5))
    ridge = RidgeEncoder(layers=["b", "a"], cv=3).fit(X, Y)
    ridge.save(tmp_path)
    loaded = RidgeEncoder.load(tmp_path)
    assert loaded.layers == ["b", "a"]
    np.testing.assert_array_equal(loaded.best_alphas_, ridge.best_alphas_)
    np.testing.assert_allclose(loaded.predict(X), ridge.predict(X), rtol=1e-6)
    with pytest.raises(CheckpointError, match="ridge.npz: missing"):
        RidgeEncoder.load(tmp_path / "nowhere")


def test_readout_aligned_lambda0_head_takes_the_caption_size_through_fit_inputs():
    """With ``model.readout_aligned`` the λ = 0 baseline has the λ > 0 model's architecture: fit_inputs hands it
    the caption embeddings so its head projects to the caption size (no contrastive term at λ = 0)."""
    ds, text = make_dataset()
    inputs = PreparedInputs(ds, {}, {}, text, backbone(), frozen_features(ds))
    dims = {}
    for lam in (0.0, 0.5):
        cfg = tiny_config("train.stage2.epochs=0", "train.stage1.epochs=1", "model.readout_aligned=true",
                          f"model.lambda_align={lam}")
        net = LLMVEMEncoder(cfg).fit_inputs(inputs).network_
        dims[lam] = (net.head.proj.out_features, net.readout.n_features)
    assert dims[0.0] == dims[0.5] and dims[0.0][0] == text["train"].shape[1]
