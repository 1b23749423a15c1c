"""The checks every value read from a run folder passes: run folders are copied between people, so nothing in
one is trusted (see :mod:`llmvem.report.runfolder`, the reader that applies them).

- :func:`check_name`: a name that becomes a path (a model: ``models/<name>/``, ``vertex_metrics/<name>/``; an
  ROI; a hemisphere) is one path component — no separator, not ``.``/``..``, no control character, at most
  :data:`MAX_NAME_CHARS` characters;
- :func:`read_run_json`: JSON of at most :data:`MAX_JSON_BYTES` nesting at most :data:`MAX_JSON_DEPTH` levels;
- :func:`bounded_number`: finite or NaN (``null``), at most :data:`MAX_ABS_NUMBER` in magnitude, correlations
  within [-1, 1] (:data:`R_BOUNDS`), p-values and fractions within [0, 1];
- :func:`load_run_array`: ``.npy`` arrays without pickles, an object dtype refused before anything is mapped.

Every refusal is a :class:`~llmvem.errors.DataValidationError` naming the file and the field.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.errors import DataValidationError, quote

__all__ = ["ANY_BOUNDS", "MAX_ABS_NUMBER", "MAX_JSON_BYTES", "MAX_JSON_DEPTH", "MAX_NAME_CHARS", "R_BOUNDS", "UNIT_BOUNDS",
           "bounded_number", "check_name", "load_run_array", "read_run_json", "read_text_bounded"]

#: Longest model or ROI name a run folder may use (names become file and folder names).
MAX_NAME_CHARS = 128
#: Largest JSON (or YAML) file of a run folder, in bytes; a real metrics.json is a few hundred KB.
MAX_JSON_BYTES = 64 * 2**20
#: Deepest nesting of a run folder's JSON; a real metrics.json nests 5 levels.
MAX_JSON_DEPTH = 32
#: Largest magnitude of a number in a run folder (beyond it, means and differences overflow).
MAX_ABS_NUMBER = 1e12
#: Bounds of a correlation (a little slack for float32 rounding), of a p-value or a fraction.
R_BOUNDS = (-1.0 - 1e-4, 1.0 + 1e-4)
UNIT_BOUNDS = (0.0, 1.0)
ANY_BOUNDS = (-MAX_ABS_NUMBER, MAX_ABS_NUMBER)


def check_name(name: Any, source: Path, fld: str) -> str:
    """``name`` (a model, an ROI) after checking that it can be one path component.

    Raises
    ------
    DataValidationError
        Not a string, empty, longer than :data:`MAX_NAME_CHARS`, ``.`` or ``..``, or holding a path separator
        or a control character (``../../esc`` would make ``vertex_metrics/<name>/`` leave the export folder).
    """
    if not isinstance(name, str) or not name.strip():
        raise DataValidationError(source, fld, f"name {quote(name)}; expected a non-empty string")
    bad = [c for c in name if c in "/\\" or ord(c) < 32 or ord(c) == 127]
    if len(name) > MAX_NAME_CHARS or name in (".", "..") or bad:
        raise DataValidationError(source, fld, f"name {quote(name)} cannot be a file name; expected one path "
                                  f"component of at most {MAX_NAME_CHARS} characters without '/', '\\', control "
                                  "characters, '.' or '..'")
    return name


def _depth(obj: Any, limit: int) -> int:
    """Nesting depth of parsed JSON, counted without recursion and stopped just past ``limit``."""
    deepest, stack = 0, [(obj, 1)]
    while stack and deepest <= limit:
        node, d = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, d)
            stack.extend((v, d + 1) for v in (node.values() if isinstance(node, dict) else node))
    return deepest


def read_text_bounded(path: Path, what: str = "file", errors: str = "strict") -> str:
    """A run folder's text file as UTF-8, refused past :data:`MAX_JSON_BYTES` (checked before reading)."""
    try:
        size = path.stat().st_size
        if size > MAX_JSON_BYTES:
            raise DataValidationError(path, "file", f"{size} bytes; expected a {what} of at most {MAX_JSON_BYTES}")
        return path.read_bytes().decode("utf-8", errors=errors)
    except UnicodeDecodeError as exc:
        raise DataValidationError(path, "file", f"not UTF-8 text ({exc}); expected a {what}") from exc
    except OSError as exc:
        raise DataValidationError(path, "file", f"cannot be read ({exc.strerror or exc})") from exc


def read_run_json(path: str | Path) -> Any:
    """A run folder's JSON file, within :data:`MAX_JSON_BYTES` and :data:`MAX_JSON_DEPTH` levels.

    Raises
    ------
    DataValidationError
        Too large, not UTF-8, invalid JSON (line and column), or nested too deeply (naming the file).
    """
    path = Path(path)
    text = read_text_bounded(path, "JSON file")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataValidationError(
            path, f"line {exc.lineno} column {exc.colno}", f"invalid JSON ({exc.msg})") from exc
    except RecursionError:
        obj, depth = None, MAX_JSON_DEPTH + 1
    else:
        depth = _depth(obj, MAX_JSON_DEPTH)
    if depth > MAX_JSON_DEPTH:
        raise DataValidationError(path, "nesting", f"deeper than {MAX_JSON_DEPTH} levels; expected a run folder's "
                                  "JSON (a few levels)")
    return obj




def bounded_number(value: Any, source: Path, fld: str, bounds: tuple[float, float] = ANY_BOUNDS) -> float:
    """A finite-or-NaN float within ``bounds`` from a JSON value (``null`` is NaN, as ``write_json`` writes NaN).

    ``Infinity`` (which Python's JSON reader accepts) and numbers outside ``bounds`` are refused.
    """
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise DataValidationError(source, fld, f"expected a number or null, got {quote(value)}")
    out = float(value)
    if math.isnan(out):
        return out
    if not bounds[0] <= out <= bounds[1]:
        lo, hi = (round(b) if abs(b) > 1.5 else round(b, 3) for b in bounds)
        raise DataValidationError(source, fld, f"{quote(value)}; expected a finite number in [{lo:g}, {hi:g}] or "
                                  "null")
    return out


def load_run_array(path: str | Path, field: str, shape: tuple[int, ...] | None = None) -> np.ndarray:
    """A numeric ``.npy`` array of a run folder, memory-mapped read-only: never unpickled, and an object dtype is
    refused from the header before anything is mapped (:func:`llmvem.data.safe_load.load_array`).

    Raises
    ------
    DataValidationError
        Not a numeric ``.npy`` file (pickled objects, text, truncated), or not of ``shape`` (naming the file).
    """
    from llmvem.data.safe_load import load_array

    path = Path(path)
    arr = load_array(path, field, ndim=None if shape is None else len(shape), mmap=True)
    if shape is not None and arr.shape != shape:
        raise DataValidationError(path, "shape", f"{arr.shape}; expected {shape}")
    return arr
