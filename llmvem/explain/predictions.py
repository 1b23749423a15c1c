"""In-silico experiments: pick a trained model in a run folder, predict responses, write them to HDF5.

HDF5 layout written by :func:`write_predictions_h5`:

``responses``
    float32 (n_stimuli, n_voxels), predicted responses in the units of the training responses.
``image_ids`` or ``texts``
    UTF-8 strings (n_stimuli,): the image ids (file names without extension) or the texts.
``roi/<name>``
    bool (n_voxels,), the ROI masks of the training dataset, when known.
``hemisphere``, ``fsaverage_index``
    (n_voxels,) ``"lh"``/``"rh"`` strings and int fsaverage vertex of each voxel, when the dataset has them
    (Algonauts: lh voxels first).
attributes
    ``kind`` (``"images"`` or ``"text"``), ``model``, ``model_dir``, ``lambda_align``, ``backbone``,
    ``text_encoder``, ``n_voxels``, ``dataset``, ``created``, ``llmvem_version`` and, for text,
    ``readout`` and ``mapping`` (how the text → brain mapping is made).
"""

from __future__ import annotations

import datetime as _dt
import os
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.errors import CheckpointError, DataValidationError

__all__ = ["model_attributes", "predict_image_folder", "predict_images", "read_predictions_h5", "resolve_model_dir",
           "roi_masks_of", "voxel_layout_of", "write_predictions_h5"]


def _positive_lambda_models(models: Path) -> list[tuple[Path, float]]:
    from llmvem.config import load_config
    from llmvem.train.load import is_model_folder

    out = []
    for d in sorted(p for p in models.iterdir() if p.is_dir()):
        if is_model_folder(d):
            out.append((d, float(load_config(d / "config.yaml").model.lambda_align)))
    return out


def resolve_model_dir(run: str | Path, model: str | None = None, for_text: bool = False) -> Path:
    """The trained-model folder that ``run`` designates.

    Parameters
    ----------
    run : str or Path
        A trained-model folder (``config.yaml`` + ``model.safetensors``), or an experiment run folder with
        ``models/<name>/`` (``llmvem demo``, ``llmvem train``).
    model : str, optional
        Name of the model under ``run/models`` (e.g. ``llmvem_lambda0.1``, or ``ridge``: a saved ridge). Default: the
        model the run chose on validation (``metrics.json``, :func:`llmvem.evaluate.selection.choose_model`) when
        it can be loaded, else the only model trained with λ > 0.
    for_text : bool
        The model serves texts (text-to-brain readouts need an alignment head): the default is then chosen by the
        same rule among the models trained with λ > 0, as the run's text-to-brain section was.

    Raises
    ------
    CheckpointError
        No such folder or model; the message lists the models that exist.
    """
    from llmvem.train.load import is_model_folder

    run = Path(run)
    if not run.is_dir():
        raise CheckpointError(f"{run}: no such run folder; expected an experiment folder (llmvem demo --out) or a "
                              "trained-model folder (config.yaml, model.safetensors)")
    if is_model_folder(run) and model is None:
        return run
    models = run / "models"
    if not models.is_dir():
        if (err := _missing_model_file(run)) is not None:
            raise err
        raise CheckpointError(f"{run}: neither a trained-model folder (config.yaml + model.safetensors) nor an "
                              "experiment folder with models/")
    found = _positive_lambda_models(models)
    names = [d.name for d, _ in found] + sorted(d.name for d in models.iterdir()
                                                if d.is_dir() and not is_model_folder(d) and _servable(d))
    if model is not None:
        if model not in names:
            raise _missing_model_file(models / model) or CheckpointError(
                f"{models / model}: no trained model of that name; models in {run}: {', '.join(names) or 'none'}")
        return models / model
    positive_names = [d.name for d, lam in found if lam > 0]
    chosen = _chosen_in_run(run, positive_names if for_text else names)
    if chosen is not None:
        return models / chosen
    positive = [d for d, lam in found if lam > 0]
    if len(positive) == 1:
        return positive[0]
    incomplete = [e for d in sorted(models.iterdir()) if (e := _missing_model_file(d)) is not None]
    if incomplete and not names:  # say which file is missing, not "0 models among none"
        raise incomplete[0]
    raise CheckpointError(f"{run}: cannot choose a model ({len(positive)} trained with λ > 0 among "
                          f"{', '.join(names) or 'none'}, and no metrics.json to choose on validation); name one "
                          "with --model")


