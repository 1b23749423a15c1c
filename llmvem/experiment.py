"""The one experiment runner: fit named estimators, predict, evaluate on test, bootstrap, write the run folder once.

:func:`run_models` is what ``llmvem demo``/``run`` (:func:`llmvem.pipeline.run_experiment`), the caption-source
ablation (:func:`llmvem.ablation.run_ablation`) and the benchmarks call. It takes a dict of
:class:`ModelSpec` (an estimator of :mod:`llmvem.estimators` plus its label) and writes::

    config.yaml  versions.json  metrics.json  voxel_metrics.npz  lambda_curve.json  gallery.json  gallery/
    test_responses.npy         (n_test, n_voxels) float32, for intervals over test images (report, export)
    challenge_test_ids.json    when the dataset has challenge test images (responses withheld): their ids
    models/<name>/   (the trainer's folder, or predictions_val.npy / predictions_test.npy of models without one;
                     ridge.npz for the ridge; predictions_challenge_test.npy with challenge test images)

``metrics.json`` holds, per model, the test summary (mean/median r, accuracy, per ROI) and the **validation**
mean r (``val_mean_r``, with ``val_in_fit`` true when the model was fitted on the validation split, as the ridge
baseline is), the paired bootstrap comparisons (λ = 0 against every LLM-VEM model, ridge against all), the
model chosen on validation by the one selection rule (``selection``, with its reason, and its name in
``selected_model``; :func:`llmvem.evaluate.selection.choose_model`) and, in ``dataset``, where the noise
ceiling came from (``noise_ceiling_source``: the held-out test images' repeats when known).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from llmvem.config import RunConfig, save_config
from llmvem.data.dataset import SPLIT_NAMES, EncodingDataset
from llmvem.data.noise_ceiling import held_out_noise_ceiling
from llmvem.estimators import model_name
from llmvem.evaluate.selection import choose_model
from llmvem.inputs import PreparedInputs
from llmvem.utils import prepare_run_folder, seed_everything, versions, write_json

__all__ = ["EXPERIMENT_OUTPUTS", "ExperimentResult", "ModelSpec", "dataset_summary",
           "default_pairs", "fit_predict", "flatten_comparison", "run_models", "versions",
           "write_gallery", "write_one_model", "write_run_outputs"]

log = logging.getLogger(__name__)

#: What an experiment writes in its folder (``overwrite`` removes exactly these).
EXPERIMENT_OUTPUTS = ("config.yaml", "versions.json", "metrics.json", "voxel_metrics.npz", "lambda_curve.json",
                      "gallery.json", "gallery", "models", "report", "extra_sections", "test_responses.npy",
                      "challenge_test_ids.json")


@dataclass
class ModelSpec:
    """One model of an experiment.

    Attributes
    ----------
    estimator : RidgeEncoder, LLMVEMEncoder or any object with ``fit_inputs``/``predict_inputs``
        Cloned before fitting (``sklearn.base.clone``); one with an ``out_dir`` parameter trains into
        ``models/<name>/`` and writes its own predictions there.
    label : str
        Human-readable name (tables, report).
    kind : str
        ``"ridge"``, ``"llmvem"``, ``"caption_source"``...
    lam : float, optional
        λ of an LLM-VEM model (its point on the λ curve); None for other models.
    inputs : PreparedInputs, optional
        What this model is fitted on, when it differs from the experiment's (another caption source).
    reuses : dict of str to str, optional
        For an estimator whose ``fit_inputs`` takes ``fitted`` (:class:`~llmvem.estimators.PerVoxelChoice`):
        candidate name → name of an **earlier** model of the experiment, whose fitted estimator is passed on
        instead of training that candidate again.
    """

    estimator: Any
    label: str
    kind: str = "llmvem"
    lam: float | None = None
    inputs: PreparedInputs | None = None
    reuses: Mapping[str, str] | None = None


@dataclass
class ExperimentResult:
    """What :func:`run_models` returns: ``metrics`` (the content of ``metrics.json``), ``predictions``
    ({name: {split: array (n_images, n_voxels)}}) and the fitted ``estimators``."""

    metrics: dict[str, Any]
    predictions: dict[str, dict[str, np.ndarray]]
    estimators: dict[str, Any]


def flatten_comparison(res: dict[str, Any]) -> dict[str, Any]:
    """:func:`~llmvem.evaluate.stats.paired_bootstrap` output → the comparison record of ``metrics.json``
    (metric mean_r: diff, ci_low, ci_high, p_value, fraction_improved, a_value, b_value, [accuracy], per_roi)."""

    def record(group: dict[str, Any]) -> dict[str, Any]:
        r = group["r"]
        rec = {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"],
               "fraction_improved": group["fraction_improved"], "a_value": r["a"], "b_value": r["b"]}
        if "accuracy" in group:
            rec["accuracy"] = group["accuracy"]
        return rec

    return {"metric": "mean_r", **record(res["overall"]),
            "per_roi": {roi: record(g) for roi, g in res["per_roi"].items()}}


def default_pairs(names: Sequence[str]) -> list[tuple[str, str]]:
    """Comparisons (a, b) of an experiment: LLM-VEM λ = 0 against every other LLM-VEM model, then ridge against
    every other model (b − a is reported)."""
    base = model_name(0.0)
    pairs: list[tuple[str, str]] = []
    if base in names:
        pairs += [(base, n) for n in names if n not in (base, "ridge")]
    if "ridge" in names:
        pairs += [("ridge", n) for n in names if n != "ridge"]
    return pairs


def dataset_summary(ds: EncodingDataset) -> dict[str, Any]:
    """The ``dataset`` record of ``metrics.json``: name, split sizes, voxels, ROI sizes and where the noise ceiling
    of the evaluation came from (``noise_ceiling_source``, see :func:`~llmvem.data.noise_ceiling.held_out_noise_ceiling`)."""
    out = {"name": ds.name, **{f"n_{s}": len(ds.splits[s]) for s in SPLIT_NAMES if s in ds.splits},
           "n_voxels": ds.n_voxels, "rois": {k: int(v.sum()) for k, v in ds.roi_masks.items()},
           "noise_ceiling_source": held_out_noise_ceiling(ds)[1]}
    if ds.meta.get("roi_classes"):
        out["roi_classes"] = {str(c): list(rois) for c, rois in ds.meta["roi_classes"].items()}
    return out


def write_run_outputs(out_dir: Path, inputs: PreparedInputs) -> None:
    """The run folder's files shared by its models: ``test_responses.npy`` and ``challenge_test_ids.json``
    (each model's own outputs were written when it was fitted: :func:`write_one_model`)."""
    from llmvem.export import CHALLENGE_IDS  # the name export/report read
    from llmvem.inputs import challenge_images
    from llmvem.report.roi import TEST_RESPONSES

    ds = inputs.dataset
    if ds.test.responses is not None:
        np.save(out_dir / TEST_RESPONSES, np.asarray(ds.test.responses, dtype=np.float32))
    challenge = challenge_images(ds) if inputs.challenge_features is not None else None
    if challenge is not None:
        write_json(out_dir / CHALLENGE_IDS, [Path(str(i)).stem for i in challenge.ids])


def write_one_model(folder: Path, inputs: PreparedInputs, predictions: Mapping[str, np.ndarray],
                    est: Any) -> dict[str, np.ndarray]:
    """Write one fitted model's outputs into ``folder``: ``predictions_<split>.npy`` (unless its trainer wrote
    them), the saved model (``est.save``) and the challenge test predictions; returns the predictions read back
    memory-mapped (read-only), so the caller need not hold a voxel-sized copy of each split in memory."""
    from llmvem.export import CHALLENGE_PREDICTIONS
    from llmvem.inputs import challenge_images

    folder.mkdir(parents=True, exist_ok=True)
    files = {split: folder / f"predictions_{split}.npy" for split in predictions}
    if not files.get("test", folder / "predictions_test.npy").is_file():  # a trainer writes its own there
        for split, p in predictions.items():
            np.save(files[split], np.asarray(p, dtype=np.float32))
    challenge = challenge_images(inputs.dataset) if inputs.challenge_features is not None else None
    if challenge is not None and hasattr(est, "predict_new"):
        pred = est.predict_new(challenge, inputs.challenge_features)
        np.save(folder / CHALLENGE_PREDICTIONS, np.asarray(pred, dtype=np.float32))
        del pred
    if hasattr(est, "save"):
        est.save(folder)
        if hasattr(est, "map_coefficients"):  # a ridge reads its saved coefficients from now on
            est.map_coefficients(folder)
    mapped = {}
    for split, p in predictions.items():
        disk = np.load(files[split], mmap_mode="r") if files[split].is_file() else None
        mapped[split] = disk if disk is not None and disk.shape == np.shape(p) and disk.dtype == np.float32 else p
    held = getattr(getattr(est, "result_", None), "predictions", None)  # a trainer's result keeps its own
    if isinstance(held, dict):
        for split, arr in mapped.items():
            if held.get(split) is predictions[split]:
                held[split] = arr
    return mapped


def write_gallery(out_dir: Path, inputs: PreparedInputs, caption_columns: Mapping[str, list[list[str]]] | None = None,
                  n: int = 8) -> None:
    """Thumbnails of ``n`` test images (``gallery/``) and their captions per source (``gallery.json``).

    ``caption_columns`` maps a column label to the captions of every test image; default: the inputs' captions
    (labelled by backend and model) plus the dataset's own captions when they differ.
    """
    ds = inputs.dataset
    folder = out_dir / "gallery"
    folder.mkdir(parents=True, exist_ok=True)
    test = ds.test
    own = caption_columns is None
    if caption_columns is None:
        caption_columns = {f"{inputs.caption_info['backend']}: {inputs.caption_info['model_id']}":
                           inputs.captions["test"]}
    entries = []
    for i in np.linspace(0, len(test) - 1, min(n, len(test))).astype(int):
        img = test.images.load(int(i))
        img.thumbnail((160, 160))
        name = f"img{int(i):04d}.png"
        img.save(folder / name)
        sources = {label: caps[int(i)] for label, caps in caption_columns.items()}
        truth = ds.captions.get(test.images.ids[int(i)])
        if own and truth and inputs.caption_info["backend"] != "dataset":
            sources["dataset"] = truth
        entries.append({"image": f"gallery/{name}", "id": test.images.ids[int(i)], "captions": sources})
    write_json(out_dir / "gallery.json", entries)


def fit_predict(models: Mapping[str, ModelSpec], inputs: PreparedInputs, models_dir: Path,
                resume: bool = False, say: Callable[[str], None] | None = None,
                timing: dict[str, float] | None = None, memory: dict[str, int] | None = None
                ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Clone, fit and predict every model (``val`` and ``test``), in order.

    An estimator with an ``out_dir`` parameter trains into ``models_dir / name`` (with ``resume``: a finished
    training there is reused); one with ``spec.reuses`` gets the earlier models it names, fitted. Each model's
    outputs go to ``models_dir / name`` as soon as it is fitted (:func:`write_one_model`). Returns (predictions
    {name: {split: array (n, n_voxels)}}, read-only memory maps of those files; fitted estimators);
    ``timing[name]`` gets the seconds of each model and ``memory[name]`` its peak resident bytes; ``say`` gets a
    line when each model starts and ends (:func:`llmvem.resources.stage`).
    """
    from sklearn.base import clone

    from llmvem.resources import release_free_memory, stage

    say = say or log.info
    predictions: dict[str, dict[str, np.ndarray]] = {}
    fitted: dict[str, Any] = {}
    for name, spec in models.items():
        est = clone(spec.estimator)
        if "out_dir" in est.get_params():
            est.set_params(out_dir=models_dir / name, resume=resume)
        own = spec.inputs or inputs
        missing = [m for m in (spec.reuses or {}).values() if m not in fitted]
        if missing:
            raise ValueError(f"model {name!r} reuses {missing}, which are not fitted before it; expected "
                             f"earlier models of {list(models)}")
        with stage(f"fitting {spec.label}", name, timing=timing, memory=memory, say=say):
            if spec.reuses:
                est.fit_inputs(own, fitted={c: fitted[m] for c, m in spec.reuses.items()})
            else:
                est.fit_inputs(own)
            release_free_memory()  # the fit's scratch, before the predictions are made
            predictions[name] = est.predict_inputs(own)
            # written now, and held memory-mapped: the next model's fit does not sit on these arrays
            predictions[name] = write_one_model(models_dir / name, own, predictions[name], est)
        fitted[name] = est
    return predictions, fitted


def _evaluate(ds: EncodingDataset, models: Mapping[str, ModelSpec], predictions: dict[str, dict[str, np.ndarray]],
              fitted: Mapping[str, Any], pairs: Sequence[tuple[str, str]], n_boot: int, seed: int,
              noise_ceiling: np.ndarray | None) -> tuple[dict[str, Any], dict[str, np.ndarray], list[dict[str, Any]]]:
    from llmvem.evaluate.metrics import evaluate_predictions, pearson_r
    from llmvem.evaluate.stats import paired_bootstrap
    from llmvem.resources import release_mapped_pages  # the run folder's predictions, once read

    y = ds.test.responses
    records: dict[str, Any] = {}
    voxel: dict[str, np.ndarray] = {}
    for name, preds in predictions.items():
        ev = evaluate_predictions(y, preds["test"], noise_ceiling, ds.roi_masks, ds.hemisphere)
        spec = models[name]
        val = None
        if "val" in preds and ds.val is not None and ds.val.responses is not None:
            val = float(np.nanmean(pearson_r(ds.val.responses, preds["val"])))
        records[name] = {"label": spec.label, "kind": spec.kind, "lambda": spec.lam, **ev["summary"],
                         "val_mean_r": val, "val_in_fit": "val" in getattr(fitted[name], "fit_splits_", ())}
        if getattr(fitted[name], "align_stream_", None) is not None:  # captioned images without brain data
            records[name]["align_stream"] = fitted[name].align_stream_
        if getattr(fitted[name], "choice_summary_", None) is not None:  # a per-voxel choice among candidates
            records[name]["per_voxel_choice"] = fitted[name].choice_summary_
        if getattr(fitted[name], "details_", None) is not None:  # a layer choice, blend weights, ensemble seeds
            records[name]["details"] = fitted[name].details_
        if getattr(fitted[name], "band_summary_", None) is not None:  # a banded ridge's band weights
            records[name]["bands"] = fitted[name].band_summary_
        release_mapped_pages(*preds.values())
        voxel[f"r__{name}"] = ev["r"]
        if ev["accuracy"] is not None:
            voxel[f"accuracy__{name}"] = ev["accuracy"]
    comparisons = []
    for a, b in pairs if n_boot > 0 else ():
        res = paired_bootstrap(y, predictions[a]["test"], predictions[b]["test"], n_boot=n_boot, seed=seed,
                               noise_ceiling=noise_ceiling, roi_masks=ds.roi_masks)
        release_mapped_pages(predictions[a]["test"], predictions[b]["test"])
        comparisons.append({"a": a, "b": b, **flatten_comparison(res)})
    return records, voxel, comparisons


def run_models(config: RunConfig, inputs: PreparedInputs | Callable[[], PreparedInputs], models: Mapping[str, ModelSpec], out_dir: str | Path, *,
               resume: bool = False, overwrite: bool = False, outputs: Sequence[str] = EXPERIMENT_OUTPUTS,
               pairs: Sequence[tuple[str, str]] | None = None, caption_info: Any = None,
               caption_columns: Mapping[str, list[list[str]]] | Callable[[], Mapping] | None = None,
               extra_stages: Sequence[tuple[str, str, Callable[[PreparedInputs], None]]] = (),
               say: Callable[[str], None] | None = None, timing: dict[str, float] | None = None,
               started: float | None = None) -> ExperimentResult:
    """Fit every model, evaluate on the test split, bootstrap, and write the run folder (once).

    Parameters
    ----------
    config : RunConfig
        Saved as ``config.yaml``; ``seed`` and ``evaluate.bootstrap`` are used.
    inputs : PreparedInputs or callable returning one
        A callable is called after the run folder is accepted (so a refused folder fails before any work);
        its ``timing`` is recorded.
    models : dict of name to ModelSpec
        In table order; names become ``models/<name>/``.
    out_dir : path
        Refused if it is used, unless ``resume`` (finished trainings are reused) or ``overwrite`` (removes only
        ``outputs``).
    pairs : sequence of (a, b), optional
        Bootstrap comparisons; default :func:`default_pairs`.
    caption_info : optional
        The ``captions`` record of ``metrics.json`` (default ``inputs.caption_info``); a callable is called
        after the inputs are prepared.
    caption_columns : dict or callable returning one, optional
        Gallery caption columns (see :func:`write_gallery`).
    extra_stages : sequence of (timing key, message, callable(inputs))
        Run (and timed) after the models are written and before ``metrics.json`` (e.g. text-to-brain sections).
    timing : dict, optional
        Seconds of earlier stages (input preparation), recorded in ``metrics.json``.
    started : float, optional
        ``time.perf_counter()`` at the start of the whole run (default: now).

    Returns
    -------
    ExperimentResult
    """
    t0 = started if started is not None else time.perf_counter()
    out_dir = Path(out_dir)
    prepare_run_folder(out_dir, resume, overwrite, outputs=outputs)
    say = say or log.info
    seed_everything(config.seed)
    save_config(config, out_dir / "config.yaml")
    write_json(out_dir / "versions.json", versions(config.seed))
    if callable(inputs):
        inputs = inputs()
    from llmvem.resources import peak_rss
    from llmvem.resources import stage as timed_stage

    timing = {**inputs.timing, **(timing or {})}
    memory = dict(inputs.memory)
    ds = inputs.dataset

    predictions, fitted = fit_predict(models, inputs, out_dir / "models", resume, say, timing, memory)

    with timed_stage("evaluating on the test split", "evaluate", timing=timing, memory=memory, say=say):
        pairs = default_pairs(list(models)) if pairs is None else pairs
        noise_ceiling = held_out_noise_ceiling(ds)[0]
        records, voxel, comparisons = _evaluate(ds, models, predictions, fitted, pairs, config.evaluate.bootstrap,
                                                config.seed, noise_ceiling)
    partition = None
    if config.evaluate.variance_partition:  # image vs caption-embedding bands: unique and shared R² on test
        from llmvem.evaluate.partition import VariancePartition

        with timed_stage("variance partitioning (image features, caption embeddings)", "variance_partition",
                         timing=timing, memory=memory, say=say):
            partition = VariancePartition.from_config(config).fit_inputs(inputs).summary(inputs)
            voxel.update({f"partition__{k}": v for k, v in partition.pop("voxels").items()})
    optional = {"noise_ceiling": noise_ceiling, "hemisphere": ds.hemisphere, "fsaverage_index": ds.fsaverage_index}
    with timed_stage("writing metrics and predictions", "write_outputs", timing=timing, memory=memory, say=say):
        np.savez_compressed(out_dir / "voxel_metrics.npz", **voxel,
                            **{k: v for k, v in optional.items() if v is not None},
                            **{f"roi__{k}": v for k, v in ds.roi_masks.items()})
        write_run_outputs(out_dir, inputs)
    curve = [{"lambda": spec.lam, "model": n, "mean_r": records[n]["mean_r"],
              "per_roi": {roi: v["mean_r"] for roi, v in records[n]["per_roi"].items()}}
             for n, spec in models.items() if spec.lam is not None]
    write_json(out_dir / "lambda_curve.json", sorted(curve, key=lambda c: c["lambda"]))
    write_gallery(out_dir, inputs, caption_columns() if callable(caption_columns) else caption_columns)
    for key, message, stage in extra_stages:
        with timed_stage(message, key, timing=timing, memory=memory, say=say):
            stage(inputs)
    selection = choose_model(records)
    metrics = {
        "dataset": dataset_summary(ds),
        "models": records,
        "selected_model": selection.model,
        "comparisons": comparisons,
        "selection": selection.to_record(),
        "captions": inputs.caption_info if caption_info is None else
        caption_info() if callable(caption_info) else caption_info,
        "timing": {"total_s": time.perf_counter() - t0, "stages": timing,
                   "peak_rss_bytes": memory, "process_peak_rss_bytes": peak_rss()},
    }
    if partition is not None:
        metrics["variance_partition"] = partition
    write_json(out_dir / "metrics.json", metrics)
    return ExperimentResult(metrics, predictions, fitted)
