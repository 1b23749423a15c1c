"""λ down to 0.01 on V4 (issue 25, item 6): small alignment weights, matched training, 3 seeds, chosen on validation.

Data: the V4 development sessions of Cowley et al. (2023) (``../shared/data/v4_cowley2023``; default all 9),
captioned by the offline label captioner (``captions.backend=labels``: ImageNet class names → MiniLM). Models: the
shipped ``v4_spatial`` config's settings (EfficientNet-Lite0 at 112 px, the pooled block8 / block10 / block12
features, cached) with a shared linear core (``model.core=linear``, 128 units) so that λ reaches the predictions,
stage 1 only (frozen backbone; cheap), for λ = 0 and each λ of ``--lambdas`` (default 0.01, 0.03, 0.1, 0.3), every
one with ``--seeds`` (default 0 1 2). Label captions of the brain images only: every model takes the same steps
(the engine's matched epochs; with no stream that is every model's schedule), gradients clipped per loss.

**Selection** (validation only): the pooled validation mean r (over every neuron of every session, mean over
seeds) of each λ; :func:`llmvem.evaluate.selection.choose_model` picks λ among the λ > 0 and, separately, says
whether validation prefers λ = 0 over it. All validation figures are written (``validation``). **Test**: read once,
for the chosen λ against λ = 0 — pooled over sessions by the bootstrap over seeds × test images
(:func:`llmvem.evaluate.seeds.seed_bootstrap`) and per session with Wilcoxon / sign tests over sessions
(:func:`llmvem.evaluate.pooled.session_tests`).

Usage::

    python bench/bench_lambda_v4.py                      # 9 sessions × 5 λ × 3 seeds
    python bench/bench_lambda_v4.py --quick              # 2 sessions, λ ∈ {0.01, 0.3}, 20 epochs
    python bench/bench_lambda_v4.py --smoke              # tiny (60 images of one session), for the tests

Writes ``bench/results/alignment_v4_lambda.json`` (``--out``; strict JSON, provenance header) and appends one
line to ``bench/results/ledger.csv``. Exits 0 with a message when the data are absent.
"""

from __future__ import annotations

import argparse
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmvem.config import RunConfig, apply_overrides, load_config
from llmvem.data.v4 import list_v4_sessions
from llmvem.estimators import LLMVEMEncoder
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.pooled import session_tests
from llmvem.evaluate.seeds import seed_bootstrap, seed_mean_ci
from llmvem.evaluate.selection import choose_model
from llmvem.inputs import load_config_dataset, prepare_inputs
from llmvem.provenance import append_ledger, result_header, write_results

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
DEFAULT_OUT = ROOT / "bench" / "results" / "alignment_v4_lambda.json"
DEFAULT_LEDGER = ROOT / "bench" / "results" / "ledger.csv"
LAMBDAS = (0.01, 0.03, 0.1, 0.3)
#: On top of the shipped ``v4_spatial`` config: its declared models off, a shared core λ can reach, stage 1 only.
OVERRIDES = ["evaluate.models=[]", "model.core=linear", "model.core_dim=128", "train.stage2.epochs=0",
             "model.align_target=captions", "train.checkpoint_every=100000", "evaluate.text_to_brain=false"]
QUICK = ["train.stage1.epochs=20", "train.stage1.early_stopping_patience=5"]
SMOKE = ["train.stage1.epochs=2", "train.stage1.early_stopping_patience=null"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help="session ids (default: every session found)")
    ap.add_argument("--lambdas", nargs="+", type=float, default=None, help=f"λ > 0 (default {LAMBDAS})")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2], help="training seeds (default 0 1 2)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="2 sessions, λ ∈ {0.01, 0.3}, 20 epochs")
    mode.add_argument("--smoke", action="store_true", help="60 images of one session, 2 epochs (tests)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override KEY=VALUE")
    ap.add_argument("--bootstrap", type=int, default=None, help="resamples (default 2000; --quick 500, --smoke 50)")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=DEFAULT_LEDGER, help="test-read ledger (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args(argv)


