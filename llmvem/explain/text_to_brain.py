"""Text-to-brain: predicted voxel responses for a sentence, through the aligned space of a trained LLM-VEM.

How the mapping is made
-----------------------
An LLM-VEM trained with λ > 0 has an *alignment head* that projects each image's pooled backbone embedding into
the caption-embedding space of the text encoder (rows L2-normalised). Two voxelwise ridge readouts
(:class:`llmvem.model.ridge.RidgeCV`, one α per voxel chosen by K-fold cross-validation) are fitted on the
*training* images (train + val splits):

``"aligned"`` (the LLM-VEM readout)
    from the aligned **image** embeddings to the measured responses. At prediction time a text is embedded with
    the same text encoder (L2-normalised) and shifted by ``mean(aligned image embeddings) − mean(caption
    embeddings)`` of the training images before the readout. The shift corrects the *modality gap* (image and
    text embeddings occupy offset cones of the shared space); being a constant it moves the predicted response
    level of every voxel but not the correlation of the predictions across texts.
``"text"`` (direct text readout)
    from the caption embeddings of the training images to their responses, applied to a text's embedding as
    is. It needs no image model and is the reference for what text alone carries.

Both readouts, the two means, the text encoder's name and the ROI masks are stored in the model folder
(``text_to_brain.safetensors`` + ``text_to_brain.json``; no pickle), so predicting from text needs no training
data: :meth:`TextToBrain.load` then :meth:`TextToBrain.predict_texts`.

The evaluation (:func:`evaluate_text_to_brain`) predicts the held-out test images from their captions alone and
scores the predictions per ROI next to the image-driven prediction of the same LLM-VEM model.

Examples
--------
>>> t2b = TextToBrain.load("runs/demo/models/llmvem_lambda0.1")          # doctest: +SKIP
>>> pred = t2b.predict_texts(["a large red circle"])                     # (1, n_voxels), doctest: +SKIP
>>> print(t2b.mapping_statement())                                       # doctest: +SKIP
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch

from llmvem.errors import CheckpointError, ConfigError, DataValidationError
from llmvem.model.ridge import RELATIVE_ALPHAS
from llmvem.utils import write_json

if TYPE_CHECKING:
    from llmvem.data.images import ImageCollection
    from llmvem.embed.base import TextEncoder
    from llmvem.estimators import LLMVEMEncoder
    from llmvem.inputs import PreparedInputs

__all__ = ["DEFAULT_ALPHAS", "PREDICTORS", "READOUTS", "READOUT_FILE", "SUMMARY_FILE", "LinearReadout",
           "TextReadoutKind", "TextToBrain", "aligned_image_outputs", "evaluate_text_to_brain", "fit_linear_readout",
           "fit_model_text_to_brain", "fit_text_to_brain"]

TextReadoutKind = Literal["aligned", "text"]
READOUTS: tuple[str, ...] = ("aligned", "text")
#: Files written into the model folder.
READOUT_FILE = "text_to_brain.safetensors"
SUMMARY_FILE = "text_to_brain.json"
#: α grid of the readouts: the ridge solver's grid for unit-norm inputs (per-dimension variance ~1/dim, so the
#: useful α are smaller than for the z-scored features of the ridge baseline).
DEFAULT_ALPHAS = tuple(float(a) for a in RELATIVE_ALPHAS)
#: Predictors scored by :func:`evaluate_text_to_brain`, with their report labels.
PREDICTORS = {
    "image": "image-driven (LLM-VEM network)",
    "text_aligned": "text only, aligned readout",
    "text_readout": "text only, text readout",
    "aligned_image": "aligned readout on image embeddings",
}


#: Text encoders loaded by :meth:`TextToBrain.load_encoder`, by (name, device, long policy).
_ENCODERS: dict[tuple[str, str, str], TextEncoder] = {}


# ----------------------------------------------------------------------------------------------- readouts
@dataclass
class LinearReadout:
    """A fitted linear voxel readout ``Y = X @ coef + intercept``.

    Attributes
    ----------
    coef : array of shape (dim, n_voxels), float32
    intercept : array of shape (n_voxels,), float32
    alphas : array of shape (n_voxels,), float64
        Ridge penalty chosen for each voxel by cross-validation.
    """

    coef: np.ndarray
    intercept: np.ndarray
    alphas: np.ndarray

    @property
    def dim(self) -> int:
        return int(self.coef.shape[0])

    @property
    def n_voxels(self) -> int:
        return int(self.coef.shape[1])

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Inputs (n, dim) → predicted responses (n, n_voxels), float32."""
        X = np.asarray(X, dtype=np.float32)
        if X.ndim != 2 or X.shape[1] != self.dim:
            raise DataValidationError(None, "embeddings", f"expected shape (n, {self.dim}), got {X.shape}")
        return (X @ self.coef + self.intercept).astype(np.float32)


