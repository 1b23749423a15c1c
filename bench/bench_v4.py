"""V4 encoding benchmark: ridge on frozen features vs LLM-VEM (λ = 0 and λ > 0, frozen and fine-tuned backbone).

Data: macaque V4 spike counts to natural images (Cowley, Stan, Pillow & Smith 2023, cowleygroup/V4_compact_models),
``../shared/data/v4_cowley2023`` relative to the repository (``--data`` to point elsewhere; any session in the same
layout is picked up by :func:`llmvem.data.v4.list_v4_sessions`). Each session records its own neurons, so each is
its own encoding problem.

For every session, on the fixed split of :func:`llmvem.data.v4.load_v4` (every 6th image is a test image; 10% of
the others, seeded, are the validation split), the script fits on the same images:

* **ridge** — :class:`llmvem.estimators.RidgeEncoder` (the one feature standardiser, voxelwise RidgeCV) on frozen
  EfficientNet-Lite0 features; the layer set is chosen among ``RIDGE_LAYER_SETS`` by the mean validation r of a
  ridge fitted on the training split only, then refitted on train + val (the pipeline's baseline convention);
* **ridge_grid** — the same ridge on grid-pooled block features (``block8@grid4`` ..., :mod:`llmvem.embed.spatial`,
  flattened), the layer set chosen among ``RIDGE_GRID_LAYER_SETS`` on validation the same way: the baseline
  with space (issue 15), reported beside the pooled one;
* **LLM-VEM λ = 0** and **LLM-VEM λ > 0** (:class:`llmvem.estimators.LLMVEMEncoder`), each with the backbone frozen
  (stage 1 only: heads on cached features) and fine-tuned (stage 1, then stage 2 on images). Captions come from
  the offline ImageNet-label captioner (``captions.backend = "labels"``; weak, see
  :mod:`llmvem.captions.labels`), embedded with the bundled MiniLM;
* **LLM-VEM with a spatial readout** (``lambda0_spatial_*``, ``lambda_spatial_*``): the same networks plus a
  factorized readout (``model.spatial_readout``, residual mode: PCA voxel mapping on the pooled layers + per
  neuron a spatial mask × channel weights) on the maps ``--spatial-layers`` (default ``SPATIAL_LAYERS``), trained
  in stage 1 on the cached maps and, fine-tuned, end to end in stage 2. Seconds of stage 1 and stage 2 of every
  LLM-VEM model are recorded per session (``stage_seconds``) so their costs compare within one run;
* **spatial_blend** (derived, nothing trained): w · λ = 0 spatial fine-tuned + (1 − w) · ridge_grid, w chosen on
  the validation split (:func:`blend`; the grid ridge's validation predictions from its train-only fit);
* opt-in (``--models …``): ``lambda0_spatial_finetuned_seed1`` (the same model trained with ``seed + 1``),
  ``spatial_2seeds`` (the two seeds' predictions averaged) and ``spatial_2seeds_blend`` (that average blended with
  the grid ridge like ``spatial_blend``).

Reported per session: mean and median test r across neurons (and, for sessions with raw repeats such as 210325,
the noise-normalised accuracy); paired bootstraps over test images (λ > 0 vs λ = 0, and each LLM-VEM vs ridge);
pooled over sessions: Wilcoxon signed-rank and sign tests of the per-session differences, and a bootstrap of the
mean difference over all neurons (test images resampled within each session).

Usage::

    python bench/bench_v4.py                           # all sessions (~20-45 min on 2 shared cores)
    python bench/bench_v4.py --sessions 210325 --quick # one session, short training
    python bench/bench_v4.py --set train.stage2.epochs=3 --set model.readout_l2=1  # tuning (read the val columns)

Writes ``bench/results/v4.json`` (``--out``) and prints the table. Exits 0 with a message when the data folder is
absent.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
DEFAULT_OUT = ROOT / "bench" / "results" / "v4.json"

#: Layers whose frozen features are extracted (and cached) once per session.
CANDIDATE_LAYERS = ["block2", "block5", "block8", "block10", "block12", "block14", "block15", "pooled"]
#: Layer sets the ridge baseline chooses from on the validation split.
RIDGE_LAYER_SETS: tuple[tuple[str, ...], ...] = (
    ("block5",), ("block8",), ("block10",), ("block12",), ("block15",), ("pooled",),
    ("block5", "block10", "pooled"), ("block8", "block10", "block12"), ("block8", "block12", "pooled"),
)
QUICK_RIDGE_LAYER_SETS: tuple[tuple[str, ...], ...] = (("block10",), ("block8", "block12", "pooled"))
#: Grid-pooled layer sets of ``ridge_grid`` (at 112 px block8/10 maps are 7×7, block12 4×4). From the measured
#: session-210322 run (BENCHMARKS.md, "Spatial features"): block8@grid4 + block12@grid4 best on validation (0.446),
#: the 2×2 pair next (0.437); block10 alone and block12 alone on a 4×4 grid are the single-block candidates.
RIDGE_GRID_LAYER_SETS: tuple[tuple[str, ...], ...] = (
    ("block8@grid4", "block12@grid4"), ("block8@grid2", "block12@grid2"), ("block10@grid4",), ("block12@grid4",),
)
QUICK_RIDGE_GRID_LAYER_SETS: tuple[tuple[str, ...], ...] = (("block10@grid4",), ("block8@grid2", "block12@grid2"))
#: Maps of the spatial readout: at 112 px block5 and block8 are 7×7 maps (@grid7 = the full map; 80 and 112
#: channels); a factorized mask learns each neuron's receptive field, so it gets the full resolution rather than the
#: ridge's 4×4 average. Chosen on the VALIDATION split of 210322 / 210224 / 190927 with the frozen spatial model
#: (stage 1, spatial_l1 3e-4): block8 alone 0.465 / 0.532 / 0.654; block10 0.452 / 0.521 / 0.644; block8 + block10
#: 0.468 / 0.540 / 0.658; **block5 + block8 0.477 / 0.574 / 0.676**; block4 + block5 + block8 0.478 / 0.576 / 0.675.
SPATIAL_LAYERS: tuple[str, ...] = ("block5@grid7", "block8@grid7")
#: Stage-1 early-stopping patience of the factorized spatial models (the pooled ones keep BENCH_OVERRIDES' 10). The
#: ridge start of the readout (``model.spatial_init=ridge``) puts it near its fit, so it needs fewer epochs. Chosen on
#: the VALIDATION split of the 9 sessions (frozen model, block5 + block8 maps), mean of session mean r: random start,
#: patience 10 (before) 0.6513; ridge start, patience 5: 0.6559 (stage-1 loop 2.21× the pooled model's, median);
#: **patience 3: 0.6544 (1.92×)**. Rule: the shortest patience tried whose validation r is not below the random start's.
SPATIAL_STAGE1_PATIENCE = 3

#: The benchmark's LLM-VEM settings, on top of the shipped ``demo`` config. Tuned on the VALIDATION split of
#: sessions 190925 and 210322 (the tuning table is in BENCHMARKS.md). The readout layers are the ridge
#: baseline's validation choice per session (``--llmvem-layers ridge``); ``backbone.layers`` is the fallback.
BENCH_OVERRIDES = [
    "captions.backend=labels",
    "text.encoder=minilm",
    "backbone.name=efficientnet_lite0",
    "backbone.image_size=112",  # V4 stimuli are 112 px: native size; forward ~10x faster than 224, as accurate on val
    "backbone.layers=[block5, block10, pooled]",
    "model.readout_l2=0.1",
    "model.feature_dropout=0.1",
    "train.stage1.epochs=60",
    "train.stage1.lr=0.001",
    "train.stage1.early_stopping_patience=10",
    "train.stage2.epochs=5",
    "train.stage2.lr=0.0003",
    "train.stage2.backbone_lr=0.0003",
    "train.stage2.unfreeze_last_n=5",  # stages of blocks 5-7, 8-10, 11-14, 15 and the conv head
    "train.stage2.warmup_steps=0",
    "train.stage2.early_stopping_patience=2",
    "evaluate.ridge_folds=5",
    # spatial readouts only (the *_spatial_* models): sparsity of mask × channel weights, tuned on the validation
    # split of session 210322, stage 1 (λ0 spatial frozen val r: 0 → 0.437, 3e-5 → 0.444, 1e-4 → 0.456,
    # 3e-4 → 0.465, 1e-3 → 0.454; 1e-4 with smoothness 1e-3 → 0.438; block8@grid7 + block12@grid4 → 0.420)
    "model.spatial_l1=0.0003",
]
QUICK_OVERRIDES = ["train.stage1.epochs=15", "train.stage2.epochs=1", "train.stage2.unfreeze_last_n=1"]

SPATIAL_MODELS = ("lambda0_spatial_frozen", "lambda_spatial_frozen", "lambda0_spatial_finetuned",
                  "lambda_spatial_finetuned")
#: Derived, not trained: ``BLEND[0]`` and ``BLEND[1]``'s predictions averaged with the weight of ``BLEND[0]`` chosen
#: on the validation split (``BLEND_WEIGHTS``), the grid ridge's validation predictions taken from its train-only
#: fit (the one its layer choice scores), so the weight is chosen on data neither model was fitted on.
BLEND = ("lambda0_spatial_finetuned", "ridge_grid")
BLEND_WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 11), 2))
#: Opt-in: the λ = 0 spatial fine-tuned model trained again with ``seed + 1`` (``SEED_TWIN``); ``spatial_2seeds``
#: averages the two (nothing chosen), ``spatial_2seeds_blend`` blends that average with the grid ridge as above.
SEED_TWIN = "lambda0_spatial_finetuned_seed1"
DERIVED = ("spatial_blend", "spatial_2seeds", "spatial_2seeds_blend")
MODELS = ("ridge", "ridge_grid", "lambda0_frozen", "lambda_frozen", "lambda0_finetuned", "lambda_finetuned",
          *SPATIAL_MODELS, SEED_TWIN, *DERIVED)
#: Fitted without ``--models``: all but ``OPT_IN_MODELS`` — the λ > 0 spatial twins, which cost as much as the λ = 0
#: ones (on V4 the label captions' alignment changes the pooled models by < 0.005 r; see BENCHMARKS.md), and the
#: seed twin with the models derived from it (a second stage-2 run per session).
OPT_IN_MODELS = ("lambda_spatial_frozen", "lambda_spatial_finetuned", SEED_TWIN, "spatial_2seeds",
                 "spatial_2seeds_blend")
DEFAULT_MODELS = tuple(m for m in MODELS if m not in OPT_IN_MODELS)
#: (reference a, challenger b) pairs compared per session and pooled.
COMPARISONS = (
    ("lambda0_frozen", "lambda_frozen"),
    ("lambda0_finetuned", "lambda_finetuned"),
    ("ridge", "lambda0_finetuned"),
    ("ridge", "lambda_finetuned"),
    ("ridge", "lambda_frozen"),
    ("ridge", "ridge_grid"),
    ("lambda0_frozen", "lambda0_spatial_frozen"),
    ("lambda0_finetuned", "lambda0_spatial_finetuned"),
    ("ridge", "lambda0_spatial_finetuned"),
    ("ridge_grid", "lambda0_spatial_finetuned"),
    ("lambda0_spatial_finetuned", "lambda_spatial_finetuned"),
    ("lambda0_spatial_finetuned", "spatial_blend"),
    ("ridge_grid", "spatial_blend"),
    ("lambda0_finetuned", "spatial_blend"),
    ("lambda0_spatial_finetuned", "spatial_2seeds"),
    ("ridge_grid", "spatial_2seeds_blend"),
    ("spatial_blend", "spatial_2seeds_blend"),
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help="session ids (default: every session found)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.1, help="λ of the aligned model (default 0.1)")
    ap.add_argument("--stage2-epochs", type=int, default=None, help="fine-tuning epochs (default: the bench setting)")
    ap.add_argument("--quick", action="store_true",
                    help="short training, 2 ridge layer sets, 200 bootstrap resamples (code-path check)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="keep only the first N images of each session (split proportions kept; for tests)")
    ap.add_argument("--models", nargs="+", choices=MODELS, default=list(DEFAULT_MODELS),
                    help="models to fit (default: all but the λ > 0 spatial twins; fewer for tuning runs)")
    ap.add_argument("--spatial-layers", nargs="+", default=list(SPATIAL_LAYERS),
                    help="maps read by the spatial models' readout (default: %(default)s)")
    ap.add_argument("--spatial-readout", choices=("factorized", "gaussian"), default="factorized",
                    help="spatial readout of the *_spatial_* models (default: %(default)s)")
    ap.add_argument("--llmvem-layers", choices=("ridge", "config"), default="ridge",
                    help="LLM-VEM readout layers: the ridge baseline's validation choice (default) or "
                         "backbone.layers of the config")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override KEY=VALUE (repeatable), applied last")
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 1000, --quick 200)")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="keep the trained models here (default: a temporary folder, deleted)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------ setup
def bench_overrides(args: argparse.Namespace) -> list[str]:
    """The config overrides of this run, in application order (after the shipped ``demo`` config)."""
    out = list(BENCH_OVERRIDES)
    if args.quick:
        out += QUICK_OVERRIDES
    if args.stage2_epochs is not None:
        out.append(f"train.stage2.epochs={args.stage2_epochs}")
    out += [f"cache_dir={args.cache_dir}", f"model.lambda_align={args.lam}"]
    return out + list(args.overrides)


def session_config(args: argparse.Namespace, session: str):
    """The RunConfig of one session: ``demo`` + bench overrides + ``data.spec = v4:ROOT:SESSION``."""
    from llmvem.config import apply_overrides, load_config

    return apply_overrides(load_config("demo"), [*bench_overrides(args), f"data.spec=v4:{args.data}:{session}"])


def truncate_dataset(ds, max_images: int):
    """The first images of each split, ``max_images`` in total (split proportions kept); the noise ceiling is
    recomputed on the kept test images."""
    from llmvem.data.noise_ceiling import split_half_noise_ceiling

    total = sum(len(s) for s in ds.splits.values())
    if max_images >= total:
        return ds
    splits = {}
    for name, split in ds.splits.items():
        k = max(4, int(round(max_images * len(split) / total)))
        splits[name] = split.subset(np.arange(min(k, len(split))))
    nc = ds.noise_ceiling
    if splits["test"].repeats is not None:
        nc = split_half_noise_ceiling(splits["test"].repeats, seed=ds.meta.get("seed", 0))
    return replace(ds, splits=splits, noise_ceiling=nc)


def _mean_r(y: np.ndarray, pred: np.ndarray) -> float:
    from llmvem.evaluate.metrics import pearson_r

    return float(np.nanmean(pearson_r(y, pred)))


# ------------------------------------------------------------------------------------------------ models
def select_ridge_layers(config, inputs, layer_sets
                        ) -> tuple[tuple[str, ...], dict[str, float], np.ndarray]:
    """Layer set with the best mean validation r of a ridge fitted on the training split only.

    Returns
    -------
    best : tuple of str
    val_r : dict of "a+b" to mean validation r
    val_pred : array of shape (n_val, n_neurons)
        Validation predictions of the train-only ridge on ``best``.
    """
    from llmvem.estimators import RidgeEncoder

    ds = inputs.dataset
    scores: dict[str, float] = {}
    val_preds: dict[str, np.ndarray] = {}
    for layers in layer_sets:  # standardised exactly as the final fit (llmvem.model.features.FeatureStandardizer)
        key = "+".join(layers)
        ridge = RidgeEncoder.from_config(config, layers).fit(inputs.features["train"], ds.train.responses)
        val_preds[key] = ridge.predict(inputs.features["val"])
        scores[key] = _mean_r(ds.val.responses, val_preds[key])
    best = max(layer_sets, key=lambda ls: scores["+".join(ls)])
    return tuple(best), scores, val_preds["+".join(best)]


def blend(preds: dict[str, dict[str, np.ndarray]], y_val: np.ndarray, ridge_val: np.ndarray, first: str = BLEND[0]
          ) -> tuple[dict[str, np.ndarray], float, dict[str, float]]:
    """``spatial_blend``: w · ``first`` + (1 − w) · ``BLEND[1]``, w in ``BLEND_WEIGHTS`` chosen on validation
    mean r, with ``ridge_val`` (the train-only ridge) standing in for ``BLEND[1]``'s validation predictions.

    Returns
    -------
    predictions : dict of split to array
        ``"val"`` is the blend with ``ridge_val`` (its score chose w, so it is in-sample for w).
    weight : float
    val_r : dict of str(w) to validation mean r
    """
    a, b = preds[first], preds[BLEND[1]]
    val_r = {str(w): _mean_r(y_val, w * a["val"] + (1 - w) * ridge_val) for w in BLEND_WEIGHTS}
    w = float(max(BLEND_WEIGHTS, key=lambda v: val_r[str(v)]))
    return {"val": w * a["val"] + (1 - w) * ridge_val, "test": w * a["test"] + (1 - w) * b["test"]}, w, val_r


def fit_models(config, inputs, lam: float, work: Path, layer_sets, show_progress: bool,
               models: tuple[str, ...] | list[str] = DEFAULT_MODELS, llmvem_layers: str = "ridge",
               grid_layer_sets=RIDGE_GRID_LAYER_SETS, spatial_layers: tuple[str, ...] | list[str] = SPATIAL_LAYERS,
               spatial_readout: str = "factorized"
               ) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Ridge (pooled and grid) and the LLM-VEM variants of one session (those in ``models``); predictions per
    model and split, plus details (ridge layer choices and validation scores, training summaries, seconds).

    ``llmvem_layers = "ridge"`` gives the LLM-VEM readout the layer set the pooled ridge baseline chose on
    validation (the alignment head always reads ``pooled``); ``"config"`` keeps ``config.backbone.layers``. The
    ``*_spatial_*`` models add a ``spatial_readout`` (residual mode) on the maps ``spatial_layers``.
    ``info["stage_seconds"][name]`` holds the train-loop seconds of stage 1 and stage 2 of each LLM-VEM model.
    """
    from llmvem.config import apply_overrides
    from llmvem.experiment import fit_predict
    from llmvem.pipeline import llmvem_spec, ridge_spec

    info: dict[str, Any] = {"seconds": {}}
    specs = {}
    if "ridge" in models or llmvem_layers == "ridge":
        t = time.perf_counter()
        best, val_scores, _ = select_ridge_layers(config, inputs, layer_sets)
        info["ridge_layers"] = list(best)
        info["ridge_val_r_by_layers"] = val_scores
        info["seconds"]["ridge_layer_choice"] = time.perf_counter() - t
        if "ridge" in models:
            specs["ridge"] = ridge_spec(config, best)
    if "ridge_grid" in models:
        t = time.perf_counter()
        best, val_scores, grid_val = select_ridge_layers(config, inputs, grid_layer_sets)
        info["ridge_grid_layers"] = list(best)
        info["ridge_grid_val_r_by_layers"] = val_scores
        info["seconds"]["ridge_grid_layer_choice"] = time.perf_counter() - t
        specs["ridge_grid"] = ridge_spec(config, best)
    layers = info["ridge_layers"] if llmvem_layers == "ridge" else list(config.backbone.layers)
    info["llmvem_layers"] = layers
    if any(m in SPATIAL_MODELS for m in models):
        info["spatial_layers"] = list(spatial_layers)
        info["spatial_readout"] = spatial_readout
    epochs2 = config.train.stage2.epochs
    for kind, stage2 in (("frozen", 0), ("finetuned", epochs2)):
        if kind == "finetuned" and stage2 == 0:
            continue
        for spatial in ("", "spatial_"):
            cfg = config.model_copy(deep=True)
            cfg.train.stage2.epochs = stage2
            cfg.backbone.layers = layers
            if spatial:  # validated like a user's override (spatial_readout needs spatial_layers)
                cfg = apply_overrides(cfg, [f"backbone.spatial_layers=[{', '.join(spatial_layers)}]",
                                            f"model.spatial_readout={spatial_readout}", "model.spatial_mode=residual"]
                                      + ([f"train.stage1.early_stopping_patience={SPATIAL_STAGE1_PATIENCE}"]
                                         if spatial_readout == "factorized" else []))
            for name, lam_m in ((f"lambda0_{spatial}{kind}", 0.0), (f"lambda_{spatial}{kind}", lam)):
                if name in models:
                    specs[name] = llmvem_spec(cfg, lam_m, name, show_progress)
            if spatial and kind == "finetuned" and SEED_TWIN in models:
                twin = cfg.model_copy(deep=True)
                twin.seed = cfg.seed + 1
                specs[SEED_TWIN] = llmvem_spec(twin, 0.0, SEED_TWIN, show_progress)
    preds, _ = fit_predict(specs, inputs, work, timing=info["seconds"])
    if "spatial_blend" in models and all(m in preds for m in BLEND):
        preds["spatial_blend"], info["spatial_blend_weight"], info["spatial_blend_val_r_by_weight"] = blend(
            preds, inputs.dataset.val.responses, grid_val)
    if {"spatial_2seeds", "spatial_2seeds_blend"} & set(models) and all(m in preds for m in (BLEND[0], SEED_TWIN)):
        preds["spatial_2seeds"] = {s: 0.5 * (preds[BLEND[0]][s] + preds[SEED_TWIN][s]) for s in ("val", "test")}
        if "spatial_2seeds_blend" in models and BLEND[1] in preds:
            (preds["spatial_2seeds_blend"], info["spatial_2seeds_blend_weight"],
             info["spatial_2seeds_blend_val_r_by_weight"]) = blend(preds, inputs.dataset.val.responses, grid_val,
                                                                  first="spatial_2seeds")
    for name in specs:
        if name.startswith("ridge") or name in DERIVED:
            continue
        training = json.loads((work / name / "training.json").read_text(encoding="utf-8"))
        info.setdefault("training", {})[name] = {
            k: v for k, v in training["metrics"].items() if k.endswith(("best_epoch", "best_val_mean_r"))}
        info.setdefault("stage_seconds", {})[name] = {
            st: float(training["stages"][st]["train_seconds"]) for st in ("stage1", "stage2")
            if st in training.get("stages", {})}
    return preds, info


