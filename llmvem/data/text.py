"""Text read from files — captions (``stimuli.csv``, caption files), text lists (``predict --text-file``,
vocabularies): one rule for control characters and one size limit, the same for every format.

- **Control characters are refused**, never stripped: a C0 control character other than tab, line feed and
  carriage return (U+0000–U+0008, U+000B, U+000C, U+000E–U+001F), or DEL (U+007F), means a broken or binary
  file, not text. The error names the file, the line (or the record) and the character's code point.
- **At most** :data:`MAX_TEXT_CHARS` **characters** per caption or text: the CSV reader's field limit, so a
  caption too long for ``stimuli.csv`` is also too long in a JSON caption file.
"""

from __future__ import annotations

import csv
import re
from pathlib import Path

from llmvem.errors import DataValidationError, quote

__all__ = ["MAX_TEXT_CHARS", "check_text"]

#: Longest caption or text (characters) llmvem reads from a file: the CSV module's field limit.
MAX_TEXT_CHARS = csv.field_size_limit()

_CONTROL = re.compile("[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")


def check_text(text: str, source: str | Path | None, where: str) -> str:
    """``text`` unchanged when it follows the rule of this module.

    Parameters
    ----------
    text : str
    source : str or Path or None
        The file it comes from (or the flag, e.g. ``"--text"``).
    where : str
        The line or record (``"line 7"``, ``"caption (line 3)"``, ``"im00[1]"``).

    Raises
    ------
    DataValidationError
        A control character (naming its code point and position) or more than :data:`MAX_TEXT_CHARS` characters.
    """
    if len(text) > MAX_TEXT_CHARS:
        raise DataValidationError(source, where, f"{len(text)} characters; expected a caption or text of at most "
                                  f"{MAX_TEXT_CHARS} characters (the CSV field limit)")
    bad = _CONTROL.search(text)
    if bad is not None:
        raise DataValidationError(source, where, f"control character U+{ord(bad.group()):04X} at character "
                                  f"{bad.start() + 1} of {quote(text, 60)}; expected plain text (a binary or "
                                  "corrupted file? save it as UTF-8 text)")
    return text