def fit_linear_readout(X: np.ndarray, Y: np.ndarray, alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5,
                       device: str = "cpu") -> LinearReadout:
    """Voxelwise ridge (one α per voxel by K-fold CV, unshuffled folds) from ``X`` to ``Y``.

    Parameters
    ----------
    X : array of shape (n_samples, dim)
    Y : array of shape (n_samples, n_voxels)
    alphas : sequence of float
    cv : int
        Folds.
    device : str
        Device of :class:`~llmvem.model.ridge.RidgeCV`.

    Returns
    -------
    LinearReadout
    """
    from llmvem.model.ridge import RidgeCV

    ridge = RidgeCV(alphas=np.asarray(alphas, dtype=np.float64), cv=cv, device=device, progress_bar=False)
    ridge.fit(np.asarray(X, dtype=np.float32), np.asarray(Y, dtype=np.float32))
    return LinearReadout(coef=np.asarray(ridge.coef_, dtype=np.float32),
                         intercept=np.asarray(ridge.intercept_, dtype=np.float32),
                         alphas=np.asarray(ridge.best_alphas_, dtype=np.float64))


def _normalize_rows(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)


# ------------------------------------------------------------------------------------------ the mapping
@dataclass
class TextToBrain:
    """Text → voxel responses through the aligned space of a trained LLM-VEM (see the module docstring).

    Attributes
    ----------
    aligned : LinearReadout
        Aligned image embedding (dim) → responses.
    text : LinearReadout
        Caption embedding (dim) → responses.
    image_mean : array of shape (dim,)
        Mean aligned image embedding of the training images.
    text_mean : array of shape (dim,)
        Mean caption embedding of the training images.
    text_encoder : str
        Name for :func:`llmvem.embed.text.load_text_encoder` (the encoder of the training captions).
    long_policy : str
        Its long-caption policy.
    roi_masks : dict of str to bool array of shape (n_voxels,)
    info : dict
        Provenance: model name and folder, λ, dataset, number of fitting images, splits, folds.
    """

    aligned: LinearReadout
    text: LinearReadout
    image_mean: np.ndarray
    text_mean: np.ndarray
    text_encoder: str
    long_policy: str = "sentence_mean"
    roi_masks: dict[str, np.ndarray] = field(default_factory=dict)
    info: dict[str, Any] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """Size of the caption-embedding space."""
        return self.text.dim

    @property
    def n_voxels(self) -> int:
        return self.text.n_voxels

    # -------------------------------------------------------------------------------------- predict
    def _readout(self, readout: str) -> LinearReadout:
        if readout not in READOUTS:
            raise ConfigError(f"readout: expected one of {READOUTS}, got {readout!r}")
        return self.aligned if readout == "aligned" else self.text

    def predict(self, text_embeddings: np.ndarray, readout: TextReadoutKind = "aligned") -> np.ndarray:
        """Predicted responses to texts from their embeddings.

        Parameters
        ----------
        text_embeddings : array of shape (n_texts, dim)
            Embeddings by :attr:`text_encoder` (rows are L2-normalised here, as in training).
        readout : {"aligned", "text"}
            Through the aligned space of the LLM-VEM (with the modality-gap shift), or the direct text readout.

        Returns
        -------
        array of shape (n_texts, n_voxels), float32
        """
        emb = np.asarray(text_embeddings, dtype=np.float32)
        if emb.ndim != 2 or emb.shape[1] != self.dim:
            raise DataValidationError(None, "text_embeddings", f"expected shape (n_texts, {self.dim}) from "
                                      f"{self.text_encoder}, got {emb.shape}")
        if not np.isfinite(emb).all():
            raise DataValidationError(None, "text_embeddings", "contains NaN or Inf")
        emb = _normalize_rows(emb)
        if readout == "aligned":
            emb = emb - self.text_mean + self.image_mean
        return self._readout(readout).predict(emb)

    def load_encoder(self, device: str = "auto") -> TextEncoder:
        """The text encoder the readouts were fitted with (loaded once per process and kept)."""
        from llmvem.embed.text import load_text_encoder

        key = (self.text_encoder, device, self.long_policy)
        if key not in _ENCODERS:
            _ENCODERS[key] = load_text_encoder(self.text_encoder, device=device,
                                               long_policy=self.long_policy)  # type: ignore[arg-type]
        return _ENCODERS[key]

    def encode(self, texts: Sequence[str], encoder: TextEncoder | None = None, batch_size: int = 64) -> np.ndarray:
        """Embeddings (n_texts, dim) of ``texts`` by :attr:`text_encoder` (or the given, identical encoder)."""
        texts = list(texts)
        if not texts:
            raise DataValidationError(None, "texts", "expected at least one text")
        for i, t in enumerate(texts):
            if not isinstance(t, str) or not t.strip():
                raise DataValidationError(None, f"texts[{i}]", f"expected a non-empty string, got {t!r}")
        encoder = encoder or self.load_encoder()
        if int(encoder.dim) != self.dim:
            raise ConfigError(f"text encoder {encoder.model_id} gives {encoder.dim}-d embeddings but the readouts "
                              f"were fitted on {self.dim}-d embeddings of {self.text_encoder}")
        return encoder.encode(texts, batch_size=batch_size).embeddings

    def predict_texts(self, texts: Sequence[str], readout: TextReadoutKind = "aligned",
                      encoder: TextEncoder | None = None) -> np.ndarray:
        """Predicted responses (n_texts, n_voxels) to ``texts`` (embedded with :attr:`text_encoder`)."""
        return self.predict(self.encode(texts, encoder), readout)

    def mapping_statement(self, readout: TextReadoutKind | None = None) -> str:
        """A plain-language statement of how the text → brain mapping is made (for the CLI and the report)."""
        i = self.info
        n_fit = i.get("n_fit", "?")
        splits = "+".join(i.get("fit_splits", ["train", "val"]))
        folds = i.get("cv", "K")
        aligned = (
            f"Aligned readout: the alignment head of {i.get('model', 'the LLM-VEM model')} (λ = "
            f"{i.get('lambda', '?')}) projects each image's pooled backbone embedding into the caption-embedding "
            f"space of {self.text_encoder} (L2-normalised). A voxelwise ridge readout (one α per voxel, "
            f"{folds}-fold CV) was fitted from the aligned embeddings of the {n_fit} training images ({splits}) to "
            "their measured responses. A text is embedded with the same encoder (L2-normalised), shifted by the "
            "mean aligned image embedding minus the mean caption embedding of those images (modality-gap "
            "correction: it moves the predicted level, not the correlation across texts), and passed through "
            "that readout.")
        text = (
            f"Text readout: a voxelwise ridge readout ({folds}-fold CV) fitted directly from the caption "
            f"embeddings ({self.text_encoder}) of the same {n_fit} training images to their responses, applied "
            "to the text's embedding; it does not use the image model.")
        if readout == "aligned":
            return aligned
        if readout == "text":
            return text
        return f"{aligned} {text}"

    # ---------------------------------------------------------------------------------------- files
    def save(self, folder: str | Path, evaluation: Mapping[str, Any] | None = None) -> Path:
        """Write ``text_to_brain.safetensors`` (arrays) and ``text_to_brain.json`` (names, provenance, the
        mapping statement and ``evaluation``) into ``folder``. Returns the safetensors path."""
        from llmvem.train.checkpoint import save_weights

        folder = Path(folder)
        tensors = {
            "aligned.coef": self.aligned.coef, "aligned.intercept": self.aligned.intercept,
            "aligned.alphas": self.aligned.alphas, "text.coef": self.text.coef,
            "text.intercept": self.text.intercept, "text.alphas": self.text.alphas,
            "image_mean": self.image_mean, "text_mean": self.text_mean,
            **{f"roi.{name}": mask.astype(np.uint8) for name, mask in self.roi_masks.items()},
        }
        path = folder / READOUT_FILE
        save_weights(path, {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in tensors.items()},
                     {"text_encoder": self.text_encoder})
        write_json(folder / SUMMARY_FILE, {
            "text_encoder": self.text_encoder, "long_policy": self.long_policy, "dim": self.dim,
            "n_voxels": self.n_voxels, "rois": list(self.roi_masks), "info": self.info,
            "mapping": {"aligned": self.mapping_statement("aligned"), "text": self.mapping_statement("text")},
            "evaluation": dict(evaluation) if evaluation is not None else None,
        })
        return path

    @classmethod
    def load(cls, folder: str | Path) -> TextToBrain:
        """Read the readouts saved by :meth:`save` from a model folder.

        Raises
        ------
        CheckpointError
            The files are missing or unreadable; the message says how to create them.
        """
        from llmvem.train.checkpoint import load_weights

        folder = Path(folder)
        path, meta_path = folder / READOUT_FILE, folder / SUMMARY_FILE
        if not path.is_file() or not meta_path.is_file():
            raise CheckpointError(
                f"{folder}: no text-to-brain readouts ({READOUT_FILE}, {SUMMARY_FILE}); they are written by "
                "`llmvem demo` (evaluate.text_to_brain=true) for its model with λ > 0, or by "
                f"`llmvem predict --run {folder} --fit-readouts`")
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{meta_path}: cannot read the readout description ({exc})") from exc
        t = {k: v.numpy() for k, v in load_weights(path).items()}
        need = ["aligned.coef", "aligned.intercept", "aligned.alphas", "text.coef", "text.intercept",
                "text.alphas", "image_mean", "text_mean"]
        missing = [k for k in need if k not in t]
        if missing or "text_encoder" not in meta:
            raise CheckpointError(f"{path}: incomplete text-to-brain readouts (missing {missing or ['text_encoder']}"
                                  f"); refit them with `llmvem predict --run {folder} --fit-readouts`")
        return cls(
            aligned=LinearReadout(t["aligned.coef"], t["aligned.intercept"], t["aligned.alphas"]),
            text=LinearReadout(t["text.coef"], t["text.intercept"], t["text.alphas"]),
            image_mean=t["image_mean"], text_mean=t["text_mean"], text_encoder=str(meta["text_encoder"]),
            long_policy=str(meta.get("long_policy", "sentence_mean")),
            roi_masks=_ordered_rois(t, meta.get("rois")),
            info=dict(meta.get("info") or {}),
        )

    @staticmethod
    def read_summary(folder: str | Path) -> dict[str, Any]:
        """``text_to_brain.json`` of a model folder (mapping statement, provenance, evaluation)."""
        path = Path(folder) / SUMMARY_FILE
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise CheckpointError(f"{path}: cannot read the text-to-brain summary ({exc})") from exc


