"""One visual core for many V4 sessions: separate vs joint vs a new session fitted on a core trained on the others.

Data: macaque V4 responses to natural images (Cowley et al. 2023), ``../shared/data/v4_cowley2023`` (``--data``).
Every arm reads the shipped ``v4_spatial`` settings of its ``spatial`` model (EfficientNet-Lite0 at 112 px, PCA
readout of block8/10/12 plus a factorized spatial readout of the block5 and block8 7x7 maps, ridge start, stage 1,
then stage 2 fine-tuning the last five backbone stages), and every session keeps its own split (the split
``llmvem train`` uses), so the three arms are scored on the same test images:

* **separate** - ``llmvem train`` on each session alone (``evaluate.models``: ``ridge_inputs`` and ``spatial``,
  3 seeds): the single-session model of BENCHMARKS.md "V4";
* **joint** - ``llmvem train-multi`` on all sessions at once (``multisubject.core=none``: the sessions share the
  backbone that stage 2 fine-tunes on all their images; each has its own flat and spatial readouts; each session
  is predicted by its own best epoch on validation), one run per seed;
* **loso** - for each session, a core is fine-tuned by ``train-multi`` on the *other* sessions, then
  ``llmvem train --init-core CORE`` fits the held-out session on it: ``ridge_inputs`` (the feature-matched ridge,
  on the core's features), ``spatial`` (readouts, then the core fine-tuned further on the session) and
  ``spatial_frozen`` (readouts only, the core kept), 3 seeds each; validation chooses between the two networks
  per session (``llmvem.evaluate.selection``). One core per held-out session (seed 0): the seeds vary the new
  session's fit, and the nine cores vary across sessions.

Test figures are read once (``--split test``; ``--split val`` prints validation figures only). Per arm: mean over
sessions of the session mean and median test r (one network per seed, averaged over seeds); loso − separate and
joint − separate pooled over neurons with CIs over seeds × test images, and per-session wins
(:func:`llmvem.evaluate.pooled.compare_predictions`). Writes ``bench/results/v4_shared_core.json`` (strict JSON,
provenance header) and one ledger line.

Usage::

    python bench/bench_shared_core_v4.py --threads 1                  # all arms, 9 sessions (~3 h on 1 core)
    python bench/bench_shared_core_v4.py --arms separate --threads 1  # one arm (run the others beside it)
    python bench/bench_shared_core_v4.py --resume                     # reuse every finished run, write results

Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
ARMS = ("separate", "joint", "loso")

#: The spatial model's own settings (``v4_spatial``'s ``spatial`` entry), for the train-multi runs.
MULTI_OVERRIDES = ["multisubject.core=none", "multisubject.split=dataset", "evaluate.models=[]",
                   "evaluate.bootstrap=0", "backbone.spatial_layers=[block5@grid7, block8@grid7]",
                   "model.spatial_readout=factorized", "model.spatial_mode=residual",
                   "train.stage1.early_stopping_patience=3"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder")
    ap.add_argument("--sessions", default=None, help="comma-separated session ids (default: all in --data)")
    ap.add_argument("--arms", default=",".join(ARMS), help="comma-separated arms to train (default: all)")
    ap.add_argument("--loso-sessions", default=None, help="held-out sessions the loso arm trains (default: all; "
                    "each core still sees every other session of --sessions)")
    ap.add_argument("--seeds", type=int, default=3, help="seeds per arm (default: 3)")
    ap.add_argument("--core-epochs", type=int, default=None,
                    help="stage-2 epochs of the loso cores (default: the config's)")
    ap.add_argument("--split", choices=("val", "test"), default="test", help="figures to report")
    ap.add_argument("--cache-dir", default=None, help="captions / features cache (default: the config's)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_shared_core_v4",
                    help="run folders (default: %(default)s)")
    ap.add_argument("--resume", action="store_true", help="reuse finished runs in --runs-dir")
    ap.add_argument("--train-only", action="store_true", help="train the arms, write no results")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "v4_shared_core.json")
    ap.add_argument("--ledger", type=Path, default=ROOT / "bench" / "results" / "ledger.csv")
    ap.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples of the pooled CIs")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra override for every run (repeatable)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args(argv)


def _say(tag: str):
    return lambda m: print(f"[bench_shared_core] {tag}: {m}", file=sys.stderr, flush=True)


def base_overrides(args: argparse.Namespace) -> list[str]:
    return ([f"cache_dir={args.cache_dir}"] if args.cache_dir else []) + list(args.overrides)


def session_models(args: argparse.Namespace, with_frozen: bool) -> list[Any]:
    """``v4_spatial``'s ``ridge_inputs`` and ``spatial`` (``--seeds`` seeds), and with ``with_frozen`` the same
    network without stage 2 (``spatial_frozen``)."""
    from llmvem.config import load_config

    shipped = {m.name: m for m in load_config("v4_spatial").evaluate.models}
    spatial = shipped["spatial"].model_copy(deep=True)
    spatial.seeds = args.seeds
    spatial.compare_to = ["ridge_inputs"]
    models = [shipped["ridge_inputs"].model_copy(deep=True), spatial]
    if with_frozen:
        frozen = spatial.model_copy(deep=True)
        frozen.name, frozen.label = "spatial_frozen", "spatial readouts on the loaded core, core not fine-tuned"
        frozen.set = {**frozen.set, "train.stage2.epochs": 0}
        models.append(frozen)
    return models


def run_session(args: argparse.Namespace, session: str, out: Path, init_core: Path | None) -> dict[str, Any]:
    """One session through :func:`llmvem.pipeline.run_experiment` (what ``llmvem train`` runs)."""
    from llmvem.config import apply_overrides, load_config
    from llmvem.pipeline import run_experiment

    cfg = apply_overrides(load_config("v4_spatial"), [f"data.spec=v4:{args.data}:{session}", "evaluate.bootstrap=0",
                                                      *base_overrides(args)])
    cfg.evaluate.models = session_models(args, init_core is not None)
    if init_core is not None:
        cfg.backbone.init_core = str(init_core.resolve())
    return run_experiment(cfg, out, resume=args.resume and out.is_dir(), overwrite=not args.resume,
                          show_progress=False, report=False, on_stage=_say(f"{out.parent.name}/{session}"))


def run_multi(args: argparse.Namespace, sessions: list[str], out: Path, seed: int,
              stage2_epochs: int | None = None) -> dict[str, Any]:
    """``llmvem train-multi`` on ``sessions`` (:func:`llmvem.multisubject.run_multisubject`)."""
    from llmvem.config import apply_overrides, load_config
    from llmvem.multisubject import run_multisubject

    extra = [f"seed={seed}"] + ([f"train.stage2.epochs={stage2_epochs}"] if stage2_epochs is not None else [])
    cfg = apply_overrides(load_config("v4_spatial"), [*MULTI_OVERRIDES, *extra, *base_overrides(args)])
    specs = [f"v4:{args.data}:{s}" for s in sessions]
    return run_multisubject(cfg, specs, out, resume=args.resume and out.is_dir(), overwrite=not args.resume,
                            show_progress=False, on_stage=_say(out.name))


def train_arms(args: argparse.Namespace, sessions: list[str], arms: list[str]) -> dict[str, float]:
    seconds: dict[str, float] = {}
    for arm in arms:
        t = time.perf_counter()
        if arm == "separate":
            for s in sessions:
                run_session(args, s, args.runs_dir / "separate" / s, None)
        elif arm == "joint":
            for seed in range(args.seeds):
                run_multi(args, sessions, args.runs_dir / "joint" / f"seed{seed}", seed)
        elif arm == "loso":
            held_out = args.loso_sessions.split(",") if args.loso_sessions else sessions
            for s in held_out:
                core = args.runs_dir / "loso" / f"core_without_{s}"
                run_multi(args, [x for x in sessions if x != s], core, 0, args.core_epochs)
                run_session(args, s, args.runs_dir / "loso" / s, core)
        seconds[arm] = time.perf_counter() - t
    return seconds


# ----------------------------------------------------------------------------------------------- results
def arm_predictions(args: argparse.Namespace, sessions: list[str], split: str
                    ) -> tuple[dict[str, np.ndarray], dict[str, dict[str, Any]]]:
    """Per session its test responses, and per arm its per-seed predictions and what validation chose."""
    from llmvem.evaluate.pooled import model_seeds
    from llmvem.report.untrusted import read_run_json

    ys: dict[str, np.ndarray] = {}
    arms: dict[str, dict[str, Any]] = {a: {} for a in (*ARMS, "ridge_inputs", "ridge_inputs_core")}
    for s in sessions:
        sep = args.runs_dir / "separate" / s
        ys[s] = np.load(sep / "test_responses.npy", allow_pickle=False)
        m = read_run_json(sep / "metrics.json")
        arms["separate"][s] = {"val": m["models"]["spatial"]["val_mean_r"], "model": "spatial",
                               "test": model_seeds(sep, "spatial") if split == "test" else None}
        arms["ridge_inputs"][s] = {"val": m["models"]["ridge_inputs"]["val_mean_r"], "model": "ridge_inputs",
                                   "test": model_seeds(sep, "ridge_inputs") if split == "test" else None}
        joint = []
        vals = []
        for seed in range(args.seeds):
            folder = args.runs_dir / "joint" / f"seed{seed}" / "joint"
            joint.append(np.load(folder / "predictions" / f"v4_{s}_test.npy", allow_pickle=False))
            vals.append(_joint_val(folder, s))
        arms["joint"][s] = {"val": float(np.mean(vals)), "model": "joint", "test": joint if split == "test" else None}
        loso = args.runs_dir / "loso" / s
        m = read_run_json(loso / "metrics.json")
        chosen = m["selection"]["model"]
        arms["loso"][s] = {"val": m["models"][chosen]["val_mean_r"], "model": chosen,
                           "val_by_model": {k: m["models"][k]["val_mean_r"] for k in ("spatial", "spatial_frozen")},
                           "test": model_seeds(loso, chosen) if split == "test" else None}
        arms["ridge_inputs_core"][s] = {"val": m["models"]["ridge_inputs"]["val_mean_r"], "model": "ridge_inputs",
                                        "test": model_seeds(loso, "ridge_inputs") if split == "test" else None}
    return ys, arms


def _joint_val(folder: Path, session: str) -> float:
    """A joint run's validation mean r of one session (its own selected epoch)."""
    from llmvem.report.untrusted import read_run_json

    info = read_run_json(folder / "training.json")
    return float(info["metrics"]["per_subject"][f"v4_{session}"]["val_mean_r"])


