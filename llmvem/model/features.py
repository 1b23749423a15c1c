"""Readout features: one concatenation of layers and one feature standardiser for every model.

The LLM-VEM network, the multi-subject network, the ridge baseline and the benchmarks all z-score the
concatenated layer features with statistics of the **training rows only**, each standard deviation floored at
``STD_FLOOR`` × the median of the positive ones (see :func:`llmvem.utils.floored_std`). Keeping this in one place
means a layer set chosen on validation data is chosen under the same standardisation it is then fitted with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from llmvem.utils import floored_std

__all__ = ["FeatureStandardizer", "concat_features"]


def concat_features(features: Mapping[str, np.ndarray], layers: Sequence[str]) -> np.ndarray:
    """Concatenate the named layers' features along the feature axis.

    Parameters
    ----------
    features : mapping of layer to array of shape (n_images, d_layer) (or (n_images, ...), flattened)
    layers : sequence of str
        Layers in concatenation order.

    Returns
    -------
    array of shape (n_images, Σ d_layer), float32
    """
    missing = [k for k in layers if k not in features]
    if missing:
        raise KeyError(f"features lack layers {missing} (have {sorted(features)})")
    parts = [np.asarray(features[k], dtype=np.float32) for k in layers]
    return np.concatenate([p.reshape(p.shape[0], -1) for p in parts], axis=1)


class FeatureStandardizer:
    """z-score features with training statistics; each std floored at ``STD_FLOOR`` × median positive std.

    Attributes (after :meth:`fit`)
    ------------------------------
    mean_ : array of shape (n_features,), float32
    std_ : array of shape (n_features,), float32
        Population std (ddof = 0) of the training rows, floored.
    """

    def fit(self, X: np.ndarray) -> FeatureStandardizer:
        """Fit on training rows ``X`` of shape (n_train, n_features) (statistics in float64)."""
        x = np.asarray(X, dtype=np.float64)
        if x.ndim != 2 or x.shape[0] == 0:
            raise ValueError(f"X: expected shape (n_train, n_features) with n_train > 0, got {x.shape}")
        self.mean_ = x.mean(axis=0).astype(np.float32)
        self.std_ = floored_std(x.std(axis=0)).astype(np.float32)
        return self

    def transform(self, X: np.ndarray) -> np.ndarray:
        """``(X - mean_) / std_``, float32, shape of ``X``."""
        if not hasattr(self, "mean_"):
            raise RuntimeError("FeatureStandardizer: call fit(X_train) before transform")
        x = np.asarray(X, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.mean_.shape[0]:
            raise ValueError(f"X: expected shape (n, {self.mean_.shape[0]}), got {x.shape}")
        return (x - self.mean_) / self.std_

    def fit_transform(self, X: np.ndarray) -> np.ndarray:
        return self.fit(X).transform(X)