def _ordered_rois(tensors: Mapping[str, np.ndarray], order: Any) -> dict[str, np.ndarray]:
    """ROI masks from ``roi.<name>`` tensors, in the dataset's order (safetensors sorts its keys)."""
    masks = {k[4:]: v.astype(bool) for k, v in tensors.items() if k.startswith("roi.")}
    first = [r for r in (order if isinstance(order, list) else []) if r in masks]
    return {r: masks[r] for r in [*first, *(r for r in masks if r not in first)]}


def fit_text_to_brain(aligned_embeddings: Mapping[str, np.ndarray], caption_embeddings: Mapping[str, np.ndarray],
                      responses: Mapping[str, np.ndarray], *, text_encoder: str,
                      long_policy: str = "sentence_mean", fit_splits: Sequence[str] = ("train", "val"),
                      roi_masks: Mapping[str, np.ndarray] | None = None,
                      alphas: Sequence[float] = DEFAULT_ALPHAS, cv: int = 5, device: str = "cpu",
                      info: Mapping[str, Any] | None = None) -> TextToBrain:
    """Fit the aligned and the text readouts on the training images.

    Parameters
    ----------
    aligned_embeddings : dict of split to array of shape (n_images, dim)
        Alignment-head outputs (L2-normalised) of each split's images.
    caption_embeddings : dict of split to array of shape (n_images, dim)
        Caption embedding of each image (L2-normalised mean over its captions), by ``text_encoder``.
    responses : dict of split to array of shape (n_images, n_voxels)
    text_encoder : str
        Name of the caption encoder (stored, used to embed texts at prediction time).
    fit_splits : sequence of str
        Splits fitted on (the splits present among them are used; never the test split).
    roi_masks : dict of str to bool array of shape (n_voxels,), optional
    alphas, cv, device
        Ridge grid, folds and device.
    info : dict, optional
        Provenance stored with the readouts.

    Returns
    -------
    TextToBrain
    """
    splits = [s for s in fit_splits if s in responses and responses[s] is not None]
    if "test" in splits:
        raise ConfigError("fit_splits: the test split is for evaluation and must not be fitted on")
    if not splits:
        raise DataValidationError(None, "responses", f"no responses for the fit splits {list(fit_splits)}")
    for s in splits:
        for name, arrays in (("aligned_embeddings", aligned_embeddings), ("caption_embeddings", caption_embeddings)):
            if s not in arrays:
                raise DataValidationError(None, name, f"missing split {s!r}")
            if len(arrays[s]) != len(responses[s]):
                raise DataValidationError(None, f"{name}[{s!r}]", f"{len(arrays[s])} rows for "
                                          f"{len(responses[s])} images")
    A = np.concatenate([_normalize_rows(aligned_embeddings[s]) for s in splits])
    T = np.concatenate([_normalize_rows(caption_embeddings[s]) for s in splits])
    if A.shape[1] != T.shape[1]:
        raise DataValidationError(None, "aligned_embeddings", f"dimension {A.shape[1]} differs from the caption "
                                  f"embeddings' {T.shape[1]}: the alignment head must project into the caption "
                                  "space (model.align_dim unset)")
    Y = np.concatenate([np.asarray(responses[s], dtype=np.float32) for s in splits])
    masks = {k: np.asarray(v, dtype=bool) for k, v in (roi_masks or {}).items()}
    meta = {**dict(info or {}), "n_fit": int(len(Y)), "fit_splits": splits, "cv": int(cv),
            "alphas": [float(a) for a in alphas]}
    return TextToBrain(
        aligned=fit_linear_readout(A, Y, alphas, cv, device), text=fit_linear_readout(T, Y, alphas, cv, device),
        image_mean=A.mean(axis=0).astype(np.float32), text_mean=T.mean(axis=0).astype(np.float32),
        text_encoder=text_encoder, long_policy=long_policy, roi_masks=masks, info=meta)


