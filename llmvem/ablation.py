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

With the backbone frozen (``train.stage2.epochs = 0``), no core (``model.core``) and a readout that does not read
the aligned embedding (``model.readout_aligned``), the alignment head and the voxel readout share no parameter, so
the captions cannot change the voxel predictions (only the joint gradient-norm clipping couples them): the
ablation then warns (:func:`llmvem.train.trainer.alignment_is_inert`).
"""

from __future__ import annotations

import logging
import re
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llmvem.config import RunConfig
from llmvem.errors import ConfigError
from llmvem.estimators import model_name
from llmvem.experiment import EXPERIMENT_OUTPUTS, ModelSpec, run_models
from llmvem.inputs import (
    PreparedInputs,
    caption_dataset,
    embed_captions,
    extract_split_features,
    load_config_backbone,
    load_config_dataset,
)
from llmvem.pipeline import llmvem_spec, ridge_spec
from llmvem.report.ablation import ablation_section_blocks, ablation_table, plot_ablation
from llmvem.train.stream import check_align_data
from llmvem.train.trainer import alignment_is_inert
from llmvem.utils import write_json

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


# ------------------------------------------------------------------------------------------------ run
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
    DataValidationError
        ``align_data.spec`` is malformed or names a missing folder / caption file (before anything is computed).
    RunFolderError
        ``out_dir`` is used and neither ``resume`` nor ``overwrite`` is given.
    """
    srcs = parse_sources(sources if isinstance(sources, str)
                         else [s.spec if isinstance(s, CaptionSource) else s for s in sources])
    lam = float(config.model.lambda_align)
    if lam <= 0:
        raise ConfigError("model.lambda_align = 0: without the alignment loss every caption source trains the same "
                          "model; set model.lambda_align > 0, e.g. --set model.lambda_align=0.1")
    check_align_data(config)  # a bad align_data.spec fails here, not when the first aligned model is fitted
    warning = None
    if alignment_is_inert(config):
        warning = ("train.stage2.epochs = 0: with the backbone frozen, no model.core and model.readout_aligned = "
                   "false the alignment head and the voxel readout share no parameter, so the captions cannot change "
                   "the voxel predictions (differences come only from the joint gradient clipping); set "
                   "train.stage2.epochs >= 1, model.core=linear or model.readout_aligned=true")
        warnings.warn(warning, UserWarning, stacklevel=2)
    out_dir = Path(out_dir)
    say = on_stage or log.info
    per_source: dict[str, PreparedInputs] = {}

    def prepare() -> PreparedInputs:
        say("preparing inputs: dataset and image features")
        t = time.perf_counter()
        ds = load_config_dataset(config)
        if ds.val is None:
            ds = ds.with_validation_split(config.data.val_fraction, config.data.seed)
        backbone = load_config_backbone(config)
        features = extract_split_features(config, ds, backbone, show_progress=show_progress)
        timing = {"image_features": time.perf_counter() - t}
        for src in srcs:  # every source is captioned before anything trains: a failing captioner stops early
            say(f"captions from source {src.spec!r}")
            t = time.perf_counter()
            cfg = source_config(config, src)
            captions, info = caption_dataset(cfg, ds, show_progress)
            text = embed_captions(cfg, captions, show_progress)
            per_source[src.model] = PreparedInputs(ds, captions, info, text, backbone, features)
            timing[f"captions_{src.name}"] = time.perf_counter() - t
        for src in srcs:
            models[src.model].inputs = per_source[src.model]
        first = next(iter(per_source.values()))
        return PreparedInputs(ds, first.captions, first.caption_info, first.text_embeddings, backbone, features,
                              timing)

    base = model_name(0.0)
    models: dict[str, ModelSpec] = {}
    if "ridge" in config.evaluate.baselines:
        models["ridge"] = ridge_spec(config)
    models[base] = llmvem_spec(config, 0.0, "LLM-VEM λ=0 (no alignment)", show_progress)
    for src in srcs:
        models[src.model] = llmvem_spec(source_config(config, src), lam, f"LLM-VEM λ={lam:g}, {src.name} captions",
                                        show_progress, kind="caption_source")
    names = list(models)
    pairs = [(base, n) for n in names if n not in (base, "ridge")]
    pairs += [("ridge", n) for n in names if n != "ridge"] if "ridge" in models else []
    n_pairs = len(pairs)
    pairs += [(a.model, b.model) for i, a in enumerate(srcs) for b in srcs[i + 1:]]
    run = run_models(config, prepare, models, out_dir, resume=resume, overwrite=overwrite, outputs=ABLATION_OUTPUTS,
                     pairs=pairs, say=say,
                     caption_info=lambda: {s.name: _caption_text(per_source[s.model].caption_info) for s in srcs},
                     caption_columns=lambda: {s.name: per_source[s.model].captions["test"] for s in srcs})
    caption_text = {s.model: _caption_text(per_source[s.model].caption_info) for s in srcs}
    metrics = run.metrics
    comparisons, pairwise = metrics["comparisons"][:n_pairs], metrics["comparisons"][n_pairs:]
    n_boot = config.evaluate.bootstrap
    vs_base = {c["b"]: c for c in comparisons if c["a"] == base}
    result: dict[str, Any] = {
        "lambda": lam,
        "baseline": base,
        "n_boot": n_boot,
        "stage2_epochs": config.train.stage2.epochs,
        "warning": warning,
        "rois": list(metrics["dataset"]["rois"]),
        "sources": [{"spec": s.spec, "name": s.name, "label": s.label, "model": s.model,
                     "captions": per_source[s.model].caption_info} for s in srcs],
        "models": {name: {"label": m["label"], "kind": m["kind"], "captions": caption_text.get(name, "-"),
                          "mean_r": m["mean_r"], "median_r": m["median_r"], "mean_accuracy": m.get("mean_accuracy"),
                          "per_roi": m["per_roi"], "vs_lambda0": vs_base.get(name)}
                   for name, m in metrics["models"].items()},
        "pairwise": pairwise,
    }
    write_json(out_dir / "ablation.json", result)
    (out_dir / "ablation.md").write_text(ablation_table(result), encoding="utf-8")
    section_dir = out_dir / "extra_sections"
    section_dir.mkdir(exist_ok=True)
    figure = plot_ablation(result, section_dir / "caption_ablation.png")
    write_json(section_dir / SECTION_FILE, {"title": "Caption-source ablation", "blocks": ablation_section_blocks(result),
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
