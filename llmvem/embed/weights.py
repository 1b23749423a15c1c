"""Backbone plumbing shared by the image backbones: safe weight-file loading, file fingerprints, views on groups
of a model's modules, and layer-spec checks."""

from __future__ import annotations

import hashlib
import pickle
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmvem.data.safe_load import WEIGHT_LOAD_ERRORS, weights_load_error
from llmvem.embed.base import ImageBackbone
from llmvem.embed.spatial import LayerSpec, parse_layer_spec, validate_layer_specs
from llmvem.errors import ModelLoadError, UnsafeFileError

__all__ = ["BlockGroup", "check_layers", "file_sha256", "load_state_dict_file"]


def file_sha256(path: Path, length: int = 16) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:length]


def load_state_dict_file(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a weights file safely: ``.safetensors``, or a torch file loaded with ``weights_only=True``.

    Checkpoints that wrap the weights (``{"state_dict": ...}``, ``{"model": ...}``) are unwrapped.

    Raises
    ------
    ModelLoadError
        The file is missing or unreadable.
    UnsafeFileError
        The torch file needs arbitrary code (pickled objects) to load.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelLoadError(f"{path}: weights: file not found; expected a .safetensors or .pt/.pth state dict")
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(path))
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeFileError(
            f"{path}: weights: the file holds pickled Python objects and llmvem refuses to execute them; "
            f"save a plain state dict (torch.save(model.state_dict(), ...)) or a .safetensors file ({exc})"
        ) from exc
    except WEIGHT_LOAD_ERRORS as exc:  # a damaged .safetensors file
        raise weights_load_error(path, exc) from exc
    except (OSError, RuntimeError, ValueError) as exc:
        raise ModelLoadError(f"{path}: weights: cannot read the file ({type(exc).__name__}: {exc})") from exc
    for key in ("state_dict", "model", "module"):
        if isinstance(state, dict) and key in state and isinstance(state[key], dict):
            state = state[key]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise ModelLoadError(f"{path}: weights: expected a dict of parameter name → tensor")
    return state


class BlockGroup(nn.Module):
    """A view on some of a model's modules and parameters (the same objects, not copies)."""

    def __init__(self, modules: Sequence[nn.Module], params: Sequence[nn.Parameter] = ()):
        super().__init__()
        self.parts = nn.ModuleList(modules)
        self.loose = nn.ParameterList(params)


def check_layers(backbone: ImageBackbone, layers: Sequence[str]) -> list[LayerSpec]:
    """Parsed specs of the requested layers other than ``"pooled"`` (see :mod:`llmvem.embed.spatial`)."""
    return [parse_layer_spec(name) for name in validate_layer_specs(layers, backbone.layer_names, backbone.model_id)]