# -------------------------------------------------------------------------------------------- statistics
def _compact(cmp: dict[str, Any]) -> dict[str, Any]:
    r = cmp["r"]
    out = {"diff": r["diff"], "ci_low": r["ci_low"], "ci_high": r["ci_high"], "p_value": r["p_value"],
           "fraction_improved": cmp["fraction_improved"]}
    if "accuracy" in cmp:
        out["accuracy_diff"] = cmp["accuracy"]["diff"]
    return out


def bootstrap_p(observed: float, diffs: np.ndarray) -> float:
    """Two-sided bootstrap p-value (the convention of :func:`llmvem.evaluate.stats.paired_bootstrap`)."""
    if observed == 0:
        k = diffs.size
    else:
        k = int(np.sum(diffs <= 0)) if observed > 0 else int(np.sum(diffs >= 0))
    return float(min(1.0, 2.0 * (k + 1) / (diffs.size + 1)))


def pooled_bootstrap(per_session: list[tuple[np.ndarray, np.ndarray, np.ndarray]], n_boot: int, seed: int
                     ) -> dict[str, float]:
    """Bootstrap of the mean over all neurons of all sessions of ``r_b - r_a``.

    Parameters
    ----------
    per_session : list of (y, pred_a, pred_b), each array of shape (n_test_images_s, n_neurons_s)
        One entry per session (different images and neurons).
    n_boot : int
    seed : int
        Each resample draws the test images of every session independently, with replacement.

    Returns
    -------
    dict
        ``diff`` (observed, over all neurons), ``ci_low``, ``ci_high`` (2.5 and 97.5 percentiles), ``p_value``,
        ``n_neurons`` and ``fraction_improved`` (neurons with r_b > r_a).
    """
    from llmvem.evaluate.metrics import pearson_r

    rng = np.random.default_rng(seed)
    obs = np.concatenate([pearson_r(y, b) - pearson_r(y, a) for y, a, b in per_session])
    n_total = obs.size
    boots = np.zeros(n_boot)
    for i in range(n_boot):
        total = 0.0
        for y, a, b in per_session:
            idx = rng.integers(0, y.shape[0], y.shape[0])
            d = pearson_r(y[idx], b[idx]) - pearson_r(y[idx], a[idx])
            total += float(np.nansum(d))  # a neuron constant within a resample counts as no difference
        boots[i] = total / n_total
    diff = float(np.nanmean(obs))
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"diff": diff, "ci_low": float(lo), "ci_high": float(hi), "p_value": bootstrap_p(diff, boots),
            "n_neurons": int(n_total), "fraction_improved": float(np.mean(obs > 0))}


