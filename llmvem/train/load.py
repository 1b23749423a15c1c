"""Load a trained LLM-VEM network back from the folder the trainer wrote.

:func:`~llmvem.train.train_encoding_model` leaves ``config.yaml``, ``training.json`` and ``model.safetensors`` in
its run folder (``<experiment>/models/<name>/`` under ``llmvem demo``). :func:`load_trained_model` rebuilds the
network from them and returns a fitted :class:`~llmvem.estimators.LLMVEMEncoder`, so ``.predict(images)`` works as
after ``fit``. Nothing is unpickled: weights come from safetensors, the rest from YAML/JSON.

The frozen backbone of a stage-1-only model is not in ``model.safetensors``; it is rebuilt from
``config.backbone`` (its own pretrained or seeded weights, exactly as in training). A model whose final stage is
stage 2 carries its fine-tuned backbone weights, which are loaded into a private copy of the backbone.

Examples
--------
>>> from llmvem.train.load import load_trained_model
>>> enc = load_trained_model("runs/demo/models/llmvem_lambda0.1")       # doctest: +SKIP
>>> pred = enc.predict(images)                                          # doctest: +SKIP
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from llmvem.config import RunConfig, load_config
from llmvem.embed.base import ImageBackbone
from llmvem.embed.trunk_cache import attach_trunk_cache
from llmvem.errors import CheckpointError, ConfigError
from llmvem.estimators import LLMVEMEncoder
from llmvem.model.network import LLMVEM
from llmvem.train.checkpoint import load_weights
from llmvem.utils import resolve_device

__all__ = ["MODEL_FILES", "has_finetuned_backbone", "is_model_folder", "load_trained_model", "read_training_summary"]

#: Files a trained-model folder must hold.
MODEL_FILES = ("config.yaml", "model.safetensors")


def is_model_folder(path: str | Path) -> bool:
    """Whether ``path`` holds a trained network (``config.yaml`` and ``model.safetensors``)."""
    p = Path(path)
    return all((p / name).is_file() for name in MODEL_FILES)


def has_finetuned_backbone(config: RunConfig) -> bool:
    """Whether a model trained with ``config`` ends with stage 2 (so its backbone differs from the frozen one
    and cached frozen-backbone features do not describe it)."""
    return config.train.stage2.epochs > 0


def read_training_summary(model_dir: str | Path) -> dict[str, Any]:
    """``training.json`` of a trained-model folder (metrics, stages, dataset identity); ``{}`` when absent."""
    path = Path(model_dir) / "training.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read the training summary ({exc}); expected the JSON file "
                              "written by the trainer") from exc


def load_trained_model(model_dir: str | Path, *, backbone: ImageBackbone | None = None,
                       device: str = "cpu") -> LLMVEMEncoder:
    """Rebuild a trained LLM-VEM network from its run folder.

    Parameters
    ----------
    model_dir : str or Path
        Folder written by :func:`~llmvem.train.train_encoding_model` (``config.yaml``, ``model.safetensors``).
    backbone : ImageBackbone, optional
        The backbone named in the model's ``config.backbone``, when the caller already has it (saves loading it
        again). It is copied before fine-tuned (stage-2) weights are loaded into it, so the caller's object is
        never changed. Default: built from ``config.backbone``.
    device : str
        ``"cpu"``, ``"cuda"``, ``"auto"``...

    Returns
    -------
    LLMVEMEncoder
        With ``network_`` (eval mode, on ``device``), ``backbone_`` and ``config`` set; ``result_`` is None.
        ``network_.head`` is the alignment head (None for a network trained without one).

    Raises
    ------
    CheckpointError
        A file is missing or unreadable, or the weights do not fit the network the config describes.
    ConfigError
        ``config.yaml`` is invalid.
    """
    folder = Path(model_dir)
    if not folder.is_dir():
        raise CheckpointError(f"{folder}: no such model folder; expected the run folder of a trained model "
                              "(config.yaml, model.safetensors), e.g. runs/demo/models/llmvem_lambda0.1")
    for name in MODEL_FILES:
        if not (folder / name).is_file():
            raise CheckpointError(f"{folder / name}: missing; {folder} is not the folder of a trained model "
                                  "(expected config.yaml and model.safetensors written by the trainer)")
    config = load_config(folder / "config.yaml")
    state = load_weights(folder / "model.safetensors")
    includes_backbone = any(k.startswith("backbone.") for k in state)
    if backbone is None:
        from llmvem.inputs import load_config_backbone

        backbone = load_config_backbone(config)
    elif includes_backbone:
        backbone = copy.deepcopy(backbone)

    layers = list(config.backbone.layers)
    try:
        layer_dims = {layer: int(backbone.layer_dim(layer)) for layer in layers}
    except (KeyError, ValueError, ConfigError) as exc:
        raise CheckpointError(f"{folder / 'config.yaml'}: backbone.layers {layers} do not exist in the backbone "
                              f"{backbone.model_id} ({exc})") from exc
    n_features = int(state["feature_mean"].shape[0]) if "feature_mean" in state else None
    if n_features != sum(layer_dims.values()):
        raise CheckpointError(f"{folder / 'model.safetensors'}: the readout reads {n_features} features but "
                              f"backbone {backbone.model_id} layers {layers} give {sum(layer_dims.values())}; "
                              "was the model trained with another backbone?")
    map_shapes = None
    if config.model.spatial_readout != "none":
        map_shapes = {layer: backbone.layer_shape(layer) for layer in config.backbone.spatial_layers}
    n_train = read_training_summary(folder).get("dataset", {}).get("n_train")
    try:
        network = LLMVEM.from_state_dict(config.model, state, layer_dims, n_train=n_train, backbone=backbone,
                                         seed=config.seed, map_shapes=map_shapes)  # type: ignore[arg-type]
    except ValueError as exc:
        raise CheckpointError(f"{folder / 'model.safetensors'}: {exc}; config.yaml says model.readout = "
                              f"{config.model.readout!r}, model.spatial_readout = "
                              f"{config.model.spatial_readout!r}") from exc
    network.to(resolve_device(device)).eval()
    attach_trunk_cache(network, config.train.stage2.unfreeze_last_n,  # the trunk stage 2 left frozen
                       config.train.trunk_cache_mib * 2**20)
    encoder = LLMVEMEncoder(config)
    encoder.network_, encoder.backbone_ = network, backbone
    return encoder
