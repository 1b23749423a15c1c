"""Report sections as data: what ``extra_sections/*.json`` holds, and how the report renders it.

A run folder may carry sections written by later stages (text-to-brain, voxel descriptions, the caption
ablation). Run folders are copied between people, so a section is **data**, never stored HTML: the report
generates every tag itself and escapes every string, so a ``<script>`` in a copied run folder reaches
``index.html`` as text. A section file is::

    {"title": "Text-to-brain predictions",
     "blocks": [{"kind": "paragraph", "text": "..."},
                {"kind": "note", "text": "..."},
                {"kind": "table", "header": ["ROI", "voxels", "r"], "rows": [["V1", 120, "0.31"]],
                 "text_columns": 1}],
     "figures": ["text_to_brain_rois.png"]}

Writers build blocks with :func:`paragraph`, :func:`note` and :func:`table`; :func:`parse_blocks` checks them
when the run folder is read and :func:`render_blocks` turns them into the page's HTML. Sections written by older
llmvem versions as ``{"html": ...}`` are read through :func:`blocks_from_html`, which keeps only their text,
paragraph by paragraph and table by table (no tag or attribute of the file reaches the page).
"""

from __future__ import annotations

import html
from collections.abc import Sequence
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

from llmvem.errors import DataValidationError, quote
from llmvem.report.tables import html_table

__all__ = ["BLOCK_KINDS", "blocks_from_html", "note", "paragraph", "parse_blocks", "render_blocks", "table"]

#: The kinds of block a section may hold.
BLOCK_KINDS = ("paragraph", "note", "table")

Block = dict[str, Any]


def paragraph(text: str) -> Block:
    """A paragraph of plain text (rendered escaped)."""
    return {"kind": "paragraph", "text": str(text)}


def note(text: str) -> Block:
    """A paragraph in the report's note style."""
    return {"kind": "note", "text": str(text)}


def table(header: Sequence[str], rows: Sequence[Sequence[object]], text_columns: int = 1) -> Block:
    """A table: the first ``text_columns`` columns are text (left-aligned), the others numbers; cells are strings
    or numbers, shown as given."""
    return {"kind": "table", "header": [str(h) for h in header],
            "rows": [[c if isinstance(c, (int, float)) and not isinstance(c, bool) else str(c) for c in row]
                     for row in rows], "text_columns": int(text_columns)}


def _text(value: Any, source: Path, fld: str) -> str:
    if not isinstance(value, str):
        raise DataValidationError(source, fld, f"expected a string, got {type(value).__name__}")
    return value


def parse_blocks(value: Any, source: Path) -> list[Block]:
    """Check the ``blocks`` of a section file and return them (see the module docstring for the schema).

    Raises
    ------
    DataValidationError
        Not a list of blocks, an unknown kind, a text that is not a string, a table row of the wrong length
        (naming the file and the block).
    """
    if not isinstance(value, list):
        raise DataValidationError(source, "blocks", f"expected a list of blocks, got {type(value).__name__}")
    out: list[Block] = []
    for i, block in enumerate(value):
        where = f"blocks[{i}]"
        if not isinstance(block, dict) or block.get("kind") not in BLOCK_KINDS:
            kind = block.get("kind") if isinstance(block, dict) else block
            raise DataValidationError(source, where, f"kind {quote(kind)}; expected an object with kind one of "
                                      f"{list(BLOCK_KINDS)}")
        if block["kind"] != "table":
            out.append({"kind": block["kind"], "text": _text(block.get("text"), source, f"{where}.text")})
            continue
        header = block.get("header")
        if not isinstance(header, list):
            raise DataValidationError(source, f"{where}.header", "expected a list of column names")
        header = [_text(h, source, f"{where}.header[{j}]") for j, h in enumerate(header)]
        rows = block.get("rows")
        if not isinstance(rows, list):
            raise DataValidationError(source, f"{where}.rows", "expected a list of rows")
        for j, row in enumerate(rows):
            if not isinstance(row, list) or len(row) != len(header):
                raise DataValidationError(source, f"{where}.rows[{j}]", f"expected a list of {len(header)} cells")
            for k, cell in enumerate(row):
                if isinstance(cell, bool) or not isinstance(cell, (str, int, float)) and cell is not None:
                    raise DataValidationError(source, f"{where}.rows[{j}][{k}]", "expected a string or a number")
        n_text = block.get("text_columns", 1)
        if isinstance(n_text, bool) or not isinstance(n_text, int) or n_text < 0:
            raise DataValidationError(source, f"{where}.text_columns", f"{quote(n_text)}; expected an integer >= 0")
        out.append({"kind": "table", "header": header, "rows": rows, "text_columns": n_text})
    return out