def session_tests(diffs: list[float]) -> dict[str, Any]:
    """Wilcoxon signed-rank and sign tests (two-sided) of per-session differences."""
    from scipy import stats

    d = np.asarray(diffs, dtype=np.float64)
    n_pos, n_neg = int(np.sum(d > 0)), int(np.sum(d < 0))
    out: dict[str, Any] = {"n_sessions": int(d.size), "n_improved": n_pos, "n_worse": n_neg,
                           "mean_diff": float(d.mean()) if d.size else None}
    out["sign_test_p"] = float(stats.binomtest(n_pos, n_pos + n_neg, 0.5).pvalue) if n_pos + n_neg else None
    out["wilcoxon_p"] = float(stats.wilcoxon(d).pvalue) if d.size >= 2 and np.any(d != 0) else None
    return out


# -------------------------------------------------------------------------------------------- one session
def extraction_layers(models, grid_layer_sets, spatial_layers) -> list[str]:
    """Layer specs extracted (and cached) once per session: the pooled candidates, plus the grid sets of
    ``ridge_grid`` and the maps of the spatial models when those are fitted."""
    out = list(CANDIDATE_LAYERS)
    if "ridge_grid" in models:
        out += [spec for ls in grid_layer_sets for spec in ls]
    if any(m in SPATIAL_MODELS for m in models):
        out += list(spatial_layers)
    return list(dict.fromkeys(out))