def session_config(args: argparse.Namespace, session: str) -> RunConfig:
    extra = QUICK if args.quick else SMOKE if args.smoke else []
    return apply_overrides(load_config("v4_spatial"), [*OVERRIDES, *extra, f"cache_dir={args.cache_dir}",
                                                       f"data.spec=v4:{args.data}:{session}", *args.overrides])


def first_images(ds: Any, n: int) -> Any:
    """The first images of each split, ``n`` in total (proportions kept; --smoke)."""
    total = sum(len(s) for s in ds.splits.values())
    splits = {k: s.subset(np.arange(max(8, round(n * len(s) / total)))) for k, s in ds.splits.items()}
    return replace(ds, splits=splits)


def mean_r(y: np.ndarray, pred: np.ndarray) -> float:
    return float(np.nanmean(pearson_r(y, pred)))


def run(args: argparse.Namespace, sessions: list[str], lambdas: list[float], log_fn: Any = print) -> dict[str, Any]:
    t0 = time.perf_counter()
    grid = [0.0, *lambdas]
    preds: dict[float, dict[str, dict[str, list[np.ndarray]]]] = {lam: {} for lam in grid}  # λ → session → split
    y: dict[str, dict[str, np.ndarray]] = {}
    steps: dict[str, dict[str, list[int]]] = {}
    for session in sessions:
        cfg = session_config(args, session)
        ds = load_config_dataset(cfg)
        if args.smoke:
            ds = first_images(ds, 60)
        t = time.perf_counter()
        inputs = prepare_inputs(cfg, show_progress=False, dataset=ds)
        y[session] = {s: inputs.dataset.splits[s].responses for s in ("val", "test")}
        log_fn(f"{session}: {len(ds.train)} / {len(ds.val)} / {len(ds.test)} images, {ds.n_voxels} neurons "
               f"(inputs {time.perf_counter() - t:.0f} s)")
        for lam in grid:
            per = preds[lam][session] = {"val": [], "test": []}
            for seed in args.seeds:
                enc = LLMVEMEncoder(apply_overrides(cfg, [f"model.lambda_align={lam}", f"seed={seed}"]),
                                    show_progress=False).fit_inputs(inputs)
                for split in ("val", "test"):
                    per[split].append(enc.result_.predictions[split])
                steps.setdefault(session, {}).setdefault(f"{lam:g}", []).append(
                    enc.result_.stages["stage1"]["steps_per_epoch"])
            val = np.mean([mean_r(y[session]["val"], p) for p in per["val"]])
            log_fn(f"  λ={lam:g}: val mean r {val:.4f} (mean of {len(args.seeds)} seeds)")
    # validation: pooled mean r over all neurons of all sessions, mean over seeds
    n_vox = sum(y[s]["val"].shape[1] for s in sessions)

    def pooled_val(lam: float) -> float:
        total = 0.0
        for s in sessions:
            total += np.mean([np.nansum(pearson_r(y[s]["val"], p)) for p in preds[lam][s]["val"]])
        return float(total / n_vox)

    records = {f"lambda{lam:g}": {"kind": "llmvem", "lambda": lam, "val_mean_r": pooled_val(lam)} for lam in grid}
    among_positive = choose_model(records, among=[f"lambda{lam:g}" for lam in lambdas])
    overall = choose_model(records)
    lam = float(among_positive.lam)  # type: ignore[arg-type]
    per_session_val = {s: {f"{g:g}": float(np.mean([mean_r(y[s]["val"], p) for p in preds[g][s]["val"]]))
                           for g in grid} for s in sessions}
    # test: once, the chosen λ against λ = 0
    n_boot = args.bootstrap or (50 if args.smoke else 500 if args.quick else 2000)
    y_test = [y[s]["test"] for s in sessions]
    cmp = seed_bootstrap(y_test, [preds[0.0][s]["test"] for s in sessions], [preds[lam][s]["test"] for s in sessions],
                         n_boot=n_boot)
    per_session = {}
    for s in sessions:
        d = np.mean([mean_r(y[s]["test"], b) - mean_r(y[s]["test"], a)
                     for a, b in zip(preds[0.0][s]["test"], preds[lam][s]["test"], strict=True)])
        per_session[s] = float(d)
    return {"validation": {"pooled_val_mean_r": {f"{g:g}": records[f"lambda{g:g}"]["val_mean_r"] for g in grid},
                           "per_session_val_mean_r": per_session_val,
                           "chosen_lambda": lam, "selection": among_positive.to_record(),
                           "validation_prefers": overall.to_record()},
            "test": {"lambda": lam, "against": 0.0,
                     "pooled": {k: cmp[k] for k in ("delta_mean_r", "ci", "p", "a_mean_r", "b_mean_r",
                                                    "per_seed_delta", "n_seeds", "n_voxels", "n_boot")},
                     "lambda0_mean_ci": seed_mean_ci(y_test, [preds[0.0][s]["test"] for s in sessions], n_boot),
                     "per_session_delta": per_session, "over_sessions": session_tests(list(per_session.values()))},
            "steps_per_epoch": steps,
            "settings": {"sessions": sessions, "lambdas": grid, "seeds": list(args.seeds), "overrides": OVERRIDES,
                         "mode": "smoke" if args.smoke else "quick" if args.quick else "full",
                         "models_trained": len(grid) * len(args.seeds) * len(sessions)},
            "seconds": time.perf_counter() - t0}


