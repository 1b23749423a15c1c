"""Captions that already exist: caption files (CSV, TSV, JSON, JSON lines, COCO) and a dataset's own captions.

:func:`read_caption_file` reads a file into ``{key: [caption, ...]}``; :class:`CaptionFileCaptioner` and
:class:`DatasetCaptioner` serve such captions through the captioner interface, keyed by image id (or file name),
so they go into the caption store like model captions.

Accepted files
--------------
- CSV / TSV with a header: an image column (``image``, ``image_id``, ``file_name``, ``filename``, ``id`` or
  ``name``) and a caption column (``caption``, ``text``, ``description``); several rows per image give several
  captions. Flickr8k's ``captions.csv`` (``image,caption``) and :meth:`CaptionStore.export` CSVs are of this kind.
- COCO captions JSON: ``{"images": [{"id", "file_name"}], "annotations": [{"image_id", "caption"}]}``; images are
  keyed by both the numeric id and the file name.
- JSON mapping ``{"image id": "caption" | ["caption", ...]}``.
- JSON list / JSON lines of records ``{"image_id": ..., "caption": "..."}`` or ``{..., "captions": [...]}``, or
  ``{"images": [records]}`` (the JSON written by :meth:`CaptionStore.export`).

Every format follows one rule (:mod:`llmvem.data.text`): a caption holding a control character (NUL, ESC, ...)
or longer than the CSV field limit is refused with one line naming the file and the row or record.
"""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from PIL import Image

from llmvem.captions.base import Captioner, CaptionResult
from llmvem.data.images import IMAGE_SUFFIXES
from llmvem.data.text import check_text
from llmvem.errors import DataValidationError, quote
from llmvem.utils import sha256_bytes, stable_hash

IMAGE_COLUMNS = ("image", "image_id", "file_name", "filename", "id", "name")
CAPTION_COLUMNS = ("caption", "text", "description")


def _decode_utf8(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise DataValidationError(
            path, "encoding",
            f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}, line {line}); "
            "save the file as UTF-8") from exc


def _check_caption(value: Any, path: Path, where: str, key: str) -> str:
    """A caption of any format, by the one rule of :mod:`llmvem.data.text` (no control character, at most
    :data:`~llmvem.data.text.MAX_TEXT_CHARS` characters) and not blank."""
    if not isinstance(value, str):
        raise DataValidationError(path, where, f"caption of {quote(key)} is {type(value).__name__}; expected a string")
    check_text(value, path, where)
    if not value.strip():
        raise DataValidationError(path, where, f"empty or whitespace caption for image {quote(key)}")
    return value.strip()


def _pick(columns: Sequence[str], wanted: str | None, candidates: Sequence[str], path: Path, what: str) -> str:
    lowered = {c.strip().lower(): c for c in columns}
    if wanted is not None:
        if wanted in columns:
            return wanted
        raise DataValidationError(path, "columns", f"no {what} column {wanted!r}; found {list(columns)}")
    for cand in candidates:
        if cand in lowered:
            return lowered[cand]
    raise DataValidationError(path, "columns", f"no {what} column; expected one named one of {list(candidates)}, "
                              f"found {list(columns)}")


def _read_table(text: str, path: Path, delimiter: str, image_column: str | None,
                caption_column: str | None) -> dict[str, list[str]]:
    reader = csv.DictReader(io.StringIO(text, newline=""), delimiter=delimiter)
    try:  # csv.Error: a field over the CSV size limit, a broken quote, ...
        fieldnames = reader.fieldnames
        rows = [(reader.line_num, row) for row in reader]
    except csv.Error as exc:
        raise DataValidationError(path, f"row {reader.line_num}", f"not valid CSV ({exc})") from exc
    if not fieldnames:
        raise DataValidationError(path, "header", "file is empty; expected a header row such as 'image,caption'")
    img_col = _pick(fieldnames, image_column, IMAGE_COLUMNS, path, "image")
    cap_col = _pick(fieldnames, caption_column, CAPTION_COLUMNS, path, "caption")
    out: dict[str, list[str]] = {}
    for line_num, row in rows:
        where = f"row {line_num}"
        key = (row.get(img_col) or "").strip()
        if not key:
            raise DataValidationError(path, where, f"empty {img_col!r}; expected an image id or file name")
        cap = row.get(cap_col)
        if cap is None:
            raise DataValidationError(path, where, f"missing {cap_col!r} value (too few fields)")
        out.setdefault(key, []).append(_check_caption(cap, path, where, key))
    if not out:
        raise DataValidationError(path, "rows", "header but no caption rows")
    return out


