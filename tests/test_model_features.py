import numpy as np
import pytest

from llmvem.model.features import FeatureStandardizer, concat_features
from llmvem.utils import STD_FLOOR


def test_standardizer_uses_training_rows_and_floors_std():
    rng = np.random.default_rng(0)
    X = rng.normal(size=(50, 6)).astype(np.float32) * np.array([1, 2, 3, 4, 5, 1e-9], dtype=np.float32)
    st = FeatureStandardizer().fit(X)
    z = st.transform(X)
    np.testing.assert_allclose(z[:, :5].mean(axis=0), 0, atol=1e-5)
    np.testing.assert_allclose(z[:, :5].std(axis=0), 1, atol=1e-4)
    med = float(np.median(X.astype(np.float64).std(axis=0)))
    assert st.std_[5] == pytest.approx(STD_FLOOR * med, rel=1e-5)
    # statistics depend on the fitted rows only
    Xt = rng.normal(size=(10, 6)).astype(np.float32) * 1e6
    before = (st.mean_.copy(), st.std_.copy())
    st.transform(Xt)
    np.testing.assert_array_equal(before[0], st.mean_)
    with pytest.raises(ValueError, match="expected shape"):
        st.transform(X[:, :3])


def test_concat_features_order_and_missing():
    f = {"a": np.ones((3, 2)), "b": np.zeros((3, 1, 2))}
    x = concat_features(f, ["b", "a"])
    assert x.shape == (3, 4) and x.dtype == np.float32
    np.testing.assert_array_equal(x[:, :2], 0)
    with pytest.raises(KeyError, match="c"):
        concat_features(f, ["c"])
