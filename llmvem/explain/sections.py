"""Report sections of the explain stage, and the one call the experiment pipeline makes.

:func:`add_text_to_brain_section` picks the run's LLM-VEM model trained with λ > 0, fits and stores its
text-to-brain readouts (:func:`~llmvem.explain.text_to_brain.fit_model_text_to_brain`), describes its voxels
with a vocabulary, and writes two report sections into the run folder:

* ``extra_sections/text_to_brain.json`` (+ ``text_to_brain_rois.png``): how the mapping is made, and per ROI the
  test accuracy of text-only predictions (captions alone) next to the image-driven prediction;
* ``extra_sections/voxel_descriptions.json`` (+ ``voxel_descriptions_categories.png`` on the virtual brain): the
  top phrases of each ROI and of example voxels, and on the virtual brain the agreement of each semantic voxel's
  top category phrase with its true preferred category.

The per-voxel top phrases are kept in ``models/<name>/voxel_descriptions.json``.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from llmvem.explain.text_to_brain import PREDICTORS, TextToBrain, fit_model_text_to_brain
from llmvem.explain.voxel_descriptions import (
    VoxelDescriptions,
    category_agreement,
    category_phrases,
    default_vocabulary,
    describe_voxels,
)
from llmvem.report import blocks
from llmvem.report.tables import fmt_number
from llmvem.utils import write_json

if TYPE_CHECKING:
    from llmvem.config import RunConfig
    from llmvem.data.dataset import EncodingDataset
    from llmvem.embed.base import TextEncoder
    from llmvem.inputs import PreparedInputs

__all__ = ["add_text_to_brain_section", "select_text_model", "write_text_to_brain_section",
           "write_voxel_descriptions_section"]

log = logging.getLogger(__name__)

SECTION_DIR = "extra_sections"
_BAR_PREDICTORS = ("image", "text_aligned", "text_readout")


def _fmt(x: float | None, digits: int = 3) -> str:
    return fmt_number(x, digits, missing="–")


def select_text_model(run_dir: str | Path, config: RunConfig | None = None) -> Path | None:
    """The run's model for text-to-brain: among the trained models with λ > 0 (their alignment head defines the
    aligned space), the one :func:`llmvem.evaluate.selection.choose_model` chooses on validation (the rule every
    other choice of llmvem uses; ``config`` is not consulted). None when no model was trained with λ > 0 or none
    recorded a validation mean r."""
    from llmvem.evaluate.selection import choose_model
    from llmvem.train.load import is_model_folder, read_training_summary

    models = Path(run_dir) / "models"
    if not models.is_dir():
        return None
    records: dict[str, dict[str, Any]] = {}
    for d in (p for p in models.iterdir() if is_model_folder(p)):
        summary = read_training_summary(d)
        lam = summary.get("lambda_align", 0.0)
        lam = float(lam) if isinstance(lam, (int, float)) else 0.0
        if lam > 0:
            records[d.name] = {"kind": "llmvem", "lambda": lam,
                               "val_mean_r": summary.get("metrics", {}).get("val_mean_r")}
    ordered = dict(sorted(records.items(), key=lambda kv: (kv[1]["lambda"], kv[0])))
    sel = choose_model(ordered)
    return None if sel.model is None else models / sel.model


# ------------------------------------------------------------------------------------------- text-to-brain
def _roi_rows(evaluation: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(key, label) of the table rows: all voxels, then each ROI."""
    first = next(iter(evaluation["predictors"].values()))["summary"]
    return [("", "all voxels"), *[(roi, roi) for roi in first["per_roi"]]]


def _cell(summary: Mapping[str, Any], roi: str) -> str:
    s = summary if not roi else summary["per_roi"][roi]
    acc = s.get("mean_accuracy")
    return _fmt(s.get("mean_r")) + ("" if acc is None else f" ({_fmt(acc, 1)}%)")


def _text_to_brain_figure(evaluation: Mapping[str, Any], roi_masks: Mapping[str, np.ndarray], path: Path) -> Path:
    from llmvem.report.figures import BarSeries, bootstrap_mean_ci, plot_roi_bars

    groups = ["all", *(name.replace("_", "\n") for name in roi_masks)]  # wrapped: long ROI names overlap
    series = []
    for name in _BAR_PREDICTORS:
        if name not in evaluation["predictors"]:
            continue
        r = np.asarray(evaluation["predictors"][name]["r"], dtype=np.float64)
        masks = [np.ones(r.shape, bool), *[np.asarray(m, bool) for m in roi_masks.values()]]
        means = [float(np.nanmean(r[m])) if m.any() else float("nan") for m in masks]
        series.append(BarSeries(PREDICTORS[name], means, [bootstrap_mean_ci(r[m]) for m in masks]))
    return plot_roi_bars(groups, series, path, ylabel="mean Pearson r (test images)")