def run_session(args: argparse.Namespace, session: str, work_root: Path, n_boot: int) -> tuple[dict, dict]:
    """Everything for one session: (JSON-ready record, test predictions and responses for pooling)."""
    from llmvem.evaluate.metrics import evaluate_predictions
    from llmvem.evaluate.stats import paired_bootstrap
    from llmvem.inputs import load_config_dataset, prepare_inputs

    t0 = time.perf_counter()
    config = session_config(args, session)
    ds = load_config_dataset(config)
    if args.max_images:
        ds = truncate_dataset(ds, args.max_images)
    layer_sets = QUICK_RIDGE_LAYER_SETS if args.quick else RIDGE_LAYER_SETS
    grid_sets = QUICK_RIDGE_GRID_LAYER_SETS if args.quick else RIDGE_GRID_LAYER_SETS
    prep_cfg = config.model_copy(deep=True)
    prep_cfg.backbone.layers = extraction_layers(args.models, grid_sets, args.spatial_layers)
    inputs = prepare_inputs(prep_cfg, show_progress=args.progress, dataset=ds)
    preds, info = fit_models(config, inputs, args.lam, work_root / session, layer_sets, args.progress, args.models,
                             args.llmvem_layers, grid_sets, args.spatial_layers, args.spatial_readout)

    y_test, y_val = ds.test.responses, ds.val.responses
    models: dict[str, Any] = {}
    for name, p in preds.items():
        ev = evaluate_predictions(y_test, p["test"], ds.noise_ceiling)
        s = ev["summary"]
        # ridge is refitted on train + val: its validation score is the one of the layer choice (train only)
        val_r = info[f"{name}_val_r_by_layers"]["+".join(info[f"{name}_layers"])] if name.startswith("ridge") \
            else _mean_r(y_val, p["val"])
        models[name] = {"mean_r": s["mean_r"], "median_r": s["median_r"], "val_mean_r": val_r,
                        "r": [round(float(v), 4) for v in ev["r"]]}
        if ds.noise_ceiling is not None:
            models[name]["mean_accuracy"] = s["mean_accuracy"]
            models[name]["median_accuracy"] = s["median_accuracy"]
    comparisons = {}
    for a, b in COMPARISONS:
        if a in preds and b in preds:
            res = paired_bootstrap(y_test, preds[a]["test"], preds[b]["test"], n_boot=n_boot, seed=0,
                                   noise_ceiling=ds.noise_ceiling)
            comparisons[f"{b}_vs_{a}"] = _compact(res["overall"])
    record = {
        "n_neurons": ds.n_voxels, "n_train": len(ds.train), "n_val": len(ds.val), "n_test": len(ds.test),
        "noise_ceiling_mean": None if ds.noise_ceiling is None else float(np.mean(ds.noise_ceiling)),
        "captions_example": inputs.captions["test"][0][0] if inputs.captions["test"] else None,
        "models": models, "comparisons": comparisons, **info,
        "seconds_inputs": inputs.timing, "seconds_total": time.perf_counter() - t0,
    }
    pooled_inputs = {"y": y_test, **{name: p["test"] for name, p in preds.items()}}
    return record, pooled_inputs


