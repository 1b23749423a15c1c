"""Image → caption retrieval of an aligned encoder: does its head put an image nearest to its own caption?

A diagnostic of the contrastive term (not a brain score): among ``n`` images and their captions, the fraction of
images whose most similar caption embedding (cosine) is their own caption — or any caption of the same group
(equal ids, e.g. identical captions), which counts as a hit. Chance is about ``1 / n``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy as np
import torch

__all__ = ["image_embeddings", "retrieval_top1"]


def image_embeddings(network: Any, features: Mapping[str, np.ndarray], batch_size: int = 256) -> np.ndarray | None:
    """The alignment head's unit-length image embeddings (n, dim) of a trained :class:`~llmvem.model.LLMVEM` on
    cached features (layer → (n, d)), in eval mode on the CPU; None when the network has no head."""
    if getattr(network, "head", None) is None:
        return None
    network = network.cpu().eval()
    n = len(next(iter(features.values())))
    out = []
    with torch.no_grad():
        for s in range(0, n, batch_size):
            batch = {k: torch.as_tensor(np.asarray(v[s : s + batch_size]), dtype=torch.float32)
                     for k, v in features.items()}
            res = network(features=batch, with_embedding=True, with_voxels=False)
            out.append(res.embedding.float().numpy())
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)


def retrieval_top1(network_or_embeddings: Any, features_or_text: Any, text: np.ndarray | None = None,
                   ids: np.ndarray | None = None) -> float:
    """Image → caption top-1 accuracy.

    Call as ``retrieval_top1(image_emb (n, d), text_emb (n, d), ids=None)`` or, for a trained network on cached
    features, ``retrieval_top1(network, features, text_emb)``.

    Parameters
    ----------
    ids : int array of shape (n,), optional
        Caption groups (equal ids are one caption); default: bit-identical caption embeddings.

    Returns
    -------
    float
        NaN when the embeddings do not live in the caption space (no head, or another size: a λ = 0 head).
    """
    if text is None:
        img, txt = np.asarray(network_or_embeddings, dtype=np.float64), np.asarray(features_or_text, np.float64)
    else:
        emb = image_embeddings(network_or_embeddings, features_or_text)
        if emb is None:
            return float("nan")
        img, txt = emb.astype(np.float64), np.asarray(text, dtype=np.float64)
    if img.ndim != 2 or img.shape != txt.shape:
        return float("nan")
    img = img / np.maximum(np.linalg.norm(img, axis=1, keepdims=True), 1e-12)
    txt = txt / np.maximum(np.linalg.norm(txt, axis=1, keepdims=True), 1e-12)
    best = (img @ txt.T).argmax(axis=1)
    if ids is None:
        _, ids = np.unique(txt, axis=0, return_inverse=True)
    ids = np.asarray(ids).reshape(-1)
    return float(np.mean(ids[best] == ids))
