"""V4 encoding benchmark, a thin client of llmvem: the shipped ``v4_spatial`` models on every development session.

Data: macaque V4 spike counts to natural images (Cowley, Stan, Pillow & Smith 2023, cowleygroup/V4_compact_models),
``../shared/data/v4_cowley2023`` relative to the repository (``--data`` to point elsewhere). Each session records its
own neurons, so each is its own encoding problem.

For every session the script builds the config a user would (``llmvem/configs/v4_spatial.yaml``, or ``--config``,
plus ``data.spec=v4:ROOT:SESSION`` and the ``--set`` overrides) and runs the same experiment runner as
``llmvem train --config v4_spatial`` (:func:`llmvem.pipeline.run_experiment`), writing an ordinary run folder per
session (``--runs-dir``; ``llmvem report`` opens it, ``llmvem predict`` serves its models). The models, the
selection rule (validation only; a ridge refitted on train + val is not eligible) and the statistics are the
package's: per session the run's ``metrics.json``; over sessions :func:`llmvem.evaluate.pooled.compare_runs`
(Wilcoxon and sign tests of the per-session differences, and a bootstrap over all neurons that resamples test
images within sessions and the seeds of a seed ensemble — one network per seed).

``--split val`` reads only the validation split (the runs that choose a setting: the JSON then holds no test
figure); ``--split test`` (default) reports test figures and appends one line to ``bench/results/ledger.csv``.

Usage::

    python bench/bench_v4.py                                   # 9 sessions, v4_spatial (3 seeds) → bench/results/v4.json
    python bench/bench_v4.py --sessions 210325 --quick         # one session, short training, 1 seed
    python bench/bench_v4.py --split val --set model.spatial_l1=1e-4 --out bench/results/v4_val_l1e-4.json

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
DEFAULT_OUT = ROOT / "bench" / "results" / "v4.json"
LEDGER = ROOT / "bench" / "results" / "ledger.csv"
#: ``--quick``: short training, one seed (a code-path check, not a figure).
QUICK_OVERRIDES = ["train.stage1.epochs=15", "train.stage2.epochs=1", "train.stage2.unfreeze_last_n=1"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help="session ids (default: every session found)")
    ap.add_argument("--config", default="v4_spatial", help="config file or shipped name (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override KEY=VALUE (repeatable), applied after the session's data.spec")
    ap.add_argument("--seeds", type=int, default=None, help="seeds of every LLM-VEM model (default: the config's)")
    ap.add_argument("--split", choices=("test", "val"), default="test",
                    help="figures to report: test (a ledger line is written) or validation only")
    ap.add_argument("--quick", action="store_true", help="short training, one seed, 200 bootstrap resamples")
    ap.add_argument("--max-images", type=int, default=None, help="keep only the first N images of each session")
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 1000, --quick 200)")
    ap.add_argument("--cache-dir", default=None, help="captions / features cache (default: the config's)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_v4",
                    help="one run folder per session (default: %(default)s); reused with --resume")
    ap.add_argument("--resume", action="store_true", help="reuse finished trainings in the run folders")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=LEDGER, help="test-read ledger (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args(argv)


def session_config(args: argparse.Namespace, session: str):
    """The RunConfig of one session: ``--config`` + ``data.spec = v4:ROOT:SESSION`` + the overrides."""
    from llmvem.config import apply_overrides, load_config

    extra = [f"data.spec=v4:{args.data}:{session}"]
    if args.cache_dir:
        extra.append(f"cache_dir={args.cache_dir}")
    if args.quick:
        extra += QUICK_OVERRIDES
    cfg = apply_overrides(load_config(args.config), [*extra, *args.overrides])
    seeds = 1 if args.quick and args.seeds is None else args.seeds
    if seeds is not None:
        for e in cfg.evaluate.models:
            if e.kind == "llmvem":
                e.seeds = int(seeds)
    return cfg


def run_session(args: argparse.Namespace, session: str, n_boot: int) -> tuple[Path, dict[str, Any]]:
    """One session through :func:`llmvem.pipeline.run_experiment`: (run folder, its metrics.json)."""
    from llmvem.data.splits import first_images
    from llmvem.inputs import load_config_dataset, prepare_inputs
    from llmvem.pipeline import extraction_config, run_experiment

    config = session_config(args, session)
    config.evaluate.bootstrap = n_boot
    inputs = None
    if args.max_images:
        inputs = prepare_inputs(extraction_config(config), show_progress=args.progress,
                                dataset=first_images(load_config_dataset(config), args.max_images))
    out = args.runs_dir / session
    metrics = run_experiment(config, out, resume=args.resume and out.is_dir(), overwrite=not args.resume,
                             show_progress=args.progress, report=False, inputs=inputs,
                             on_stage=lambda m: print(f"[bench_v4] {session}: {m}", file=sys.stderr, flush=True))
    return out, metrics


def session_record(run: Path, metrics: dict[str, Any], split: str) -> dict[str, Any]:
    """What the results JSON keeps of one session (test figures only with ``split == "test"``)."""
    from llmvem.evaluate.pooled import run_model_summary

    ds = metrics["dataset"]
    rec: dict[str, Any] = {"run": str(run), "n_neurons": ds["n_voxels"], "n_train": ds.get("n_train"),
                           "n_val": ds.get("n_val"), "n_test": ds.get("n_test"), "models": {},
                           "selection": {k: metrics["selection"][k] for k in ("model", "reason", "val_mean_r")}}
    for name, m in metrics["models"].items():
        row: dict[str, Any] = {"val_mean_r": m.get("val_mean_r"), "val_in_fit": m.get("val_in_fit", False)}
        if m.get("details") is not None:
            row["details"] = m["details"]
        if m.get("bands") is not None:
            row["bands"] = m["bands"]
        if split == "test":
            row |= {"mean_r": m["mean_r"], "median_r": m["median_r"], "mean_accuracy": m.get("mean_accuracy")}
            row |= {k: v for k, v in run_model_summary(run, name).items() if k.startswith(("one_network", "member"))}
        rec["models"][name] = row
    if split != "test":
        rec["selection"].pop("val_mean_r")
    return rec


def pooled_comparisons(runs: list[Path], pairs: list[tuple[str, str]], n_boot: int,
                       ensembles: set[str]) -> dict[str, Any]:
    """Every (a, b) pair over the sessions: one network per seed; also the averaged ensembles where one is."""
    from llmvem.evaluate.pooled import compare_runs

    out: dict[str, Any] = {}
    for a, b in pairs:
        res = compare_runs(runs, a, b, n_boot=n_boot)
        out[f"{b}_vs_{a}"] = {"one_network": {"pooled": res["pooled"], "over_sessions": res["over_sessions"]},
                              "per_session": res["sessions"]}
        if {a, b} & ensembles:
            ens = compare_runs(runs, a, b, n_boot=n_boot, members=False)
            out[f"{b}_vs_{a}"]["ensemble"] = {"pooled": ens["pooled"], "over_sessions": ens["over_sessions"]}
    return out


def summary_rows(records: dict[str, Any], split: str) -> dict[str, dict[str, float]]:
    """Mean over sessions of each model's session mean and median r (and one network's, for ensembles)."""
    names = list(dict.fromkeys(n for s in records.values() for n in s["models"]))
    out: dict[str, dict[str, float]] = {}
    for n in names:
        rows = [s["models"][n] for s in records.values() if n in s["models"]]
        keys = ["val_mean_r"] if split == "val" else ["mean_r", "median_r", "one_network_mean_r",
                                                       "one_network_median_r"]
        out[n] = {f"mean_of_{k}": float(np.mean([r[k] for r in rows])) for k in keys
                  if all(r.get(k) is not None for r in rows)}
    return out


def format_table(results: dict[str, Any]) -> str:
    """The printed table: per session and model the figure reported, then the means and pooled tests."""
    from llmvem.report.tables import fmt_number, text_table

    split = results["settings"]["split"]
    names = list(results["summary"])
    rows = []
    for sid, s in results["sessions"].items():
        cells = [sid, str(s["n_neurons"])]
        for n in names:
            m = s["models"].get(n)
            if m is None:
                cells.append("-")
            elif split == "test":
                cells.append(f"{fmt_number(m['mean_r'])}/{fmt_number(m['median_r'])}")
            else:
                cells.append(fmt_number(m["val_mean_r"]) + (" (in fit)" if m["val_in_fit"] else ""))
        cells.append(str(s["selection"]["model"]))
        rows.append(cells)
    lines = [text_table(["session", "neurons", *names, "chosen (val)"], rows, n_left=2)]
    lines.append("cells: " + ("mean / median test r over neurons" if split == "test" else
                              "validation mean r ((in fit): fitted on train + val, not eligible)"))
    for n, v in results["summary"].items():
        lines.append(f"{n}: " + ", ".join(f"{k.replace('mean_of_', 'mean over sessions of ')} {x:.4f}"
                                          for k, x in v.items()))
    for key, c in results.get("pooled", {}).items():
        for kind in ("one_network", "ensemble"):
            if kind not in c:
                continue
            p, t = c[kind]["pooled"], c[kind]["over_sessions"]
            w = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.3g}"
            lines.append(f"{key} ({kind.replace('_', ' ')}): Δ mean r over {p['n_voxels']} neurons = "
                         f"{p['delta_mean_r']:+.4f} [95% CI {p['ci'][0]:+.4f}, {p['ci'][1]:+.4f}] (images × "
                         f"{p['n_seeds']} seeds), p = {p['p']:.3g}; sessions better {t['n_improved']}/"
                         f"{t['n_sessions']}, Wilcoxon p = {w}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_v4: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(args.progress, args.threads)
    from llmvem.data.v4 import list_v4_sessions
    from llmvem.pipeline import experiment_pairs

    sessions = args.sessions or list_v4_sessions(args.data)
    n_boot = args.bootstrap if args.bootstrap is not None else (200 if args.quick else 1000)
    t0 = time.perf_counter()
    records: dict[str, Any] = {}
    runs: list[Path] = []
    for session in sessions:
        print(f"[bench_v4] session {session} ...", file=sys.stderr, flush=True)
        run, metrics = run_session(args, session, n_boot if args.split == "test" else 0)
        runs.append(run)
        records[session] = session_record(run, metrics, args.split)
    config = session_config(args, sessions[0])
    seeds = sorted({config.seed + i for e in config.evaluate.models if e.kind == "llmvem" for i in range(e.seeds)})
    ensembles = {e.name for e in config.evaluate.models if e.kind == "llmvem" and e.seeds > 1}
    results: dict[str, Any] = {
        **result_header("v4_cowley2023", "bench/bench_v4.py", argv, config=config, seeds=seeds or [config.seed]),
        "settings": {"config": args.config, "overrides": list(args.overrides), "split": args.split,
                     "quick": args.quick, "max_images": args.max_images, "bootstrap": n_boot,
                     "models": [e.model_dump(mode="json") for e in config.evaluate.models]},
        "sessions": records,
        "summary": summary_rows(records, args.split),
    }
    if args.split == "test":
        results["pooled"] = pooled_comparisons(runs, experiment_pairs([], config), n_boot, ensembles)
    results["seconds_total"] = time.perf_counter() - t0
    write_results(args.out, results)
    if args.split == "test":
        append_ledger(args.ledger, "bench_v4", f"test: {', '.join(records[sessions[0]]['models'])} "
                      f"({len(seeds) or 1} seeds{', quick' if args.quick else ''}) -> {args.out.name}",
                      config=config, sessions=sessions)
    print(format_table(results))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
