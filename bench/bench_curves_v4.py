"""V4 learning curves, a thin client of llmvem: mean test r against the number of training images, for ridge,
LLM-VEM λ = 0, λ > 0 and λ > 0 with the Flickr8k captioned-image stream (issue 14, item 4).

Data: V4 development sessions of Cowley et al. (2023) (``../shared/data/v4_cowley2023``; default 190925, 190927,
190928). Every run is configured as a user would: the shipped ``v4_spatial`` config (label captions → MiniLM,
EfficientNet-Lite0 at 112 px, the pooled readout layers block8/10/12) with ``data.spec=v4:ROOT:SESSION``, a shared
trainable core (``CURVE_OVERRIDES``: stage 1 only, on cached features) and the ``--set`` overrides; its
``evaluate.models`` are replaced by the curve's models, fitted by :func:`llmvem.pipeline.run_experiment` into one
ordinary run folder per (session, size) (``--runs-dir``/SESSION/n_SIZE; ``llmvem report`` opens it). The
validation and test images of each session are fixed; the training images are nested seeded subsets of the
training split (:func:`llmvem.data.splits.train_subset`), n_train ∈ {50, 100, 200, 400, all}. At every size:

* ``ridge`` — ridge on pooled layers, the layer set chosen on validation from train-only fits, then refitted on
  train + validation (the package's baseline convention: at n = 50 it sees 150 images);
* ``ridge_train`` — the same choice, fitted on the n training images only (the networks' data);
* ``lambda0`` — LLM-VEM, λ = 0, with the shared core;
* ``aligned`` — the same network at λ > 0 (label captions of the brain images);
* ``aligned_stream`` — ``aligned`` plus the Flickr8k images × 5 human captions without brain data
  (``align_data.spec=../shared/data/flickr8k_1000`` in the model's ``set``, weight 1).

λ of each aligned model is chosen once, at n = all, from ``--lambdas`` (default 0.3, 1, 3) by the package's rule
(:func:`llmvem.evaluate.selection.choose_model`) on the mean validation r over all neurons of all sessions. Reported
per (session, n, model) and pooled over sessions (per n): mean test r over neurons with the 95% interval of a
bootstrap over test images (:func:`llmvem.evaluate.pooled.runs_mean_ci`; test images resampled within each
session) and each model minus λ = 0, paired (:func:`llmvem.evaluate.pooled.compare_runs`, with the Wilcoxon and
sign tests over sessions).

Usage::

    python bench/bench_curves_v4.py            # 3 sessions × 5 sizes (see BENCHMARKS.md for the wall time)
    python bench/bench_curves_v4.py --quick    # 1 session, n ∈ {100, all}, short training
    python bench/bench_curves_v4.py --smoke    # tiny (80 images, 40 stream images): the test's run

Writes ``bench/results/curves_v4.json`` (``--out``; strict JSON with the provenance header) and a PNG plot beside
it (mean r vs n, one line per model, CI bands), appends one line to ``bench/results/ledger.csv`` (``--ledger``: the
test split is read) and prints the tables. Exits 0 with a message when the data are absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "bench" / "results" / "curves_v4.json"
LEDGER = ROOT / "bench" / "results" / "ledger.csv"
DEFAULT_SESSIONS = ("190925", "190927", "190928")
MODELS = ("ridge", "ridge_train", "lambda0", "aligned", "aligned_stream")
ALIGNED = ("aligned", "aligned_stream")
LABELS = {"ridge": "ridge (frozen, train+val)", "ridge_train": "ridge (frozen, train only)",
          "lambda0": "LLM-VEM λ=0 (core)", "aligned": "LLM-VEM λ>0 (core)",
          "aligned_stream": "LLM-VEM λ>0 + Flickr8k stream"}
#: Candidate pooled layer sets of both ridges (chosen on validation from train-only fits).
RIDGE_LAYER_SETS = [["block8", "block10", "block12"], ["block10"], ["block8", "block12", "pooled"]]
#: On top of ``v4_spatial``: the shared core that both λ = 0 and λ > 0 train, stage 1 only (cached features).
CURVE_OVERRIDES = ["model.core=linear", "model.core_dim=128", "train.stage2.epochs=0",
                   "evaluate.text_to_brain=false"]
QUICK_OVERRIDES = ["train.stage1.epochs=15"]
SMOKE_OVERRIDES = ["train.stage1.epochs=3"]
#: Seed of the nested training subsets.
SUBSET_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "v4_cowley2023", help="V4 data folder (default: %(default)s)")
    ap.add_argument("--flickr", type=Path, default=DATA / "flickr8k_1000",
                    help="captioned images of the stream (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help=f"session ids (default: {' '.join(DEFAULT_SESSIONS)})")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="training-set sizes, integers and/or 'all' (default: 50 100 200 400 all)")
    ap.add_argument("--lambdas", nargs="+", type=float, default=None,
                    help="λ grid of the aligned models, chosen on validation at n = all (default: 0.3 1 3)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 session, n ∈ {100, all}, λ ∈ {0.3, 3}, short training")
    mode.add_argument("--smoke", action="store_true", help="tiny run for the tests (80 images, 3 epochs)")
    ap.add_argument("--max-images", type=int, default=None,
                    help="keep only the first N images of each session (default: all; --smoke 80)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override KEY=VALUE (repeatable), applied last")
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 1000, --quick 200)")
    ap.add_argument("--cache-dir", default=None, help="captions / features cache (default: the config's)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_curves_v4",
                    help="run folders, SESSION/n_SIZE (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the results path with .png)")
    ap.add_argument("--ledger", type=Path, default=LEDGER, help="test-read ledger (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args(argv)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sessions, sizes, λ grid, bootstrap, image caps and config overrides of the chosen mode."""
    if args.smoke:
        s = {"sessions": ["210325"], "sizes": ["10", "20", "all"], "lambdas": [1.0], "bootstrap": 50,
             "max_images": 80, "stream_images": 40, "overrides": SMOKE_OVERRIDES}
    elif args.quick:
        s = {"sessions": [DEFAULT_SESSIONS[0]], "sizes": ["100", "all"], "lambdas": [0.3, 3.0], "bootstrap": 200,
             "max_images": None, "stream_images": None, "overrides": QUICK_OVERRIDES}
    else:
        s = {"sessions": list(DEFAULT_SESSIONS), "sizes": ["50", "100", "200", "400", "all"],
             "lambdas": [0.3, 1.0, 3.0], "bootstrap": 1000, "max_images": None, "stream_images": None,
             "overrides": []}
    for key in ("sessions", "sizes", "lambdas", "bootstrap", "max_images"):
        if getattr(args, key) is not None:
            s[key] = [str(x) for x in getattr(args, key)] if key == "sizes" else getattr(args, key)
    s["lambdas"] = [float(x) for x in s["lambdas"]]
    return s