def _missing_model_file(folder: Path) -> CheckpointError | None:
    """The error naming the missing file of a model folder that holds some, not all, of a trained network's
    files (``config.yaml``, ``model.safetensors``: a folder copied incompletely); None otherwise."""
    from llmvem.train.load import MODEL_FILES

    present = [n for n in MODEL_FILES if (folder / n).is_file()]
    if not present or len(present) == len(MODEL_FILES):
        return None
    missing = next(n for n in MODEL_FILES if n not in present)
    return CheckpointError(f"{folder / missing}: missing; a trained-model folder holds {' and '.join(MODEL_FILES)} "
                           "(was it copied incompletely?)")


def _chosen_in_run(run: Path, names: list[str]) -> str | None:
    """The model the run's ``metrics.json`` records as chosen on validation (the one rule of
    :func:`llmvem.evaluate.selection.choose_model`, recomputed from its model records), when it is one of the
    loadable ``names``; None without a readable ``metrics.json``."""
    import json

    from llmvem.evaluate.selection import choose_model

    path = run / "metrics.json"
    try:
        records = json.loads(path.read_text(encoding="utf-8")).get("models")
    except (OSError, ValueError, AttributeError, RecursionError):
        return None
    if not isinstance(records, dict) or not all(isinstance(r, dict) for r in records.values()):
        return None
    sel = choose_model(records)
    if sel.model in names:
        return sel.model
    # the chosen model cannot serve here (a per-voxel choice, say): the best loadable one by the same rule
    sel = choose_model(records, among=names)
    return sel.model


def _servable(folder: Path) -> bool:
    """Whether ``folder`` holds a model ``predict`` can load: a network, a saved ridge or banded ridge, or a
    blend / seed ensemble of such models."""
    from llmvem.composite import BLEND_FILE, ENSEMBLE_FILE
    from llmvem.ridge_encoders import BANDED_FILE, RIDGE_FILE
    from llmvem.train.load import is_model_folder

    return is_model_folder(folder) or any((folder / f).is_file() for f in (RIDGE_FILE, BANDED_FILE, BLEND_FILE,
                                                                           ENSEMBLE_FILE))


def roi_masks_of(model_dir: str | Path) -> dict[str, np.ndarray]:
    """ROI masks of the dataset a model was trained on, from its text-to-brain readouts or from the experiment's
    ``voxel_metrics.npz``; empty when neither is there."""
    from llmvem.explain.text_to_brain import READOUT_FILE, TextToBrain

    model_dir = Path(model_dir)
    if (model_dir / READOUT_FILE).is_file():
        return dict(TextToBrain.load(model_dir).roi_masks)
    npz = model_dir.parent.parent / "voxel_metrics.npz"
    if npz.is_file():
        with np.load(npz, allow_pickle=False) as z:
            return {k[len("roi__"):]: z[k].astype(bool) for k in z.files if k.startswith("roi__")}
    return {}


def voxel_layout_of(model_dir: str | Path) -> dict[str, np.ndarray]:
    """``hemisphere`` and ``fsaverage_index`` per voxel from the run's ``voxel_metrics.npz`` (those it has)."""
    npz = Path(model_dir).parent.parent / "voxel_metrics.npz"
    if not npz.is_file():
        return {}
    with np.load(npz, allow_pickle=False) as z:
        return {k: z[k] for k in ("hemisphere", "fsaverage_index") if k in z.files}


def _model_config_path(model_dir: Path) -> Path:
    """``config.yaml`` of a model folder, or of its run (a saved ridge has none of its own)."""
    own = model_dir / "config.yaml"
    return own if own.is_file() else model_dir.parent.parent / "config.yaml"


