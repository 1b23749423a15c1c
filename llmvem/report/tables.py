"""Number formatting and tables (Markdown, aligned text, HTML) shared by the CLI, the summaries and the report.

Examples
--------
>>> print(markdown_table(["model", "mean r"], [["ridge", fmt_number(0.41234)]]))
| model | mean r |
|---|---|
| ridge | 0.412 |
<BLANKLINE>
"""

from __future__ import annotations

import html
import math
from collections.abc import Sequence

__all__ = ["fmt_ci", "fmt_number", "fmt_p", "html_table", "markdown_table", "text_table"]


def fmt_number(x: float | None, digits: int = 3, signed: bool = False, missing: str = "-") -> str:
    """``x`` with ``digits`` decimals (``+`` sign with ``signed``); ``missing`` for None, NaN or inf."""
    if x is None or not math.isfinite(x):
        return missing
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def fmt_p(p: float | None, missing: str = "-") -> str:
    """A p-value: two significant digits below 0.001, else three decimals."""
    if p is None or not math.isfinite(p):
        return missing
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def fmt_ci(low: float | None, high: float | None, digits: int = 4) -> str:
    """A signed confidence interval ``[-0.0012, +0.0345]``."""
    return f"[{fmt_number(low, digits, True)}, {fmt_number(high, digits, True)}]"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table (``|`` inside cells becomes ``/``), ending with a newline."""
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c).replace("|", "/") for c in row) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], n_left: int = 1) -> str:
    """A plain-text table: columns padded to their widest cell, the first ``n_left`` left-aligned, the others
    right-aligned, a dashed rule under the header; no trailing newline."""
    table = [list(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    out = []
    for k, row in enumerate(table):
        out.append("  ".join(c.ljust(w) if i < n_left else c.rjust(w)
                             for i, (c, w) in enumerate(zip(row, widths, strict=True))))
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def html_table(header: Sequence[str], rows: Sequence[Sequence[str]], n_text: int = 1) -> str:
    """An HTML table in a scrolling ``div`` (the report's style): the first ``n_text`` columns are text
    (``class="text"``), the others numbers; cells are escaped."""
    e = html.escape

    def cells(tag: str, row: Sequence[str]) -> str:
        return "".join(f'<{tag} class="text">{e(str(c))}</{tag}>' if i < n_text else f"<{tag}>{e(str(c))}</{tag}>"
                       for i, c in enumerate(row))

    body = "".join(f"<tr>{cells('td', row)}</tr>" for row in rows)
    return f'<div class="scroll"><table><thead><tr>{cells("th", header)}</tr></thead><tbody>{body}</tbody></table></div>'
