"""Voxel descriptions: rank phrases by the response they are predicted to evoke (in the spirit of BrainSCUBA).

Every phrase of a vocabulary is embedded with the model's text encoder and passed through a text-to-brain
readout (:class:`~llmvem.explain.text_to_brain.TextToBrain`), giving a predicted response of every voxel to
every phrase. A voxel is described by its top-ranked phrases; an ROI by the phrases with the highest mean
*standardised* predicted response over its voxels (each voxel's predictions are z-scored across the vocabulary
first, so voxels with large response ranges do not dominate).

Vocabularies: :func:`virtual_brain_vocabulary` (categories × colours × sizes plus background phrases, for the
built-in virtual brain), :func:`caption_corpus` (the training captions, for real data) or a user file
(:func:`read_vocabulary`, one phrase per line). On the virtual brain the true tuning is known, and
:func:`category_agreement` checks that the top-ranked category phrase of each semantic voxel is its preferred
category.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from llmvem.errors import DataValidationError

if TYPE_CHECKING:
    from llmvem.embed.base import TextEncoder
    from llmvem.explain.text_to_brain import TextReadoutKind, TextToBrain

__all__ = [
    "VOCABULARY_FILE",
    "VoxelDescriptions",
    "caption_corpus",
    "category_agreement",
    "category_phrases",
    "default_vocabulary",
    "describe_voxels",
    "read_vocabulary",
    "virtual_brain_vocabulary",
    "write_vocabulary",
]

from llmvem.explain.vocabulary import (  # noqa: E402 - re-exported names
    VOCABULARY_FILE,
    caption_corpus,
    category_phrases,
    default_vocabulary,
    read_vocabulary,
    virtual_brain_vocabulary,
    write_vocabulary,
)


@dataclass
class VoxelDescriptions:
    """Predicted response of every voxel to every phrase of a vocabulary.

    Attributes
    ----------
    phrases : list of str, length n_phrases
    scores : array of shape (n_phrases, n_voxels), float32
        Predicted responses.
    readout : str
        The text-to-brain readout that predicted them (``"aligned"`` or ``"text"``).
    """

    phrases: list[str]
    scores: np.ndarray
    readout: str
    _z: np.ndarray | None = field(default=None, init=False, repr=False, compare=False)

    @property
    def n_voxels(self) -> int:
        return int(self.scores.shape[1])

    def standardized(self) -> np.ndarray:
        """Scores z-scored per voxel across the vocabulary, shape (n_phrases, n_voxels), float32 (0 for a flat
        voxel). Computed once."""
        if self._z is None:
            s = np.asarray(self.scores, dtype=np.float32)
            mean = s.mean(axis=0, dtype=np.float64).astype(np.float32)
            sd = s.std(axis=0, dtype=np.float64).astype(np.float32)
            self._z = (s - mean) / np.where(sd > 0, sd, np.float32(1.0))
        return self._z

    def best_phrase_index(self) -> np.ndarray:
        """Index of each voxel's top-ranked phrase, shape (n_voxels,)."""
        return np.argmax(self.scores, axis=0)

    def top_indices(self, k: int = 5) -> np.ndarray:
        """Indices of each voxel's ``k`` top-ranked phrases, best first, shape (n_voxels, k)."""
        k = min(k, len(self.phrases))
        part = np.argpartition(-self.scores, k - 1, axis=0)[:k]  # (k, n_voxels), unordered
        vals = np.take_along_axis(self.scores, part, axis=0)
        order = np.argsort(-vals, axis=0, kind="stable")
        return np.take_along_axis(part, order, axis=0).T

    def top_for_voxel(self, voxel: int, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` phrases with the highest predicted response of ``voxel``, with that response."""
        if not 0 <= voxel < self.n_voxels:
            raise DataValidationError(None, "voxel", f"expected 0..{self.n_voxels - 1}, got {voxel}")
        col = self.scores[:, voxel]
        order = np.argsort(-col, kind="stable")[:k]
        return [(self.phrases[i], float(col[i])) for i in order]

    def roi_scores(self, mask: np.ndarray) -> np.ndarray:
        """Mean standardised predicted response of the ROI's voxels to each phrase, shape (n_phrases,)."""
        m = np.asarray(mask, dtype=bool)
        if m.shape != (self.n_voxels,):
            raise DataValidationError(None, "mask", f"expected shape ({self.n_voxels},), got {m.shape}")
        if not m.any():
            raise DataValidationError(None, "mask", "the ROI has no voxel")
        return self.standardized()[:, m].mean(axis=1, dtype=np.float64)

    def top_for_roi(self, mask: np.ndarray, k: int = 5) -> list[tuple[str, float]]:
        """The ``k`` phrases with the highest :meth:`roi_scores`, with that score (in standard deviations)."""
        s = self.roi_scores(mask)
        order = np.argsort(-s, kind="stable")[:k]
        return [(self.phrases[i], float(s[i])) for i in order]


def describe_voxels(t2b: TextToBrain, phrases: Sequence[str], *, readout: TextReadoutKind = "aligned",
                    embeddings: np.ndarray | None = None, encoder: TextEncoder | None = None) -> VoxelDescriptions:
    """Predicted response of every voxel to every phrase.

    Parameters
    ----------
    t2b : TextToBrain
    phrases : sequence of str, length n_phrases
    readout : {"aligned", "text"}
    embeddings : array of shape (n_phrases, dim), optional
        Precomputed phrase embeddings (by ``t2b.text_encoder``); computed when absent.
    encoder : TextEncoder, optional
        The text encoder, when the caller has it loaded.

    Returns
    -------
    VoxelDescriptions
    """
    phrases = list(phrases)
    emb = t2b.encode(phrases, encoder) if embeddings is None else np.asarray(embeddings)
    if len(emb) != len(phrases):
        raise DataValidationError(None, "embeddings", f"{len(emb)} rows for {len(phrases)} phrases")
    return VoxelDescriptions(phrases=phrases, scores=t2b.predict(emb, readout), readout=readout)


def category_agreement(descriptions: VoxelDescriptions, preferred: np.ndarray,
                       categories: Sequence[str]) -> dict[str, Any]:
    """How often a voxel's top-ranked category phrase is its true preferred category.

    Parameters
    ----------
    descriptions : VoxelDescriptions
        Over a vocabulary that holds :func:`category_phrases` of ``categories`` (other phrases are ignored).
    preferred : int array of shape (n_voxels,)
        Index into ``categories`` of each voxel's preferred category; -1 for voxels without one (not counted).
    categories : sequence of str

    Returns
    -------
    dict
        ``fraction`` (of voxels with a preference whose top category phrase matches), ``n_voxels`` (voxels
        with a preference), ``chance`` (1 / n_categories), ``top_category`` (int array (n_voxels,), the
        top-ranked category of every voxel) and ``confusion`` (int array (n_categories, n_categories): rows
        true, columns top-ranked).
    """
    phrases = category_phrases(categories)
    index = {p: i for i, p in enumerate(descriptions.phrases)}
    missing = [p for p in phrases if p not in index]
    if missing:
        raise DataValidationError(None, "phrases", f"the vocabulary lacks the category phrases {missing}")
    pref = np.asarray(preferred, dtype=np.int64)
    if pref.shape != (descriptions.n_voxels,):
        raise DataValidationError(None, "preferred", f"expected shape ({descriptions.n_voxels},), got {pref.shape}")
    sub = descriptions.scores[[index[p] for p in phrases]]  # (n_categories, n_voxels)
    top = np.argmax(sub, axis=0)
    has = pref >= 0
    k = len(categories)
    confusion = np.zeros((k, k), dtype=np.int64)
    np.add.at(confusion, (pref[has], top[has]), 1)
    n = int(has.sum())
    return {"fraction": float((top[has] == pref[has]).mean()) if n else float("nan"), "n_voxels": n,
            "chance": 1.0 / k, "top_category": top, "confusion": confusion}