def model_attributes(model_dir: str | Path) -> dict[str, Any]:
    """Provenance attributes of a trained model (for HDF5 attributes and the CLI)."""
    from importlib.metadata import PackageNotFoundError, version

    from llmvem.config import load_config
    from llmvem.estimators import RIDGE_FILE
    from llmvem.train.load import read_training_summary

    model_dir = Path(model_dir)
    cfg = load_config(_model_config_path(model_dir))
    summary = read_training_summary(model_dir)
    ridge = (model_dir / RIDGE_FILE).is_file()
    try:
        ver = version("llmvem")
    except PackageNotFoundError:
        ver = "unknown"
    return {"model": model_dir.name, "model_dir": str(model_dir.resolve()),
            "lambda_align": float("nan") if ridge else float(cfg.model.lambda_align), "backbone": cfg.backbone.name,
            "text_encoder": cfg.text.encoder, "dataset": str(summary.get("dataset", {}).get("name", "")),
            "config_hash": str(summary.get("config_hash", "")), "llmvem_version": ver,
            "created": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds")}


def predict_image_folder(model_dir: str | Path, folder: str | Path, *, device: str = "auto",
                         batch_size: int = 64) -> tuple[np.ndarray, list[str]]:
    """Predicted responses of a trained model to every image of a folder.

    Parameters
    ----------
    model_dir : str or Path
        Trained-model folder.
    folder : str or Path
        Images (jpg, png, ...; see :func:`llmvem.data.images.list_image_files`).
    device : str
    batch_size : int

    Returns
    -------
    responses : array of shape (n_images, n_voxels), float32
    image_ids : list of str
        File names without extension (with it when two files share a stem), in ``responses`` row order.

    A saved ridge (``models/ridge``) predicts from the frozen features of the run's backbone (feature cache of
    the run's ``cache_dir``).
    """
    from llmvem.data.images import FileImages, list_image_files

    files = list_image_files(folder)
    if not files:
        raise DataValidationError(folder, "images", "no image files (jpg, png, ...) in the folder")
    stems = [f.stem for f in files]
    # ids are file names without extension (as the datasets name images), unless two files share a stem
    images = FileImages(files, ids=stems if len(set(stems)) == len(stems) else [f.name for f in files])
    return predict_images(Path(model_dir), images, device=device, batch_size=batch_size), list(images.ids)


def predict_images(model_dir: Path, images: Any, *, device: str = "auto", batch_size: int = 64,
                   _features: dict[tuple[str, ...], dict[str, np.ndarray]] | None = None) -> np.ndarray:
    """Predictions (n_images, n_voxels), float32, of the model in ``model_dir`` for an image collection: a
    network from the images; a ridge or banded ridge from the frozen features of the run's backbone (feature
    cache of the run's ``cache_dir``); a blend or seed ensemble from its members, combined as in training.

    Raises
    ------
    CheckpointError
        The folder holds no model, or a composite model names a member outside the run's ``models/``.
    """
    from llmvem.composite import read_composite
    from llmvem.ridge_encoders import BANDED_FILE, RIDGE_FILE
    from llmvem.train.load import load_trained_model
    from llmvem.utils import resolve_device

    features = {} if _features is None else _features
    composite = read_composite(model_dir)
    if composite is not None:
        kind, rec = composite
        if kind == "ensemble":
            preds = [predict_images(model_dir / m, images, device=device, batch_size=batch_size, _features=features)
                     for m in rec["member_folders"]]
            return np.mean(preds, axis=0).astype(np.float32)
        weights = rec.get("weights", {})
        if not isinstance(weights, dict) or set(weights) != set(rec["member_folders"]):
            raise CheckpointError(f"{model_dir}: blend.json: weights must name every member")
        return np.sum([float(weights[n]) * predict_images(model_dir.parent / m, images, device=device,
                                                          batch_size=batch_size, _features=features)
                       for n, m in rec["member_folders"].items()], axis=0).astype(np.float32)
    linear = None
    if (model_dir / RIDGE_FILE).is_file():
        from llmvem.estimators import RidgeEncoder

        linear = RidgeEncoder.load(model_dir)
    elif (model_dir / BANDED_FILE).is_file():
        from llmvem.estimators import BandedRidgeEncoder

        linear = BandedRidgeEncoder.load(model_dir)
    if linear is not None:
        from llmvem.config import load_config
        from llmvem.inputs import extract_image_features, load_config_backbone

        cfg = load_config(_model_config_path(model_dir))
        cfg.backbone.device = device
        key = tuple(linear.layers or [])
        if key not in features:
            features[key] = extract_image_features(cfg, images, load_config_backbone(cfg), list(key),
                                                   show_progress=False)
        return linear.predict(features[key])
    encoder = load_trained_model(model_dir, device=resolve_device(device))
    return encoder.predict(images, batch_size=batch_size)


def write_predictions_h5(path: str | Path, responses: np.ndarray, *, image_ids: Sequence[str] | None = None,
                         texts: Sequence[str] | None = None, attrs: Mapping[str, Any] | None = None,
                         roi_masks: Mapping[str, np.ndarray] | None = None,
                         voxel_layout: Mapping[str, np.ndarray] | None = None) -> Path:
    """Write predicted responses to an HDF5 file (layout in the module docstring), atomically.

    Parameters
    ----------
    path : str or Path
    responses : array of shape (n_stimuli, n_voxels)
    image_ids, texts : sequence of str, length n_stimuli
        Exactly one of them names the rows.
    attrs : dict, optional
        Scalar or string attributes.
    roi_masks : dict of str to bool array of shape (n_voxels,), optional
    voxel_layout : dict, optional
        ``hemisphere`` (str array (n_voxels,)) and/or ``fsaverage_index`` (int array (n_voxels,)).
    """
    import h5py

    path = Path(path)
    y = np.asarray(responses, dtype=np.float32)
    if y.ndim != 2:
        raise DataValidationError(None, "responses", f"expected shape (n_stimuli, n_voxels), got {y.shape}")
    if (image_ids is None) == (texts is None):
        raise DataValidationError(None, "rows", "give exactly one of image_ids and texts")
    names = list(image_ids if image_ids is not None else texts)  # type: ignore[arg-type]
    if len(names) != len(y):
        raise DataValidationError(None, "image_ids" if texts is None else "texts",
                                  f"{len(names)} names for {len(y)} rows of responses")
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        from llmvem.utils import follow_umask

        follow_umask(tmp)  # the mode open() would give, not mkstemp's 0600
        with h5py.File(tmp, "w") as f:
            f.create_dataset("responses", data=y, compression="gzip" if y.size > 65536 else None)
            f.create_dataset("image_ids" if texts is None else "texts", data=np.array(names, dtype=object),
                             dtype=h5py.string_dtype("utf-8"))
            for name, mask in (roi_masks or {}).items():
                f.create_dataset(f"roi/{name}", data=np.asarray(mask, dtype=bool))
            for key, values in (voxel_layout or {}).items():
                if len(values) != y.shape[1]:
                    raise DataValidationError(None, key, f"{len(values)} values for {y.shape[1]} voxels")
                if key == "hemisphere":
                    f.create_dataset(key, data=np.asarray(values).astype(object), dtype=h5py.string_dtype("utf-8"))
                else:
                    f.create_dataset(key, data=np.asarray(values, dtype=np.int64))
            for key, value in {**(attrs or {}), "kind": "images" if texts is None else "text",
                               "n_voxels": int(y.shape[1])}.items():
                f.attrs[key] = value
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return path


def read_predictions_h5(path: str | Path) -> dict[str, Any]:
    """Read a file written by :func:`write_predictions_h5`.

    Returns
    -------
    dict
        ``responses`` (n, n_voxels) float32, ``image_ids`` or ``texts`` (list of str), ``roi`` (dict of masks),
        ``attrs`` (dict), and ``hemisphere`` (list of str) / ``fsaverage_index`` (int array) when written.
    """
    import h5py

    path = Path(path)
    try:
        with h5py.File(path, "r") as f:
            out: dict[str, Any] = {"responses": f["responses"][()], "attrs": dict(f.attrs),
                                   "roi": {k: v[()] for k, v in f["roi"].items()} if "roi" in f else {}}
            for key in ("image_ids", "texts", "hemisphere"):
                if key in f:
                    out[key] = [s.decode("utf-8") if isinstance(s, bytes) else str(s) for s in f[key][()]]
            if "fsaverage_index" in f:
                out["fsaverage_index"] = f["fsaverage_index"][()]
    except (OSError, KeyError) as exc:
        raise DataValidationError(path, "file", f"not a predictions file written by llmvem predict ({exc})") from exc
    return out
