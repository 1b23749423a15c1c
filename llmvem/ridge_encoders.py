"""Linear encoding models on frozen features: :class:`RidgeEncoder` (voxelwise ridge) and
:class:`BandedRidgeEncoder` (banded ridge, one band per layer or feature space), scikit-learn-style estimators with
the experiment runner's ``fit_inputs``/``predict_inputs`` (see :mod:`llmvem.estimators`), both on the project's
one ridge solver (:mod:`llmvem.model.ridge`).

Examples
--------
>>> from llmvem.ridge_encoders import RidgeEncoder
>>> ridge = RidgeEncoder(layers=["block5"], cv=3).fit(features_train, Y_train)   # doctest: +SKIP
>>> r = ridge.score(features_test, Y_test)                                        # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.model.features import FeatureStandardizer, concat_features
from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

if TYPE_CHECKING:
    from llmvem.config import RunConfig
    from llmvem.data.images import ImageCollection
    from llmvem.inputs import PreparedInputs

__all__ = ["BANDED_FILE", "PREDICT_SPLITS", "RIDGE_FILE", "BandedRidgeEncoder", "RidgeEncoder"]

#: Splits whose predictions ``predict_inputs`` returns.
PREDICT_SPLITS = ("val", "test")
#: File of a saved :class:`RidgeEncoder` in its model folder (``models/ridge/``).
RIDGE_FILE = "ridge.npz"


#: File of a saved :class:`BandedRidgeEncoder` in its model folder.
BANDED_FILE = "banded_ridge.npz"


# ------------------------------------------------------------------------------------------------- ridge
class RidgeEncoder(BaseEstimator):
    """Voxelwise ridge on frozen features: one standardiser, then :class:`~llmvem.model.ridge.RidgeCV` with a
    per-voxel alpha chosen by K-fold cross-validation.

    Parameters
    ----------
    layers : sequence of str, optional
        Layers concatenated (in this order) when ``X`` is a dict of layer to features; required then.
    alphas : array of shape (n_alphas,), optional
        Regularisation strengths to try; default ``llmvem.model.ridge.DEFAULT_ALPHAS`` (1e-2 ... 1e7).
    cv : int or splitter
        Folds of the alpha search (contiguous ``KFold(cv)`` for an int).
    device : str
        Device of the ridge solver (``"auto"``, ``"cpu"``, ``"cuda"``).
    fit_splits : sequence of str
        Splits :meth:`fit_inputs` fits on (default train + val, the baseline of ``llmvem demo``).
    progress_bar : bool

    Attributes
    ----------
    standardizer_ : FeatureStandardizer
        Fitted on the training rows.
    ridge_ : RidgeCV
    best_alphas_ : array of shape (n_voxels,)
    n_features_in_ : int
    fit_splits_ : tuple of str
        Set by :meth:`fit_inputs`.
    """

    def __init__(self, layers: Sequence[str] | None = None, alphas: Sequence[float] | np.ndarray | None = None,
                 cv: Any = 5, device: str = "auto", fit_splits: Sequence[str] = ("train", "val"),
                 progress_bar: bool = False):
        self.layers = layers
        self.alphas = alphas
        self.cv = cv
        self.device = device
        self.fit_splits = fit_splits
        self.progress_bar = progress_bar

    @classmethod
    def from_config(cls, config: RunConfig, layers: Sequence[str] | None = None) -> RidgeEncoder:
        """The ridge baseline ``config.evaluate`` describes, on ``layers`` (default ``config.backbone.layers``)."""
        e = config.evaluate
        return cls(layers=list(layers or config.backbone.layers), alphas=e.ridge_alphas, cv=e.ridge_folds,
                   device=e.ridge_device)

    def _matrix(self, X: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        if isinstance(X, Mapping):
            if not self.layers:
                raise DataValidationError(None, "layers", "X is a dict of layer features but RidgeEncoder(layers=...)"
                                          " is empty; name the layers to concatenate")
            return concat_features(X, list(self.layers))
        x = np.asarray(X, dtype=np.float32)
        if x.ndim != 2:
            raise DataValidationError(None, "X", f"expected an array of shape (n_images, n_features), got {x.shape}")
        return x

    def fit(self, X: np.ndarray | Mapping[str, np.ndarray], Y: Any) -> RidgeEncoder:
        """Fit the standardiser and the ridge.

        Parameters
        ----------
        X : array of shape (n_images, n_features), or dict of layer to array (n_images, d_layer)
        Y : array of shape (n_images, n_voxels), or :class:`~llmvem.model.ridge.RowStack` of such arrays
        """
        from llmvem.model.ridge import RowStack

        x = self._matrix(X)
        y = Y if isinstance(Y, RowStack) else np.asarray(Y)
        if y.ndim != 2 or y.shape[0] != x.shape[0]:
            raise DataValidationError(None, "Y", f"expected shape ({x.shape[0]}, n_voxels) to match X {x.shape}, "
                                      f"got {y.shape}")
        self.standardizer_ = FeatureStandardizer().fit(x)
        alphas = DEFAULT_ALPHAS if self.alphas is None else self.alphas
        self.ridge_ = RidgeCV(alphas=alphas, cv=self.cv, device=self.device,
                              progress_bar=self.progress_bar).fit(self.standardizer_.transform(x), y)
        self.best_alphas_ = self.ridge_.best_alphas_
        self.n_features_in_ = x.shape[1]
        return self

    def predict(self, X: np.ndarray | Mapping[str, np.ndarray]) -> np.ndarray:
        """Predicted responses, array of shape (n_images, n_voxels), float32."""
        if not hasattr(self, "ridge_"):
            raise RuntimeError("RidgeEncoder: call fit() before predict()")
        return np.asarray(self.ridge_.predict(self.standardizer_.transform(self._matrix(X))), dtype=np.float32)

    def score(self, X: np.ndarray | Mapping[str, np.ndarray], Y: np.ndarray) -> np.ndarray:
        """Pearson r per voxel between ``Y`` (n_images, n_voxels) and the predictions, shape (n_voxels,)."""
        return pearson_r(np.asarray(Y), self.predict(X))

    def fit_inputs(self, inputs: PreparedInputs) -> RidgeEncoder:
        """Fit on the concatenated ``fit_splits`` of prepared inputs (frozen features, responses)."""
        ds = inputs.dataset
        splits = tuple(s for s in self.fit_splits if s in ds.splits)
        from llmvem.model.ridge import RowStack

        X = np.concatenate([self._matrix(inputs.features[s]) for s in splits])
        self.fit(X, RowStack([ds.splits[s].responses for s in splits]))  # the responses are never copied whole
        self.fit_splits_ = splits
        return self

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        """Predictions of the ``val`` and ``test`` splits of prepared inputs."""
        return {s: self.predict(inputs.features[s]) for s in PREDICT_SPLITS if s in inputs.dataset.splits}

    def predict_new(self, images: ImageCollection, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Predictions for images outside the splits (challenge test images), from their frozen ``features``
        (dict of layer to array (n, d_layer)); ``images`` is unused. Returns (n, n_voxels), float32."""
        return self.predict(features)

    def save(self, folder: str | Path) -> Path:
        """Write the fitted standardiser and ridge to ``folder/RIDGE_FILE`` (``llmvem predict --model ridge``)."""
        if not hasattr(self, "ridge_"):
            raise RuntimeError("RidgeEncoder: call fit() before save()")
        from llmvem.utils import atomic_write

        path = Path(folder) / RIDGE_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_write(path, "wb") as fh:
            np.savez(fh, mean=self.standardizer_.mean_, std=self.standardizer_.std_, coef=self.ridge_.coef_,
                     intercept=self.ridge_.intercept_, best_alphas=self.best_alphas_,
                     layers=np.array(list(self.layers or []), dtype=str))
        return path

    def map_coefficients(self, folder: str | Path) -> bool:
        """Read ``coef_`` from the file :meth:`save` wrote in ``folder``, memory-mapped read-only, and drop the
        in-memory copy (0.23 GB for one NSD subject): predictions are unchanged, and the next model's fit does
        not sit on it. Returns whether it was mapped (False when the file does not hold these coefficients)."""
        from llmvem.utils import npz_memmap

        path = Path(folder) / RIDGE_FILE
        coef = self.ridge_.coef_
        mapped = npz_memmap(path, "coef") if path.is_file() else None
        # a spot check of the first and last row ends (a column would fault in every row of the file)
        if mapped is None or mapped.shape != coef.shape or mapped.dtype != coef.dtype or mapped.size and \
                not (np.array_equal(mapped[0, :8], coef[0, :8]) and np.array_equal(mapped[-1, -8:], coef[-1, -8:])):
            return False
        self.ridge_.coef_ = mapped
        return True

    @classmethod
    def load(cls, folder: str | Path) -> RidgeEncoder:
        """A fitted encoder read from ``folder/RIDGE_FILE`` (written by :meth:`save`).

        Raises
        ------
        CheckpointError
            The file is missing or lacks a field.
        """
        from llmvem.errors import CheckpointError

        path = Path(folder) / RIDGE_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; expected a ridge model saved by the experiment runner")
        with np.load(path, allow_pickle=False) as z:
            missing = [k for k in ("mean", "std", "coef", "intercept", "best_alphas", "layers") if k not in z.files]
            if missing:
                raise CheckpointError(f"{path}: field {missing[0]!r} missing; expected a file written by "
                                      "RidgeEncoder.save")
            enc = cls(layers=[str(x) for x in z["layers"]] or None)
            enc.standardizer_ = FeatureStandardizer()
            enc.standardizer_.mean_, enc.standardizer_.std_ = z["mean"], z["std"]
            ridge = RidgeCV(alphas=np.unique(z["best_alphas"]))
            ridge.coef_, ridge.intercept_ = z["coef"], z["intercept"]
            ridge.best_alphas_, ridge.n_features_in_, ridge._ravel = z["best_alphas"], int(z["coef"].shape[0]), False
        enc.ridge_, enc.best_alphas_, enc.n_features_in_ = ridge, ridge.best_alphas_, ridge.n_features_in_
        return enc