def write_text_to_brain_section(folder: str | Path, t2b: TextToBrain, evaluation: Mapping[str, Any] | None,
                                model_label: str) -> Path:
    """Write ``text_to_brain.json`` (+ its ROI bar figure) into ``folder`` (a run's ``extra_sections``)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    body = [blocks.paragraph(f"Predicted voxel responses to text with {model_label}. "
                             f"{t2b.mapping_statement('aligned')}"),
            blocks.paragraph(t2b.mapping_statement("text"))]
    figures = []
    if evaluation is None:
        body.append(blocks.note("The test split has no responses, so the text-only predictions are not scored."))
    else:
        body.append(blocks.paragraph(
            f"Honest test: each of the {evaluation['n_test']} held-out test images is predicted from its captions "
            "alone (their embedding, no pixels) and scored against the measured responses, next to the "
            "image-driven prediction of the same network. Cells: mean Pearson r"
            + (" (mean noise-normalised accuracy, % of the noise ceiling)"
               if evaluation["metric"] == "mean_accuracy" else "") + "."))
        names = [n for n in PREDICTORS if n in evaluation["predictors"]]
        rows = []
        for key, label in _roi_rows(evaluation):
            n_vox = (evaluation["predictors"][names[0]]["summary"] if not key else
                     evaluation["predictors"][names[0]]["summary"]["per_roi"][key])["n_voxels"]
            rows.append([label, n_vox, *(_cell(evaluation["predictors"][n]["summary"], key) for n in names)])
        body.append(blocks.table(["ROI", "voxels", *(PREDICTORS[n] for n in names)], rows))
        fig = _text_to_brain_figure(evaluation, t2b.roi_masks, folder / "text_to_brain_rois.png")
        figures.append(fig.name)
        body.append(blocks.paragraph("Figure: mean test r per ROI of the image-driven prediction and of the two "
                                     "text-only predictions (95% bootstrap intervals over voxels)."))
    write_json(folder / "text_to_brain.json", {"title": "Text-to-brain predictions", "blocks": body,
                                               "figures": figures})
    return folder / "text_to_brain.json"


# ------------------------------------------------------------------------------------- voxel descriptions
def _phrase_list(items: Sequence[tuple[str, float]]) -> str:
    return "; ".join(f"{p} ({s:+.2f})" for p, s in items)


def _category_figure(agreements: Mapping[str, Mapping[str, Any]], categories: Sequence[str], path: Path) -> Path:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(4.2 * len(agreements), 3.8))
    axes = fig.subplots(1, len(agreements), squeeze=False)[0]
    for ax, (readout, agr) in zip(axes, agreements.items(), strict=True):
        conf = np.asarray(agr["confusion"], dtype=np.float64)
        frac = conf / np.maximum(conf.sum(axis=1, keepdims=True), 1)
        ax.imshow(frac, vmin=0, vmax=1, cmap="viridis")
        for i in range(len(categories)):
            for j in range(len(categories)):
                ax.text(j, i, int(conf[i, j]), ha="center", va="center", fontsize=8,
                        color="black" if frac[i, j] > 0.5 else "white")
        ax.set_xticks(range(len(categories)), list(categories), rotation=45, ha="right")
        ax.set_yticks(range(len(categories)), list(categories))
        ax.set_xlabel("top-ranked category phrase")
        ax.set_ylabel("true preferred category")
        ax.set_title(f"{readout} readout: {100 * agr['fraction']:.0f}% agree", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    return path


def write_voxel_descriptions_section(folder: str | Path, t2b: TextToBrain, phrases: Sequence[str],
                                     vocabulary_source: str, dataset: EncodingDataset | None = None,
                                     encoder: TextEncoder | None = None, model_dir: str | Path | None = None,
                                     top_k: int = 5, n_example_voxels: int = 6) -> dict[str, Any]:
    """Rank ``phrases`` for every ROI and voxel; write ``voxel_descriptions.json`` (+ figure) into ``folder``.

    Parameters
    ----------
    folder : str or Path
        The run's ``extra_sections`` folder.
    t2b : TextToBrain
    phrases : sequence of str
    vocabulary_source : str
        What the phrases are (shown in the report).
    dataset : EncodingDataset, optional
        When it is the virtual brain (``meta["ground_truth"]``), the category agreement is checked.
    encoder : TextEncoder, optional
        The loaded text encoder (loaded from ``t2b.text_encoder`` when absent).
    model_dir : str or Path, optional
        Where to keep the per-voxel top phrases (``voxel_descriptions.json``).
    top_k, n_example_voxels : int

    Returns
    -------
    dict
        ``{"vocabulary", "n_phrases", "per_roi": {readout: {roi: [[phrase, score], ...]}},
        "category_agreement": {readout: fraction} (virtual brain only)}``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    encoder = encoder or t2b.load_encoder()
    phrase_emb = t2b.encode(phrases, encoder)
    descr: dict[str, VoxelDescriptions] = {r: describe_voxels(t2b, phrases, readout=r, embeddings=phrase_emb)
                                           for r in ("aligned", "text")}
    rois = {"all voxels": np.ones(t2b.n_voxels, bool), **{k: v for k, v in t2b.roi_masks.items() if v.any()}}
    per_roi = {r: {roi: [[p, s] for p, s in d.top_for_roi(m, top_k)] for roi, m in rois.items()}
               for r, d in descr.items()}
    body = [blocks.paragraph(
        f"Each phrase of the vocabulary ({vocabulary_source}) is embedded with {t2b.text_encoder} and passed "
        "through the text-to-brain readouts, giving a predicted response of every voxel to every phrase. An ROI's "
        "phrases are ranked by the mean over its voxels of the predicted response z-scored per voxel across the "
        "vocabulary (score in standard deviations), in the spirit of BrainSCUBA.")]
    body.append(blocks.table(["ROI", f"top {top_k} phrases, aligned readout", f"top {top_k} phrases, text readout"],
                             [[roi, _phrase_list(per_roi["aligned"][roi]), _phrase_list(per_roi["text"][roi])]
                              for roi in rois], text_columns=3))
    result: dict[str, Any] = {"vocabulary": vocabulary_source, "n_phrases": len(phrases), "per_roi": per_roi}
    figures: list[str] = []
    truth = (dataset.meta.get("ground_truth") if dataset is not None else None) or {}
    preferred = truth.get("preferred_category") if isinstance(truth, Mapping) else None
    examples = _example_voxels(t2b, preferred, n_example_voxels)
    if preferred is not None and "categories" in truth:
        categories = list(truth["categories"])
        cat_phr = category_phrases(categories)
        cat_emb = t2b.encode(cat_phr, encoder)
        agreements = {r: category_agreement(describe_voxels(t2b, cat_phr, readout=r, embeddings=cat_emb),  # type: ignore[arg-type]
                                            np.asarray(preferred), categories) for r in ("aligned", "text")}
        result["category_agreement"] = {r: a["fraction"] for r, a in agreements.items()}
        n = agreements["aligned"]["n_voxels"]
        body.append(blocks.paragraph(
            f"Check against the virtual brain's ground truth: for each of the {n} semantic voxels the category "
            f"phrases ({', '.join(repr(p) for p in cat_phr)}) are ranked by predicted response; the top-ranked "
            f"one names the voxel's true preferred category for {100 * agreements['aligned']['fraction']:.0f}% "
            f"of them with the aligned readout and {100 * agreements['text']['fraction']:.0f}% with the text "
            f"readout (chance {100 * agreements['aligned']['chance']:.0f}%)."))
        fig = _category_figure(agreements, categories, folder / "voxel_descriptions_categories.png")
        figures.append(fig.name)
    if examples:
        colours = truth.get("colours") if isinstance(truth, Mapping) else None
        ex_rows = []
        for v in examples:
            roi = ", ".join(k for k, m in t2b.roi_masks.items() if m[v]) or "–"
            true = ""
            if preferred is not None and int(preferred[v]) >= 0:
                true = str(truth["categories"][int(preferred[v])])
                pc = truth.get("preferred_colour")
                if colours is not None and pc is not None and int(pc[v]) >= 0:
                    true = f"{colours[int(pc[v])]} {true}"
            ex_rows.append([v, roi, *([true or "–"] if preferred is not None else []),
                            _phrase_list(descr["aligned"].top_for_voxel(v, 3))])
        header = ["voxel", "ROIs", *(["true preference"] if preferred is not None else []), "top 3 phrases"]
        body.append(blocks.paragraph("Example voxels (predicted response to each phrase, aligned readout):"))
        body.append(blocks.table(header, ex_rows, text_columns=len(header)))
    if model_dir is not None:  # phrase indices, not strings: 40k voxels × long captions would be large
        write_json(Path(model_dir) / "voxel_descriptions.json", {
            **result, "phrases": list(phrases),
            "per_voxel_top_index": {r: d.top_indices(top_k) for r, d in descr.items()}})
        body.append(blocks.paragraph(f"Top {top_k} phrases of every voxel: {Path(model_dir).name}/"
                                     "voxel_descriptions.json in the run's models folder."))
    write_json(folder / "voxel_descriptions.json", {"title": "Voxel descriptions", "blocks": body,
                                                    "figures": figures})
    return result


