"""Tables, report section and figure of the caption-source ablation (:func:`llmvem.ablation.run_ablation`).

All three read the ablation result (the content of ``ablation.json``): ``models`` {name: label, kind, captions,
mean_r, mean_accuracy, per_roi, vs_lambda0}, ``pairwise`` (source vs source comparisons), ``rois``, ``baseline``,
``lambda``, ``n_boot`` and ``warning``.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from llmvem.report.blocks import note, table
from llmvem.report.tables import fmt_ci, fmt_number, fmt_p, markdown_table

__all__ = ["ablation_section_blocks", "ablation_table", "plot_ablation", "top_rois"]


def top_rois(rois: Sequence[str]) -> list[str]:
    """ROIs that are not a subdivision ``<roi>_<part>`` of another listed ROI (for compact tables)."""
    return [r for r in rois if not any(r != o and r.startswith(o + "_") for o in rois)]


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the ablation table (baselines first, then the sources)."""
    rois = top_rois(list(result["rois"]))
    has_acc = any(m.get("mean_accuracy") is not None for m in result["models"].values())
    header = ["model", "captions", "mean r"] + (["mean acc %"] if has_acc else []) + \
        [f"{r} r" for r in rois] + ["Δr vs λ=0", "95% CI", "p", "improved %"]
    rows = []
    for name, m in result["models"].items():
        vs = m.get("vs_lambda0")
        cells = [m["label"], m.get("captions", "-"), fmt_number(m["mean_r"])]
        if has_acc:
            cells.append(fmt_number(m.get("mean_accuracy"), 1))
        cells += [fmt_number(m["per_roi"].get(r, {}).get("mean_r")) for r in rois]
        if vs is None:
            cells += ["(reference)" if name == result["baseline"] else "-", "", "", ""]
        else:
            cells += [fmt_number(vs["diff"], 4, True), fmt_ci(vs["ci_low"], vs["ci_high"]), fmt_p(vs["p_value"]),
                      fmt_number(100 * vs["fraction_improved"], 1)]
        rows.append(cells)
    return header, rows


def _pairwise_rows(result: dict[str, Any]) -> list[list[str]]:
    labels = {n: m["label"] for n, m in result["models"].items()}
    return [[f"{labels[c['b']]} vs {labels[c['a']]}", fmt_number(c["diff"], 4, True), fmt_ci(c["ci_low"], c["ci_high"]),
             fmt_p(c["p_value"]), fmt_number(100 * c["fraction_improved"], 1)] for c in result["pairwise"]]


def ablation_table(result: dict[str, Any]) -> str:
    """The ablation as a Markdown table: one row per model, Δ mean r against λ = 0 with its 95% CI and p,
    followed by the pairwise comparisons of the sources."""
    out = markdown_table(*_rows(result))
    if result["pairwise"]:
        out += "\n" + markdown_table(["B vs A", "Δ mean r (B − A)", "95% CI", "p", "improved %"],
                                     _pairwise_rows(result))
    return out


def ablation_section_blocks(result: dict[str, Any]) -> list[dict[str, Any]]:
    """The report section as data blocks (:mod:`llmvem.report.blocks`): the table, its caption, the pairwise
    table and the warning."""
    header, rows = _rows(result)
    out = [table(header, rows, text_columns=2),
           note(f"The same model (seed, features, schedule) trained at λ = {result['lambda']:g} with captions from "
                "each source; Δ, the 95% CI and the two-sided p come from the paired bootstrap over test images "
                f"({result['n_boot']} resamples) against LLM-VEM trained without alignment (λ = 0); 'improved' is "
                "the percentage of voxels whose r rose. The shuffled control keeps the sentences and breaks their "
                "link to the image: a source helps through its content only if it beats the shuffled control.")]
    if result["pairwise"]:
        out.append(table(["sources (B vs A)", "Δ mean r", "95% CI", "p", "improved (%)"], _pairwise_rows(result)))
    if result.get("warning"):
        out.append(note(f"Note: {result['warning']}"))
    return out


def plot_ablation(result: dict[str, Any], path: Path) -> Path | None:
    """Δ mean r against λ = 0 per source (all voxels and the top-level ROIs), with the bootstrap 95% CIs;
    None when no source was compared."""
    from llmvem.report.figures import BarSeries, plot_roi_bars

    rois = top_rois(list(result["rois"]))
    series = []
    for m in result["models"].values():
        vs = m.get("vs_lambda0")
        if vs is None or m.get("kind") != "caption_source":
            continue
        parts = [vs, *(vs["per_roi"].get(r) for r in rois)]
        series.append(BarSeries(label=m["label"], means=[p["diff"] if p else float("nan") for p in parts],
                                intervals=[(p["ci_low"], p["ci_high"]) if p else None for p in parts]))
    if not series:
        return None
    return plot_roi_bars(["all voxels", *rois], series, path, ylabel="Δ mean r vs λ = 0 (test)")
