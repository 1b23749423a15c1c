"""Caption-source ablation: the same LLM-VEM model trained with captions from different sources.

This is the direct test of the paper's claim that it is the *content* of the LLM descriptions that helps: the
dataset, backbone, features, seed and every training setting stay fixed, only the captions change. Sources:

==============================  ==================================================================================
``dataset``                     the captions that come with the dataset (human captions; the virtual brain's exact
                                scene descriptions)
``labels``                      the offline ImageNet-label captioner (weak: "A photo that looks like a ...")
``shuffled``                    the config's own captions permuted across the images of each split (control: same
                                sentences, no relation to the image); ``shuffled:SOURCE`` shuffles another source
``file:PATH``                   a caption file (CSV/TSV/JSON/JSONL/COCO)
``transformers:MODEL``          a local VLM (hub id or model folder)
``openai:MODEL[@URL]``          an OpenAI-compatible server (default: the config's ``captions.base_urls``)
==============================  ==================================================================================

:func:`run_ablation` prepares the inputs once (dataset, backbone features from the feature cache), captions and
embeds each source (caption store and text-embedding cache), fits the ridge baseline (when listed in
``evaluate.baselines``), trains LLM-VEM with λ = 0 once and each source at the config's ``model.lambda_align``,
then compares every source with λ = 0 and with each other by the paired bootstrap over test images. The run
folder is a normal run folder (the report reads it) plus ``ablation.json``, ``ablation.md`` and the report
section ``extra_sections/caption_ablation.json``.

With the backbone frozen (``train.stage2.epochs = 0``) the alignment head and the voxel readout share no
parameter, so the captions cannot change the voxel predictions (only the joint gradient-norm clipping couples
them): the ablation is only meaningful with stage 2 fine-tuning, and warns otherwise.
"""

from __future__ import annotations

import copy
import dataclasses
import html
import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.config import RunConfig, save_config
from llmvem.errors import ConfigError
from llmvem.pipeline import (
    EXPERIMENT_OUTPUTS,
    PreparedInputs,
    caption_dataset,
    embed_captions,
    extract_split_features,
    fit_ridge_baseline,
    load_config_backbone,
    load_config_dataset,
    model_name,
    train_llmvem,
)
from llmvem.utils import prepare_run_folder, seed_everything, write_json

__all__ = ["ABLATION_OUTPUTS", "CaptionSource", "ablation_table", "parse_sources", "run_ablation",
           "source_config"]

log = logging.getLogger(__name__)

#: What :func:`run_ablation` writes in its folder (``overwrite`` removes exactly these).
ABLATION_OUTPUTS = (*EXPERIMENT_OUTPUTS, "ablation.json", "ablation.md")

SECTION_FILE = "caption_ablation.json"
_KINDS = ("dataset", "labels", "shuffled", "file", "transformers", "openai")


@dataclass(frozen=True)
class CaptionSource:
    """One caption source of the ablation.

    Attributes
    ----------
    spec : str
        As written on the command line (``"file:caps.csv"``).
    name : str
        Short identifier used for the model (``captions_<name>``) and file names.
    label : str
        Human-readable description.
    captions : dict
        Fields of the ``captions`` config section this source sets.
    """

    spec: str
    name: str
    label: str
    captions: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        """Name of the model trained with these captions."""
        return f"captions_{self.name}"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "_", text).strip("_").lower() or "x"


