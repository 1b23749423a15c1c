"""Build the HTML report of one or more run folders: one ``index.html`` that holds everything.

The page is a single file: CSS inline and every image (figures, gallery thumbnails, extra figures) embedded as a
base64 ``data:`` URI; the figures are also left as PNG files beside it for reuse. Sections whose inputs are absent
are replaced by a one-line note. The model marked "chosen" is the one :func:`llmvem.evaluate.selection.choose_model`
picks on the **validation** split — the same model the CLI summary names and ``llmvem export`` submits; the
alignment comparisons show the λ > 0 model the same rule picks among the aligned ones. The test split never
chooses.
"""

from __future__ import annotations

import base64
import datetime as _dt
import html
import logging
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from importlib import resources
from pathlib import Path
from urllib.parse import quote

import numpy as np

from llmvem.evaluate.selection import Selection, choose_model
from llmvem.report import figures
from llmvem.report.blocks import render_blocks
from llmvem.report.cortex import masks_to_fsaverage5, plot_surface_maps, voxels_to_fsaverage5
from llmvem.report.roi import ALL_VOXELS, class_order, interval_note, roi_classes, roi_values
from llmvem.report.runfolder import (
    ComparisonStats,
    LambdaPoint,
    ModelResult,
    RunResults,
    load_run,
)
from llmvem.report.tables import fmt_number, fmt_p
from llmvem.utils import atomic_write, progress

logger = logging.getLogger(__name__)

_DASH = "–"


# ------------------------------------------------------------------------------------------ small helpers
def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _fmt(value: float | None, digits: int = 3) -> str:
    return fmt_number(value, digits, missing=_DASH)


def _fmt_p(p: float) -> str:
    return fmt_p(p, missing=_DASH)


def _fmt_lambda(lam: float | None) -> str:
    return _DASH if lam is None else f"{lam:g}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _data_uri(path: Path) -> str:
    """The file as a base64 ``data:`` URI (PNG, JPEG, GIF or SVG by suffix), so the page needs no file beside it."""
    kind = {".jpg": "jpeg", ".jpeg": "jpeg", ".gif": "gif", ".svg": "svg+xml"}.get(path.suffix.lower(), "png")
    return f"data:image/{kind};base64," + base64.b64encode(path.read_bytes()).decode("ascii")


def _note(text: str) -> str:
    return f'<p class="note">{_e(text)}</p>'


def _figure(path: Path, alt: str, caption: str) -> str:
    return (f'<figure><img src="{_data_uri(path)}" alt="{_e(alt)}" data-file="{_e(quote(path.name))}">'
            f'<figcaption class="caption">{caption}</figcaption></figure>')


def _table(header: Sequence[str], rows: Sequence[str], text_cols: int = 1, cls: str = "") -> str:
    ths = "".join(f'<th class="text">{h}</th>' if i < text_cols else f"<th>{h}</th>" for i, h in enumerate(header))
    return (f'<div class="scroll"><table class="{cls}"><thead><tr>{ths}</tr></thead>'
            f'<tbody>{"".join(rows)}</tbody></table></div>')


@dataclass
class _Entry:
    """A model of one run, under the key it has in the report (prefixed with the run when names collide)."""

    key: str
    run: RunResults
    model: ModelResult

    @property
    def label(self) -> str:
        return self.model.label if self.key == self.model.name else f"{self.run.name}: {self.model.label}"


def _unique_run_names(runs: list[RunResults]) -> None:
    seen: dict[str, int] = {}
    for run in runs:
        base = run.name
        seen[base] = seen.get(base, 0) + 1
        if seen[base] > 1:
            run.name = f"{base}-{seen[base]}"


def _entries(runs: list[RunResults]) -> list[_Entry]:
    counts: dict[str, int] = {}
    for run in runs:
        for name in run.models:
            counts[name] = counts.get(name, 0) + 1
    return [_Entry(key=name if counts[name] == 1 else f"{run.name}/{name}", run=run, model=m)
            for run in runs for name, m in run.models.items()]


def chosen_model(run: RunResults) -> Selection:
    """The run's model chosen on validation by the one rule (:func:`llmvem.evaluate.selection.choose_model`):
    the model the CLI summary names and ``llmvem export`` submits."""
    return choose_model(run.models)