def session_config(args: argparse.Namespace, settings: dict[str, Any], session: str):
    """``v4_spatial`` for one session with the curve's overrides (its ``evaluate.models`` emptied: the caller
    declares the models of each run)."""
    from llmvem.config import apply_overrides, load_config

    extra = [f"data.spec=v4:{args.data}:{session}", *([f"cache_dir={args.cache_dir}"] if args.cache_dir else [])]
    cfg = apply_overrides(load_config("v4_spatial"), [*extra, *CURVE_OVERRIDES, *settings["overrides"],
                                                      *args.overrides])
    cfg.evaluate.models = []
    cfg.evaluate.bootstrap = 0  # the intervals come from llmvem.evaluate.pooled, over the run folders
    return cfg


def model_entries(args: argparse.Namespace, settings: dict[str, Any], lambdas: dict[str, list[float]]):
    """The ``evaluate.models`` of one run: both ridges, λ = 0, and each aligned model at each λ of
    ``lambdas[kind]`` (named ``<kind>_lambda<λ>``)."""
    from llmvem.config_models import ModelEntry

    stream: dict[str, Any] = {"align_data.spec": str(args.flickr)}
    if settings["stream_images"]:
        stream["align_data.max_images"] = int(settings["stream_images"])
    entries = [ModelEntry(name="ridge", kind="ridge", label=LABELS["ridge"], layer_sets=RIDGE_LAYER_SETS),
               ModelEntry(name="ridge_train", kind="ridge", label=LABELS["ridge_train"], layer_sets=RIDGE_LAYER_SETS,
                          fit_splits=["train"]),
               ModelEntry(name="lambda0", kind="llmvem", label=LABELS["lambda0"], lambda_align=0.0)]
    for kind in ALIGNED:
        for lam in lambdas[kind]:
            entries.append(ModelEntry(name=entry_name(kind, lam), kind="llmvem", label=f"{LABELS[kind]} λ={lam:g}",
                                      lambda_align=lam, set=stream if kind == "aligned_stream" else {}))
    return entries


