"""Vocabularies for voxel descriptions: phrases of the virtual brain, of training captions, or of a user file
(one phrase per line), and the default vocabulary saved beside a model's text-to-brain readouts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.data.text import check_text
from llmvem.errors import DataValidationError

__all__ = ["VOCABULARY_FILE", "caption_corpus", "category_phrases", "default_vocabulary", "read_vocabulary",
           "virtual_brain_vocabulary", "write_vocabulary"]

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
        Unreadable, not UTF-8, a line with a control character or longer than the text limit (the rule of
        :mod:`llmvem.data.text`, naming the line), or no phrase in the file.
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
    phrases = [check_text(line, path, f"line {n}").strip() for n, line in enumerate(text.splitlines(), start=1)]
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