def baseline_and_aligned(run: RunResults) -> tuple[ModelResult | None, ModelResult | None]:
    """The LLM-VEM model trained without alignment (λ = 0) and the λ > 0 model that the same rule chooses on
    validation among the aligned ones (the alignment comparisons of the report show this pair).

    Either is None when the run has no such model; the aligned one is None when no λ > 0 model recorded a
    validation mean r outside its fit (the test split is never used to choose).
    """
    llmvem = [m for m in run.models.values() if m.kind == "llmvem" and m.lam is not None]
    base = next((m for m in llmvem if m.lam == 0), None)
    sel = choose_model(run.models, among=lambda _name, f: f["kind"] == "llmvem" and (f["lambda"] or 0) > 0)
    return base, None if sel.model is None else run.models[sel.model]


def _selection_note(run: RunResults) -> str:
    sel = chosen_model(run)
    prefix = f"{run.name}: " if run.name else ""
    if sel.model is None:
        return f"{prefix}no model was chosen: {sel.reason()}."
    note = (f"{prefix}validation chose {run.models[sel.model].label} (val mean r {_fmt(sel.val_mean_r)}): "
            f"{sel.reason()}. llmvem export submits this model.")
    aligned = baseline_and_aligned(run)[1]
    if aligned is not None and aligned.name != sel.model:
        note += (f" The alignment comparisons below show {aligned.label}, the λ > 0 model with the best validation "
                 f"mean r (val mean r {_fmt(aligned.val_mean_r)}); it is not the chosen model.")
    return note


# ---------------------------------------------------------------------------------------------- sections
@dataclass
class _Context:
    runs: list[RunResults]
    entries: list[_Entry]
    out_dir: Path

    @property
    def multi(self) -> bool:
        return len(self.runs) > 1

    def run_heading(self, run: RunResults) -> str:
        return f"<h3>Run {_e(run.name)}</h3>" if self.multi else ""

    def fig_path(self, stem: str, run: RunResults | None = None) -> Path:
        name = stem if run is None or not self.multi else f"{stem}_{_slug(run.name)}"
        return self.out_dir / f"{name}.png"


def _dataset_line(run: RunResults) -> str:
    d = run.dataset
    if not d:
        return _note(f"{run.name}: metrics.json has no dataset description")
    parts = [f"<b>{_e(d.get('name', 'dataset'))}</b>"]
    splits = [f"{_e(d[k])} {k[2:]}" for k in ("n_train", "n_val", "n_test") if d.get(k) is not None]
    if splits:
        parts.append(" / ".join(splits) + " images")
    if d.get("n_voxels") is not None:
        parts.append(f"{_e(d['n_voxels'])} voxels")
    rois = d.get("rois") or {}
    if rois:
        parts.append("ROIs: " + ", ".join(f"{_e(k)} ({_e(v)})" for k, v in rois.items()))
    if d.get("noise_ceiling_source"):
        parts.append(f"noise ceiling: {_e(d['noise_ceiling_source'])}")
    cap = run.captions_info
    if cap:
        parts.append("captions: " + ", ".join(f"{_e(k)} {_e(v)}" for k, v in cap.items()))
    return f'<p class="meta">{_e(run.name)}: {"; ".join(parts)}</p>'


#: Above this many ROIs the summary table leaves the per-ROI columns to the ROI figure (and ``llmvem export``).
MAX_ROI_COLUMNS = 10