def _records(records: list, path: Path, where: str, image_column: str | None) -> dict[str, list[str]]:
    out: dict[str, list[str]] = {}
    for k, rec in enumerate(records):
        loc = f"{where}[{k}]"
        if not isinstance(rec, dict):
            raise DataValidationError(path, loc, f"expected an object, got {type(rec).__name__}")
        key_col = _pick(list(rec), image_column, IMAGE_COLUMNS, path, f"{loc} image")
        key = str(rec[key_col]).strip()
        if "captions" in rec:
            caps = rec["captions"]
            if not isinstance(caps, list) or not caps:
                raise DataValidationError(path, f"{loc}.captions", "expected a non-empty list of strings")
            for j, c in enumerate(caps):
                out.setdefault(key, []).append(_check_caption(c, path, f"{loc}.captions[{j}]", key))
        else:
            cap_col = _pick(list(rec), None, CAPTION_COLUMNS, path, f"{loc} caption")
            out.setdefault(key, []).append(_check_caption(rec[cap_col], path, f"{loc}.{cap_col}", key))
    if not out:
        raise DataValidationError(path, where, "no captions")
    return out


def _read_coco(obj: dict, path: Path) -> dict[str, list[str]]:
    anns = obj["annotations"]
    if not isinstance(anns, list):
        raise DataValidationError(path, "annotations", "expected a list of {image_id, caption} objects")
    names: dict[str, str] = {}
    for k, img in enumerate(obj.get("images") or []):
        if isinstance(img, dict) and "id" in img and "file_name" in img:
            names[str(img["id"])] = str(img["file_name"])
        else:
            raise DataValidationError(path, f"images[{k}]", "expected an object with 'id' and 'file_name'")
    out: dict[str, list[str]] = {}
    for k, ann in enumerate(anns):
        if not isinstance(ann, dict) or "image_id" not in ann or "caption" not in ann:
            raise DataValidationError(path, f"annotations[{k}]", "expected an object with 'image_id' and 'caption'")
        key = str(ann["image_id"])
        cap = _check_caption(ann["caption"], path, f"annotations[{k}].caption", key)
        out.setdefault(key, []).append(cap)
        if key in names:
            out.setdefault(names[key], []).append(cap)
    if not out:
        raise DataValidationError(path, "annotations", "no captions")
    return out