def _parse_one(spec: str) -> CaptionSource:
    kind, _, arg = spec.partition(":")
    kind = kind.strip().lower()
    arg = arg.strip()
    reset = {"model": None, "captions_file": None, "shuffle": False}
    if kind in ("dataset", "labels"):
        if arg:
            raise ConfigError(f"caption source {spec!r}: {kind!r} takes no argument")
        label = "dataset captions" if kind == "dataset" else "ImageNet-label captions (EfficientNet-Lite0)"
        return CaptionSource(spec, kind, label, {**reset, "backend": kind})
    if kind == "shuffled":
        if not arg:  # the config's own captions, permuted
            return CaptionSource(spec, "shuffled", "shuffled captions (the config's source, permuted across images)",
                                 {"shuffle": True})
        inner = _parse_one(arg)
        if inner.captions.get("shuffle"):
            raise ConfigError(f"caption source {spec!r}: shuffling a shuffled source is the same control; "
                              "write it once")
        return CaptionSource(spec, f"shuffled_{inner.name}", f"shuffled {inner.label}",
                             {**inner.captions, "shuffle": True})
    if kind == "file":
        if not arg:
            raise ConfigError(f"caption source {spec!r}: expected file:PATH (a CSV/TSV/JSON/JSONL caption file)")
        path = Path(arg).expanduser()
        if not path.is_file():
            raise ConfigError(f"caption source {spec!r}: {path} is not a file; expected a caption file "
                              "(CSV/TSV/JSON/JSONL or COCO captions)")
        return CaptionSource(spec, f"file_{_slug(path.stem)}", f"captions from {path.name}",
                             {**reset, "backend": "file", "captions_file": str(path)})
    if kind == "transformers":
        if not arg:
            raise ConfigError(f"caption source {spec!r}: expected transformers:MODEL (hub id or model folder)")
        return CaptionSource(spec, f"transformers_{_slug(Path(arg).name or arg)}", f"VLM {arg}",
                             {**reset, "backend": "transformers", "model": arg})
    if kind == "openai":
        model, _, url = arg.partition("@")
        if not model.strip():
            raise ConfigError(f"caption source {spec!r}: expected openai:MODEL@URL, e.g. "
                              "openai:llava-1.5-7b@http://localhost:8000/v1")
        out: dict[str, Any] = {**reset, "backend": "openai", "model": model.strip()}
        if url.strip():
            if not url.strip().startswith(("http://", "https://")):
                raise ConfigError(f"caption source {spec!r}: {url.strip()!r} is not an http(s) URL")
            out["base_urls"] = [url.strip()]
        return CaptionSource(spec, f"openai_{_slug(model)}", f"VLM {model.strip()} (OpenAI-compatible server)", out)
    raise ConfigError(f"caption source {spec!r}: unknown kind {kind!r}; expected one of "
                      "dataset, labels, shuffled[:SOURCE], file:PATH, transformers:MODEL, openai:MODEL@URL")


def parse_sources(sources: str | Sequence[str]) -> list[CaptionSource]:
    """Parse ``"dataset,labels,shuffled,file:PATH,transformers:MODEL,openai:MODEL@URL"`` into sources.

    Parameters
    ----------
    sources : str or sequence of str
        Comma-separated specs (a string) or one spec per item (see the module docstring).

    Returns
    -------
    list of CaptionSource
        In the given order, with unique names.

    Raises
    ------
    ConfigError
        Unknown kind, missing argument, missing caption file, duplicate source, or fewer than one source.
    """
    items = [s.strip() for s in (sources.split(",") if isinstance(sources, str) else sources) if s.strip()]
    if not items:
        raise ConfigError("--sources: expected at least one caption source, e.g. dataset,labels,shuffled")
    out: list[CaptionSource] = []
    for spec in items:
        src = _parse_one(spec)
        if any(o.name == src.name for o in out):
            raise ConfigError(f"--sources: {spec!r} repeats the source {src.name!r}; list each source once")
        out.append(src)
    return out


def source_config(config: RunConfig, source: CaptionSource) -> RunConfig:
    """A copy of ``config`` whose ``captions`` section describes ``source`` (everything else unchanged)."""
    cfg = config.model_copy(deep=True)
    data = cfg.captions.model_dump()
    data.update(source.captions)
    cfg.captions = type(cfg.captions).model_validate(data)
    return cfg


# --------------------------------------------------------------------------------------------- results
def _record(res: dict[str, Any]) -> dict[str, Any]:
    from llmvem.pipeline import _flatten_comparison

    return _flatten_comparison(res)