def _section_summary(ctx: _Context) -> str:
    rois = list(dict.fromkeys(r for e in ctx.entries for r in e.model.per_roi))
    many = len(rois) > MAX_ROI_COLUMNS
    has_acc = any(math.isfinite(e.model.overall.mean_accuracy) or math.isfinite(e.model.overall.median_accuracy)
                  for e in ctx.entries)
    has_val = any(math.isfinite(e.model.val_mean_r) for e in ctx.entries)
    header = ["Model"] + (["Run"] if ctx.multi else []) + ["kind", "λ"]
    text_cols = len(header) - 1
    header += (["val mean r"] if has_val else []) + ["test mean r", "test median r"]
    if has_acc:
        header += ["test mean acc. (%)", "test median acc. (%)"]
    header += [] if many else [f"{_e(r)} test mean r" for r in rois]
    best = max((e.model.overall.mean_r for e in ctx.entries if math.isfinite(e.model.overall.mean_r)),
               default=math.nan)
    chosen = {(run.path, sel.model) for run in ctx.runs if (sel := chosen_model(run)).model is not None}
    rows = []
    for e in ctx.entries:
        m = e.model.overall
        mark = ' <span class="key">(chosen on validation)</span>' if (e.run.path, e.model.name) in chosen else ""
        cells = [f'<td class="text">{_e(e.model.label)} <span class="key">{_e(e.key)}</span>{mark}</td>']
        if ctx.multi:
            cells.append(f'<td class="text">{_e(e.run.name)}</td>')
        cells.append(f'<td class="text">{_e(e.model.kind)}</td>')
        cells.append(f"<td>{_fmt_lambda(e.model.lam)}</td>")
        if has_val:
            cells.append(f"<td>{_fmt(e.model.val_mean_r)}{' (in fit)' if e.model.val_in_fit else ''}</td>")
        cls = ' class="best"' if m.mean_r == best else ""
        cells.append(f"<td{cls}>{_fmt(m.mean_r)}</td><td>{_fmt(m.median_r)}</td>")
        if has_acc:
            cells.append(f"<td>{_fmt(m.mean_accuracy, 1)}</td><td>{_fmt(m.median_accuracy, 1)}</td>")
        for roi in [] if many else rois:
            region = e.model.per_roi.get(roi)
            cells.append(f"<td>{_fmt(region.mean_r if region else None)}</td>")
        rows.append(f"<tr>{''.join(cells)}</tr>")
    out = [_dataset_line(run) for run in ctx.runs]
    out.append(_table(header, rows, text_cols=text_cols))
    acc_note = ("Accuracy is noise-normalised (percent of the noise ceiling). " if has_acc
                else "No noise-normalised accuracy: the data have no noise ceiling. ")
    roi_note = (f"The {len(rois)} ROIs are in the ROI section (and in results.csv from `llmvem export`). "
                if many else "")
    out.append(f'<p class="caption">All models, on the <b>test</b> split: Pearson r between predicted and measured '
               f"test responses, over voxels{'; val mean r is on the validation split ((in fit): the model was fitted on it, so its val r is in-sample)' if has_val else ''}. "
               f"{acc_note}{roi_note}Bold: best test mean r.</p>")
    for run in ctx.runs:
        out.append(f'<p class="note">{_e(_selection_note(run))}</p>')
    return "".join(out)


_METRIC_AXIS = {"accuracy": "noise-normalised accuracy (% of noise ceiling, test)",
                "r": "mean Pearson r (test)"}
_HEMI_TITLES = {"lh": "left hemisphere", "rh": "right hemisphere", "both": "both hemispheres"}


