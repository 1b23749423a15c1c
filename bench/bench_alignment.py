"""Positive control of language alignment on the virtual brain, with matched training, controls and seeds.

The virtual brain's ``relational`` voxels respond to what the exact scene descriptions state in words but frozen,
spatially pooled image features encode poorly (number of objects, positions, same-category pairs, category pairs;
:mod:`llmvem.data.virtual_brain`). LLM-VEM with a shared core (``model.core``; stage 1 on cached EfficientNet-Lite0
features) is trained on 150 images (50 validate, 200 test) and compared on the relational test voxels, for two
runs — captions of the brain images only (``brain_captions``), and the same plus a stream of extra captioned
scenes without responses (``extra``: ``align_data.spec = virtual-scenes:n=N,seed=7``) — in four rows:

* ``lambda0`` — λ = 0 (the same network; the contrastive term off; a stream changes nothing at λ = 0);
* ``language`` — λ > 0 toward MiniLM embeddings of the exact descriptions (``model.align_target=captions``);
* ``non_language`` — the same head and loss toward an embedding of each scene's exact attribute vector: the same
  facts without language (``model.align_target=attributes``);
* ``shuffled`` — the descriptions permuted across the images of each split and of the stream (``captions.shuffle``)
  at the language row's λ.

Every model takes the same optimizer steps: the engine's matched epochs (``train.epoch=voxel_steps``: the stream's
batches join the voxel steps, covering the stream once per epoch) and per-loss gradient clipping
(``train.clip_per_loss``); the steps per epoch of every model are recorded. λ of the language and non-language rows
is chosen on the **validation** r of the relational voxels (mean over seeds, :func:`llmvem.evaluate.selection.
choose_model`); every model is trained with ≥ 3 seeds, and the test figures are the mean over seeds with 95%
intervals of a bootstrap over seeds × test images (:func:`llmvem.evaluate.seeds.seed_bootstrap`), Δ against the
λ = 0 model of the same seeds. Two reference rows repeat the stream run's language model at its λ on other
engines: ``language_unmatched`` before matching (``train.epoch=all_batches``, one global clipping norm), as the
earlier +0.057 [+0.030, +0.085] (one seed) was measured, and ``language_global_clip`` with matched steps but global
clipping (does clipping per loss matter?).

Usage::

    python bench/bench_alignment.py            # mlp core, λ ∈ {0.1, 0.3, 1, 3}, 2,000 extra scenes, 100 epochs, 3 seeds
    python bench/bench_alignment.py --quick    # linear core, λ ∈ {1, 3}, 500 extra scenes, 30 epochs, 3 seeds
    python bench/bench_alignment.py --smoke    # tiny, for the test suite

Writes ``bench/results/alignment.json`` (``--out``; strict JSON with the provenance header) and appends one line
per test read to ``bench/results/ledger.csv`` (``--ledger``). The 92-image RSA of aligned encoders is
``bench/bench_rsa92.py --alignment-only``.
"""

from __future__ import annotations

import argparse
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmvem.config import RunConfig, apply_overrides
from llmvem.data import load_dataset
from llmvem.estimators import LLMVEMEncoder
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.seeds import seed_bootstrap, seed_mean_ci
from llmvem.evaluate.selection import choose_model
from llmvem.inputs import prepare_inputs
from llmvem.provenance import append_ledger, result_header, write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "alignment.json"
DEFAULT_LEDGER = ROOT / "bench" / "results" / "ledger.csv"
ROI = "relational"
ROWS = ("lambda0", "language", "non_language", "shuffled")
RUNS = ("brain_captions", "extra")
#: The config of each row (on top of the run's): what the head is aligned to.
TARGETS = {"language": ["model.align_target=captions"], "non_language": ["model.align_target=attributes"],
           "shuffled": ["model.align_target=captions", "captions.shuffle=true", "captions.shuffle_seed=1"]}
#: Reference rows of the stream run, the language model at its λ on other engines: before matching (every stream
#: batch its own step, one global clipping norm: the earlier +0.057 was measured so), and matched steps with global
#: clipping (does clipping per loss matter?).
REFERENCE_ROWS = {"language_unmatched": ["train.epoch=all_batches", "train.clip_per_loss=false"],
                  "language_global_clip": ["train.clip_per_loss=false"]}

