"""A visual core trained on other sessions: the fine-tuned backbone of a finished training folder.

A lab that has trained one network on its earlier recordings (``llmvem train-multi`` with stage 2: one backbone
fine-tuned on the images of every session, one readout per session) fits a new session on top of that backbone
instead of the ImageNet one. :func:`load_core` reads the folder's ``model.safetensors`` (no unpickling), keeps the
``backbone.*`` tensors of the network's selected state, checks that they fit the configured backbone exactly
(same names and shapes) and loads them. The backbone's ``model_id`` gains ``+core:<hash>`` (SHA-256 of those
tensors), so the feature cache stores the new core's features under their own key and never hands out features
of the pretrained backbone, or of another core, for them.

Set it with ``backbone.init_core`` (``llmvem train --init-core RUN``); everything that reads features then reads
the core's: the ridges, the readouts' ridge start, stage 1 and (when ``train.stage2.epochs > 0``) stage 2, which
fine-tunes the loaded core further on the new session.
"""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import torch

from llmvem.embed.base import ImageBackbone
from llmvem.errors import ConfigError

__all__ = ["CORE_PREFIX", "core_weights_path", "load_core"]

log = logging.getLogger(__name__)

#: Prefix of the backbone's tensors in a network's state.
CORE_PREFIX = "backbone."


def core_weights_path(run: str | Path) -> Path:
    """The weights file of a training folder: ``RUN/model.safetensors``, or ``RUN/joint/model.safetensors`` for
    the output folder of ``llmvem train-multi``.

    Raises
    ------
    ConfigError
        When neither exists, naming what was looked for.
    """
    run = Path(run).expanduser()
    for path in (run / "model.safetensors", run / "joint" / "model.safetensors"):
        if path.is_file():
            return path
    raise ConfigError(f"backbone.init_core: {run} holds no model.safetensors (nor joint/model.safetensors); "
                      "expected a finished training folder, e.g. the --out folder of llmvem train-multi")


def _saved_backbone_name(weights: Path) -> str | None:
    """``backbone.name`` of the folder's config.yaml, if it has one that parses."""
    from llmvem.config import load_config
    from llmvem.errors import LLMVEMError

    config = weights.parent / "config.yaml"
    if not config.is_file():
        return None
    try:
        return load_config(config).backbone.name
    except LLMVEMError as exc:
        raise ConfigError(f"backbone.init_core: {config}: cannot read the core's configuration ({exc})") from exc


def load_core(backbone: ImageBackbone, run: str | Path, backbone_name: str | None = None) -> str:
    """Load the fine-tuned backbone of training folder ``run`` into ``backbone`` (in place).

    Parameters
    ----------
    backbone : ImageBackbone
        The configured backbone (same architecture as the one the folder fine-tuned).
    run : path
        A finished training folder (``train-multi``'s ``--out`` or its ``joint/``, or a model folder of
        ``llmvem train`` trained with stage 2).
    backbone_name : str, optional
        The configured ``backbone.name``; refused when the folder's config names another backbone.

    Returns
    -------
    str
        The core's identity: the first 12 hex digits of the SHA-256 of its tensors (also appended to
        ``backbone.model_id`` as ``+core:<identity>``).

    Raises
    ------
    ConfigError
        The folder is not a training folder, was trained without stage 2 (no backbone weights), or its
        backbone differs from the configured one (another name, missing or extra tensors, other shapes).
    CheckpointError
        The weights file is unreadable.
    """
    from llmvem.train.checkpoint import load_weights

    weights = core_weights_path(run)
    saved = _saved_backbone_name(weights)
    if backbone_name is not None and saved is not None and saved != backbone_name:
        raise ConfigError(f"backbone.init_core: {weights.parent / 'config.yaml'} fine-tuned backbone {saved!r}, "
                          f"but backbone.name is {backbone_name!r}; set backbone.name={saved}")
    state = load_weights(weights)
    core = {k[len(CORE_PREFIX):]: v for k, v in state.items() if k.startswith(CORE_PREFIX)}
    if not core:
        raise ConfigError(f"backbone.init_core: {weights} holds no backbone weights: the folder was trained "
                          "without stage 2 (train.stage2.epochs = 0), so its backbone is the pretrained one; "
                          "train the core with train.stage2.epochs > 0")
    own = backbone.state_dict()
    missing = sorted(set(own) - set(core))
    extra = sorted(set(core) - set(own))
    if missing or extra:
        raise ConfigError(f"backbone.init_core: {weights}: its backbone does not fit {backbone.model_id} "
                          f"(missing {missing[:3]}, unexpected {extra[:3]}); was it trained with another "
                          "backbone?")
    bad = [k for k in own if tuple(own[k].shape) != tuple(core[k].shape)]
    if bad:
        k = bad[0]
        raise ConfigError(f"backbone.init_core: {weights}: tensor backbone.{k} has shape {tuple(core[k].shape)}, "
                          f"expected {tuple(own[k].shape)} ({len(bad)} tensors differ)")
    digest = hashlib.sha256()
    for k in sorted(core):
        t = core[k].detach().to(torch.float32).contiguous().cpu()
        digest.update(k.encode())
        digest.update(t.numpy().tobytes())
    identity = digest.hexdigest()[:12]
    backbone.load_state_dict({k: core[k].to(own[k].dtype) for k in own}, strict=True)
    backbone.model_id = f"{backbone.model_id}+core:{identity}"
    log.info("backbone %s: fine-tuned core loaded from %s", backbone.model_id, weights)
    return identity
