"""Exceptions raised by llmvem.

Every error a user can cause (bad file, bad config, bad flag) is an :class:`LLMVEMError`. The CLI turns it
into one line on stderr and exit code 2. Messages name the file, the field and what was expected.
"""

from __future__ import annotations

import errno
import reprlib
from pathlib import Path

#: Longest value or key quoted in a message; longer ones are cut with a note of their size.
MAX_QUOTE = 200
#: Longest whole message the CLI prints (a message quotes several bounded values).
MAX_MESSAGE = 1000

_REPR = reprlib.Repr()
_REPR.maxlevel = 3
_REPR.maxstring = MAX_QUOTE
_REPR.maxother = MAX_QUOTE
for _name in ("maxtuple", "maxlist", "maxarray", "maxdict", "maxset", "maxfrozenset", "maxdeque"):
    setattr(_REPR, _name, 8)


def shorten(text: str, limit: int = MAX_QUOTE) -> str:
    """``text`` on one line and at most about ``limit`` characters (longer text is cut with its length noted).

    Line breaks and runs of whitespace become single spaces, so a multi-line message stays one line. Only the
    first ``4 * limit`` characters are looked at, so a huge string costs no more than a short one.
    """
    one = " ".join(text[: 4 * limit].split())
    if len(text) <= 4 * limit and len(one) <= limit:
        return one
    return f"{one[:limit]}… ({len(text)} chars)"


def quote(value: object, limit: int = MAX_QUOTE) -> str:
    """A bounded ``repr`` of any value for an error message.

    Nesting deeper than 3 levels and containers of more than 8 items are elided *before* the text is built, so a
    deeply nested or self-similar value (a YAML alias bomb, a pickled tuple tower) costs microseconds, not memory.
    """
    return shorten(_REPR.repr(value), limit)


def one_line(message: object, limit: int = MAX_MESSAGE) -> str:
    """The message of an error as one bounded line (what the CLI prints after ``llmvem: error:``)."""
    lines = [ln.strip() for ln in str(message).splitlines() if ln.strip()]
    return shorten("; ".join(lines) or type(message).__name__, limit)


def is_disk_full(exc: BaseException) -> bool:
    """True when ``exc`` (or an exception it was raised from) is "no space left on device" or "quota exceeded"."""
    seen: set[int] = set()
    cur: BaseException | None = exc
    while cur is not None and id(cur) not in seen:
        seen.add(id(cur))
        if isinstance(cur, OSError) and cur.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        text = str(cur).lower()
        if "no space left" in text or "database or disk is full" in text or "disk quota" in text:
            return True
        cur = cur.__cause__ or cur.__context__
    return False


class LLMVEMError(Exception):
    """Base class of user-facing errors (exit code 2 in the CLI)."""


class DiskFullError(Exception):
    """A disk filled up (or a quota ran out) while writing; an environment error (exit code 1 in the CLI).

    What was written before stays valid; free space and run the same command again to finish.
    """

    def __init__(self, folder: str | Path, what: str):
        self.folder = str(folder)
        super().__init__(f"{folder}: no space left on the device while writing {what}; finished work is kept, "
                         "free some space and run the same command again")


class DataValidationError(LLMVEMError, ValueError):
    """A dataset file has the wrong shape, type or content."""

    def __init__(self, source: str | Path | None, field: str, problem: str):
        self.source = shorten(str(source), 2 * MAX_QUOTE) if source is not None else "<in memory>"
        self.field = shorten(field)
        self.problem = shorten(problem, MAX_MESSAGE)
        super().__init__(f"{self.source}: {field}: {problem}")


class ConfigError(LLMVEMError, ValueError):
    """A configuration file or option is invalid."""


class CaptionError(LLMVEMError, RuntimeError):
    """Captioning failed for some images (after retries)."""


class CheckpointError(LLMVEMError, RuntimeError):
    """A checkpoint is missing, unsafe, or belongs to another configuration."""


class UnsafeFileError(LLMVEMError, RuntimeError):
    """A file would need code execution (pickle) to load, and llmvem refuses it."""


class RunFolderError(LLMVEMError, FileExistsError):
    """A run folder exists and neither resume nor overwrite was asked for."""


class ModelLoadError(LLMVEMError, OSError):
    """A model directory or hub id could not be loaded."""


class OutputPathError(LLMVEMError, OSError):
    """An output path the user gave cannot be used (a folder where a file belongs, unwritable, ...)."""
