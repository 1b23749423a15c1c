"""Alignment targets without language: the controls that carry a caption's information but no text encoder.

The contrastive head of LLM-VEM is trained toward one target embedding per image (``model.align_target``):

``"captions"`` (default)
    The text embedding of the image's captions (:mod:`llmvem.embed.text`).
``"attributes"``
    An embedding of the image's exact attribute vector — for the virtual brain, every fact its description states
    (:meth:`llmvem.data.virtual_brain.Scene.attribute_vector`: objects' category, colour, size and 3×3 cell,
    background type and colour) — as a fixed random projection (:func:`attribute_embeddings`). Same facts, no
    language: the non-language control of the positive control.
``"classes"``
    One fixed random unit vector per distinct caption set (:func:`class_embeddings`): a one-hot code of the
    caption's identity in a random basis. With label captions (``captions.backend=labels``) that is a label
    one-hot: the non-language control on real data.

Both embeddings have the size of the caption embeddings, so the head, the loss and λ are unchanged; their ids
(which rows are positives of each other) are equal attribute vectors and equal caption sets. Nothing here is
fitted on data, so the same image gets the same target in every split, in the caption stream and in every run.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import numpy as np

from llmvem.utils import sha256_bytes

__all__ = ["ALIGN_TARGETS", "AlignTarget", "attribute_embeddings", "attribute_ids", "class_embeddings"]

AlignTarget = Literal["captions", "attributes", "classes"]
ALIGN_TARGETS: tuple[str, ...] = ("captions", "attributes", "classes")

#: Seed of the fixed projection of attribute vectors (one basis for every dataset and run).
PROJECTION_SEED = 20251201


def _unit_rows(x: np.ndarray) -> np.ndarray:
    return (x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)).astype(np.float32)


def attribute_embeddings(attributes: np.ndarray, dim: int) -> np.ndarray:
    """Unit-length embeddings of attribute vectors: a fixed Gaussian projection (seed :data:`PROJECTION_SEED`).

    The projection preserves the attributes' inner products up to the usual random-projection error
    (``dim`` ≥ the number of attributes makes it injective), so the embedding carries exactly the facts of the
    vector, and rows with the same attributes get the same embedding.

    Parameters
    ----------
    attributes : array of shape (n_images, n_attributes)
    dim : int
        Size of the embedding (the caption embeddings' size).

    Returns
    -------
    float32 array of shape (n_images, dim), L2-normalised rows
    """
    a = np.asarray(attributes, dtype=np.float64)
    if a.ndim != 2 or not np.isfinite(a).all():
        raise ValueError(f"attributes: expected a finite (n_images, n_attributes) array, got shape {a.shape}")
    proj = np.random.default_rng([PROJECTION_SEED, a.shape[1], dim]).standard_normal((a.shape[1], dim))
    return _unit_rows(a @ proj)


def attribute_ids(attributes: np.ndarray) -> np.ndarray:
    """Identity of each row: equal attribute vectors share an id (int64 array of shape (n_images,))."""
    a = np.ascontiguousarray(np.asarray(attributes, dtype=np.float64))
    return np.array([int(sha256_bytes(row.tobytes(), 15), 16) for row in a], dtype=np.int64).reshape(len(a))


def class_embeddings(ids: Sequence[int] | np.ndarray, dim: int) -> np.ndarray:
    """One fixed random unit vector per id (a one-hot code in a random basis): equal ids, equal vectors.

    Parameters
    ----------
    ids : int array of shape (n_images,)
        E.g. :func:`llmvem.embed.text.caption_ids` of the images' caption sets.
    dim : int

    Returns
    -------
    float32 array of shape (n_images, dim), L2-normalised rows
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    codes: dict[int, np.ndarray] = {}
    for i in np.unique(ids):
        codes[int(i)] = np.random.default_rng([PROJECTION_SEED, int(i) & 0xFFFFFFFF, int(i) >> 32]).standard_normal(dim)
    out = np.stack([codes[int(i)] for i in ids]) if len(ids) else np.zeros((0, dim))
    return _unit_rows(out)
