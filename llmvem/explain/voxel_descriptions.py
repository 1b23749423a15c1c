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

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
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

_BG_WORDS = ("plain", "gradient", "striped", "checkered", "speckled")
#: The default vocabulary of a model, saved beside its text-to-brain readouts (one phrase per line).
VOCABULARY_FILE = "vocabulary.txt"


def _a(phrase: str) -> str:
    """``phrase`` with the indefinite article: "a red circle", "an orange star"."""
    return f"{'an' if phrase[:1].lower() in 'aeiou' else 'a'} {phrase}"


def category_phrases(categories: Sequence[str]) -> list[str]:
    """One bare phrase per category: ``"a circle"``, ``"a square"``..."""
    return [_a(c) for c in categories]


def virtual_brain_vocabulary(categories: Sequence[str] | None = None, colours: Sequence[str] | None = None,
                             sizes: Sequence[str] = ("small", "large"),
                             backgrounds: Sequence[str] = _BG_WORDS) -> list[str]:
    """Phrases describing what the virtual brain's scenes contain.

    Categories alone (``"a circle"``), with a colour (``"a red circle"``), with a size and a colour
    (``"a large red circle"``), and backgrounds (``"a striped background"``, ``"a green striped background"``).
    Defaults: the virtual brain's ``CATEGORIES`` and ``COLOURS``.

    Returns
    -------
    list of str
        Unique phrases, categories first.
    """
    from llmvem.data.virtual_brain import CATEGORIES, COLOURS

    cats = list(categories or CATEGORIES)
    cols = list(colours or COLOURS)
    phrases = category_phrases(cats)
    phrases += [_a(f"{col} {c}") for c in cats for col in cols]
    phrases += [_a(f"{s} {col} {c}") for c in cats for s in sizes for col in cols]
    phrases += [_a(f"{b} background") for b in backgrounds]
    phrases += [_a(f"{col} {b} background") for b in backgrounds for col in cols]
    return list(dict.fromkeys(phrases))


def caption_corpus(captions: Sequence[Sequence[str]], max_phrases: int = 2000, seed: int = 0) -> list[str]:
    """Unique captions of a caption set (e.g. the training images') as a vocabulary, white space collapsed.

    Parameters
    ----------
    captions : sequence of sequences of str
        Captions of each image.
    max_phrases : int
        When there are more unique captions, a seeded random subset of this size is kept (in first-seen order).
    seed : int

    Returns
    -------
    list of str
    """
    # white space (line breaks of VLM captions included) collapsed, so each phrase is one line
    unique = list(dict.fromkeys(" ".join(c.split()) for caps in captions for c in caps if c and c.strip()))
    if len(unique) > max_phrases:
        keep = np.sort(np.random.default_rng(seed).choice(len(unique), size=max_phrases, replace=False))
        unique = [unique[i] for i in keep]
    return unique


def read_vocabulary(path: str | Path) -> list[str]:
    """Phrases of a vocabulary file: UTF-8 text, one phrase per line; blank lines and ``#`` comments are skipped.

    Raises
    ------
    DataValidationError
        Unreadable, not UTF-8, or no phrase in the file.
    """
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise DataValidationError(path, "file", "not found; expected a text file with one phrase per line") from exc
    except UnicodeDecodeError as exc:
        raise DataValidationError(path, "file", f"not UTF-8 text ({exc}); expected one phrase per line") from exc
    except OSError as exc:
        raise DataValidationError(path, "file", f"cannot be read ({exc})") from exc
    phrases = [line.strip() for line in text.splitlines()]
    phrases = list(dict.fromkeys(p for p in phrases if p and not p.startswith("#")))
    if not phrases:
        raise DataValidationError(path, "phrases", "the file holds no phrase; expected one phrase per line")
    return phrases


def write_vocabulary(path: str | Path, phrases: Sequence[str], header: str | None = None) -> Path:
    """Write phrases one per line (the format :func:`read_vocabulary` reads), with an optional ``#`` header."""
    from llmvem.utils import atomic_write

    bad = [p for p in phrases if "\n" in p or not p.strip()]
    if bad:
        raise DataValidationError(path, "phrases", f"phrases must be non-empty single lines, got {bad[:3]!r}")
    with atomic_write(path) as fh:
        if header:
            fh.write("".join(f"# {line}\n" for line in header.splitlines()))
        fh.write("".join(f"{p.strip()}\n" for p in phrases))
    return Path(path)


def default_vocabulary(dataset_meta: Mapping[str, Any] | None, captions: Sequence[Sequence[str]] | None,
                       max_phrases: int = 2000, seed: int = 0) -> tuple[list[str], str]:
    """The vocabulary used when the user gives none, and a short description of it.

    The generated phrase list for the virtual brain (recognised by ``meta["ground_truth"]``), else the
    training captions as a corpus.
    """
    truth = (dataset_meta or {}).get("ground_truth")
    if isinstance(truth, Mapping) and "categories" in truth:
        phrases = virtual_brain_vocabulary(truth["categories"], truth.get("colours"))
        return phrases, (f"{len(phrases)} generated phrases (virtual-brain categories × colours × sizes, and "
                         "backgrounds)")
    if not captions:
        raise DataValidationError(None, "vocabulary", "no vocabulary given and no captions to build one from")
    phrases = caption_corpus(captions, max_phrases, seed)
    return phrases, f"{len(phrases)} unique training captions"


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