def entry_name(kind: str, lam: float) -> str:
    return f"{kind}_lambda{lam:g}"


def training_sizes(sizes: list[str], n_all: int) -> list[tuple[str, int]]:
    """(label, n_train) in increasing n: integers below ``n_all`` and ``"all"`` (= ``n_all``); larger ones are
    dropped (they would equal "all")."""
    out = sorted({int(s) for s in sizes if s != "all" and 0 < int(s) < n_all})
    pairs = [(str(n), n) for n in out]
    if "all" in sizes or not pairs:
        pairs.append(("all", n_all))
    return pairs


def fit_run(config, entries, dataset, out: Path, progress: bool) -> dict[str, Any]:
    """One run folder: ``entries`` fitted on ``dataset`` by the package's runner; returns its metrics.json."""
    from llmvem.inputs import prepare_inputs
    from llmvem.pipeline import extraction_config, run_experiment

    config = config.model_copy(deep=True)
    config.evaluate.models = entries
    inputs = prepare_inputs(extraction_config(config), show_progress=progress, dataset=dataset)
    return run_experiment(config, out, overwrite=True, show_progress=progress, report=False, inputs=inputs,
                          on_stage=lambda m: print(f"[curves_v4] {out.parent.name}/{out.name}: {m}",
                                               file=sys.stderr, flush=True))


def choose_lambdas(metrics_all: dict[str, dict[str, Any]], lambdas: list[float]) -> tuple[dict, dict, dict]:
    """λ of each aligned model: the package's selection rule on the mean validation r over all neurons of all
    sessions at n = all (each session's validation mean r weighted by its neurons).

    Returns (chosen λ per kind, validation r per kind and λ, the rule's reason per kind).
    """
    from llmvem.evaluate.selection import choose_model

    n = {sid: m["dataset"]["n_voxels"] for sid, m in metrics_all.items()}
    chosen, scores, reasons = {}, {}, {}
    for kind in ALIGNED:
        records = {}
        for lam in lambdas:
            vals = [(m["models"][entry_name(kind, lam)]["val_mean_r"], n[sid]) for sid, m in metrics_all.items()]
            ok = all(v is not None for v, _ in vals)
            records[f"{lam:g}"] = {"kind": "llmvem", "lambda": lam, "val_in_fit": False,
                                   "val_mean_r": sum(v * k for v, k in vals) / sum(k for _, k in vals) if ok else None}
        sel = choose_model(records)
        if sel.model is None:
            raise RuntimeError(f"curves_v4: no λ of {kind} has a validation mean r ({sel.reason()})")
        chosen[kind], reasons[kind] = float(sel.lam), sel.reason()
        scores[kind] = {k: r["val_mean_r"] for k, r in records.items()}
    return chosen, scores, reasons


def cell_statistics(runs: list[Path], names: dict[str, str], n_boot: int) -> tuple[dict, dict]:
    """Per model (``names``: curve model → model folder in the runs): mean test r over all neurons of ``runs`` with
    its bootstrap 95% CI, and every model minus λ = 0 (paired; with the tests over sessions)."""
    from llmvem.evaluate.pooled import compare_runs, runs_mean_ci

    models = {}
    for m in MODELS:
        r = runs_mean_ci(runs, names[m], n_boot=n_boot, seed=0)
        models[m] = {"mean_r": r["mean_r"], "ci": r["ci"], "n_neurons": r["n_voxels"]}
    vs = {}
    for m in MODELS:
        if m != "lambda0":
            c = compare_runs(runs, names["lambda0"], names[m], n_boot=n_boot, seed=0)
            p = c["pooled"]
            vs[m] = {"diff": p["delta_mean_r"], "ci": p["ci"], "p": p["p"]}
            if len(runs) > 1:
                vs[m]["over_sessions"] = c["over_sessions"]
    return models, vs