# ----------------------------------------------------------------------------------- image embeddings
@torch.no_grad()
def aligned_image_outputs(encoder: LLMVEMEncoder, *, features: Mapping[str, np.ndarray] | None = None,
                          images: ImageCollection | None = None, batch_size: int = 64
                          ) -> tuple[np.ndarray, np.ndarray]:
    """Predicted responses and aligned embeddings of images under a trained LLM-VEM.

    Frozen-backbone ``features`` are used when given and the model's backbone was not fine-tuned (stage 1
    only); otherwise the images are run through the model's own backbone.

    Parameters
    ----------
    encoder : LLMVEMEncoder
        A fitted or loaded model (:func:`llmvem.train.load.load_trained_model`) with an alignment head.
    features : dict of layer to array of shape (n_images, d_layer), optional
        Readout layers plus ``"pooled"``.
    images : ImageCollection, optional

    Returns
    -------
    responses : array of shape (n_images, n_voxels), float32
    embeddings : array of shape (n_images, dim), float32, L2-normalised rows
    """
    from llmvem.train.load import has_finetuned_backbone
    from llmvem.train.tensors import autocast, load_image_tensor, resolve_precision

    net = encoder.network_
    if net is None:
        raise ConfigError("the encoder is not fitted; fit it or load a trained model first")
    if net.head is None:
        raise ConfigError("this model has no alignment head, so it has no aligned embedding space")
    device = next(net.parameters()).device
    precision = resolve_precision(encoder.config.train.precision, device)
    use_features = features is not None and not has_finetuned_backbone(encoder.config)
    if use_features:
        assert features is not None
        layers = net.required_layers(True)
        missing = [k for k in layers if k not in features]
        if missing:
            raise DataValidationError(None, "features", f"missing layers {missing}; expected {layers}")
        n = len(features[layers[0]])
        tensors = {k: torch.as_tensor(np.asarray(features[k]), dtype=torch.float32) for k in layers}
    else:
        if images is None:
            raise ConfigError("this model's backbone was fine-tuned (stage 2): pass the images, not cached "
                              "frozen-backbone features")
        if net.backbone is None:
            raise ConfigError("the model has no backbone; pass features")
        pixels = load_image_tensor(images, int(net.backbone.image_size), show_progress=False)
        n = len(pixels)
    was = net.training
    net.eval()
    voxels, emb = [], []
    try:
        for s in range(0, n, batch_size):
            with autocast(device, precision):
                if use_features:
                    out = net(features={k: v[s : s + batch_size].to(device) for k, v in tensors.items()},
                              with_embedding=True)
                else:
                    out = net(images=pixels[s : s + batch_size].to(device), with_embedding=True)
            assert out.embedding is not None
            voxels.append(out.voxels.float().cpu())
            emb.append(out.embedding.float().cpu())
    finally:
        net.train(was)
    if not voxels:
        return np.zeros((0, net.n_voxels), np.float32), np.zeros((0, 0), np.float32)
    return torch.cat(voxels).numpy(), torch.cat(emb).numpy()