def read_caption_file(path: str | Path, image_column: str | None = None,
                      caption_column: str | None = None) -> dict[str, list[str]]:
    """Read a caption file into ``{image key: [caption, ...]}`` (captions stripped, in file order).

    Parameters
    ----------
    path : str or Path
        ``.csv``, ``.tsv``, ``.txt`` (tab-separated), ``.json`` or ``.jsonl`` (see the module docstring).
    image_column, caption_column : str or None
        Column / field names when they are not among the recognised ones.

    Raises
    ------
    DataValidationError
        Naming the file and the row (or JSON path) for: a file that is not UTF-8, a missing column, an empty or
        whitespace caption, a caption that is not a string, a structure that is none of the accepted ones.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataValidationError(path, "caption file", f"cannot read ({exc})") from exc
    text = _decode_utf8(data, path)
    suffix = path.suffix.lower()
    if suffix in (".csv", ".tsv", ".txt"):
        return _read_table(text, path, "," if suffix == ".csv" else "\t", image_column, caption_column)
    if suffix == ".jsonl":
        records = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise DataValidationError(path, f"line {n}", f"not valid JSON ({exc.msg})") from exc
        return _records(records, path, "lines", image_column)
    if suffix != ".json":
        raise DataValidationError(path, "caption file", f"suffix {path.suffix!r}; expected .csv, .tsv, .json or .jsonl")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        raise DataValidationError(path, f"line {exc.lineno}", f"not valid JSON ({exc.msg})") from exc
    except RecursionError:
        raise DataValidationError(path, "caption file", "JSON nested too deeply to read") from None
    if isinstance(obj, dict) and "annotations" in obj:
        return _read_coco(obj, path)
    if isinstance(obj, dict) and isinstance(obj.get("images"), list):
        return _records(obj["images"], path, "images", image_column)
    if isinstance(obj, list):
        return _records(obj, path, "records", image_column)
    if isinstance(obj, dict):
        out: dict[str, list[str]] = {}
        for key, val in obj.items():
            vals = val if isinstance(val, list) else [val]
            if not vals:
                raise DataValidationError(path, str(key), "empty list; expected at least one caption")
            out[str(key)] = [_check_caption(v, path, f"{key}[{j}]" if isinstance(val, list) else str(key), str(key))
                             for j, v in enumerate(vals)]
        if not out:
            raise DataValidationError(path, "captions", "empty object; expected {image id: caption(s)}")
        return out
    raise DataValidationError(path, "captions", f"top-level {type(obj).__name__}; expected an object or a list")


def _key_variants(key: str) -> list[str]:
    """``"dir/img 01.jpg"`` is also found as ``"img 01.jpg"`` and ``"img 01"`` (image ids are file stems)."""
    out = [key]
    name = key.replace("\\", "/").rsplit("/", 1)[-1]
    if name != key:
        out.append(name)
    stem, dot, ext = name.rpartition(".")
    if dot and ("." + ext.lower()) in IMAGE_SUFFIXES:
        out.append(stem)
    return out


class LookupCaptioner(Captioner):
    """Serves captions from a ``{key: [captions]}`` table by image id (also by file name and stem)."""

    needs_pixels = False
    default_batch_size = 256

    def __init__(self, table: dict[str, list[str]], model_id: str, source: str, max_captions: int | None = None):
        if max_captions is not None and max_captions < 1:
            raise ValueError(f"max_captions must be >= 1 or None, got {max_captions}")
        self.model_id = model_id
        self.prompt = None
        self.source = source
        self.max_captions = max_captions
        self._table: dict[str, list[str]] = {}
        for key, caps in table.items():
            for variant in _key_variants(str(key)):
                self._table.setdefault(variant, list(caps))

    def lookup(self, image_id: str) -> list[str] | None:
        for variant in _key_variants(image_id):
            if variant in self._table:
                caps = self._table[variant]
                return caps[: self.max_captions] if self.max_captions else list(caps)
        return None

    def caption_batch(self, images: Sequence[Image.Image | None], ids: Sequence[str]) -> list[CaptionResult]:
        out = []
        for k, image_id in enumerate(ids):
            caps = self.lookup(image_id)
            if caps:
                out.append(CaptionResult(k, image_id, caps))
            else:
                out.append(CaptionResult(k, image_id, [], error=f"no caption for image id {image_id!r} in {self.source}"))
        return out


class CaptionFileCaptioner(LookupCaptioner):
    """Captions read from a caption file, served by image id or file name.

    The file's content hash is part of the configuration, so editing the file gives a new configuration in the
    store instead of mixing old and new captions.

    Parameters
    ----------
    path : str or Path
        See :func:`read_caption_file`.
    image_column, caption_column : str or None
    max_captions : int or None
        Keep at most this many captions per image (in file order).
    """

    backend = "file"

    def __init__(self, path: str | Path, image_column: str | None = None, caption_column: str | None = None,
                 max_captions: int | None = None):
        self.path = Path(path)
        table = read_caption_file(self.path, image_column, caption_column)
        self.file_sha256 = sha256_bytes(self.path.read_bytes())
        super().__init__(table, model_id=f"file:{self.path.name}", source=str(self.path), max_captions=max_captions)

    def settings(self) -> dict[str, Any]:
        return {"file_sha256": self.file_sha256, "max_captions": self.max_captions}

    def runtime(self) -> dict[str, Any]:
        return {"path": str(self.path.resolve())}


class DatasetCaptioner(LookupCaptioner):
    """The captions an :class:`~llmvem.data.dataset.EncodingDataset` carries (``dataset.captions``), by image id.

    The built-in virtual brain carries exact scene descriptions; Flickr8k-style datasets carry human captions.
    """

    backend = "dataset"

    def __init__(self, dataset: Any, max_captions: int | None = None):
        captions = getattr(dataset, "captions", None) or {}
        if not captions:
            raise DataValidationError(getattr(dataset, "source", None), "captions",
                                      f"dataset {getattr(dataset, 'name', '?')!r} carries no captions; choose another "
                                      "captioning backend")
        self.captions_hash = stable_hash(captions)
        super().__init__(captions, model_id=f"dataset:{dataset.name}",
                         source=f"the captions of dataset {dataset.name!r}", max_captions=max_captions)

    def settings(self) -> dict[str, Any]:
        return {"captions_hash": self.captions_hash, "max_captions": self.max_captions}