def _section_roi(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        values = roi_values(run)
        if not values:
            out.append(_note("no ROI figure: the run has no model values"))
            continue
        metric = values[0].metric
        labels = {e.model.name: e.label for e in ctx.entries if e.run is run}
        order = {c: i for i, c in enumerate(["all", *class_order(v.roi_class for v in values if v.roi_class != "all")])}
        bars = [figures.FacetBar(series=labels[v.model], roi=v.roi, row=v.roi_class, column=v.hemisphere,
                                 mean=v.mean, ci=v.ci)
                for v in sorted(values, key=lambda v: order[v.roi_class])]
        path = figures.plot_roi_facets(bars, ctx.fig_path("roi_accuracy", run), _METRIC_AXIS[metric],
                                       column_titles=_HEMI_TITLES)
        n_rois = len({v.roi for v in values if v.roi != ALL_VOXELS})
        what = ("mean noise-normalised accuracy (percent of each voxel's noise ceiling)" if metric == "accuracy"
                else "mean Pearson r (the data have no noise ceiling, so no accuracy)")
        caption = (f"Test {what} of every model per ROI ({n_rois} ROIs), grouped by ROI class (rows) and "
                   f"hemisphere (columns). {interval_note(values, labels)}")
        out.append(_figure(path, "ROI chart", _e(caption)))
    return "".join(out)


def _section_scatter(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        base, aligned = baseline_and_aligned(run)
        if run.voxels is None:
            out.append(_note("no voxel scatter: voxel_metrics.npz is absent"))
            continue
        if base is None or aligned is None:
            out.append(_note("no voxel scatter: the run needs an LLM-VEM model with λ = 0 and one with λ > 0"))
            continue
        vox = run.voxels
        path = ctx.fig_path("voxel_scatter", run)
        frac, n = figures.plot_voxel_scatter(vox.r[base.name], vox.r[aligned.name],
                                             figures.roi_labels(vox.roi_masks, vox.n_voxels), path,
                                             baseline_label=base.label, aligned_label=aligned.label)
        caption = (f"Test r of each voxel without alignment ({_e(base.label)}, x) and with the best alignment "
                   f"weight ({_e(aligned.label)}, λ = {aligned.lam:g}, y), coloured by ROI. "
                   f'<span class="best">{100 * frac:.1f}%</span> of {n} voxels lie above the diagonal '
                   f"(better with alignment).")
        out.append(_figure(path, "voxel scatter", caption))
    return "".join(out)


def _stats_cells(s: ComparisonStats) -> str:
    sig = ' class="sig"' if math.isfinite(s.p_value) and s.p_value < 0.05 else ""
    return (f"<td>{_fmt(s.diff, 4)}</td><td>[{_fmt(s.ci_low, 4)}, {_fmt(s.ci_high, 4)}]</td>"
            f"<td{sig}>{_fmt_p(s.p_value)}</td><td>{_fmt(100 * s.fraction_improved, 1)}</td>")


def _section_comparisons(ctx: _Context) -> str:
    key = {(e.run.path, e.model.name): e for e in ctx.entries}
    rows = []
    for run in ctx.runs:
        for c in run.comparisons:
            a, b = key[(run.path, c.a)], key[(run.path, c.b)]
            rows.append(f'<tr><td class="text"><b>{_e(b.label)}</b> vs {_e(a.label)}</td>'
                        f'<td class="text">{_e(c.metric)}</td><td class="text">all voxels</td>'
                        f"{_stats_cells(c.overall)}</tr>")
            for roi, s in c.per_roi.items():
                rows.append(f'<tr class="sub"><td></td><td></td><td class="text indent">{_e(roi)}</td>'
                            f"{_stats_cells(s)}</tr>")
    if not rows:
        return _note("no comparisons: metrics.json lists none")
    header = ["Comparison (B vs A)", "metric", "voxels", "Δ (B − A)", "95% CI", "p", "improved (%)"]
    caption = ("Paired comparisons recorded by the run: Δ is the difference of the metric (B minus A), the CI "
               "and p-value come from the run's paired test, and 'improved' is the percentage of voxels where B "
               "beats A. Green: p &lt; 0.05 (uncorrected).")
    return _table(header, rows, text_cols=3) + f'<p class="caption">{caption}</p>'


def _lambda_points(run: RunResults) -> tuple[list[LambdaPoint], str] | None:
    if run.lambda_curve:
        return run.lambda_curve, "lambda_curve.json"
    models = [m for m in run.models.values() if m.kind == "llmvem" and m.lam is not None]
    if len({m.lam for m in models}) < 2:
        return None
    points = [LambdaPoint(lam=float(m.lam), mean_r=m.overall.mean_r, model=m.name, mean_r_ci=m.overall.mean_r_ci,
                          per_roi={roi: reg.mean_r for roi, reg in m.per_roi.items()})
              for m in sorted(models, key=lambda m: float(m.lam or 0.0))]
    return points, "the models in metrics.json (no lambda_curve.json)"


def _section_lambda(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        found = _lambda_points(run)
        if found is None:
            out.append(_note("no λ curve: the run has no lambda_curve.json and fewer than two λ values"))
            continue
        points, source = found
        per = "ROI"
        if len({r for p in points for r in p.per_roi}) > MAX_ROI_COLUMNS:  # 31 dashed lines are unreadable
            classes = roi_classes({r for p in points for r in p.per_roi}, run.dataset.get("roi_classes"))
            points = [replace(p, per_roi={c: float(np.nanmean([v for r, v in p.per_roi.items() if classes[r] == c]))
                                          for c in class_order(classes.values())}) for p in points]
            per = "ROI class (mean of its ROIs' mean r)"
        path = figures.plot_lambda_curve(points, ctx.fig_path("lambda_curve", run))
        has_ci = any(p.mean_r_ci is not None for p in points)
        caption = (f"Mean test r against the alignment weight λ (from {source}); x axis linear from 0 to the "
                   f"smallest positive λ and logarithmic above. Black: all voxels"
                   f"{' with 95% CIs' if has_ci else ' (no CIs recorded)'}; dashed: per {per}.")
        out.append(_figure(path, "lambda curve", _e(caption)))
    return "".join(out)


def _section_training(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        if not run.curves:
            out.append(_note("no training curves: no models/<model>/curves.csv in the run"))
            continue
        labels = {e.model.name: e.label for e in ctx.entries if e.run is run}
        path = figures.plot_training_curves({labels[k]: c for k, c in run.curves.items()},
                                            ctx.fig_path("training_curves", run))
        caption = ("Training loss (left; voxel and alignment terms where logged) and validation mean r (right) "
                   "of each trained model; dotted lines mark the start of a training stage.")
        out.append(_figure(path, "training curves", _e(caption)))
    return "".join(out)


def _section_gallery(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        if not run.gallery:
            out.append(_note("no caption gallery: gallery.json is absent or empty"))
            continue
        sources = list(dict.fromkeys(s for g in run.gallery for s in g.captions))
        rows = []
        for item in run.gallery:
            cells = [f'<td><img src="{_data_uri(item.image)}" alt="{_e(item.id)}"><br>'
                     f'<span class="key">{_e(item.id)}</span></td>']
            for src in sources:
                caps = item.captions.get(src, [])
                cells.append("<td><ul>" + "".join(f"<li>{_e(c)}</li>" for c in caps) + "</ul></td>" if caps
                             else f"<td>{_DASH}</td>")
            rows.append(f"<tr>{''.join(cells)}</tr>")
        out.append(_table(["image", *(_e(s) for s in sources)], rows, text_cols=len(sources) + 1, cls="gallery"))
    return "".join(out)


def _section_cortex(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        vox = run.voxels
        if vox is None or vox.fsaverage_index is None:
            out.append(_note("no cortical map: the data are not in fsaverage space (no fsaverage_index in "
                             "voxel_metrics.npz)"))
            continue
        if vox.hemisphere is None:
            out.append(_note("no cortical map: voxel_metrics.npz has fsaverage_index but no hemisphere"))
            continue
        base, aligned = baseline_and_aligned(run)
        sel = chosen_model(run)
        shown = run.models[sel.model] if sel.model is not None else next(iter(run.models.values()))
        use_acc = shown.name in vox.accuracy
        values = vox.accuracy[shown.name] if use_acc else vox.r[shown.name]
        what = "noise-normalised accuracy (%)" if use_acc else "Pearson r"
        maps = voxels_to_fsaverage5(values, vox.hemisphere, vox.fsaverage_index)
        dropped = (f"{maps.n_dropped} of {maps.n_voxels} voxels are not fsaverage5 vertices "
                   f"(full-fsaverage index ≥ 10242) and are left out.")
        if maps.n_vertices_with_data == 0:
            out.append(_note(f"no cortical map: no voxel lies on an fsaverage5 vertex; {dropped}"))
            continue
        outlines = _class_outlines(run)
        path = plot_surface_maps(maps, ctx.fig_path("cortex_accuracy", run), f"{shown.label}: {what}",
                                 cmap="inferno", colorbar_label=what, outlines=outlines)
        out.append(_figure(path, "cortical map of accuracy", _e(
            f"Test {what} of {shown.label} on the inflated fsaverage5 surface (lateral, medial, ventral and "
            f"posterior views; {maps.n_vertices_with_data} vertices carry data; each colours the mesh faces around "
            f"it). {'Outlines: ' + ', '.join(outlines) + '. ' if outlines else ''}{dropped}")))
        if base is None or aligned is None:
            out.append(_note("no improvement map: the run needs an LLM-VEM model with λ = 0 and one with λ > 0"))
            continue
        diff = voxels_to_fsaverage5(vox.r[aligned.name] - vox.r[base.name], vox.hemisphere, vox.fsaverage_index)
        path = plot_surface_maps(diff, ctx.fig_path("cortex_improvement", run),
                                 f"r({aligned.label}) − r({base.label})", cmap="RdBu_r", symmetric=True,
                                 colorbar_label="Δ r", outlines=outlines)
        out.append(_figure(path, "cortical map of the improvement", _e(
            f"Improvement from alignment: test r of {aligned.label} minus that of {base.label} (red: better "
            f"with alignment). {dropped}")))
    return "".join(out)


def _class_outlines(run: RunResults) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """fsaverage5 outlines of the run's ROI classes (the union of each class's ROIs; "streams" overlaps the
    others and is left out)."""
    vox = run.voxels
    if vox is None or vox.hemisphere is None or vox.fsaverage_index is None or not vox.roi_masks:
        return {}
    classes = roi_classes(vox.roi_masks, run.dataset.get("roi_classes"))
    unions: dict[str, np.ndarray] = {}
    for roi, cls in classes.items():
        if cls != "streams":
            unions[cls] = unions.get(cls, np.zeros(vox.n_voxels, bool)) | vox.roi_masks[roi]
    return masks_to_fsaverage5({c: unions[c] for c in class_order(unions)}, vox.hemisphere, vox.fsaverage_index)


def _section_partition(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(ctx.run_heading(run))
        vp = run.variance_partition
        if not vp:
            out.append(_note("no variance partition: set evaluate.variance_partition: true (needs captions)"))
            continue
        rois = list(vp)
        parts = [("unique_image_r2", "unique to image features"), ("shared_r2", "shared"),
                 ("unique_language_r2", "unique to caption embeddings")]
        series = [figures.BarSeries(label, [vp[r][key] for r in rois], [None] * len(rois)) for key, label in parts]
        path = figures.plot_roi_bars([r.replace("_", "\n") for r in rois], series, ctx.fig_path("partition", run),
                                     ylabel="test R² (mean over voxels)")
        rows = [f'<tr><td class="text">{_e(r)}</td>' + "".join(f"<td>{_fmt(vp[r][k])}</td>" for k, _ in parts)
                + f"<td>{_fmt(vp[r]['joint_r2'])}</td></tr>" for r in rois]
        out.append(_figure(path, "variance partition", _e(
            "Test R² of each ROI's voxels explained uniquely by the image features, uniquely by the caption "
            "embeddings, and by both (shared), from a banded ridge on both and a ridge on each (llmvem.evaluate."
            "partition; each R² floored at 0, the joint R² at least the larger single one, parts floored at 0).")))
        out.append(_table(["ROI", *(label for _, label in parts), "joint R²"], rows, text_cols=1))
    return "".join(out)


def _section_config(ctx: _Context) -> str:
    out = []
    for run in ctx.runs:
        out.append(f"<h3>Run {_e(run.name)}</h3>")
        out.append(f'<p class="meta">{_e(run.path.resolve())}</p>')
        if run.config_text is not None:
            out.append(f"<details><summary>config.yaml</summary><pre>{_e(run.config_text)}</pre></details>")
        else:
            out.append(_note("no config.yaml in the run"))
        if run.versions is not None:
            rows = [f'<tr><td class="text">{_e(k)}</td><td class="text">{_e(v)}</td></tr>'
                    for k, v in run.versions.items()]
            out.append("<details open><summary>versions</summary>"
                       + _table(["package", "version"], rows, text_cols=2) + "</details>")
        else:
            out.append(_note("no versions.json in the run"))
        if run.timing:
            total = run.timing.get("total_s")
            stages = run.timing.get("stages") or {}
            rows = [f'<tr><td class="text">{_e(k)}</td><td>{_fmt(float(v), 1)}</td></tr>' for k, v in stages.items()
                    if isinstance(v, (int, float))]
            if isinstance(total, (int, float)):
                rows.append(f'<tr><td class="text"><b>total</b></td><td><b>{_fmt(float(total), 1)}</b></td></tr>')
            out.append("<details><summary>run time</summary>"
                       + _table(["stage", "seconds"], rows, text_cols=1) + "</details>")
    return "".join(out)


# -------------------------------------------------------------------------------------------- the page
_SECTIONS: list[tuple[str, str, Callable[[_Context], str]]] = [
    ("summary", "Summary", _section_summary),
    ("roi", "ROI accuracy", _section_roi),
    ("scatter", "Voxel scatter", _section_scatter),
    ("comparisons", "Comparisons", _section_comparisons),
    ("lambda", "λ curve", _section_lambda),
    ("training", "Training curves", _section_training),
    ("gallery", "Caption gallery", _section_gallery),
    ("cortex", "Cortical map", _section_cortex),
    ("partition", "Variance partition", _section_partition),
]


def _extra_sections(ctx: _Context) -> list[tuple[str, str, str]]:
    sections = []
    for run in ctx.runs:
        for i, sec in enumerate(run.extra_sections):
            body = [render_blocks(sec.blocks)]  # data from the run folder, escaped: never its stored HTML
            for fig in sec.figures:
                body.append(f'<figure><img src="{_data_uri(fig)}" alt="{_e(fig.name)}"></figure>')
            title = f"{sec.title} ({run.name})" if ctx.multi else sec.title
            sections.append((f"extra-{_slug(run.name)}-{i}", title, "".join(body)))
    return sections


def write_report(run_dirs: Sequence[str | Path], out_dir: str | Path | None = None,
                 title: str | None = None) -> Path:
    """Write the HTML report of one or more run folders.

    Parameters
    ----------
    run_dirs : sequence of str or Path
        Run folders (each with ``metrics.json``; see :mod:`llmvem.report.runfolder`). Models of all runs
        appear side by side; a model name found in several runs is prefixed with its run's folder name.
    out_dir : str or Path, optional
        Folder of ``index.html`` and its figures; default ``<first run>/report``.
    title : str, optional
        Page title; default "LLM-VEM report: <run names>".

    Returns
    -------
    Path
        The written ``index.html``.

    Raises
    ------
    DataValidationError
        A run folder or one of its files is missing or malformed.
    """
    if not run_dirs:
        raise ValueError("write_report needs at least one run folder")
    runs = [load_run(p) for p in run_dirs]
    _unique_run_names(runs)
    out = Path(out_dir) if out_dir is not None else runs[0].path / "report"
    out.mkdir(parents=True, exist_ok=True)
    out = out.resolve()
    ctx = _Context(runs=runs, entries=_entries(runs), out_dir=out)
    title = title or "LLM-VEM report: " + ", ".join(r.name for r in runs)

    body: list[tuple[str, str, str]] = []
    for anchor, heading, build in progress(_SECTIONS, desc="report sections", unit="section"):
        body.append((anchor, heading, build(ctx)))
    body += _extra_sections(ctx)
    body.append(("configuration", "Configuration", _section_config(ctx)))

    css = resources.files("llmvem.report").joinpath("report.css").read_text(encoding="utf-8")
    nav = "".join(f'<a href="#{a}">{_e(h)}</a>' for a, h, _ in body)
    stamp = _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    sections = "".join(f'<section id="{a}"><h2>{_e(h)}</h2>{content}</section>' for a, h, content in body)
    page = (f'<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            f'<meta name="viewport" content="width=device-width, initial-scale=1">'
            f"<title>{_e(title)}</title><style>{css}</style></head><body><main>"
            f"<h1>{_e(title)}</h1><p class=\"meta\">Generated {stamp} by llmvem from "
            f"{len(runs)} run folder{'s' if len(runs) > 1 else ''}: {', '.join(_e(r.name) for r in runs)}.</p>"
            f"<nav>{nav}</nav>{sections}</main></body></html>\n")
    index = out / "index.html"
    with atomic_write(index, encoding="utf-8") as fh:
        fh.write(page)
    logger.info("report written to %s", index)
    return index