# ------------------------------------------------------------------------------------------ evaluation
def evaluate_text_to_brain(t2b: TextToBrain, y_test: np.ndarray, caption_embeddings_test: np.ndarray, *,
                           image_predictions: np.ndarray | None = None,
                           aligned_embeddings_test: np.ndarray | None = None,
                           noise_ceiling: np.ndarray | None = None, hemisphere: np.ndarray | None = None
                           ) -> dict[str, Any]:
    """Score text-only predictions of held-out images next to the image-driven prediction.

    Parameters
    ----------
    t2b : TextToBrain
    y_test : array of shape (n_test, n_voxels)
        Measured responses of the test images (never used in fitting).
    caption_embeddings_test : array of shape (n_test, dim)
        Embeddings of the test images' captions: the only input of the text-only predictions.
    image_predictions : array of shape (n_test, n_voxels), optional
        The LLM-VEM network's prediction from the images.
    aligned_embeddings_test : array of shape (n_test, dim), optional
        Aligned embeddings of the test images (scores the aligned readout on its own modality).
    noise_ceiling : array of shape (n_voxels,), optional
    hemisphere : array of shape (n_voxels,), optional

    Returns
    -------
    dict
        ``{"n_test", "metric", "predictors": {name: {"label", "summary", "r"}}}``: ``metric`` is
        ``"mean_accuracy"`` (percent of the noise ceiling) when a ceiling is known, else ``"mean_r"``; each
        ``summary`` is :func:`llmvem.evaluate.metrics.evaluate_predictions`'s (overall and per ROI); ``r`` is the
        per-voxel correlation (list).
    """
    from llmvem.evaluate.metrics import evaluate_predictions

    y = np.asarray(y_test, dtype=np.float32)
    preds: dict[str, np.ndarray] = {}
    if image_predictions is not None:
        preds["image"] = np.asarray(image_predictions, dtype=np.float32)
    preds["text_aligned"] = t2b.predict(caption_embeddings_test, "aligned")
    preds["text_readout"] = t2b.predict(caption_embeddings_test, "text")
    if aligned_embeddings_test is not None:
        preds["aligned_image"] = t2b.aligned.predict(_normalize_rows(aligned_embeddings_test))
    out: dict[str, Any] = {"n_test": int(len(y)), "metric": "mean_accuracy" if noise_ceiling is not None
                           else "mean_r", "predictors": {}}
    for name, p in preds.items():
        if p.shape != y.shape:
            raise DataValidationError(None, name, f"predictions of shape {p.shape}, expected {y.shape}")
        ev = evaluate_predictions(y, p, noise_ceiling, t2b.roi_masks, hemisphere)
        out["predictors"][name] = {"label": PREDICTORS[name], "summary": ev["summary"], "r": ev["r"].tolist()}
    return out