# ------------------------------------------------------------------------------------------------ output
def format_table(results: dict[str, Any]) -> str:
    """The printed table: one row per session, mean / median test r per model, then the pooled tests."""
    names = [m for m in MODELS if any(m in s["models"] for s in results["sessions"].values())]
    lam = results["settings"]["lambda"]
    label = {"ridge": "ridge", "ridge_grid": "ridge grid", "lambda0_frozen": "λ0 frz", "lambda_frozen": f"λ{lam:g} frz",
             "lambda0_finetuned": "λ0 ft", "lambda_finetuned": f"λ{lam:g} ft", "lambda0_spatial_frozen": "λ0 sp frz",
             "lambda_spatial_frozen": f"λ{lam:g} sp frz", "lambda0_spatial_finetuned": "λ0 sp ft",
             "lambda_spatial_finetuned": f"λ{lam:g} sp ft", "spatial_blend": "λ0 sp ft+grid",
             SEED_TWIN: "λ0 sp ft seed+1", "spatial_2seeds": "λ0 sp ft 2 seeds", "spatial_2seeds_blend": "2 seeds+grid"}
    head = ["session", "neurons", "ridge layers"] + [label[m] for m in names] + ["best"]
    rows = [head]
    for sid, s in results["sessions"].items():
        cells = [sid, str(s["n_neurons"]), "+".join(s.get("ridge_layers", ["-"]))]
        for m in names:
            if m not in s["models"]:
                cells.append("-")
                continue
            mm = s["models"][m]
            cells.append(f"{mm['mean_r']:.3f}/{mm['median_r']:.3f}")
        cells.append(label[max(s["models"], key=lambda m: s["models"][m]["mean_r"])])
        rows.append(cells)
    widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    lines.append("cells: mean / median test r across neurons; frz = backbone frozen (stage 1), ft = fine-tuned; "
                 "sp = + spatial readout")
    means = {m: float(np.mean([s["models"][m]["mean_r"] for s in results["sessions"].values() if m in s["models"]]))
             for m in names}
    lines.append("mean over sessions of mean test r: " + ", ".join(f"{label[m]} {v:.3f}" for m, v in means.items()))
    for sid, s in results["sessions"].items():
        extra = []
        if "ridge_grid_layers" in s:
            extra.append("ridge grid layers " + "+".join(s["ridge_grid_layers"]))
        if "spatial_blend_weight" in s:
            extra.append(f"blend weight of λ0 sp ft (validation) {s['spatial_blend_weight']:.1f}")
        if "spatial_layers" in s:
            extra.append(f"spatial readout {s['spatial_readout']} on " + "+".join(s["spatial_layers"]))
        if s.get("stage_seconds"):
            extra.append("train s (stage 1/stage 2): " + ", ".join(
                f"{label[m]} {st.get('stage1', 0):.0f}/{st.get('stage2', 0):.0f}" for m, st in s["stage_seconds"].items()))
        if extra:
            lines.append(f"{sid}: " + "; ".join(extra))
    for sid, s in results["sessions"].items():
        lines.append(f"{sid}: validation mean r: " + ", ".join(f"{label[m]} {s['models'][m]['val_mean_r']:.4f}"
                                                             for m in names if m in s["models"]))
    for sid, s in results["sessions"].items():
        if s["noise_ceiling_mean"] is not None:
            acc = ", ".join(f"{label[m]} {s['models'][m]['mean_accuracy']:.1f}%" for m in names if m in s["models"])
            lines.append(f"{sid}: noise-normalised accuracy (mean over neurons; ceiling mean "
                         f"{s['noise_ceiling_mean']:.3f}): {acc}")
    for key, c in results["pooled"].items():
        b = c["bootstrap_all_neurons"]
        t = c["over_sessions"]
        w = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.3g}"
        sgn = "n/a" if t["sign_test_p"] is None else f"{t['sign_test_p']:.3g}"
        lines.append(f"{key}: Δ mean r over {b['n_neurons']} neurons = {b['diff']:+.4f} [95% CI {b['ci_low']:+.4f}, "
                     f"{b['ci_high']:+.4f}], bootstrap p = {b['p_value']:.3g}; sessions better {t['n_improved']}/"
                     f"{t['n_sessions']}, Wilcoxon p = {w}, sign test p = {sgn}")
    return "\n".join(lines)