def _example_voxels(t2b: TextToBrain, preferred: Any, n: int) -> list[int]:
    """A few voxels spread over the ROIs (over the preferred categories on the virtual brain)."""
    if n <= 0 or t2b.n_voxels == 0:
        return []
    if preferred is not None:
        pref = np.asarray(preferred)
        picks = [int(np.flatnonzero(pref == c)[0]) for c in np.unique(pref[pref >= 0])][: n - 1]
        early = np.flatnonzero(pref < 0)
        return picks + ([int(early[0])] if early.size else [])
    return [int(i) for i in np.linspace(0, t2b.n_voxels - 1, min(n, t2b.n_voxels)).astype(int)]


# ------------------------------------------------------------------------------------------- pipeline hook
def add_text_to_brain_section(run_dir: str | Path, config: RunConfig, inputs: PreparedInputs,
                              vocabulary: Sequence[str] | None = None) -> dict[str, Any] | None:
    """Fit the text-to-brain readouts of the run's λ > 0 model and write both report sections.

    Parameters
    ----------
    run_dir : str or Path
        Experiment run folder with ``models/`` (as :func:`llmvem.pipeline.run_experiment` writes it).
    config : RunConfig
    inputs : PreparedInputs
        What the models were trained on.
    vocabulary : sequence of str, optional
        Phrases for the voxel descriptions; default :func:`~llmvem.explain.voxel_descriptions.default_vocabulary`.

    Returns
    -------
    dict or None
        ``{"model", "evaluation" (per-ROI summaries, no per-voxel arrays), "voxel_descriptions"}``; None (and a
        note section) when the run has no model trained with λ > 0.
    """
    run_dir = Path(run_dir)
    folder = run_dir / SECTION_DIR
    model_dir = select_text_model(run_dir, config)
    if model_dir is None:
        folder.mkdir(parents=True, exist_ok=True)
        note = [blocks.note("Text-to-brain predictions need an LLM-VEM model trained with λ > 0 (its alignment head "
                            "defines the aligned space); this run has none.")]
        write_json(folder / "text_to_brain.json", {"title": "Text-to-brain predictions", "blocks": note,
                                                   "figures": []})
        return None
    t2b, evaluation = fit_model_text_to_brain(model_dir, inputs, device=config.train.device)
    label = f"LLM-VEM λ={t2b.info['lambda']:g} ({model_dir.name})"
    write_text_to_brain_section(folder, t2b, evaluation, label)
    ds = inputs.dataset
    if vocabulary is None:
        phrases, source = default_vocabulary(ds.meta, inputs.captions.get("train"))
    else:
        phrases, source = list(vocabulary), f"{len(vocabulary)} user phrases"
    from llmvem.embed.text import CachedTextEncoder
    from llmvem.inputs import cache_root

    # phrase embeddings are cached beside the caption embeddings: a warm rerun loads no text model here
    encoder = CachedTextEncoder(lambda: t2b.load_encoder(config.text.device), t2b.text_encoder, t2b.long_policy,
                                t2b.dim, cache_root(config) / "text_embeddings")
    descr = write_voxel_descriptions_section(folder, t2b, phrases, source, ds, encoder, model_dir)
    slim = None
    if evaluation is not None:
        slim = {**{k: v for k, v in evaluation.items() if k != "predictors"},
                "predictors": {n: {"label": p["label"], "mean_r": p["summary"]["mean_r"],
                                   "mean_accuracy": p["summary"].get("mean_accuracy"),
                                   "per_roi": {roi: {"mean_r": s["mean_r"], "mean_accuracy": s.get("mean_accuracy")}
                                               for roi, s in p["summary"]["per_roi"].items()}}
                               for n, p in evaluation["predictors"].items()}}
    return {"model": model_dir.name, "evaluation": slim, "voxel_descriptions": descr}
