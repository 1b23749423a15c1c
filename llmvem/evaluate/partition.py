"""Variance partitioning: how much of each voxel's test variance image features and caption embeddings explain
uniquely, and how much they share.

The field's standard way to ask "does language add?" (Lescroart et al. 2015; de Heer et al. 2017; himalaya's
and the voxelwise tutorials' banded-ridge examples): three encoding models fitted on the same images —

* ``joint``: banded ridge with two bands, the image features and the caption embeddings (each z-scored; per-voxel
  band weights and α by cross-validation, :class:`llmvem.model.banded.BandedRidgeCV`),
* ``image``: ridge on the image features alone, ``language``: ridge on the caption embeddings alone —

scored by R² (``1 − SSE/SS``) on the **test** images. Then per voxel

``unique_image = R²_joint − R²_language``, ``unique_language = R²_joint − R²_image``,
``shared = R²_image + R²_language − R²_joint``.

Corrections, stated: sampling noise makes these estimates negative for voxels where a part is ~0, and a joint
model that over-fits can make ``R²_joint`` fall below one of its bands. Each model's R² is first floored at 0
(a model worse than the test mean explains nothing), ``R²_joint`` is raised to at least the larger single-band
R² (the joint model nests both), and each part is then floored at 0. Per ROI the means of the corrected parts are
reported (``*_r2``), with the raw means beside them (``raw_*``), so the size of the correction is visible.

Examples
--------
>>> vp = VariancePartition(image_layers=["block5", "pooled"]).fit_inputs(inputs)        # doctest: +SKIP
>>> summary = vp.summary(inputs)["per_roi"]["semantic"]                                  # doctest: +SKIP
>>> summary["unique_language_r2"], summary["unique_image_r2"], summary["shared_r2"]     # doctest: +SKIP
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import explained_variance

if TYPE_CHECKING:
    from llmvem.config import RunConfig
    from llmvem.inputs import PreparedInputs

__all__ = ["PARTS", "VariancePartition", "partition_r2"]

#: The parts, in the order tables and figures show them.
PARTS = ("unique_image", "shared", "unique_language")


def partition_r2(r2_joint: np.ndarray, r2_image: np.ndarray, r2_language: np.ndarray, corrected: bool = True
                 ) -> dict[str, np.ndarray]:
    """Unique and shared R² per voxel from the three models' test R² (arrays of shape (n_voxels,)).

    With ``corrected`` the module's corrections are applied (R² floored at 0, the joint R² at least the larger
    single-band R², each part floored at 0); without, the raw differences.
    """
    j, a, b = (np.asarray(x, dtype=np.float64) for x in (r2_joint, r2_image, r2_language))
    if corrected:
        a, b = np.maximum(a, 0.0), np.maximum(b, 0.0)
        j = np.maximum(np.maximum(j, 0.0), np.maximum(a, b))
    parts = {"unique_image": j - b, "unique_language": j - a, "shared": a + b - j}
    if corrected:
        parts = {k: np.maximum(v, 0.0) for k, v in parts.items()}
    return parts


class VariancePartition:
    """The three models of a variance partition (see the module docstring), fitted on prepared inputs.

    Parameters
    ----------
    image_layers : sequence of str
        Layers of the image band (concatenated; map specs flattened).
    alphas : array, optional
        Default :data:`llmvem.model.ridge.DEFAULT_ALPHAS`.
    cv : int
    n_iter : int
        Random band weightings of the joint model besides the equal one.
    fit_splits : sequence of str
        Splits the models are fitted on (default train + val; R² is computed on ``test``).
    device : str
    random_state : int

    Attributes
    ----------
    joint_, image_, language_ : fitted estimators
    """

    def __init__(self, image_layers: Sequence[str], alphas: Sequence[float] | None = None, cv: int = 5,
                 n_iter: int = 20, fit_splits: Sequence[str] = ("train", "val"), device: str = "auto",
                 random_state: int = 0):
        self.image_layers = list(image_layers)
        self.alphas = alphas
        self.cv = cv
        self.n_iter = n_iter
        self.fit_splits = tuple(fit_splits)
        self.device = device
        self.random_state = random_state

    @classmethod
    def from_config(cls, config: RunConfig) -> VariancePartition:
        """The partition ``config.evaluate`` asks for: the image band is ``evaluate.partition_layers`` (default
        ``backbone.layers``), with the α grid, folds and device of the ridge baseline."""
        e = config.evaluate
        return cls(image_layers=e.partition_layers or config.backbone.layers, alphas=e.ridge_alphas,
                   cv=e.ridge_folds, device=e.ridge_device, random_state=config.seed)

    def _bands(self, inputs: PreparedInputs, split: str) -> list[np.ndarray]:
        from llmvem.model.features import concat_features

        if inputs.text_embeddings is None or split not in inputs.text_embeddings:
            raise DataValidationError(None, "text_embeddings", f"variance partitioning needs caption embeddings "
                                      f"of the {split!r} split")
        return [concat_features(inputs.features[split], self.image_layers),
                np.asarray(inputs.text_embeddings[split], dtype=np.float32)]

    def fit_inputs(self, inputs: PreparedInputs) -> VariancePartition:
        """Fit the joint, image-only and language-only models on ``fit_splits``."""
        from llmvem.model.banded import BandedRidgeCV
        from llmvem.model.features import FeatureStandardizer
        from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

        ds = inputs.dataset
        splits = [s for s in self.fit_splits if s in ds.splits]
        per = [self._bands(inputs, s) for s in splits]
        bands = [np.concatenate([p[b] for p in per]) for b in range(2)]
        Y = np.concatenate([ds.splits[s].responses for s in splits])
        self.standardizers_ = [FeatureStandardizer().fit(x) for x in bands]
        z = [st.transform(x) for st, x in zip(self.standardizers_, bands, strict=True)]
        alphas = DEFAULT_ALPHAS if self.alphas is None else self.alphas
        kw = dict(alphas=alphas, cv=self.cv, device=self.device)
        self.joint_ = BandedRidgeCV(n_iter=self.n_iter, random_state=self.random_state, **kw).fit(z, Y)
        self.image_ = RidgeCV(progress_bar=False, **kw).fit(z[0], Y)
        self.language_ = RidgeCV(progress_bar=False, **kw).fit(z[1], Y)
        self.fit_splits_ = tuple(splits)
        return self

    def test_r2(self, inputs: PreparedInputs, split: str = "test") -> dict[str, np.ndarray]:
        """R² per voxel of the three models on ``split``: ``joint``, ``image``, ``language``."""
        if split in self.fit_splits_:
            raise DataValidationError(None, "split", f"{split!r} was fitted on; R² must be computed on held-out "
                                      "images")
        z = [st.transform(x) for st, x in zip(self.standardizers_, self._bands(inputs, split), strict=True)]
        y = inputs.dataset.splits[split].responses
        return {"joint": explained_variance(y, self.joint_.predict(z)),
                "image": explained_variance(y, self.image_.predict(z[0])),
                "language": explained_variance(y, self.language_.predict(z[1]))}

    def summary(self, inputs: PreparedInputs, roi_masks: Mapping[str, np.ndarray] | None = None,
                split: str = "test") -> dict[str, Any]:
        """The ``variance_partition`` record of ``metrics.json``: per ROI (``"all"`` first) the means over its
        voxels of the corrected parts (``unique_image_r2``, ``unique_language_r2``, ``shared_r2``), the three
        models' R² (``joint_r2``, ``image_r2``, ``language_r2``, uncorrected) and the raw parts (``raw_*``);
        plus per-voxel arrays (``voxels``) for the report's figure and ``voxel_metrics.npz``."""
        r2 = self.test_r2(inputs, split)
        fixed = partition_r2(r2["joint"], r2["image"], r2["language"])
        raw = partition_r2(r2["joint"], r2["image"], r2["language"], corrected=False)
        masks = {"all": np.ones(r2["joint"].shape, bool), **{k: np.asarray(v, bool) for k, v in
                                                              (roi_masks or inputs.dataset.roi_masks).items()}}
        per_roi = {}
        for roi, m in masks.items():
            if not m.any():
                continue
            rec = {f"{p}_r2": float(fixed[p][m].mean()) for p in PARTS}
            rec |= {f"{k}_r2": float(v[m].mean()) for k, v in r2.items()}
            rec |= {f"raw_{p}_r2": float(raw[p][m].mean()) for p in PARTS}
            rec["n_voxels"] = int(m.sum())
            per_roi[roi] = rec
        gam = self.joint_.best_gammas_
        return {"split": split, "fit_splits": list(self.fit_splits_), "image_layers": self.image_layers,
                "correction": "R² floored at 0, joint R² at least the larger single-band R², parts floored at 0",
                "per_roi": per_roi, "language_band_weight_mean": float(gam[1].mean()),
                "voxels": {**{f"{p}_r2": fixed[p] for p in PARTS}, **{f"{k}_r2": v for k, v in r2.items()}}}