#: Sizes of each mode. The core kinds were chosen on validation at λ = 0 before matching (full: mlp 0.146 vs
#: linear 0.091; BENCHMARKS.md "Alignment: full run"); λ = 0 trains exactly as then (matching changes only models
#: with a contrastive term), so the choice stands.
MODES: dict[str, dict[str, Any]] = {
    "full": {"n_train": 150, "n_val": 50, "n_test": 200, "n_extra": 2000, "core": "mlp",
             "lambdas": [0.1, 0.3, 1.0, 3.0], "epochs": 100, "n_boot": 2000, "image_size": 96, "seeds": [0, 1, 2]},
    "quick": {"n_train": 150, "n_val": 50, "n_test": 200, "n_extra": 500, "core": "linear",
              "lambdas": [1.0, 3.0], "epochs": 30, "n_boot": 1000, "image_size": 96, "seeds": [0, 1, 2]},
    "smoke": {"n_train": 30, "n_val": 16, "n_test": 30, "n_extra": 60, "core": "linear", "lambdas": [1.0],
              "epochs": 3, "n_boot": 50, "image_size": 48, "seeds": [0, 1, 2]},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="linear core, λ ∈ {1, 3}, 500 extra scenes, 30 epochs")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's check of the outputs)")
    ap.add_argument("--seeds", type=int, nargs="+", default=None, help="training seeds (default 0 1 2)")
    ap.add_argument("--data-seed", type=int, default=0, help="seed of the virtual brain and its splits")
    ap.add_argument("--cache-dir", type=Path, default=None, help="caption-embedding / feature cache (default: temp)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=DEFAULT_LEDGER, help="test-read ledger (default: %(default)s)")
    ap.add_argument("--no-reference", action="store_true", help="skip the reference rows (other engines)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: at most 2)")
    return ap.parse_args(argv)


def base_config(mode: dict[str, Any], cache_dir: Path) -> RunConfig:
    """The settings of every model (stage 1 on cached features, a shared core that λ reaches)."""
    return apply_overrides(RunConfig(), [
        f"cache_dir={cache_dir}", f"data.image_size={mode['image_size']}", f"backbone.image_size={mode['image_size']}",
        "backbone.layers=[block5, block10, pooled]", "backbone.device=cpu", "text.device=cpu", "train.device=cpu",
        "train.precision=fp32", f"train.stage1.epochs={mode['epochs']}", "train.stage1.batch_size=32",
        "train.stage1.lr=0.002", "train.stage1.early_stopping_patience=8", "train.stage2.epochs=0",
        "train.checkpoint_every=100000", f"model.core={mode['core']}", "model.core_dim=128", "model.core_dropout=0.1",
        "model.feature_dropout=0", "align_data.batch_size=128", "evaluate.text_to_brain=false"])


def brain(mode: dict[str, Any], seed: int) -> Any:
    """Virtual brain with 100 relational voxels (and 30 + 30 early / semantic ones); a seeded validation split
    of ``n_val`` of its ``n_train + n_val`` training images."""
    n_fit = mode["n_train"] + mode["n_val"]
    ds = load_dataset("virtual:n_relational=100,n_early=30,n_semantic=30", n_train=n_fit, n_test=mode["n_test"],
                      image_size=mode["image_size"], seed=seed)
    return ds.with_validation_split(mode["n_val"] / n_fit, seed)


class Fits:
    """Trains the models of the comparison (through :class:`llmvem.estimators.LLMVEMEncoder`, the user's path)
    and keeps, per model and seed, the relational voxels' predictions and the engine's step schedule."""

    def __init__(self, mode: dict[str, Any], cache_dir: Path, dataset: Any, log_fn: Any):
        self.mode, self.base, self.log = mode, base_config(mode, cache_dir), log_fn
        self.dataset, self.mask = dataset, dataset.roi_masks[ROI]
        self.inputs: dict[bool, Any] = {}
        self.models: dict[str, dict[str, Any]] = {}

    def config(self, run: str, extra: list[str], seed: int) -> RunConfig:
        stream = [f"align_data.spec=virtual-scenes:n={self.mode['n_extra']},seed=7"] if run == "extra" else []
        return apply_overrides(self.base, [f"seed={seed}", *stream, *extra])

    def prepared(self, config: RunConfig) -> Any:
        shuffle = config.captions.shuffle
        if shuffle not in self.inputs:  # captions (shuffled or not), MiniLM embeddings, cached features
            self.inputs[shuffle] = prepare_inputs(config, show_progress=False, dataset=self.dataset)
        return self.inputs[shuffle]

    def fit(self, name: str, run: str, extra: list[str]) -> dict[str, Any]:
        """Train ``name`` with every seed (once per name)."""
        if name in self.models:
            return self.models[name]
        t0 = time.perf_counter()
        rec: dict[str, Any] = {"val": [], "test": [], "steps_per_epoch": [], "extra_batches_per_epoch": [],
                               "clipped_fraction": [], "epochs_run": []}
        for seed in self.mode["seeds"]:
            cfg = self.config(run, extra, seed)
            enc = LLMVEMEncoder(cfg, show_progress=False).fit_inputs(self.prepared(cfg))
            res, st = enc.result_, enc.result_.stages["stage1"]
            for split in ("val", "test"):
                rec[split].append(res.predictions[split][:, self.mask])
            rec["steps_per_epoch"].append(st["steps_per_epoch"])
            rec["extra_batches_per_epoch"].append(st["extra_batches_per_epoch"])
            rec["clipped_fraction"].append(st.get("clipped_fraction", {}))
            rec["epochs_run"].append(st["epochs_run"])
        y_val = self.dataset.val.responses[:, self.mask]
        rec["val_mean_r"] = float(np.mean([np.nanmean(pearson_r(y_val, p)) for p in rec["val"]]))
        rec["seconds"] = time.perf_counter() - t0
        self.models[name] = rec
        self.log(f"  {name}: val r {rec['val_mean_r']:.3f}, steps/epoch {rec['steps_per_epoch'][0]}, "
                 f"{rec['seconds']:.0f} s")
        return rec


def lam_name(row: str, run: str, lam: float) -> str:
    return f"{run}/{row}/lambda{lam:g}"


def choose_lambda(fits: Fits, row: str, run: str) -> tuple[float, dict[str, Any]]:
    """λ of ``row`` in ``run`` with the best mean validation r over seeds (the package's selection rule)."""
    records = {}
    for lam in fits.mode["lambdas"]:
        rec = fits.fit(lam_name(row, run, lam), run, [*TARGETS[row], f"model.lambda_align={lam}"])
        records[lam_name(row, run, lam)] = {"kind": "llmvem", "lambda": lam, "val_mean_r": rec["val_mean_r"]}
    sel = choose_model(records)
    assert sel.lam is not None
    return sel.lam, sel.to_record()


def _steps(rec: dict[str, Any], name: str) -> int:
    steps = set(rec["steps_per_epoch"])
    if len(steps) != 1:
        raise RuntimeError(f"{name}: steps per epoch differ between seeds: {sorted(steps)}")
    return steps.pop()


def run(mode_name: str, cache_dir: Path, data_seed: int, seeds: list[int] | None = None, reference: bool = True,
        log_fn: Any = print) -> dict[str, Any]:
    mode = {**MODES[mode_name], **({"seeds": list(seeds)} if seeds else {})}
    t0 = time.perf_counter()
    ds = brain(mode, data_seed)
    fits = Fits(mode, cache_dir, ds, log_fn)
    y_test = ds.test.responses[:, fits.mask]
    log_fn(f"virtual brain: {len(ds.train)} train / {len(ds.val)} val / {len(ds.test)} test images, "
           f"{int(fits.mask.sum())} relational voxels; seeds {mode['seeds']}")
    zero = fits.fit("lambda0", "brain_captions", ["model.lambda_align=0"])
    matched: dict[str, Any] = {}
    selection: dict[str, Any] = {}
    for run_name in RUNS:
        log_fn(f"run {run_name}:")
        chosen: dict[str, float] = {}
        for row in ("language", "non_language"):
            chosen[row], selection[f"{run_name}/{row}"] = choose_lambda(fits, row, run_name)
        chosen["shuffled"] = chosen["language"]
        models = {"lambda0": zero, **{row: fits.fit(lam_name(row, run_name, chosen[row]), run_name,
                                                     [*TARGETS[row], f"model.lambda_align={chosen[row]}"])
                                      for row in ("language", "non_language", "shuffled")}}
        if reference and run_name == "extra":
            for row, engine in REFERENCE_ROWS.items():
                models[row] = fits.fit(f"{run_name}/{row}", run_name, [
                    *TARGETS["language"], f"model.lambda_align={chosen['language']}", *engine])
        # test figures: read once, for the chosen models only
        rows: dict[str, Any] = {"lambda0": {**seed_mean_ci(y_test, zero["test"], mode["n_boot"]),
                                            "val_mean_r": zero["val_mean_r"]}}
        for row, rec in models.items():
            if row == "lambda0":
                continue
            cmp = seed_bootstrap(y_test, zero["test"], rec["test"], mode["n_boot"])
            own = seed_mean_ci(y_test, rec["test"], mode["n_boot"])
            rows[row] = {"delta_mean_r": cmp["delta_mean_r"], "ci": cmp["ci"], "p": cmp["p"],
                         "per_seed_delta": cmp["per_seed_delta"], "lambda": chosen.get(row, chosen["language"]),
                         "mean_r": own["mean_r"], "mean_ci": own["ci"], "val_mean_r": rec["val_mean_r"]}
        matched[run_name] = {
            "n_seeds": len(mode["seeds"]), "seeds": mode["seeds"], "n_extra": mode["n_extra"] if run_name == "extra"
            else 0, "lambda": chosen,
            "steps_per_epoch": {row: _steps(rec, row) for row, rec in models.items()},
            "extra_batches_per_epoch": {row: rec["extra_batches_per_epoch"][0] for row, rec in models.items()},
            "clipped_fraction": {row: rec["clipped_fraction"][0] for row, rec in models.items()},
            "epochs_run": {row: rec["epochs_run"] for row, rec in models.items()},
            "rows": rows}
    return {"matched": matched, "selection": {"basis": f"validation mean r over seeds, {ROI} voxels",
                                              "lambda": selection,
                                              "val_mean_r": {n: r["val_mean_r"] for n, r in fits.models.items()}},
            "settings": {"mode": mode_name, **mode, "data_seed": data_seed, "roi": ROI,
                         "n_voxels": int(fits.mask.sum()), "models_trained": len(fits.models) * len(mode["seeds"]),
                         "lambda0_note": "one λ = 0 model serves both runs: at λ = 0 a stream adds no term and the "
                                         "matched schedule is the same"},
            "seconds": time.perf_counter() - t0}


def _ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def format_table(res: dict[str, Any]) -> str:
    s = res["settings"]
    lines = [f"Positive control, matched ({s['roi']} voxels, test; {len(s['seeds'])} seeds × {s['n_test']} test "
             "images; 95% CIs of a bootstrap over seeds × images)",
             f"{'run':<16}{'row':<20}{'λ':>5}{'steps/ep':>9}{'mean r':>8}{'95% CI':>18}{'Δ vs λ=0':>10}"
             f"{'95% CI':>18}{'p':>7}  per-seed Δ"]
    for run_name, block in res["matched"].items():
        label = "brain captions" if run_name == "brain_captions" else f"+{block['n_extra']} scenes"
        for row, r in block["rows"].items():
            steps = block["steps_per_epoch"][row]
            if row == "lambda0":
                lines.append(f"{label:<16}{'λ = 0':<20}{'-':>5}{steps:>9}{r['mean_r']:>8.3f}"
                             f"{_ci(r['ci']):>18}")
                continue
            per_seed = " ".join(f"{d:+.3f}" for d in r["per_seed_delta"])
            lines.append(f"{'':<16}{row:<20}{r['lambda']:>5g}{steps:>9}{r['mean_r']:>8.3f}{_ci(r['mean_ci']):>18}"
                         f"{r['delta_mean_r']:>+10.3f}{_ci(r['ci']):>18}{r['p']:>7.3f}  {per_seed}")
    lines.append("Validation (mean over seeds): " + ", ".join(
        f"{name} {v:.3f}" for name, v in res["selection"]["val_mean_r"].items()))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    torch.set_num_threads(args.threads or max(1, min(2, torch.get_num_threads())))
    quiet = logging.getLogger("llmvem")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the per-model info lines would drown the table
    try:
        with tempfile.TemporaryDirectory() as tmp:
            res = run(mode, args.cache_dir or Path(tmp) / "cache", args.data_seed, args.seeds,
                      reference=not args.no_reference)
    finally:
        quiet.setLevel(level)  # called in-process (tests): leave logging as it was
    results = {**result_header("alignment_positive_control", "bench/bench_alignment.py", argv,
                               config=base_config(MODES[mode], Path("<cache>")), seeds=res["settings"]["seeds"]),
               **res}
    print("\n" + format_table(results))
    print(f"\n{mode} run: {res['seconds']:.0f} s")
    write_results(args.out, results)
    append_ledger(args.ledger, "alignment_positive_control",
                  f"test: {mode}, {ROI} voxels, rows {', '.join(ROWS)} (+ {', '.join(REFERENCE_ROWS)}) x runs "
                  f"{', '.join(RUNS)}, chosen λ only, {len(res['settings']['seeds'])} seeds",
                  config=base_config(MODES[mode], Path("<cache>")), sessions=[f"virtual_brain_seed{args.data_seed}"])
    print(f"results: {args.out}; ledger: {args.ledger}")
    return results


if __name__ == "__main__":
    main()