def machine() -> str:
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")


def result_header(benchmark: str, script: str, argv: list[str] | None) -> dict[str, str]:
    """The first keys of every benchmark's results JSON: name, date, the command as run, the machine."""
    args = argv if argv is not None else sys.argv[1:]
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"),
            "command": f"python bench/{script} " + " ".join(shlex.quote(a) for a in args), "machine": machine()}


def offline_runtime(progress: bool, threads: int | None) -> None:
    """Hub access off (nothing downloads), progress bars only when asked, and the torch CPU threads."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not progress:
        os.environ["LLMVEM_NO_PROGRESS"] = "1"
    import torch

    if threads:
        torch.set_num_threads(threads)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_v4: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    offline_runtime(args.progress, args.threads)
    from llmvem.data.v4 import list_v4_sessions

    sessions = args.sessions or list_v4_sessions(args.data)
    n_boot = args.bootstrap if args.bootstrap is not None else (200 if args.quick else 1000)
    t0 = time.perf_counter()
    records: dict[str, Any] = {}
    pooled_in: dict[str, dict[str, np.ndarray]] = {}
    with tempfile.TemporaryDirectory(prefix="llmvem_bench_v4_") as tmp:
        work = args.work_dir or Path(tmp)
        for session in sessions:
            print(f"[bench_v4] session {session} ...", file=sys.stderr, flush=True)
            records[session], pooled_in[session] = run_session(args, session, work, n_boot)
            m = records[session]["models"]
            print(f"[bench_v4] session {session}: " + ", ".join(f"{k} {v['mean_r']:.3f}" for k, v in m.items())
                  + f" ({records[session]['seconds_total']:.0f} s)", file=sys.stderr, flush=True)
    pooled: dict[str, Any] = {}
    for a, b in COMPARISONS:
        have = [s for s in sessions if a in pooled_in[s] and b in pooled_in[s]]
        if not have:
            continue
        key = f"{b}_vs_{a}"
        pooled[key] = {
            "bootstrap_all_neurons": pooled_bootstrap([(pooled_in[s]["y"], pooled_in[s][a], pooled_in[s][b])
                                                       for s in have], n_boot, seed=0),
            "over_sessions": session_tests([records[s]["models"][b]["mean_r"] - records[s]["models"][a]["mean_r"]
                                            for s in have]),
        }
    config = session_config(args, sessions[0])
    results = {
        **result_header("v4_cowley2023", "bench_v4.py", argv),
        "settings": {"lambda": args.lam, "quick": args.quick, "models": list(args.models),
                     "llmvem_layers": args.llmvem_layers, "max_images": args.max_images, "bootstrap": n_boot,
                     "overrides": [o for o in bench_overrides(args) if not o.startswith("cache_dir=")],
                     "backbone": config.backbone.model_dump(mode="json"), "model": config.model.model_dump(mode="json"),
                     "train": config.train.model_dump(mode="json")},
        "sessions": records,
        "pooled": pooled,
        "seconds_total": time.perf_counter() - t0,
    }
    write_results(args.out, results)
    print(format_table(results))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


def write_results(path: Path, results: dict[str, Any]) -> None:
    """Strict JSON (NaN → null), indented, with lists of numbers kept on one line (small, diffable files)."""
    import re

    text = json.dumps(finite(results), indent=1, allow_nan=False, ensure_ascii=False)
    text = re.sub(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text + "\n", encoding="utf-8")


def finite(obj: Any) -> Any:
    """``obj`` with NumPy scalars made plain and NaN/Inf replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


if __name__ == "__main__":
    main()