def format_table(res: dict[str, Any]) -> str:
    v, t = res["validation"], res["test"]
    lines = ["Validation (pooled mean r over all neurons, mean over seeds):",
             "  " + "  ".join(f"λ={k}: {r:.4f}" for k, r in v["pooled_val_mean_r"].items()),
             f"  chosen among λ > 0: λ = {v['chosen_lambda']:g}; among all: {v['validation_prefers']['model']}",
             f"Test (read once): λ = {t['lambda']:g} − λ = 0, pooled over {t['pooled']['n_voxels']} neurons × "
             f"{t['pooled']['n_seeds']} seeds: {t['pooled']['delta_mean_r']:+.4f} [{t['pooled']['ci'][0]:+.4f}, "
             f"{t['pooled']['ci'][1]:+.4f}], p = {t['pooled']['p']:.3f} (λ = 0: {t['pooled']['a_mean_r']:.4f})",
             f"  sessions better: {t['over_sessions']['n_improved']} of {t['over_sessions']['n_sessions']}, "
             f"Wilcoxon p = {t['over_sessions']['wilcoxon_p']}, sign p = {t['over_sessions']['sign_test_p']}",
             "  per session: " + ", ".join(f"{s} {d:+.4f}" for s, d in t["per_session_delta"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"{args.data}: no V4 data here; nothing to do (see --data)")
        return None
    if args.threads:
        torch.set_num_threads(args.threads)
    sessions = args.sessions or list_v4_sessions(args.data)
    if args.quick and not args.sessions:
        sessions = sessions[:2]
    if args.smoke and not args.sessions:
        sessions = sessions[:1]
    lambdas = args.lambdas or ([0.01, 0.3] if args.quick or args.smoke else list(LAMBDAS))
    quiet = logging.getLogger("llmvem")
    level = quiet.level
    quiet.setLevel(logging.ERROR)
    try:
        res = run(args, sessions, lambdas)
    finally:
        quiet.setLevel(level)
    cfg = session_config(args, sessions[0])
    results = {**result_header("v4_lambda_sweep", "bench/bench_lambda_v4.py", argv, config=cfg, seeds=args.seeds),
               **res}
    print("\n" + format_table(results))
    print(f"\n{res['settings']['mode']} run: {res['seconds']:.0f} s")
    write_results(args.out, results)
    append_ledger(args.ledger, "v4_lambda_sweep", f"test: λ={res['test']['lambda']:g} vs λ=0 (chosen on "
                  f"validation among {lambdas}), {len(args.seeds)} seeds, stage 1 + linear core", config=cfg,
                  sessions=sessions)
    print(f"results: {args.out}; ledger: {args.ledger}")
    return results


if __name__ == "__main__":
    main()
