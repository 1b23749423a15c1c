"""In-memory tensors of training and prediction: decoded images, backbone features, batched prediction.

Stage 2 keeps the training images as decoded, resized uint8 tensors in memory, so no step decodes a JPEG; the
same decoded tensors feed the frozen backbone when stage-1 features are computed here, so stage 1 and stage 2
see identical inputs.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from llmvem.data.images import ImageCollection
from llmvem.embed.base import ImageBackbone
from llmvem.utils import progress

if TYPE_CHECKING:
    from llmvem.config import RunConfig

__all__ = ["readout_layers", "autocast", "augment_images", "backbone_features", "load_image_tensor", "predict_network",
           "resolve_precision"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``"auto"`` → ``"bf16"`` on a CUDA device that supports it, else ``"fp32"``."""
    if precision != "auto":
        return precision
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return "bf16"
    return "fp32"


def autocast(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """bf16 autocast on ``device`` when ``precision == "bf16"``, else a no-op context."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def load_image_tensor(images: ImageCollection, size: int, desc: str = "decoding images",
                      show_progress: bool = True) -> torch.Tensor:
    """Decode and resize every image once.

    Returns
    -------
    uint8 tensor of shape (n_images, size, size, 3), on the CPU
    """
    out = np.empty((len(images), size, size, 3), dtype=np.uint8)
    for i in progress(range(len(images)), desc=desc, total=len(images), unit="img",
                      disable=None if show_progress else True):
        out[i] = images.load_array(i, size)
    return torch.from_numpy(out)


@torch.no_grad()
def backbone_features(backbone: ImageBackbone, images: torch.Tensor, layers: Sequence[str], device: torch.device,
                      batch_size: int = 32, precision: str = "fp32", desc: str = "backbone features",
                      show_progress: bool = True) -> dict[str, torch.Tensor]:
    """Features of the frozen backbone (eval mode) for uint8 images (n, H, W, 3).

    Returns
    -------
    dict of layer to float32 tensor of shape (n_images, d_layer), on the CPU
        Grids and maps (``"block5@grid7"``, ``"block5@map"``) keep their shape (n_images, C, H, W).
    """
    was = backbone.training
    backbone.eval()
    parts: dict[str, list[torch.Tensor]] = {k: [] for k in layers}
    starts = range(0, len(images), batch_size)
    for s in progress(starts, desc=desc, total=len(starts), unit="batch", disable=None if show_progress else True):
        x = backbone.preprocess(images[s : s + batch_size].to(device))
        with autocast(device, precision):
            feats = backbone(x, list(layers))
        for k in layers:
            parts[k].append(feats[k].float().cpu())
    backbone.train(was)
    return {k: torch.cat(v) for k, v in parts.items()}


def augment_images(images: torch.Tensor, generator: torch.Generator, max_shift: float = 1 / 16) -> torch.Tensor:
    """Random horizontal flips and translations (reflect-padded) of uint8 images (B, H, W, 3).

    ``generator`` (a CPU generator) makes the augmentation reproducible.
    """
    b, h, w, _ = images.shape
    flip = torch.rand(b, generator=generator) < 0.5
    pad = max(1, int(round(max_shift * min(h, w))))
    shifts = torch.randint(0, 2 * pad + 1, (b, 2), generator=generator)
    x = images.permute(0, 3, 1, 2).float()
    x = torch.nn.functional.pad(x, (pad, pad, pad, pad), mode="reflect")
    out = torch.empty_like(images)
    for i in range(b):
        dy, dx = int(shifts[i, 0]), int(shifts[i, 1])
        crop = x[i, :, dy : dy + h, dx : dx + w]
        if flip[i]:
            crop = crop.flip(-1)
        out[i] = crop.permute(1, 2, 0).to(images.dtype)
    return out


@torch.no_grad()
def predict_network(network: torch.nn.Module, n: int, device: torch.device, *,
                    features: Mapping[str, torch.Tensor] | None = None, images: torch.Tensor | None = None,
                    batch_size: int = 64, precision: str = "fp32", channels_last: bool = False,
                    key: str | None = None) -> np.ndarray:
    """Predicted responses of ``network`` (an :class:`~llmvem.model.LLMVEM`) in eval mode.

    Parameters
    ----------
    n : int
        Number of samples.
    key : str, optional
        Data key whose readout predicts (see :class:`~llmvem.model.LLMVEM`); None: the network's only key.
    features : mapping of layer to tensor (n, d_layer), optional
    images : uint8 tensor (n, H, W, 3), optional

    Returns
    -------
    array of shape (n, n_voxels), float32
    """
    was = network.training
    network.eval()
    out: np.ndarray | None = None  # filled batch by batch: no list of batches concatenated at the end
    extra = {} if key is None else {"key": key}
    for s in range(0, n, batch_size):
        with autocast(device, precision):
            if features is not None:
                batch = {k: v[s : s + batch_size].to(device) for k, v in features.items()}
                res = network(features=batch, **extra)
            else:
                assert images is not None
                res = network(images=images[s : s + batch_size].to(device), channels_last=channels_last,
                              **extra)
        voxels = res.voxels.float().cpu().numpy()
        if out is None:
            out = np.empty((n, voxels.shape[1]), dtype=np.float32)
        out[s : s + len(voxels)] = voxels
        del res, voxels
    network.train(was)
    if out is not None:
        return out
    n_vox = network.n_voxels if key is None else network.n_voxels_of(key)  # type: ignore[operator]
    return np.zeros((0, n_vox), dtype=np.float32)


def readout_layers(config: RunConfig) -> list[str]:
    """The layers the network reads: ``backbone.layers`` plus, with a spatial readout, the maps of
    ``backbone.spatial_layers`` not already among them."""
    layers = list(config.backbone.layers)
    if config.model.spatial_readout != "none":
        layers += [k for k in config.backbone.spatial_layers if k not in layers]
    return layers