# ------------------------------------------------------------------------------------------------ output
def format_tables(results: dict[str, Any]) -> str:
    """Mean test r [95% CI] per size and model, pooled then per session; Δ vs λ = 0."""
    sizes = [c["size"] for c in results["pooled"]["sizes"]]
    ch = results["settings"]["lambda_chosen"]
    lines = [f"λ chosen on validation at n = all: aligned {ch['aligned']:g}, aligned_stream {ch['aligned_stream']:g}"]

    def table(title: str, cells: list[dict[str, Any]], n_label: str) -> None:
        lines.append(f"\n{title}")
        head = ["model"] + [f"n={c[n_label]}" for c in cells]
        rows = [head] + [[LABELS[m]] + [f"{c['models'][m]['mean_r']:.3f} [{c['models'][m]['ci'][0]:.3f}, "
                                        f"{c['models'][m]['ci'][1]:.3f}]" for c in cells] for m in MODELS]
        rows += [[f"Δ {m} − λ=0"] + [f"{c['vs_lambda0'][m]['diff']:+.4f} [{c['vs_lambda0'][m]['ci'][0]:+.4f}, "
                                     f"{c['vs_lambda0'][m]['ci'][1]:+.4f}]" for c in cells]
                 for m in MODELS if m != "lambda0"]
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines.extend("  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows)

    table(f"pooled over sessions {', '.join(results['sessions'])} (mean test r over all neurons [95% CI])",
          results["pooled"]["sizes"], "size")
    for sid, s in results["sessions"].items():
        table(f"session {sid} ({s['n_neurons']} neurons, {s['n_val']} val, {s['n_test']} test)", s["sizes"],
              "n_train")
    lines.append(f"\nsizes {sizes}; CIs: bootstrap over test images ({results['settings']['bootstrap']} resamples)")
    return "\n".join(lines)


def plot(results: dict[str, Any], path: Path) -> None:
    """Mean test r vs n_train (log axis), one line per model with its CI band: pooled, then each session."""
    panels = [(sid, s["sizes"]) for sid, s in results["sessions"].items()]
    if len(panels) > 1:
        panels.insert(0, ("pooled", results["pooled"]["sizes"]))
    out = []
    for title, cells in panels:
        x = [c["n_train"] if isinstance(c["n_train"], int) else c["n_train_mean"] for c in cells]
        lines = {LABELS[m]: ([c["models"][m]["mean_r"] for c in cells], [c["models"][m]["ci"][0] for c in cells],
                             [c["models"][m]["ci"][1] for c in cells]) for m in MODELS}
        out.append((title if title == "pooled" else f"session {title}", x, lines))
    plot_panels(out, path)


def plot_panels(panels: list[tuple[str, list[float], dict[str, tuple[list[float], list[float], list[float]]]]],
                path: Path) -> None:
    """Learning-curve PNG: one panel per (title, training-set sizes, {label: (mean, ci_low, ci_high)}), mean test r
    against the number of training images on a log axis, each line with its 95% CI band."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for ax, (title, x, lines) in zip(axes[0], panels, strict=True):
        for label, (mean, lo, hi) in lines.items():
            (line,) = ax.plot(x, mean, marker="o", label=label)
            ax.fill_between(x, lo, hi, color=line.get_color(), alpha=0.15)
        ax.set_xscale("log")
        ax.set_xticks(x, [f"{v:.0f}" for v in x])
        ax.minorticks_off()
        ax.set_xlabel("training images")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean test r (95% CI)")
    axes[0][-1].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -------------------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    for what, path in (("data folder", args.data), ("stream folder", args.flickr)):
        if not path.is_dir():
            print(f"bench_curves_v4: {what} {path} is absent; nothing to benchmark (use --data / --flickr)")
            return None
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(args.progress, args.threads)
    from llmvem.data.splits import first_images, train_subset
    from llmvem.inputs import load_config_dataset

    settings = run_settings(args)
    n_boot, lambdas = settings["bootstrap"], settings["lambdas"]
    t0 = time.perf_counter()
    # 1. n = all: every λ of the grid, one run per session; λ chosen on validation over all sessions
    data: dict[str, Any] = {}
    metrics_all: dict[str, dict[str, Any]] = {}
    for sid in settings["sessions"]:
        print(f"[curves_v4] session {sid}: n = all with the λ grid ...", file=sys.stderr, flush=True)
        config = session_config(args, settings, sid)
        ds = load_config_dataset(config)
        if settings["max_images"]:
            ds = first_images(ds, settings["max_images"])
        data[sid] = (config, ds, training_sizes(settings["sizes"], len(ds.train)))
        grid = model_entries(args, settings, {k: lambdas for k in ALIGNED})
        metrics_all[sid] = fit_run(config, grid, ds, args.runs_dir / sid / "n_all", args.progress)
    chosen, val_scores, reasons = choose_lambdas(metrics_all, lambdas)
    print(f"[curves_v4] λ chosen on validation: {chosen}", file=sys.stderr, flush=True)
    # 2. the smaller sizes at the chosen λ, on nested subsets of each session's training images
    sessions: dict[str, Any] = {}
    by_size: dict[str, dict[str, tuple[Path, int]]] = {}
    for sid, (config, ds, sizes) in data.items():
        cells = []
        for label, n in sizes:
            run = args.runs_dir / sid / f"n_{label}"
            t = time.perf_counter()
            if label == "all":
                metrics, seconds = metrics_all[sid], None
            else:
                entries = model_entries(args, settings, {k: [chosen[k]] for k in ALIGNED})
                metrics = fit_run(config, entries, train_subset(ds, n, seed=SUBSET_SEED), run, args.progress)
                seconds = time.perf_counter() - t
            names = {m: m if m not in ALIGNED else entry_name(m, chosen[m]) for m in MODELS}
            models, vs = cell_statistics([run], names, n_boot)
            for m in MODELS:
                rec = metrics["models"][names[m]]
                models[m] |= {"val_mean_r": rec.get("val_mean_r"), "val_in_fit": rec.get("val_in_fit", False)}
            cells.append({"size": label, "n_train": metrics["dataset"]["n_train"], "run": str(run),
                          "model_names": names, "ridge_details": metrics["models"]["ridge"].get("details"),
                          "models": models, "vs_lambda0": vs, "seconds": seconds})
            by_size.setdefault(label, {})[sid] = (run, metrics["dataset"]["n_train"])
            print(f"[curves_v4] session {sid} n={n}: " + ", ".join(f"{m} {models[m]['mean_r']:.3f}" for m in MODELS),
                  file=sys.stderr, flush=True)
        d = metrics_all[sid]["dataset"]
        sessions[sid] = {"n_neurons": d["n_voxels"], "n_train_all": d["n_train"], "n_val": d["n_val"],
                         "n_test": d["n_test"], "sizes": cells}
    # 3. pooled over sessions (sizes every session has)
    pooled_sizes = []
    for label, runs in by_size.items():
        if len(runs) != len(sessions):
            continue
        names = {m: m if m not in ALIGNED else entry_name(m, chosen[m]) for m in MODELS}
        models, vs = cell_statistics([r for r, _ in runs.values()], names, n_boot)
        n_train = {sid: n for sid, (_, n) in runs.items()}
        pooled_sizes.append({"size": label, "n_train": n_train, "n_train_mean": float(np.mean(list(n_train.values()))),
                             "models": models, "vs_lambda0": vs})
    pooled_sizes.sort(key=lambda c: c["n_train_mean"])
    config = data[settings["sessions"][0]][0]
    stream = metrics_all[settings["sessions"][0]]["models"][entry_name("aligned_stream", chosen["aligned_stream"])]
    results = {
        **result_header("curves_v4", "bench/bench_curves_v4.py", argv, config=config, seeds=[config.seed]),
        "settings": {"config": "v4_spatial", "sessions": settings["sessions"], "sizes": settings["sizes"],
                     "lambda_grid": lambdas, "lambda_chosen": chosen, "lambda_val_r": val_scores,
                     "lambda_reason": reasons, "bootstrap": n_boot, "max_images": settings["max_images"],
                     "quick": args.quick, "smoke": args.smoke, "subset_seed": SUBSET_SEED,
                     "models": {m: LABELS[m] for m in MODELS}, "ridge_layer_sets": RIDGE_LAYER_SETS,
                     "readout_layers": list(config.backbone.layers),
                     "stream": {"spec": str(args.flickr), **(stream.get("align_stream") or {})},
                     "overrides": [*CURVE_OVERRIDES, *settings["overrides"], *args.overrides]},
        "sessions": sessions,
        "pooled": {"sizes": pooled_sizes},
        "seconds_total": time.perf_counter() - t0,
    }
    write_results(args.out, results)
    append_ledger(args.ledger, "curves_v4", f"test: {', '.join(MODELS)} at n = {', '.join(by_size)} "
                  f"(λ chosen on validation){' (smoke)' if args.smoke else ''} -> {args.out.name}",
                  config=config, sessions=list(sessions))
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(results, plot_path)
    print(format_tables(results))
    print(f"results: {args.out}, plot: {plot_path}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
