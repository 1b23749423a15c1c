"""A notebook-friendly wrapper around the trainer: ``LLMVEMEncoder(config).fit(dataset, text_embeddings)`` and
``.predict(images_or_features)``.

Examples
--------
>>> from llmvem.config import load_config
>>> from llmvem.train import LLMVEMEncoder
>>> enc = LLMVEMEncoder(load_config("demo")).fit(dataset, text_embeddings, backbone=backbone)
>>> pred = enc.predict(dataset.test.images)          # array of shape (n_test, n_voxels)
>>> r = enc.score(dataset.test.images, dataset.test.responses)
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch

from llmvem.config import RunConfig
from llmvem.data.dataset import EncodingDataset
from llmvem.data.images import ImageCollection
from llmvem.embed.base import ImageBackbone
from llmvem.evaluate.metrics import pearson_r
from llmvem.model.network import LLMVEM
from llmvem.train.tensors import load_image_tensor, predict_network, resolve_precision
from llmvem.train.trainer import TrainResult, train_encoding_model

__all__ = ["LLMVEMEncoder"]


class LLMVEMEncoder:
    """Fit an LLM-VEM encoding model and predict responses, scikit-learn style.

    Parameters
    ----------
    config : RunConfig, optional
        Defaults to ``RunConfig()``.

    Attributes
    ----------
    result_ : TrainResult
        Set by :meth:`fit` (curves, metrics, validation/test predictions).
    network_ : LLMVEM
    backbone_ : ImageBackbone or None
    """

    def __init__(self, config: RunConfig | None = None):
        self.config = config if config is not None else RunConfig()
        self.result_: TrainResult | None = None
        self.network_: LLMVEM | None = None
        self.backbone_: ImageBackbone | None = None

    def fit(self, dataset: EncodingDataset, text_embeddings: Mapping[str, np.ndarray] | None = None, *,
            backbone: ImageBackbone | None = None, features: Mapping[str, Mapping[str, np.ndarray]] | None = None,
            out_dir: str | Path | None = None, overwrite: bool = False, show_progress: bool = False) -> LLMVEMEncoder:
        """Train on ``dataset`` (see :func:`~llmvem.train.train_encoding_model` for the arguments).

        A dataset without a validation split gets one (``config.data.val_fraction``, seed ``config.data.seed``)
        unless ``features`` are given (they are indexed by the dataset's own splits). Without ``backbone`` the
        one named in ``config.backbone`` is loaded when needed. Without ``out_dir`` checkpoints go to a temporary
        folder that is deleted after training.
        """
        if dataset.val is None:
            if features is not None:
                from llmvem.errors import DataValidationError

                raise DataValidationError(dataset.source, "splits", "features were given but the dataset has no "
                                          "validation split; split the dataset before extracting features")
            dataset = dataset.with_validation_split(self.config.data.val_fraction, self.config.data.seed)
        if backbone is None and (features is None or self.config.train.stage2.epochs > 0):
            from llmvem.pipeline import load_config_backbone

            backbone = load_config_backbone(self.config)
        kwargs = dict(text_embeddings=text_embeddings, backbone=backbone, features=features,
                      show_progress=show_progress)
        if out_dir is None:
            with tempfile.TemporaryDirectory(prefix="llmvem-fit-") as tmp:
                result = train_encoding_model(self.config, dataset, out_dir=Path(tmp) / "run", **kwargs)
        else:
            result = train_encoding_model(self.config, dataset, out_dir=out_dir, overwrite=overwrite, **kwargs)
        self.result_, self.network_, self.backbone_ = result, result.network, backbone
        return self

    def _check_fitted(self) -> LLMVEM:
        if self.network_ is None:
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
        network = self._check_fitted()
        device = next(network.parameters()).device
        precision = resolve_precision(self.config.train.precision, device)
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
                               precision=precision, channels_last=self.config.train.channels_last)

    def score(self, X: ImageCollection | np.ndarray | torch.Tensor | Mapping[str, np.ndarray],
              y: np.ndarray) -> np.ndarray:
        """Pearson r between ``y`` (n, n_voxels) and the predictions for ``X``, per voxel."""
        return pearson_r(y, self.predict(X))