def render_blocks(blocks: Sequence[Block]) -> str:
    """The HTML of checked blocks: every tag made here, every string escaped."""
    parts = []
    for block in blocks:
        if block["kind"] == "table":
            rows = [["–" if c is None else c for c in row] for row in block["rows"]]
            parts.append(html_table(block["header"], rows, n_text=block["text_columns"]))
        else:
            cls = ' class="note"' if block["kind"] == "note" else ""
            parts.append(f"<p{cls}>{html.escape(block['text'], quote=True)}</p>")
    return "".join(parts)


class _LegacyText(HTMLParser):
    """Text of an old section's HTML as blocks: paragraphs, notes (``class="note"``/``"caption"``) and tables.

    Only character data is kept (entities decoded); the content of ``script``/``style`` and the like is dropped;
    no tag, attribute or URL is carried over.
    """

    _DROP = {"script", "style", "template", "iframe", "object", "svg", "math", "noscript", "textarea", "title"}

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.blocks: list[Block] = []
        self._text: list[str] = []
        self._kind = "paragraph"
        self._drop = 0
        self._rows: list[tuple[list[str], bool]] | None = None  # (cells, all header cells) per row
        self._cell: list[str] | None = None

    def flush(self) -> None:
        text = " ".join("".join(self._text).split())
        if text:
            self.blocks.append({"kind": self._kind, "text": text})
        self._text, self._kind = [], "paragraph"

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag in self._DROP:
            self._drop += 1
        elif tag == "table" and self._rows is None:
            self.flush()
            self._rows = []
        elif tag == "tr" and self._rows is not None:
            self._rows.append(([], True))
        elif tag in ("td", "th") and self._rows is not None:
            if not self._rows:
                self._rows.append(([], True))
            if tag == "td":
                self._rows[-1] = (self._rows[-1][0], False)
            self._cell = []
        elif tag == "p" and self._rows is None:
            self.flush()
            classes = set((dict(attrs).get("class") or "").split())
            self._kind = "note" if classes & {"note", "caption"} else "paragraph"
        elif tag == "br":
            self.handle_data(" ")

    def handle_endtag(self, tag: str) -> None:
        if tag in self._DROP:
            self._drop = max(0, self._drop - 1)
        elif tag in ("td", "th") and self._rows and self._cell is not None:
            self._rows[-1][0].append(" ".join("".join(self._cell).split()))
            self._cell = None
        elif tag == "table" and self._rows is not None:
            rows = [(cells, head) for cells, head in self._rows if cells]
            header = rows.pop(0)[0] if rows and rows[0][1] else []
            width = max([len(header), *(len(c) for c, _ in rows)], default=0)
            if width:
                self.blocks.append(table(header + [""] * (width - len(header)),
                                         [c + [""] * (width - len(c)) for c, _ in rows]))
            self._rows = None
        elif tag == "p" and self._rows is None:
            self.flush()

    def handle_data(self, data: str) -> None:
        if self._drop:
            return
        if self._cell is not None:
            self._cell.append(data)
        elif self._rows is None:
            self._text.append(data)


def blocks_from_html(text: str) -> list[Block]:
    """The text of an old section's ``html`` as blocks (see :class:`_LegacyText`); nothing of its markup."""
    parser = _LegacyText()
    parser.feed(text)
    parser.close()
    parser.flush()
    return parser.blocks