def summarise(args: argparse.Namespace, sessions: list[str]) -> dict[str, Any]:
    from llmvem.evaluate.metrics import pearson_r
    from llmvem.evaluate.pooled import compare_predictions

    ys, arms = arm_predictions(args, sessions, args.split)
    out: dict[str, Any] = {"n_seeds": args.seeds, "arms": {}, "sessions": {}, "comparisons": {}}
    for arm, per in arms.items():
        rows = {}
        for s, e in per.items():
            row: dict[str, Any] = {"val_mean_r": e["val"], "model": e["model"]}
            if "val_by_model" in e:
                row["val_by_model"] = e["val_by_model"]
            if e["test"] is not None:
                rs = [pearson_r(ys[s], p) for p in e["test"]]
                row["mean_r"] = float(np.mean([np.nanmean(r) for r in rs]))
                row["median_r"] = float(np.mean([np.nanmedian(r) for r in rs]))
                row["n_seeds"] = len(rs)
            rows[s] = row
        out["sessions"][arm] = rows
        summary = {"mean_of_val_means": float(np.mean([r["val_mean_r"] for r in rows.values()]))}
        if args.split == "test":
            summary["mean_of_means"] = float(np.mean([r["mean_r"] for r in rows.values()]))
            summary["mean_of_medians"] = float(np.mean([r["median_r"] for r in rows.values()]))
        out["arms"][arm] = summary
    if args.split == "test":
        for a, b in (("separate", "loso"), ("separate", "joint"), ("ridge_inputs", "separate"),
                     ("ridge_inputs_core", "loso"), ("joint", "loso")):
            res = compare_predictions({s: (ys[s], arms[a][s]["test"], arms[b][s]["test"]) for s in sessions},
                                      n_boot=args.bootstrap)
            out["comparisons"][f"{b}_vs_{a}"] = res
    return out