def _top_rois(rois: Sequence[str]) -> list[str]:
    """ROIs that are not a subdivision ``<roi>_<part>`` of another listed ROI (for compact tables)."""
    return [r for r in rois if not any(r != o and r.startswith(o + "_") for o in rois)]


def _fmt(x: float | None, digits: int = 3, signed: bool = False) -> str:
    if x is None or not np.isfinite(x):
        return "-"
    return f"{x:+.{digits}f}" if signed else f"{x:.{digits}f}"


def _fmt_p(p: float | None) -> str:
    if p is None or not np.isfinite(p):
        return "-"
    return f"{p:.2g}" if p < 0.001 else f"{p:.3f}"


def _rows(result: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the ablation table (baselines first, then the sources)."""
    rois = _top_rois(list(result["rois"]))
    has_acc = any(m.get("mean_accuracy") is not None for m in result["models"].values())
    header = ["model", "captions", "mean r"] + (["mean acc %"] if has_acc else []) + \
        [f"{r} r" for r in rois] + ["Δr vs λ=0", "95% CI", "p", "improved %"]
    rows = []
    for name, m in result["models"].items():
        vs = m.get("vs_lambda0")
        cells = [m["label"], m.get("captions", "-"), _fmt(m["mean_r"])]
        if has_acc:
            cells.append(_fmt(m.get("mean_accuracy"), 1))
        cells += [_fmt(m["per_roi"].get(r, {}).get("mean_r")) for r in rois]
        if vs is None:
            cells += ["(reference)" if name == result["baseline"] else "-", "", "", ""]
        else:
            cells += [_fmt(vs["diff"], 4, True), f"[{_fmt(vs['ci_low'], 4, True)}, {_fmt(vs['ci_high'], 4, True)}]",
                      _fmt_p(vs["p_value"]), _fmt(100 * vs["fraction_improved"], 1)]
        rows.append(cells)
    return header, rows


def ablation_table(result: dict[str, Any]) -> str:
    """The ablation as a Markdown table: one row per model, Δ mean r against λ = 0 with its 95% CI and p,
    followed by the pairwise comparisons of the sources."""
    header, rows = _rows(result)
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(c.replace("|", "/") for c in row) + " |" for row in rows]
    if result["pairwise"]:
        lines += ["", "| B vs A | Δ mean r (B − A) | 95% CI | p | improved % |", "|---|---|---|---|---|"]
        labels = {n: m["label"] for n, m in result["models"].items()}
        for c in result["pairwise"]:
            lines.append(f"| {labels[c['b']]} vs {labels[c['a']]} | {_fmt(c['diff'], 4, True)} | "
                         f"[{_fmt(c['ci_low'], 4, True)}, {_fmt(c['ci_high'], 4, True)}] | {_fmt_p(c['p_value'])} | "
                         f"{_fmt(100 * c['fraction_improved'], 1)} |")
    return "\n".join(lines) + "\n"


def _section_html(result: dict[str, Any]) -> str:
    e = html.escape
    header, rows = _rows(result)
    n_text = 2
    ths = "".join(f'<th class="text">{e(h)}</th>' if i < n_text else f"<th>{e(h)}</th>" for i, h in enumerate(header))
    body = []
    for row in rows:
        tds = "".join(f'<td class="text">{e(c)}</td>' if i < n_text else f"<td>{e(c)}</td>" for i, c in enumerate(row))
        body.append(f"<tr>{tds}</tr>")
    out = [f'<div class="scroll"><table><thead><tr>{ths}</tr></thead><tbody>{"".join(body)}</tbody></table></div>',
           f'<p class="caption">The same model (seed, features, schedule) trained at λ = {result["lambda"]:g} with '
           "captions from each source; Δ, the 95% CI and the two-sided p come from the paired bootstrap over test "
           f"images ({result['n_boot']} resamples) against LLM-VEM trained without alignment (λ = 0); "
           "'improved' is the percentage of voxels whose r rose. The shuffled control keeps the sentences and "
           "breaks their link to the image: a source helps through its content only if it beats the shuffled "
           "control.</p>"]
    if result["pairwise"]:
        labels = {n: m["label"] for n, m in result["models"].items()}
        prow = [f'<tr><td class="text"><b>{e(labels[c["b"]])}</b> vs {e(labels[c["a"]])}</td>'
                f"<td>{_fmt(c['diff'], 4, True)}</td><td>[{_fmt(c['ci_low'], 4, True)}, "
                f"{_fmt(c['ci_high'], 4, True)}]</td><td>{_fmt_p(c['p_value'])}</td>"
                f"<td>{_fmt(100 * c['fraction_improved'], 1)}</td></tr>" for c in result["pairwise"]]
        out.append('<div class="scroll"><table><thead><tr><th class="text">sources (B vs A)</th><th>Δ mean r</th>'
                   f'<th>95% CI</th><th>p</th><th>improved (%)</th></tr></thead><tbody>{"".join(prow)}</tbody>'
                   "</table></div>")
    if result.get("warning"):
        out.append(f'<p class="caption"><b>Note:</b> {e(result["warning"])}</p>')
    return "".join(out)


def _plot(result: dict[str, Any], path: Path) -> Path | None:
    """Δ mean r against λ = 0 per source (all voxels and the top-level ROIs), with the bootstrap 95% CIs."""
    from llmvem.report.figures import BarSeries, plot_roi_bars

    rois = _top_rois(list(result["rois"]))
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


# ------------------------------------------------------------------------------------------------ run
def _write_gallery(out_dir: Path, inputs: PreparedInputs, per_source: dict[str, PreparedInputs],
                   labels: dict[str, str]) -> None:
    """The pipeline's caption gallery (thumbnails of test images), with one caption column per source."""
    import json

    from llmvem.pipeline import _write_gallery as write_pipeline_gallery

    write_pipeline_gallery(out_dir, inputs)
    path = out_dir / "gallery.json"
    entries = json.loads(path.read_text(encoding="utf-8"))
    index = {img_id: i for i, img_id in enumerate(inputs.dataset.test.images.ids)}
    for entry in entries:
        i = index[entry["id"]]
        entry["captions"] = {labels[name]: inp.captions["test"][i] for name, inp in per_source.items()}
    write_json(path, entries)


def run_ablation(config: RunConfig, sources: str | Sequence[str] | Sequence[CaptionSource], out_dir: str | Path,
                 resume: bool = False, overwrite: bool = False, show_progress: bool = True, report: bool = True,
                 on_stage: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Train LLM-VEM with captions from each source, compare them, write the run folder and the report.

    Parameters
    ----------
    config : RunConfig
        The base configuration; ``model.lambda_align`` (> 0) is the weight every source is trained with, and
        ``captions`` is the source ``shuffled`` permutes.
    sources : str, sequence of str or sequence of CaptionSource
        See :func:`parse_sources`.
    out_dir : path
        Run folder; refused if it exists unless ``resume`` (finished models are reused) or ``overwrite``.
    report : bool
        Write ``report/index.html``.
    on_stage : callable, optional
        Called with a short message as each stage starts (the CLI prints it).

    Returns
    -------
    dict
        The content of ``ablation.json``: ``lambda``, ``baseline`` (the λ = 0 model), ``sources`` (spec, name,
        model, caption info), ``models`` ({name: label, kind, captions, mean_r, median_r, mean_accuracy, per_roi,
        vs_lambda0}), ``pairwise`` (source vs source comparisons), ``rois``, ``n_boot``, ``warning``; plus
        ``report`` (path of index.html) when written.

    Raises
    ------
    ConfigError
        ``model.lambda_align`` is 0, or a source is malformed.
    RunFolderError
        ``out_dir`` is used and neither ``resume`` nor ``overwrite`` is given.
    """
    from llmvem.evaluate.stats import paired_bootstrap
    from llmvem.pipeline import _evaluate_all, _versions

    srcs = parse_sources(sources if isinstance(sources, str)
                         else [s.spec if isinstance(s, CaptionSource) else s for s in sources])
    lam = float(config.model.lambda_align)
    if lam <= 0:
        raise ConfigError("model.lambda_align = 0: without the alignment loss every caption source trains the same "
                          "model; set model.lambda_align > 0, e.g. --set model.lambda_align=0.1")
    warning = None
    if config.train.stage2.epochs == 0:
        warning = ("train.stage2.epochs = 0: with the backbone frozen the alignment head and the voxel readout share "
                   "no parameter, so the captions cannot change the voxel predictions (differences come only from "
                   "the joint gradient clipping); set train.stage2.epochs >= 1 to let the captions shape the "
                   "fine-tuned backbone blocks")
        warnings.warn(warning, UserWarning, stacklevel=2)
    out_dir = Path(out_dir)
    prepare_run_folder(out_dir, resume, overwrite, outputs=ABLATION_OUTPUTS)
    say = on_stage or (lambda msg: log.info(msg))
    seed_everything(config.seed)
    t0 = time.perf_counter()
    save_config(config, out_dir / "config.yaml")
    write_json(out_dir / "versions.json", _versions(config.seed))

    timing: dict[str, float] = {}
    say("preparing inputs: dataset and image features")
    t = time.perf_counter()
    ds = load_config_dataset(config)
    if ds.val is None:
        ds = ds.with_validation_split(config.data.val_fraction, config.data.seed)
    backbone = load_config_backbone(config)
    features = extract_split_features(config, ds, backbone, show_progress=show_progress)
    timing["image_features"] = time.perf_counter() - t
    per_source: dict[str, PreparedInputs] = {}
    configs: dict[str, RunConfig] = {}
    for src in srcs:  # every source is captioned before anything trains: a failing captioner stops early
        say(f"captions from source {src.spec!r}")
        t = time.perf_counter()
        cfg = source_config(config, src)
        captions, info = caption_dataset(cfg, ds, show_progress)
        text = embed_captions(cfg, captions, show_progress)
        per_source[src.model] = PreparedInputs(ds, captions, info, text, backbone, features)
        configs[src.model] = cfg
        timing[f"captions_{src.name}"] = time.perf_counter() - t
    base_inputs = next(iter(per_source.values()))

    predictions: dict[str, dict[str, np.ndarray]] = {}
    labels: dict[str, str] = {}
    lam_of: dict[str, float | None] = {}
    if "ridge" in config.evaluate.baselines:
        say("fitting the ridge baseline on frozen features")
        t = time.perf_counter()
        predictions["ridge"] = fit_ridge_baseline(config, base_inputs)
        timing["ridge"] = time.perf_counter() - t
        labels["ridge"], lam_of["ridge"] = "Ridge (frozen features)", None

    def own_backbone(inputs: PreparedInputs) -> PreparedInputs:
        # Stage 2 fine-tunes the backbone in place: every model starts from the same (pretrained) weights.
        if config.train.stage2.epochs == 0:
            return inputs
        return dataclasses.replace(inputs, backbone=copy.deepcopy(backbone))

    base = model_name(0.0)
    say("training LLM-VEM with lambda = 0 (no alignment)")
    t = time.perf_counter()
    predictions[base] = train_llmvem(config, own_backbone(base_inputs), 0.0, out_dir / "models" / base,
                                     resume=resume, show_progress=show_progress)
    timing[base] = time.perf_counter() - t
    labels[base], lam_of[base] = "LLM-VEM λ=0 (no alignment)", 0.0
    for src in srcs:
        say(f"training LLM-VEM with lambda = {lam:g} on {src.label}")
        t = time.perf_counter()
        predictions[src.model] = train_llmvem(configs[src.model], own_backbone(per_source[src.model]), lam,
                                              out_dir / "models" / src.model, resume=resume,
                                              show_progress=show_progress)
        timing[src.model] = time.perf_counter() - t
        labels[src.model], lam_of[src.model] = f"LLM-VEM λ={lam:g}, {src.name} captions", lam

    say("evaluating on the test split")
    t = time.perf_counter()
    n_boot = config.evaluate.bootstrap
    models, voxel, comparisons = _evaluate_all(ds, predictions, labels, lam_of, n_boot, config.seed)
    for src in srcs:
        models[src.model]["kind"] = "caption_source"
    pairwise = []
    if n_boot > 0:
        y = ds.test.responses
        for i, a in enumerate(srcs):
            for b in srcs[i + 1:]:
                res = paired_bootstrap(y, predictions[a.model]["test"], predictions[b.model]["test"], n_boot=n_boot,
                                       seed=config.seed, noise_ceiling=ds.noise_ceiling, roi_masks=ds.roi_masks)
                pairwise.append({"a": a.model, "b": b.model, **_record(res)})
    timing["evaluate"] = time.perf_counter() - t

    # ---- run folder (the pipeline's layout, so the report reads it)
    np.savez_compressed(out_dir / "voxel_metrics.npz", **voxel,
                        **({"noise_ceiling": ds.noise_ceiling} if ds.noise_ceiling is not None else {}),
                        **({"hemisphere": ds.hemisphere} if ds.hemisphere is not None else {}),
                        **({"fsaverage_index": ds.fsaverage_index} if ds.fsaverage_index is not None else {}),
                        **{f"roi__{k}": v for k, v in ds.roi_masks.items()})
    for name, preds in predictions.items():
        folder = out_dir / "models" / name
        folder.mkdir(parents=True, exist_ok=True)
        np.save(folder / "predictions_test.npy", preds["test"].astype(np.float32))
    caption_text = {src.model: _caption_text(per_source[src.model].caption_info) for src in srcs}
    _write_gallery(out_dir, base_inputs, per_source, {src.model: src.name for src in srcs})
    timing["total_s"] = time.perf_counter() - t0
    write_json(out_dir / "metrics.json", {
        "dataset": {"name": ds.name, **{f"n_{s}": len(ds.splits[s]) for s in ("train", "val", "test")},
                    "n_voxels": ds.n_voxels, "rois": {k: int(v.sum()) for k, v in ds.roi_masks.items()}},
        "models": models,
        "comparisons": comparisons + pairwise,
        "captions": {src.name: caption_text[src.model] for src in srcs},
        "timing": {"total_s": timing.pop("total_s"), "stages": timing},
    })

    vs_base = {c["b"]: c for c in comparisons if c["a"] == base}
    result: dict[str, Any] = {
        "lambda": lam,
        "baseline": base,
        "n_boot": n_boot,
        "stage2_epochs": config.train.stage2.epochs,
        "warning": warning,
        "rois": list(ds.roi_masks),
        "sources": [{"spec": s.spec, "name": s.name, "label": s.label, "model": s.model,
                     "captions": per_source[s.model].caption_info} for s in srcs],
        "models": {name: {"label": labels[name], "kind": models[name]["kind"],
                          "captions": caption_text.get(name, "-"), "mean_r": models[name]["mean_r"],
                          "median_r": models[name]["median_r"], "mean_accuracy": models[name].get("mean_accuracy"),
                          "per_roi": models[name]["per_roi"], "vs_lambda0": vs_base.get(name)}
                   for name in predictions},
        "pairwise": pairwise,
    }
    write_json(out_dir / "ablation.json", result)
    (out_dir / "ablation.md").write_text(ablation_table(result), encoding="utf-8")
    section_dir = out_dir / "extra_sections"
    section_dir.mkdir(exist_ok=True)
    figure = _plot(result, section_dir / "caption_ablation.png")
    write_json(section_dir / SECTION_FILE, {"title": "Caption-source ablation", "html": _section_html(result),
                                            "figures": [figure.name] if figure is not None else []})
    if report:
        say("writing the report")
        from llmvem.report import write_report

        result["report"] = str(write_report([out_dir]))
    return result


def _caption_text(info: dict[str, Any]) -> str:
    text = f"{info.get('backend')}: {info.get('model_id')}"
    if info.get("shuffled"):
        text += f" (shuffled, seed {info.get('shuffle_seed')})"
    return text
