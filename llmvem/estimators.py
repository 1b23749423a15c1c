"""The models llmvem compares, as scikit-learn-style estimators: :class:`RidgeEncoder` and :class:`LLMVEMEncoder`.

Written in the style of ``himalaya.ridge.RidgeCV``: the constructor only stores its arguments (so
``sklearn.base.clone``, ``get_params`` and ``set_params`` work), ``fit`` validates and fits, fitted attributes end
in ``_``, ``predict`` returns responses of shape (n_images, n_voxels) and ``score`` the per-voxel Pearson r.

Besides ``fit(X, Y)``/``fit(dataset, ...)``, both estimators implement the two methods the experiment runner
(:func:`llmvem.experiment.run_models`) calls, so it fits and evaluates any of them the same way:

``fit_inputs(inputs)``
    Fit on a :class:`~llmvem.inputs.PreparedInputs` (dataset, captions, features, backbone).
``predict_inputs(inputs)``
    Predictions of the ``"val"`` and ``"test"`` splits, dict of split to array (n_images, n_voxels).
``fit_splits_`` (attribute)
    The splits ``fit_inputs`` fitted on (so a validation score of a model fitted on ``val`` is flagged).

:class:`MultiSubjectEncoder` (one model over several subjects) is fitted on a list of subjects instead
(:func:`llmvem.multisubject.run_multisubject`).

Examples
--------
>>> from llmvem.estimators import RidgeEncoder
>>> ridge = RidgeEncoder(layers=["blocks.5"], cv=3).fit(features_train, Y_train)   # doctest: +SKIP
>>> r = ridge.score(features_test, Y_test)                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import logging
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
from sklearn.base import BaseEstimator

from llmvem.errors import DataValidationError
from llmvem.evaluate.metrics import pearson_r
from llmvem.ridge_encoders import PREDICT_SPLITS, RIDGE_FILE, BandedRidgeEncoder, RidgeEncoder

if TYPE_CHECKING:
    import torch

    from llmvem.config import RunConfig
    from llmvem.data.dataset import EncodingDataset
    from llmvem.data.images import ImageCollection
    from llmvem.embed.base import ImageBackbone
    from llmvem.inputs import PreparedInputs
    from llmvem.model.network import LLMVEM
    from llmvem.train.stream import CaptionStream

__all__ = ["PREDICT_SPLITS", "RIDGE_FILE", "BandedRidgeEncoder", "LLMVEMEncoder", "MultiSubjectEncoder", "PerVoxelChoice",
           "RidgeEncoder", "model_name"]

log = logging.getLogger(__name__)

def model_name(lam: float) -> str:
    """Run-folder name of the LLM-VEM model trained with ``lambda_align = lam`` (``llmvem_lambda0.1``)."""
    return f"llmvem_lambda{lam:g}"


# ------------------------------------------------------------------------------------------------ LLM-VEM
class LLMVEMEncoder(BaseEstimator):
    """The LLM-VEM encoding model (two-stage training of :func:`~llmvem.train.train_encoding_model`).

    Parameters
    ----------
    config : RunConfig, optional
        Defaults to ``RunConfig()``.
    out_dir : path, optional
        Training folder (checkpoints, ``model.safetensors``, ``predictions_<split>.npy``). Default: a temporary
        folder deleted after training.
    resume : bool
        Continue (or reuse) the training in ``out_dir``.
    overwrite : bool
        Delete the trainer's previous outputs in ``out_dir``.
    show_progress : bool
    alignment_head : bool
        Build the alignment head (see :func:`~llmvem.train.train_encoding_model`).

    Attributes
    ----------
    result_ : TrainResult
        Set by :meth:`fit` (curves, metrics, validation/test predictions); None for a loaded model.
    network_ : LLMVEM
    backbone_ : ImageBackbone or None
    fit_splits_ : tuple of str
        ``("train",)``: validation only selects the epoch.
    align_stream_ : dict or None
        The alignment stream training used (``spec``, ``n_images``, ``weight``, ``batch_size``), or None.

    Examples
    --------
    >>> enc = LLMVEMEncoder(load_config("demo")).fit(dataset, text_embeddings, backbone=backbone)  # doctest: +SKIP
    >>> pred = enc.predict(dataset.test.images)          # array of shape (n_test, n_voxels)       # doctest: +SKIP
    """

    def __init__(self, config: RunConfig | None = None, out_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, show_progress: bool = False, alignment_head: bool = True):
        self.config = config
        self.out_dir = out_dir
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = show_progress
        self.alignment_head = alignment_head

    def _resolved_config(self) -> RunConfig:
        """The configuration used (``config`` or the default one)."""
        from llmvem.config import RunConfig

        return self.config if self.config is not None else RunConfig()

    def fit(self, dataset: EncodingDataset, text_embeddings: Mapping[str, np.ndarray] | None = None, *,
            backbone: ImageBackbone | None = None, features: Mapping[str, Mapping[str, np.ndarray]] | None = None,
            out_dir: str | Path | None = None, overwrite: bool | None = None,
            show_progress: bool | None = None, align_stream: CaptionStream | None = None,
            text_ids: Mapping[str, np.ndarray] | None = None) -> LLMVEMEncoder:
        """Train on ``dataset`` (see :func:`~llmvem.train.train_encoding_model` for the arguments).

        A dataset without a validation split gets one (``config.data.val_fraction``, seed ``config.data.seed``)
        unless ``features`` are given (they are indexed by the dataset's own splits). Without ``backbone`` the
        one named in ``config.backbone`` is loaded when needed. ``out_dir``, ``overwrite`` and ``show_progress``
        override the constructor's values for this call.

        When ``config.align_data.spec`` names captioned images and ``model.lambda_align > 0``, their stream
        (:func:`~llmvem.train.stream.load_align_stream`: cached caption embeddings and features) trains the
        contrastive term alongside the brain data; ``align_stream`` passes one already loaded instead. A λ = 0
        model ignores the stream (and says so in a log line).
        """
        from llmvem.train.stream import load_align_stream, stream_is_used
        from llmvem.train.trainer import train_encoding_model

        config = self._resolved_config()
        show = self.show_progress if show_progress is None else show_progress
        if dataset.val is None:
            if features is not None:
                raise DataValidationError(dataset.source, "splits", "features were given but the dataset has no "
                                          "validation split; split the dataset before extracting features")
            dataset = dataset.with_validation_split(config.data.val_fraction, config.data.seed)
        if backbone is None and (features is None or config.train.stage2.epochs > 0):
            from llmvem.inputs import load_config_backbone

            backbone = load_config_backbone(config)
        lam = float(config.model.lambda_align)
        if lam == 0 and (align_stream is not None or config.align_data.spec is not None):
            log.info("the λ = 0 model ignores the alignment stream (%s): it adds only the contrastive loss",
                     align_stream.source if align_stream is not None else config.align_data.spec)
        elif align_stream is None and stream_is_used(config):
            if backbone is None:
                from llmvem.inputs import load_config_backbone

                backbone = load_config_backbone(config)
            align_stream = load_align_stream(config, backbone, show)
        used = align_stream is not None and align_stream.weight > 0 and lam > 0
        out = out_dir if out_dir is not None else self.out_dir
        kwargs: dict[str, Any] = dict(text_embeddings=text_embeddings, text_ids=text_ids, backbone=backbone,
                                      features=features,
                                      show_progress=show, alignment_head=self.alignment_head,
                                      align_stream=align_stream if used else None)
        if out is None:
            with tempfile.TemporaryDirectory(prefix="llmvem-fit-") as tmp:
                result = train_encoding_model(config, dataset, out_dir=Path(tmp) / "run", **kwargs)
        else:
            result = train_encoding_model(config, dataset, out_dir=out, resume=self.resume,
                                          overwrite=self.overwrite if overwrite is None else overwrite, **kwargs)
        self.result_, self.network_, self.backbone_ = result, result.network, backbone
        self.fit_splits_ = ("train",)
        self.align_stream_ = align_stream.describe() if used and align_stream is not None else None
        return self

    def fit_inputs(self, inputs: PreparedInputs) -> LLMVEMEncoder:
        """Train on prepared inputs; caption embeddings (and the alignment stream of ``config.align_data``,
        loaded once per inputs by :func:`~llmvem.train.stream.stream_for_inputs`) are used only when
        ``model.lambda_align > 0`` (with ``model.readout_aligned`` the captions also size the λ = 0 head)."""
        from llmvem.inputs import alignment_targets
        from llmvem.train.stream import stream_for_inputs

        config = self._resolved_config()
        stream = stream_for_inputs(config, inputs, self.show_progress)
        # stage 2 fine-tunes the backbone in place: train a private copy, so the next model starts from the same
        # frozen backbone that the cached features describe
        backbone = copy.deepcopy(inputs.backbone) if config.train.stage2.epochs > 0 else inputs.backbone
        # at λ = 0 with readout_aligned the captions only size the head like the λ > 0 twin's (no contrastive term)
        # the head's targets (model.align_target) and their ids, hashed from the caption texts
        text, ids = alignment_targets(config, inputs) if config.model.lambda_align > 0 or config.model.readout_aligned \
            else (None, None)
        return self.fit(inputs.dataset, text, backbone=backbone, features=inputs.features, align_stream=stream,
                        text_ids=ids)

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        """Predictions of the ``val`` and ``test`` splits (the trainer's, from the selected epoch, after fit)."""
        if getattr(self, "result_", None) is not None:
            return {s: self.result_.predictions[s] for s in PREDICT_SPLITS if s in self.result_.predictions}
        if self._resolved_config().train.stage2.epochs > 0:
            return {s: self.predict(inputs.dataset.splits[s].images) for s in PREDICT_SPLITS}
        return {s: self.predict(inputs.features[s]) for s in PREDICT_SPLITS}

    def predict_new(self, images: ImageCollection, features: Mapping[str, np.ndarray]) -> np.ndarray:
        """Predictions for images outside the splits (challenge test images): from their frozen ``features``
        (dict of layer to array (n, d_layer)) when the backbone was not fine-tuned, else from the ``images``.
        Returns (n, n_voxels), float32."""
        if self._resolved_config().train.stage2.epochs > 0:
            return self.predict(images)
        return self.predict(features)

    def _check_fitted(self) -> LLMVEM:
        if getattr(self, "network_", None) is None:
            raise RuntimeError("call fit() before predict()")
        return self.network_

    def predict(self, X: ImageCollection | np.ndarray | torch.Tensor | Mapping[str, np.ndarray],
                batch_size: int = 64) -> np.ndarray:
        """Predicted responses.

        Parameters
        ----------
        X : ImageCollection, uint8 array of shape (n, H, W, 3), or dict of layer to array (n, d_layer)
            Images (decoded at the backbone's input size, as in training) or precomputed backbone features
            of the readout layers (and the maps (n, C, H, W) of the spatial layers).

        Returns
        -------
        array of shape (n, n_voxels), float32
        """
        import torch

        from llmvem.data.images import ImageCollection
        from llmvem.train.tensors import load_image_tensor, predict_network, resolve_precision

        network = self._check_fitted()
        config = self._resolved_config()
        device = next(network.parameters()).device
        precision = resolve_precision(config.train.precision, device)
        if isinstance(X, Mapping):
            feats = {k: torch.as_tensor(np.asarray(X[k]), dtype=torch.float32)
                     for k in network.required_layers(with_embedding=False)}
            n = len(next(iter(feats.values())))
            return predict_network(network, n, device, features=feats, batch_size=batch_size, precision=precision)
        if network.backbone is None:
            raise RuntimeError("this model was fitted on features without a backbone; pass features to predict()")
        if isinstance(X, ImageCollection):
            images = load_image_tensor(X, int(network.backbone.image_size), show_progress=False)
        else:
            images = torch.as_tensor(np.asarray(X) if not isinstance(X, torch.Tensor) else X)
            if images.dtype != torch.uint8 or images.ndim != 4:
                raise ValueError(f"expected uint8 images of shape (n, H, W, 3), got {images.dtype} "
                                 f"{tuple(images.shape)}")
        return predict_network(network, len(images), device, images=images, batch_size=batch_size,
                               precision=precision, channels_last=config.train.channels_last)

    def score(self, X: ImageCollection | np.ndarray | torch.Tensor | Mapping[str, np.ndarray],
              y: np.ndarray) -> np.ndarray:
        """Pearson r between ``y`` (n, n_voxels) and the predictions for ``X``, per voxel, shape (n_voxels,)."""
        return pearson_r(y, self.predict(X))


# ------------------------------------------------------------------------------------------ per-voxel choice
class PerVoxelChoice(BaseEstimator):
    """Per voxel, the predictions of whichever of several estimators has the highest **validation** r.

    The usual per-voxel model selection of encoding studies (e.g. a spatial readout for retinotopic voxels and
    a pooled one for the rest): every candidate is fitted on the training split, scored per voxel on the
    validation split, and each voxel keeps its best candidate; the test split plays no part. The combined
    model's validation r is therefore in-sample (``fit_splits_`` includes ``"val"``, so the experiment never
    chooses between models by it).

    Parameters
    ----------
    estimators : dict of name to estimator
        Unfitted estimators with ``fit_inputs``/``predict_inputs`` that do not fit on the validation split
        (e.g. ``RidgeEncoder(fit_splits=("train",))``, ``LLMVEMEncoder``). Cloned before fitting.

    Attributes
    ----------
    names_ : list of str
        The candidates, in order.
    choice_ : array of int, shape (n_voxels,)
        Index into ``names_`` of each voxel's candidate.
    val_r_ : array of shape (n_candidates, n_voxels)
        Each candidate's validation r.
    estimators_ : dict of name to fitted estimator
    reused_ : list of str
        Candidates passed already fitted to :meth:`fit_inputs` (not trained again).
    choice_summary_ : dict
        ``candidates``, ``fractions`` (of all voxels) and ``fractions_per_roi`` ({roi: {candidate: fraction}});
        the experiment runner records it in ``metrics.json`` as the model's ``per_voxel_choice``.
    fit_splits_ : tuple of str

    Examples
    --------
    >>> both = PerVoxelChoice({"pooled": LLMVEMEncoder(config), "spatial": LLMVEMEncoder(spatial_config)})  # doctest: +SKIP
    >>> run_models(config, inputs, {"choice": ModelSpec(both, "per-voxel choice", "llmvem")}, "out")  # doctest: +SKIP
    """

    def __init__(self, estimators: Mapping[str, Any] | None = None):
        self.estimators = estimators

    def fit_inputs(self, inputs: PreparedInputs, fitted: Mapping[str, Any] | None = None) -> PerVoxelChoice:
        """Fit every candidate on ``inputs`` and choose one per voxel by validation r.

        Parameters
        ----------
        inputs : PreparedInputs
        fitted : dict of name to fitted estimator, optional
            Candidates (names of ``estimators``) already fitted on ``inputs``, used as they are instead of
            fitting a clone (the experiment runner passes the models it trained anyway); recorded in
            ``reused_`` and not saved again by :meth:`save`.
        """
        from sklearn.base import clone

        ds = inputs.dataset
        if not self.estimators:
            raise DataValidationError(None, "estimators", "expected at least one candidate estimator")
        unknown = sorted(set(fitted or {}) - set(self.estimators))
        if unknown:
            raise DataValidationError(None, "fitted", f"names {unknown} are not candidates; expected some of "
                                      f"{list(self.estimators)}")
        if ds.val is None or ds.val.responses is None or len(ds.val.responses) < 3:
            raise DataValidationError(None, "dataset.val", "a per-voxel choice needs a validation split with "
                                      "responses (at least 3 images)")
        from llmvem.evaluate.selection import choose_per_voxel

        given = dict(fitted or {})
        fitted = {}
        val_preds = []
        for name, est in self.estimators.items():
            e = given[name] if name in given else clone(est).fit_inputs(inputs)
            if "val" in getattr(e, "fit_splits_", ()):
                raise DataValidationError(None, f"estimators[{name!r}]", "is fitted on the validation split; a "
                                          "per-voxel choice by validation r needs candidates that do not see it "
                                          "(e.g. RidgeEncoder(fit_splits=('train',)))")
            fitted[name] = e
            val_preds.append(e.predict_inputs(inputs)["val"])
        self.names_ = list(fitted)
        self.estimators_ = fitted
        self.reused_ = [n for n in self.names_ if n in given]
        self.choice_, self.val_r_ = choose_per_voxel(ds.val.responses, val_preds)
        splits = {s for e in fitted.values() for s in getattr(e, "fit_splits_", ("train",))}
        self.fit_splits_ = (*sorted(splits), "val")
        self.choice_summary_ = {"candidates": self.names_, "fractions": self.fractions(),
                                "fractions_per_roi": {roi: self.fractions(mask) for roi, mask in
                                                      ds.roi_masks.items()}}
        return self

    def fractions(self, mask: np.ndarray | None = None) -> dict[str, float]:
        """Fraction of voxels that take each candidate: of all voxels, or of those in ``mask`` (bool array of
        shape (n_voxels,), e.g. an ROI; NaN for an empty mask)."""
        choice = self.choice_ if mask is None else self.choice_[np.asarray(mask, dtype=bool)]
        return {n: float(np.mean(choice == i)) if choice.size else float("nan") for i, n in enumerate(self.names_)}

    def combine(self, predictions: Mapping[str, np.ndarray]) -> np.ndarray:
        """Per-voxel pick from each candidate's predictions (name → array (n, n_voxels)) by ``choice_``."""
        from llmvem.evaluate.selection import pick_per_voxel

        return pick_per_voxel([predictions[n] for n in self.names_], self.choice_)

    def save(self, folder: str | Path) -> Path:
        """Write the choice (``per_voxel_choice.json``: candidates, each voxel's index, validation r) and each
        candidate that can save itself into ``folder/<name>/``."""
        from llmvem.utils import write_json

        if not hasattr(self, "choice_"):
            raise RuntimeError("PerVoxelChoice: call fit_inputs() before save()")
        folder = Path(folder)
        for name, est in self.estimators_.items():
            if hasattr(est, "save") and name not in self.reused_:
                est.save(folder / name)
        path = folder / "per_voxel_choice.json"
        write_json(path, {"candidates": self.names_, "choice": self.choice_.tolist(), "fractions": self.fractions(),
                          "fractions_per_roi": self.choice_summary_["fractions_per_roi"], "reused": self.reused_,
                          "val_r": np.where(np.isfinite(self.val_r_), self.val_r_, np.nan).tolist()})
        return path

    def predict_inputs(self, inputs: PreparedInputs) -> dict[str, np.ndarray]:
        """Predictions of the ``val`` and ``test`` splits, each voxel from its chosen candidate."""
        if not hasattr(self, "choice_"):
            raise RuntimeError("PerVoxelChoice: call fit_inputs() before predict_inputs()")
        per = {n: e.predict_inputs(inputs) for n, e in self.estimators_.items()}
        return {s: self.combine({n: per[n][s] for n in self.names_}) for s in PREDICT_SPLITS
                if all(s in p for p in per.values())}


# ------------------------------------------------------------------------------------------ multi-subject
class MultiSubjectEncoder(BaseEstimator):
    """Several subjects trained as one model (:func:`~llmvem.train.multisubject.train_multisubject`): a shared
    backbone and core, one readout per subject; one subject is "separate" training.

    Parameters
    ----------
    config : RunConfig
    out_dir : path, optional
        Training folder (default: a temporary folder deleted after training).
    resume, overwrite, show_progress : bool
        As for :class:`LLMVEMEncoder`.

    Attributes
    ----------
    result_ : MultiSubjectResult
    predictions_ : dict of subject to dict of split to array of shape (n_images, n_voxels_subject)
        ``"val"`` and ``"test"`` predictions of every subject.
    """

    def __init__(self, config: RunConfig | None = None, out_dir: str | Path | None = None, resume: bool = False,
                 overwrite: bool = False, show_progress: bool = False):
        self.config = config
        self.out_dir = out_dir
        self.resume = resume
        self.overwrite = overwrite
        self.show_progress = show_progress

    def fit(self, subjects: Sequence[Any], backbone: ImageBackbone | None = None) -> MultiSubjectEncoder:
        """Train on ``subjects`` (sequence of :class:`~llmvem.train.multisubject.SubjectData`); ``backbone`` is
        needed for stage 2 (it is deep-copied, never changed)."""
        from llmvem.config import RunConfig
        from llmvem.train.multisubject import train_multisubject

        if not subjects:
            raise DataValidationError(None, "subjects", "expected at least one subject to train on")
        config = self.config if self.config is not None else RunConfig()
        kwargs: dict[str, Any] = dict(resume=self.resume, overwrite=self.overwrite, show_progress=self.show_progress)
        if self.out_dir is None:
            with tempfile.TemporaryDirectory(prefix="llmvem-multi-") as tmp:
                self.result_ = train_multisubject(config, list(subjects), backbone, Path(tmp) / "run", **kwargs)
        else:
            self.result_ = train_multisubject(config, list(subjects), backbone, self.out_dir, **kwargs)
        self.predictions_ = self.result_.predictions
        return self
