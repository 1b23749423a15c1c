"""The report's figures, drawn with matplotlib's object API (no pyplot state, no display needed).

Each function takes plain arrays or parsed run-folder objects, writes one PNG and returns what the caption
needs to say. Figures are small (100 dpi) so a report renders in seconds.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from llmvem.report.runfolder import LambdaPoint, TrainingCurves

DPI = 100
_OTHER = "other"


def _colors(n: int) -> list[tuple[float, float, float, float]]:
    from matplotlib import colormaps

    cmap = colormaps["tab10" if n <= 10 else "tab20"]
    return [cmap(i % cmap.N) for i in range(n)]


def bootstrap_mean_ci(values: np.ndarray, n_boot: int = 1000, confidence: float = 0.95,
                      seed: int = 0) -> tuple[float, float]:
    """Percentile bootstrap confidence interval of the mean (resampling the values with replacement).

    Parameters
    ----------
    values : array of shape (n_values,)
        Per-voxel values; NaNs are left out.
    n_boot : int
        Bootstrap resamples.
    confidence : float
        Coverage of the interval (0.95: the 2.5th to 97.5th percentile of the resampled means).
    seed : int
        Seed of the resampling.

    Returns
    -------
    (low, high) : tuple of float
        NaN when fewer than two finite values.
    """
    x = np.asarray(values, dtype=np.float64)
    x = x[np.isfinite(x)]
    if x.size < 2:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(n_boot)
    chunk = max(1, 2_000_000 // x.size)  # bound memory at ~16 MB of indices per chunk
    for start in range(0, n_boot, chunk):
        stop = min(n_boot, start + chunk)
        means[start:stop] = x[rng.integers(0, x.size, size=(stop - start, x.size))].mean(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(means, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


@dataclass
class BarSeries:
    """The bars of one model: a mean and an optional (low, high) interval per group (NaN mean: no bar)."""

    label: str
    means: list[float]
    intervals: list[tuple[float, float] | None]


def plot_roi_bars(groups: Sequence[str], series: Sequence[BarSeries], path: Path,
                  ylabel: str = "mean Pearson r (test)") -> Path:
    """Grouped bar chart: one group per ROI, one bar per model, error bars where intervals are known.

    Returns
    -------
    Path
        ``path``.
    """
    n_groups, n_series = len(groups), len(series)
    width_in = float(np.clip(2.5 + 0.28 * n_groups * n_series, 6.0, 14.0))
    fig = Figure(figsize=(width_in, 3.6))
    ax = fig.subplots()
    bar_w = 0.8 / max(n_series, 1)
    x = np.arange(n_groups)
    for i, (s, color) in enumerate(zip(series, _colors(n_series), strict=True)):
        means = np.asarray(s.means, dtype=np.float64)
        pos = x - 0.4 + bar_w * (i + 0.5)
        ax.bar(pos, np.nan_to_num(means), width=bar_w * 0.92, color=color, label=s.label)
        lo = np.array([m - iv[0] if iv is not None else np.nan for m, iv in zip(means, s.intervals, strict=True)])
        hi = np.array([iv[1] - m if iv is not None else np.nan for m, iv in zip(means, s.intervals, strict=True)])
        # An interval from another source (voxel bootstrap) may not bracket the recorded mean exactly.
        lo, hi = np.clip(lo, 0, None), np.clip(hi, 0, None)
        has = np.isfinite(lo) & np.isfinite(hi) & np.isfinite(means)
        if has.any():
            ax.errorbar(pos[has], means[has], yerr=np.vstack([lo[has], hi[has]]), fmt="none", ecolor="0.15",
                        elinewidth=1, capsize=2)
    ax.axhline(0, color="0.3", lw=0.8)
    ax.set_xticks(x, list(groups))
    ax.set_ylabel(ylabel)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


@dataclass
class FacetBar:
    """One horizontal bar of :func:`roi_facet_figure`: ``mean`` of ``series`` (a model) for ``roi`` in a facet.

    ``row`` (an ROI class) and ``column`` (a hemisphere) name the facet; ``ci`` is (low, high) or None.
    """

    series: str
    roi: str
    row: str
    column: str
    mean: float
    ci: tuple[float, float] | None


#: Height in inches of one bar, and the gap between ROIs, in :func:`roi_facet_figure`.
BAR_IN = 0.1
ROI_GAP_IN = 0.12


def roi_facet_figure(bars: Sequence[FacetBar], xlabel: str, column_titles: Mapping[str, str] | None = None
                     ) -> Figure:
    """Horizontal grouped bars faceted by ROI class (rows) and hemisphere (columns).

    Each facet lists its ROIs top to bottom, one bar per series (model) per ROI, with error bars where known.
    Facet heights follow their ROI counts, so tick labels keep the same spacing (≥ one bar group, 8 pt) at any
    number of ROIs; all facets share the x range.

    Parameters
    ----------
    bars : sequence of FacetBar
        Rows and columns appear in the order first met; ROIs in a facet in the order first met.
    xlabel : str
        Label of the value axis (bottom row).
    column_titles : dict of str to str, optional
        Title of each column (default: the column key).

    Returns
    -------
    matplotlib.figure.Figure
        Axes in row-major order; ``ax.get_label()`` is ``"<row>|<column>"``.
    """
    rows = list(dict.fromkeys(b.row for b in bars))
    cols = list(dict.fromkeys(b.column for b in bars))
    series = list(dict.fromkeys(b.series for b in bars))
    rois_of = {r: list(dict.fromkeys(b.roi for b in bars if b.row == r)) for r in rows}
    n_s = max(len(series), 1)
    group_in = n_s * BAR_IN + ROI_GAP_IN
    heights = [len(rois_of[r]) * group_in + 0.35 for r in rows]
    longest = max((len(roi) for r in rows for roi in rois_of[r]), default=4)
    width = min(4.0 + 3.2 * len(cols) + 0.06 * longest, 14.0)
    legend_in = 0.2 * math.ceil(n_s / 3)
    fig = Figure(figsize=(width, sum(heights) + 0.6 + legend_in), layout="constrained")
    fig.get_layout_engine().set(h_pad=0.02, hspace=0.0, wspace=0.08)
    grid = fig.add_gridspec(len(rows), len(cols), height_ratios=heights)
    finite = [v for b in bars for v in (b.mean, *(b.ci or ())) if math.isfinite(v)]
    lo, hi = (min(finite + [0.0]), max(finite + [0.0])) if finite else (0.0, 1.0)
    pad = 0.05 * (hi - lo or 1.0)
    colors = dict(zip(series, _colors(n_s), strict=True))
    lookup = {(b.row, b.column, b.roi, b.series): b for b in bars}
    bar_h = 1.0 / (n_s + ROI_GAP_IN / BAR_IN)
    for i, row in enumerate(rows):
        rois = rois_of[row]
        y = np.arange(len(rois), dtype=float)
        for j, col in enumerate(cols):
            ax = fig.add_subplot(grid[i, j], label=f"{row}|{col}")
            for k, name in enumerate(series):
                found = [lookup.get((row, col, roi, name)) for roi in rois]
                means = np.array([b.mean if b else np.nan for b in found])
                pos = y - 0.5 * n_s * bar_h + (k + 0.5) * bar_h
                ok = np.isfinite(means)
                ax.barh(pos[ok], means[ok], height=bar_h * 0.9, color=colors[name],
                        label=name if i == 0 and j == 0 else None)
                has = np.array([bool(b and b.ci and ok[n]) for n, b in enumerate(found)])
                if has.any():
                    ci = np.array([b.ci for b, h in zip(found, has, strict=True) if h and b and b.ci])
                    m = means[has]
                    err = np.clip(np.vstack([m - ci[:, 0], ci[:, 1] - m]), 0, None)
                    ax.errorbar(m, pos[has], xerr=err, fmt="none", ecolor="0.15", elinewidth=0.8, capsize=1.5)
            ax.set_ylim(len(rois) - 0.5, -0.5)
            ax.set_xlim(lo - pad, hi + pad)
            ax.axvline(0, color="0.3", lw=0.8)
            ax.set_yticks(y, rois if j == 0 else [""] * len(rois), fontsize=8)
            ax.tick_params(axis="y", length=0)
            ax.tick_params(axis="x", labelsize=7, labelbottom=i == len(rows) - 1)
            ax.grid(axis="x", color="0.9", lw=0.6)
            ax.set_axisbelow(True)
            ax.spines[["top", "right"]].set_visible(False)
            if j == 0:
                ax.set_ylabel(row, fontsize=8, color="0.25")
            if i == 0:
                ax.set_title((column_titles or {}).get(col, col), fontsize=9)
            if i == len(rows) - 1:
                ax.set_xlabel(xlabel, fontsize=8)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside upper center", ncols=min(n_s, 3),
               fontsize=8, frameon=False)
    return fig


def plot_roi_facets(bars: Sequence[FacetBar], path: Path, xlabel: str,
                    column_titles: Mapping[str, str] | None = None) -> Path:
    """Draw :func:`roi_facet_figure` into the PNG ``path`` and return ``path``."""
    roi_facet_figure(bars, xlabel, column_titles).savefig(path, dpi=DPI)
    return path


def roi_labels(roi_masks: Mapping[str, np.ndarray], n_voxels: int) -> np.ndarray:
    """Name of the first ROI (in mask order) that holds each voxel, ``"other"`` for the rest.

    Returns
    -------
    array of shape (n_voxels,) of str
    """
    labels = np.full(n_voxels, _OTHER, dtype=object)
    for name in reversed(list(roi_masks)):
        labels[np.asarray(roi_masks[name], dtype=bool)] = name
    return labels


def plot_voxel_scatter(r_baseline: np.ndarray, r_aligned: np.ndarray, labels: np.ndarray, path: Path,
                       baseline_label: str, aligned_label: str) -> tuple[float, int]:
    """Per-voxel r of the baseline (x) against the aligned model (y), coloured by ROI, with the diagonal.

    Parameters
    ----------
    r_baseline, r_aligned : arrays of shape (n_voxels,)
    labels : array of shape (n_voxels,) of str
        ROI of each voxel (see :func:`roi_labels`).

    Returns
    -------
    fraction_above : float
        Fraction of voxels (with finite r in both) above the diagonal (aligned better).
    n_voxels : int
        Voxels plotted.
    """
    x, y = np.asarray(r_baseline, float), np.asarray(r_aligned, float)
    ok = np.isfinite(x) & np.isfinite(y)
    x, y, labels = x[ok], y[ok], np.asarray(labels)[ok]
    frac = float(np.mean(y > x)) if ok.any() else float("nan")
    fig = Figure(figsize=(5.2, 4.6))
    ax = fig.subplots()
    names = [n for n in dict.fromkeys(labels.tolist()) if n != _OTHER]
    names += [_OTHER] if (labels == _OTHER).any() else []
    colors = _colors(len(names))
    size = 10 if x.size < 2000 else 3
    for name, color in zip(names, colors, strict=True):
        sel = labels == name
        ax.scatter(x[sel], y[sel], s=size, alpha=0.6, lw=0, rasterized=True,
                   color="0.6" if name == _OTHER else color, label=f"{name} ({int(sel.sum())})")
    lims = [min(x.min(initial=0), y.min(initial=0)) - 0.02, max(x.max(initial=0), y.max(initial=0)) + 0.02]
    ax.plot(lims, lims, color="0.2", lw=1, ls="--")
    ax.set_xlim(lims)
    ax.set_ylim(lims)
    ax.set_aspect("equal")
    ax.set_xlabel(f"r, {baseline_label}")
    ax.set_ylabel(f"r, {aligned_label}")
    ax.set_title(f"{100 * frac:.1f}% of {x.size} voxels above the diagonal", fontsize=9)
    # Outside the axes, in columns: with 31 ROIs a legend inside would cover the points.
    ax.legend(fontsize=7, frameon=False, markerscale=2, loc="upper left", bbox_to_anchor=(1.02, 1.0),
              ncols=1 + len(names) // 16)
    ax.spines[["top", "right"]].set_visible(False)
    fig.set_figwidth(5.2 + 1.6 * (1 + len(names) // 16))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return frac, int(x.size)


def plot_lambda_curve(points: Sequence[LambdaPoint], path: Path) -> Path:
    """Mean r against the alignment weight λ, with CIs where known and one dashed line per ROI.

    The x axis is symmetric-log: linear between 0 and the smallest positive λ, logarithmic above, so λ = 0
    sits on the axis beside λ = 0.001 … 10.
    """
    lams = np.array([p.lam for p in points])
    means = np.array([p.mean_r for p in points])
    fig = Figure(figsize=(6.0, 3.6))
    ax = fig.subplots()
    positive = lams[lams > 0]
    if positive.size:
        ax.set_xscale("symlog", linthresh=float(positive.min()), linscale=0.6)
    rois = list(dict.fromkeys(r for p in points for r in p.per_roi))
    for roi, color in zip(rois, _colors(len(rois) + 1)[1:], strict=True):
        vals = np.array([p.per_roi.get(roi, np.nan) for p in points])
        ax.plot(lams, vals, ls="--", marker=".", lw=1, color=color, label=roi)
    ci = [p.mean_r_ci for p in points]
    if any(c is not None for c in ci):
        lo = np.array([m - c[0] if c else 0.0 for m, c in zip(means, ci, strict=True)])
        hi = np.array([c[1] - m if c else 0.0 for m, c in zip(means, ci, strict=True)])
        ax.errorbar(lams, means, yerr=np.clip(np.vstack([lo, hi]), 0, None), color="black", marker="o", lw=1.8, capsize=3,
                    label="all voxels")
    else:
        ax.plot(lams, means, color="black", marker="o", lw=1.8, label="all voxels")
    ax.set_xticks(lams, [f"{v:g}" for v in lams])
    ax.minorticks_off()
    ax.set_xlabel("alignment weight λ")
    ax.set_ylabel("mean Pearson r (test)")
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(fontsize=8, frameon=False, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path


#: Loss columns of ``curves.csv`` drawn by :func:`plot_training_curves`: the total, then each term (the trainer
#: logs ``train_voxel_loss``/``train_align_loss``; older runs ``voxel_loss``/``align_loss``).
LOSS_COLUMNS = (("train_loss",), ("train_voxel_loss", "voxel_loss"), ("train_align_loss", "align_loss"))


def _curve_x(curves: TrainingCurves) -> tuple[np.ndarray, str]:
    step = curves.columns["step"]
    if np.isfinite(step).all() and (np.diff(step) >= 0).all():
        return step, "step"
    return np.arange(len(curves), dtype=np.float64), "row"


def plot_training_curves(curves: Mapping[str, TrainingCurves], path: Path) -> Path:
    """One row per model: losses (left) and validation mean r (right) against the training step.

    Stage changes are marked with dotted vertical lines and the stage name.
    """
    n = len(curves)
    fig = Figure(figsize=(9.0, 0.6 + 2.3 * n))
    axes = np.atleast_2d(fig.subplots(n, 2, squeeze=False, sharex="row"))
    loss_cols = LOSS_COLUMNS
    for row, (label, c) in enumerate(curves.items()):
        x, xlabel = _curve_x(c)
        ax_l, ax_r = axes[row]
        positive = True
        for (col, *fallback), color in zip(loss_cols, _colors(len(loss_cols)), strict=True):
            col = next((k for k in (col, *fallback) if k in c.columns and np.isfinite(c.columns[k]).any()), None)
            if col is not None:
                y = c.columns[col]
                ok = np.isfinite(y)
                positive &= bool((y[ok] > 0).all())
                ax_l.plot(x[ok], y[ok], lw=1.2, color=color, label=col)
        if positive:
            ax_l.set_yscale("log")
        val = c.columns["val_mean_r"]
        ok = np.isfinite(val)
        ax_r.plot(x[ok], val[ok], marker=".", lw=1.2, color="black")
        ax_l.set_ylabel("loss")
        ax_r.set_ylabel("val mean r")
        ax_l.set_title(label, fontsize=9, loc="left")
        ax_l.legend(fontsize=7, frameon=False)
        for ax in (ax_l, ax_r):
            ax.spines[["top", "right"]].set_visible(False)
            for i in range(len(c.stage)):
                if i == 0 or c.stage[i] != c.stage[i - 1]:
                    if i > 0:
                        ax.axvline(x[i], color="0.5", ls=":", lw=1)
                    ax.text(x[i], 1.0, f" {c.stage[i]}", transform=ax.get_xaxis_transform(), fontsize=7,
                            va="top", color="0.4")
        if row == n - 1:
            ax_l.set_xlabel(xlabel)
            ax_r.set_xlabel(xlabel)
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    return path