# ------------------------------------------------------------------------------------------- banded ridge
class BandedRidgeEncoder(BaseEstimator):
    """Banded ridge on frozen features (:class:`~llmvem.model.banded.BandedRidgeCV`): one band per layer (or
    layer set, or feature space), each z-scored on its own, with each voxel's band weighting and α chosen by
    cross-validation — the layer choice of encoding studies made per voxel and soft.

    Parameters
    ----------
    bands : sequence of sequence of str
        The layers of each band (``[["block5@grid7"], ["block8@grid7"]]``); features of a band are concatenated.
    alphas : array, optional
        Default :data:`llmvem.model.ridge.DEFAULT_ALPHAS`.
    cv : int, splitter or ``"loo"``
    n_iter : int
        Random band weightings tried besides the equal one.
    random_state : int
    device : str
    fit_splits : sequence of str
        Splits :meth:`fit_inputs` fits on (default train + val, like :class:`RidgeEncoder`).
    progress_bar : bool

    Attributes
    ----------
    standardizers_ : list of FeatureStandardizer
    banded_ : BandedRidgeCV
    band_summary_ : dict
        ``bands`` (layer lists), ``mean_gamma`` (mean band weight over voxels) and ``dominant`` (fraction of voxels
        whose largest weight is each band's); recorded in ``metrics.json``.
    fit_splits_ : tuple of str
    """

    def __init__(self, bands: Sequence[Sequence[str]] | None = None,
                 alphas: Sequence[float] | np.ndarray | None = None, cv: Any = 5, n_iter: int = 20,
                 random_state: int = 0, device: str = "auto", fit_splits: Sequence[str] = ("train", "val"),
                 progress_bar: bool = False):
        self.bands = bands
        self.alphas = alphas
        self.cv = cv
        self.n_iter = n_iter
        self.random_state = random_state
        self.device = device
        self.fit_splits = fit_splits
        self.progress_bar = progress_bar

    @classmethod
    def from_config(cls, config: RunConfig, bands: Sequence[Sequence[str]], **kwargs: Any) -> BandedRidgeEncoder:
        """The banded ridge on ``bands`` with ``config.evaluate``'s α grid, folds and device."""
        e = config.evaluate
        return cls(bands=[list(b) for b in bands], alphas=e.ridge_alphas, cv=e.ridge_folds, device=e.ridge_device,
                   random_state=config.seed, **kwargs)

    def _band_list(self) -> list[list[str]]:
        if not self.bands or not all(self.bands):
            raise DataValidationError(None, "bands", "expected a list of bands, each a non-empty list of layers")
        return [list(b) for b in self.bands]

    def _matrices(self, X: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if not isinstance(X, Mapping):
            raise DataValidationError(None, "X", "expected a dict of layer to features (n_images, d_layer)")
        return [concat_features(X, band) for band in self._band_list()]

    def fit(self, X: Mapping[str, np.ndarray], Y: np.ndarray) -> BandedRidgeEncoder:
        """Fit one standardiser per band and the banded ridge.

        Parameters
        ----------
        X : dict of layer to array (n_images, d_layer)
        Y : array of shape (n_images, n_voxels)
        """
        from llmvem.model.banded import BandedRidgeCV

        mats = self._matrices(X)
        y = np.asarray(Y)
        if y.ndim != 2 or y.shape[0] != mats[0].shape[0]:
            raise DataValidationError(None, "Y", f"expected shape ({mats[0].shape[0]}, n_voxels), got {y.shape}")
        self.standardizers_ = [FeatureStandardizer().fit(m) for m in mats]
        alphas = DEFAULT_ALPHAS if self.alphas is None else self.alphas
        self.banded_ = BandedRidgeCV(alphas=alphas, n_iter=self.n_iter, cv=self.cv, random_state=self.random_state,
                                     device=self.device, progress_bar=self.progress_bar).fit(
            [s.transform(m) for s, m in zip(self.standardizers_, mats, strict=True)], y)
        g = self.banded_.best_gammas_
        self.band_summary_ = {"bands": self._band_list(), "mean_gamma": g.mean(1).tolist(),
                              "dominant": [float(np.mean(np.argmax(g, 0) == b)) for b in range(g.shape[0])]}
        return self

    def _scaled(self, X: Mapping[str, np.ndarray]) -> list[np.ndarray]:
        if not hasattr(self, "banded_"):
            raise RuntimeError("BandedRidgeEncoder: call fit() before predict()")
        return [s.transform(m) for s, m in zip(self.standardizers_, self._matrices(X), strict=True)]

    def predict(self, X: Mapping[str, np.ndarray]) -> np.ndarray:
        """Predicted responses, array of shape (n_images, n_voxels), float32."""
        return np.asarray(self.banded_.predict(self._scaled(X)), dtype=np.float32)

    def predict_bands(self, X: Mapping[str, np.ndarray]) -> np.ndarray:
        """Each band's share of the prediction, shape (n_bands, n_images, n_voxels) (without the intercept)."""
        return np.asarray(self.banded_.predict(self._scaled(X), split=True), dtype=np.float32)

    def score(self, X: Mapping[str, np.ndarray], Y: np.ndarray) -> np.ndarray:
        """Pearson r per voxel, shape (n_voxels,)."""
        return pearson_r(np.asarray(Y), self.predict(X))

    def fit_inputs(self, inputs: PreparedInputs) -> BandedRidgeEncoder:
        """Fit on the concatenated ``fit_splits`` of prepared inputs."""
        ds = inputs.dataset
        splits = tuple(s for s in self.fit_splits if s in ds.splits)
        layers = list(dict.fromkeys(k for band in self._band_list() for k in band))
        X = {k: np.concatenate([np.asarray(inputs.features[s][k]) for s in splits]) for k in layers}
        self.fit(X, np.concatenate([ds.splits[s].responses for s in splits]))
        self.fit_splits_ = splits
        return self

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        """Predictions of the ``val`` and ``test`` splits."""
        return {s: self.predict(inputs.features[s]) for s in PREDICT_SPLITS if s in inputs.dataset.splits}

    def predict_new(self, images: ImageCollection, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Predictions from the frozen ``features`` of images outside the splits; ``images`` is unused."""
        return self.predict(features)

    @property
    def layers(self) -> list[str]:
        """Every layer the bands read (what feature extraction must provide)."""
        return list(dict.fromkeys(k for band in self._band_list() for k in band))

    def save(self, folder: str | Path) -> Path:
        """Write the standardisers and the banded ridge to ``folder/BANDED_FILE``."""
        import json

        from llmvem.utils import atomic_write

        if not hasattr(self, "banded_"):
            raise RuntimeError("BandedRidgeEncoder: call fit() before save()")
        path = Path(folder) / BANDED_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        b = self.banded_
        arrays = {f"mean{i}": s.mean_ for i, s in enumerate(self.standardizers_)}
        arrays |= {f"std{i}": s.std_ for i, s in enumerate(self.standardizers_)}
        with atomic_write(path, "wb") as fh:
            np.savez(fh, coef=b.coef_, intercept=b.intercept_, best_gammas=b.best_gammas_,
                     best_alphas=b.best_alphas_, band_sizes=np.asarray(b.band_sizes_),
                     bands=np.array(json.dumps(self._band_list())), **arrays)
        return path

    @classmethod
    def load(cls, folder: str | Path) -> BandedRidgeEncoder:
        """A fitted encoder read from ``folder/BANDED_FILE`` (written by :meth:`save`).

        Raises
        ------
        CheckpointError
            The file is missing, lacks a field, or its bands are not a list of lists of layer names.
        """
        import json

        from llmvem.errors import CheckpointError
        from llmvem.model.banded import BandedRidgeCV

        path = Path(folder) / BANDED_FILE
        if not path.is_file():
            raise CheckpointError(f"{path}: missing; expected a banded ridge saved by the experiment runner")
        with np.load(path, allow_pickle=False) as z:
            need = ["coef", "intercept", "best_gammas", "best_alphas", "band_sizes", "bands"]
            missing = [k for k in need if k not in z.files]
            if missing:
                raise CheckpointError(f"{path}: field {missing[0]!r} missing; expected a file written by "
                                      "BandedRidgeEncoder.save")
            try:
                bands = json.loads(str(z["bands"]))
            except ValueError as exc:
                raise CheckpointError(f"{path}: field 'bands' is not JSON ({exc})") from exc
            if not isinstance(bands, list) or not all(isinstance(b, list) and b and all(isinstance(k, str) for k in b)
                                                      for b in bands):
                raise CheckpointError(f"{path}: field 'bands': expected a list of lists of layer names")
            enc = cls(bands=bands)
            enc.standardizers_ = []
            for i in range(len(bands)):
                if f"mean{i}" not in z.files or f"std{i}" not in z.files:
                    raise CheckpointError(f"{path}: field 'mean{i}' missing; expected one standardiser per band")
                st = FeatureStandardizer()
                st.mean_, st.std_ = z[f"mean{i}"], z[f"std{i}"]
                enc.standardizers_.append(st)
            b = BandedRidgeCV()
            b.coef_, b.intercept_ = z["coef"], z["intercept"]
            b.best_gammas_, b.best_alphas_ = z["best_gammas"], z["best_alphas"]
            b.band_sizes_ = [int(k) for k in z["band_sizes"]]
            b.n_features_in_ = int(b.coef_.shape[0])
        enc.banded_ = b
        return enc