def format_table(results: dict[str, Any]) -> str:
    from llmvem.report.tables import fmt_number, text_table

    test = results["settings"]["split"] == "test"
    names = list(results["arms"])
    rows = []
    for s in results["settings"]["sessions"]:
        cells = [s]
        for n in names:
            r = results["sessions"][n][s]
            cells.append(f"{fmt_number(r['mean_r'])}/{fmt_number(r['median_r'])}" if test else
                         fmt_number(r["val_mean_r"]))
        cells.append(results["sessions"]["loso"][s]["model"])
        rows.append(cells)
    rows.append(["mean", *[(f"{fmt_number(results['arms'][n]['mean_of_means'])}/"
                            f"{fmt_number(results['arms'][n]['mean_of_medians'])}") if test else
                           fmt_number(results["arms"][n]["mean_of_val_means"]) for n in names], ""])
    lines = [text_table(["session", *names, "loso chose"], rows, n_left=1),
             "cells: " + ("mean / median test r over neurons (one network, averaged over seeds)" if test else
                          "validation mean r")]
    for key, c in results.get("comparisons", {}).items():
        p, t = c["pooled"], c["over_sessions"]
        w = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.3g}"
        lines.append(f"{key}: Δ mean r over {p['n_voxels']} neurons = {p['delta_mean_r']:+.4f} [95% CI "
                     f"{p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}] (images × {p['n_seeds']} seeds); sessions better "
                     f"{t['n_improved']}/{t['n_sessions']}, Wilcoxon p = {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_shared_core_v4: V4 data folder {args.data} is absent; nothing to benchmark (pass --data)")
        return None
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(False, args.threads)
    from llmvem.data.v4 import list_v4_sessions

    sessions = args.sessions.split(",") if args.sessions else list_v4_sessions(args.data)
    arms = [a.strip() for a in args.arms.split(",") if a.strip()]
    bad = [a for a in arms if a not in ARMS]
    if bad:
        raise SystemExit(f"--arms: unknown {bad}; expected some of {ARMS}")
    t0 = time.perf_counter()
    seconds = train_arms(args, sessions, arms)
    if args.train_only:
        print(f"trained {arms} in {time.perf_counter() - t0:.0f} s: {seconds}")
        return None
    results: dict[str, Any] = {
        **result_header("v4_shared_core", "bench/bench_shared_core_v4.py", argv, seeds=list(range(args.seeds))),
        "settings": {"config": "v4_spatial", "split": args.split, "sessions": sessions, "multi": MULTI_OVERRIDES,
                     "core_epochs": args.core_epochs, "overrides": args.overrides, "bootstrap": args.bootstrap},
        **summarise(args, sessions), "seconds": seconds}
    print(format_table(results))
    write_results(args.results, results)
    if args.split == "test":
        append_ledger(args.ledger, "bench_shared_core_v4", f"test: separate, joint, loso (spatial, spatial_frozen "
                      f"chosen on val), ridge_inputs on both backbones ({args.seeds} seeds)", sessions=sessions)
    print(f"results: {args.results}")
    return results


if __name__ == "__main__":
    main()