def fit_model_text_to_brain(model_dir: str | Path, inputs: PreparedInputs, *,
                            alphas: Sequence[float] = DEFAULT_ALPHAS, device: str | None = None,
                            save: bool = True) -> tuple[TextToBrain, dict[str, Any] | None]:
    """Fit, evaluate and store the text-to-brain readouts of one trained model.

    Parameters
    ----------
    model_dir : str or Path
        Folder of a model trained with λ > 0 (``config.yaml``, ``model.safetensors``).
    inputs : PreparedInputs
        The dataset, caption embeddings and cached features the model was trained on
        (:func:`llmvem.inputs.prepare_inputs` of its config).
    alphas : sequence of float
    device : str, optional
        Device of the model and of the ridge fits; default ``"auto"`` for the model and
        ``config.evaluate.ridge_device`` for the ridge fits.
    save : bool
        Write ``text_to_brain.safetensors`` / ``.json`` and the default voxel-description vocabulary
        (``vocabulary.txt``, see :func:`llmvem.explain.vocabulary.default_vocabulary`) into
        ``model_dir``.

    Returns
    -------
    (TextToBrain, evaluation or None)
        The evaluation (see :func:`evaluate_text_to_brain`) is None when the test split has no responses.
    """
    from llmvem.train.load import load_trained_model
    from llmvem.utils import resolve_device

    model_dir = Path(model_dir)
    enc = load_trained_model(model_dir, backbone=inputs.backbone, device=resolve_device(device or "auto"))
    cfg = enc.config
    lam = float(cfg.model.lambda_align)
    if lam <= 0:
        raise ConfigError(f"{model_dir}: trained with model.lambda_align = {lam:g}; its alignment head is untrained, "
                          "so text-to-brain needs a model trained with λ > 0")
    ds = inputs.dataset
    if ds.n_voxels != enc.network_.n_voxels:  # type: ignore[union-attr]
        raise DataValidationError(ds.source, "responses", f"{ds.n_voxels} voxels but the model in {model_dir} "
                                  f"predicts {enc.network_.n_voxels}")  # type: ignore[union-attr]
    aligned, image_pred = {}, {}
    for split in ds.splits:
        image_pred[split], aligned[split] = aligned_image_outputs(
            enc, features=inputs.features.get(split), images=ds.splits[split].images)
    ridge_device = resolve_device(device or cfg.evaluate.ridge_device)
    info = {"model": model_dir.name, "model_dir": str(model_dir), "lambda": lam, "dataset": ds.name,
            "backbone": cfg.backbone.name, "finetuned_backbone": cfg.train.stage2.epochs > 0}
    t2b = fit_text_to_brain(aligned, inputs.text_embeddings, {s: ds.splits[s].responses for s in ds.splits},
                            text_encoder=cfg.text.encoder, long_policy=cfg.text.long_policy,
                            fit_splits=[s for s in ("train", "val") if s in ds.splits], roi_masks=ds.roi_masks,
                            alphas=alphas, cv=cfg.evaluate.ridge_folds, device=ridge_device, info=info)
    evaluation = None
    if ds.test.responses is not None:
        evaluation = evaluate_text_to_brain(t2b, ds.test.responses, inputs.text_embeddings["test"],
                                            image_predictions=image_pred["test"],
                                            aligned_embeddings_test=aligned["test"],
                                            noise_ceiling=ds.noise_ceiling, hemisphere=ds.hemisphere)
    if save:
        from llmvem.explain.vocabulary import VOCABULARY_FILE, default_vocabulary, write_vocabulary

        t2b.save(model_dir, evaluation)
        phrases, source = default_vocabulary(ds.meta, inputs.captions.get("train"))
        write_vocabulary(model_dir / VOCABULARY_FILE, phrases, f"default vocabulary of {model_dir.name}: {source}")
    return t2b, evaluation

