"""V4 learning curves: mean test r against the number of training images, for ridge, LLM-VEM λ = 0, λ > 0 and
λ > 0 with the Flickr8k captioned-image stream (issue 14, item 4).

Data: V4 development sessions of Cowley et al. (2023) (``../shared/data/v4_cowley2023``; default 190925, 190927,
190928), loaded and captioned exactly as ``bench/bench_v4.py`` does (its settings and helpers are imported: label
captions → MiniLM, EfficientNet-Lite0 at 112 px, features cached). The validation (100) and test (200) images of
each session are fixed; the training images are nested seeded subsets of the training split, n_train ∈ {50, 100,
200, 400, all}. At every size, on the same images:

* ``ridge`` — bench_v4's ridge: layer set chosen on validation by a ridge fitted on the n training images, then
  refitted on those + validation (the pipeline's baseline convention: at n = 50 it sees 150 images);
* ``ridge_train`` — the same layer set fitted on the n training images only (the networks' data);
* ``lambda0`` — LLM-VEM, λ = 0, with a shared trainable core (``model.core=linear``), stage 1 on cached features,
  readout on the ridge's layers;
* ``aligned`` — the same network and core at λ > 0 (label captions of the brain images);
* ``aligned_stream`` — ``aligned`` plus 1,000 Flickr8k images × 5 human captions without brain data
  (``align_data.spec=../shared/data/flickr8k_1000``, weight 1), loaded by the user's path
  (:class:`llmvem.estimators.LLMVEMEncoder` reads ``align_data`` from its config).

λ of each aligned model is chosen once, on validation at n = all (mean validation r over all neurons of all
sessions), from ``--lambdas`` (default 0.3, 1, 3). Reported per (session, n, model): mean test r across neurons
with a bootstrap 95% CI over test images (the same resamples for every model, so the intervals are paired), and
each model minus λ = 0 (paired bootstrap); pooled over sessions: the mean over all neurons, test images resampled
within each session.

Usage::

    python bench/bench_curves_v4.py            # 3 sessions × 5 sizes (see BENCHMARKS.md for the wall time)
    python bench/bench_curves_v4.py --quick    # 1 session, n ∈ {100, all}, short training
    python bench/bench_curves_v4.py --smoke    # tiny (80 images, 40 stream images): the test's run

Writes ``bench/results/curves_v4.json`` (``--out``) and a PNG plot beside it (mean r vs n, one line per model,
CI bands), and prints the tables. Exits 0 with a message when the data are absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_v4  # noqa: E402  (the V4 benchmark's settings and helpers)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_FLICKR = ROOT.parent / "shared" / "data" / "flickr8k_1000"
DEFAULT_OUT = ROOT / "bench" / "results" / "curves_v4.json"
DEFAULT_SESSIONS = ("190925", "190927", "190928")
MODELS = ("ridge", "ridge_train", "lambda0", "aligned", "aligned_stream")
LABELS = {"ridge": "ridge (frozen, train+val)", "ridge_train": "ridge (frozen, train only)", "lambda0": "LLM-VEM λ=0 (core)", "aligned": "LLM-VEM λ>0 (core)",
          "aligned_stream": "LLM-VEM λ>0 + Flickr8k stream"}
#: On top of bench_v4's settings: the shared core that both λ = 0 and λ > 0 train, stage 1 only (cached features).
CURVE_OVERRIDES = ["model.core=linear", "model.core_dim=128", "train.stage2.epochs=0"]
SMOKE_OVERRIDES = ["train.stage1.epochs=3", "align_data.max_images=40"]
#: Seed of the nested training subsets.
SUBSET_SEED = 0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=bench_v4.DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--flickr", type=Path, default=DEFAULT_FLICKR,
                    help="captioned images of the stream (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help=f"session ids (default: {' '.join(DEFAULT_SESSIONS)})")
    ap.add_argument("--sizes", nargs="+", default=None,
                    help="training-set sizes, integers and/or 'all' (default: 50 100 200 400 all)")
    ap.add_argument("--lambdas", nargs="+", type=float, default=None,
                    help="λ grid of the aligned models, chosen on validation at n = all (default: 0.3 1 3)")
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="1 session, n ∈ {100, all}, λ ∈ {0.3, 3}, short training")
    mode.add_argument("--smoke", action="store_true", help="tiny run for the tests (80 images, 3 epochs)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="extra config override KEY=VALUE (repeatable), applied last")
    ap.add_argument("--bootstrap", type=int, default=None, help="bootstrap resamples (default 1000, --quick 200)")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--plot", type=Path, default=None, help="PNG plot (default: the results path with .png)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args(argv)


def run_settings(args: argparse.Namespace) -> dict[str, Any]:
    """Sessions, sizes, λ grid, bootstrap, image cap and config overrides of the chosen mode."""
    if args.smoke:
        s = {"sessions": ["210325"], "sizes": ["10", "20", "all"], "lambdas": [1.0], "bootstrap": 50,
             "max_images": 80, "overrides": SMOKE_OVERRIDES}
    elif args.quick:
        s = {"sessions": [DEFAULT_SESSIONS[0]], "sizes": ["100", "all"], "lambdas": [0.3, 3.0], "bootstrap": 200,
             "max_images": None, "overrides": []}
    else:
        s = {"sessions": list(DEFAULT_SESSIONS), "sizes": ["50", "100", "200", "400", "all"],
             "lambdas": [0.3, 1.0, 3.0], "bootstrap": 1000, "max_images": None, "overrides": []}
    for key in ("sessions", "sizes", "lambdas", "bootstrap"):
        if getattr(args, key) is not None:
            s[key] = [str(x) for x in getattr(args, key)] if key == "sizes" else getattr(args, key)
    return s


def bench_args(args: argparse.Namespace, settings: dict[str, Any]) -> argparse.Namespace:
    """The arguments bench_v4's ``session_config`` reads (its ``--quick`` training for --quick and --smoke)."""
    extra = [*CURVE_OVERRIDES, *settings["overrides"], f"align_data.spec={args.flickr}", *args.overrides]
    return argparse.Namespace(data=args.data, quick=args.quick or args.smoke, stage2_epochs=None,
                              cache_dir=args.cache_dir, lam=settings["lambdas"][0], overrides=extra)


def plain_config(config):
    """``config`` without the stream (the λ = 0 and captions-only models)."""
    cfg = config.model_copy(deep=True)
    cfg.align_data.spec = None
    return cfg


# ------------------------------------------------------------------------------------------------ sizes
def training_sizes(sizes: list[str], n_all: int) -> list[tuple[str, int]]:
    """(label, n_train) in increasing n: integers below ``n_all`` and ``"all"`` (= ``n_all``); larger ones are
    dropped (they would equal "all")."""
    out = sorted({int(s) for s in sizes if s != "all" and 0 < int(s) < n_all})
    pairs = [(str(n), n) for n in out]
    if "all" in sizes or not pairs:
        pairs.append(("all", n_all))
    return pairs


def subset_inputs(inputs, n: int, seed: int = SUBSET_SEED):
    """The prepared inputs with the first ``n`` training images of a seeded permutation (nested in n: a smaller
    subset is a prefix of a larger one); validation and test unchanged, the alignment-stream memo shared."""
    n_all = len(inputs.dataset.train)
    if n >= n_all:
        return inputs
    idx = np.sort(np.random.default_rng(seed).permutation(n_all)[:n])
    ds = inputs.dataset
    dataset = replace(ds, splits={**ds.splits, "train": ds.train.subset(idx)})
    return replace(inputs, dataset=dataset,
                   captions={**inputs.captions, "train": [inputs.captions["train"][i] for i in idx]},
                   text_embeddings={**inputs.text_embeddings, "train": inputs.text_embeddings["train"][idx]},
                   features={**inputs.features, "train": {k: v[idx] for k, v in inputs.features["train"].items()}},
                   align_streams=inputs.align_streams)


# ------------------------------------------------------------------------------------------------ models
def fit_size(config, inputs, lam: dict[str, float], work: Path, layer_sets, show: bool,
             extra: tuple[str, ...] = ()) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, Any]]:
    """Ridge, λ = 0 and the aligned models of one (session, n) through bench_v4's ``fit_models``.

    ``lam`` maps ``aligned`` / ``aligned_stream`` to their λ; ``extra`` adds the models of other λ,
    named ``aligned@λ`` / ``aligned_stream@λ`` (the validation grid). Returns predictions per model and split, and
    details (ridge layers, validation r per layer set, seconds).
    """
    plain = plain_config(config)
    preds, info = bench_v4.fit_models(plain, inputs, lam["aligned"], work / "base", layer_sets, show,
                                      ("ridge", "lambda0_frozen", "lambda_frozen"), "ridge")
    from llmvem.estimators import RidgeEncoder

    layers = info["ridge_layers"]
    ridge_train = RidgeEncoder.from_config(plain, layers).set_params(fit_splits=("train",)).fit_inputs(inputs)
    out = {"ridge": preds["ridge"], "ridge_train": ridge_train.predict_inputs(inputs),
           "lambda0": preds["lambda0_frozen"], "aligned": preds["lambda_frozen"]}
    jobs = [("aligned_stream", lam["aligned_stream"])] + [(e.split("@")[0], float(e.split("@")[1])) for e in extra]
    names = ["aligned_stream", *extra]
    for name, (kind, lam_m) in zip(names, jobs, strict=True):
        cfg = (config if kind == "aligned_stream" else plain).model_copy(deep=True)
        cfg.backbone.layers = list(layers)
        p, i = bench_v4.fit_models(cfg, inputs, lam_m, work / name.replace("@", "_"), layer_sets, show,
                                   ("lambda_frozen",), "config")
        out[name] = p["lambda_frozen"]
        info["seconds"][name] = i["seconds"]["lambda_frozen"]
    return out, info


# -------------------------------------------------------------------------------------------- statistics
def session_cell(y: np.ndarray, preds: dict[str, np.ndarray], n_boot: int) -> tuple[dict, dict]:
    """Per model: mean test r and its bootstrap 95% CI (seed 0: the same resamples for every model); per aligned
    model and ridge: the paired difference to λ = 0 (diff, CI, p)."""
    from llmvem.evaluate.stats import bootstrap_ci, paired_bootstrap

    models = {}
    for name, p in preds.items():
        r = bootstrap_ci(y, p, n_boot=n_boot, seed=0)["overall"]["r"]
        models[name] = {"mean_r": r["mean"], "ci": [r["ci_low"], r["ci_high"]]}
    vs = {}
    for name in preds:
        if name != "lambda0":
            c = paired_bootstrap(y, preds["lambda0"], preds[name], n_boot=n_boot, seed=0)["overall"]
            vs[name] = {"diff": c["r"]["diff"], "ci": [c["r"]["ci_low"], c["r"]["ci_high"]],
                        "p": c["r"]["p_value"], "fraction_improved": c["fraction_improved"]}
    return models, vs


def pooled_mean_ci(per_session: list[tuple[np.ndarray, np.ndarray]], n_boot: int, seed: int = 0) -> dict[str, Any]:
    """Mean r over all neurons of all sessions with a bootstrap 95% CI (each session's test images resampled
    independently; the draws of ``bench_v4.pooled_bootstrap`` with the same seed, so the intervals of all models
    come from the same resamples)."""
    from llmvem.evaluate.metrics import pearson_r

    rng = np.random.default_rng(seed)
    obs = np.concatenate([pearson_r(y, p) for y, p in per_session])
    boots = np.zeros(n_boot)
    for i in range(n_boot):
        total = 0.0
        for y, p in per_session:
            idx = rng.integers(0, y.shape[0], y.shape[0])
            total += float(np.nansum(pearson_r(y[idx], p[idx])))
        boots[i] = total / obs.size
    lo, hi = np.percentile(boots, [2.5, 97.5])
    return {"mean_r": float(np.nanmean(obs)), "ci": [float(lo), float(hi)], "n_neurons": int(obs.size)}


def choose_lambda(val: dict[str, dict[float, list[tuple[np.ndarray, np.ndarray]]]]) -> tuple[dict, dict]:
    """λ of each aligned model: the best mean validation r over all neurons of all sessions at n = all.

    ``val[kind][λ]`` lists (validation responses, predictions) per session. Returns (chosen λ per kind,
    validation r per kind and λ).
    """
    from llmvem.evaluate.metrics import pearson_r

    scores = {kind: {lam: float(np.nanmean(np.concatenate([pearson_r(y, p) for y, p in pairs])))
                     for lam, pairs in grid.items()} for kind, grid in val.items()}
    chosen = {kind: max(s, key=lambda lam: s[lam]) for kind, s in scores.items()}
    return chosen, {kind: {f"{lam:g}": v for lam, v in s.items()} for kind, s in scores.items()}


# ------------------------------------------------------------------------------------------------ output
def format_tables(results: dict[str, Any]) -> str:
    """Mean test r [95% CI] per size and model, pooled then per session; Δ vs λ = 0 pooled."""
    sizes = [c["size"] for c in results["pooled"]["sizes"]]
    lines = [f"λ chosen on validation at n = all: aligned {results['settings']['lambda_chosen']['aligned']:g}, "
             f"aligned_stream {results['settings']['lambda_chosen']['aligned_stream']:g}"]

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
    bench_v4.offline_runtime(args.progress, args.threads)
    from llmvem.evaluate.metrics import pearson_r
    from llmvem.inputs import load_config_dataset, prepare_inputs

    settings = run_settings(args)
    bargs = bench_args(args, settings)
    layer_sets = bench_v4.QUICK_RIDGE_LAYER_SETS if bargs.quick else bench_v4.RIDGE_LAYER_SETS
    n_boot, lambdas = settings["bootstrap"], [float(x) for x in settings["lambdas"]]
    t0 = time.perf_counter()
    streams: dict[str, Any] = {}  # one stream load per layer set, shared by every session and size
    per: dict[str, dict[str, Any]] = {}
    val_grid: dict[str, dict[float, list]] = {"aligned": {}, "aligned_stream": {}}
    with tempfile.TemporaryDirectory(prefix="llmvem_curves_v4_") as tmp:
        # 1. inputs, sizes and the λ grid at n = all
        for sid in settings["sessions"]:
            print(f"[curves_v4] session {sid}: inputs and the λ grid at n = all ...", file=sys.stderr, flush=True)
            t = time.perf_counter()
            config = bench_v4.session_config(bargs, sid)
            ds = load_config_dataset(config)
            if settings["max_images"]:
                ds = bench_v4.truncate_dataset(ds, settings["max_images"])
            prep = plain_config(config)
            prep.backbone.layers = list(bench_v4.CANDIDATE_LAYERS)  # one cached extraction for every layer set
            inputs = replace(prepare_inputs(prep, show_progress=args.progress, dataset=ds), align_streams=streams)
            sizes = training_sizes(settings["sizes"], len(ds.train))
            lam0 = {"aligned": lambdas[0], "aligned_stream": lambdas[0]}
            extra = tuple(f"{k}@{lam:g}" for lam in lambdas[1:] for k in ("aligned", "aligned_stream"))
            preds, info = fit_size(config, inputs, lam0, Path(tmp) / sid / "all", layer_sets, args.progress, extra)
            for kind in val_grid:
                for lam in lambdas:
                    name = kind if lam == lambdas[0] else f"{kind}@{lam:g}"
                    val_grid[kind].setdefault(lam, []).append((ds.val.responses, preds[name]["val"]))
            per[sid] = {"config": config, "inputs": inputs, "sizes": sizes, "all": (preds, info),
                        "seconds": time.perf_counter() - t}
        chosen, val_scores = choose_lambda(val_grid)
        print(f"[curves_v4] λ chosen on validation: {chosen}", file=sys.stderr, flush=True)
        # 2. the curves at the chosen λ
        sessions: dict[str, Any] = {}
        pooled_in: dict[str, dict[str, tuple[np.ndarray, dict[str, np.ndarray]]]] = {}
        for sid, p in per.items():
            ds = p["inputs"].dataset
            cells = []
            for label, n in p["sizes"]:
                t = time.perf_counter()
                if label == "all":
                    preds_all, info = p["all"]
                    preds = {m: preds_all[m] for m in ("ridge", "ridge_train", "lambda0")}
                    for kind in ("aligned", "aligned_stream"):
                        lam = chosen[kind]
                        preds[kind] = preds_all[kind if lam == lambdas[0] else f"{kind}@{lam:g}"]
                else:
                    preds, info = fit_size(p["config"], subset_inputs(p["inputs"], n), chosen,
                                           Path(tmp) / sid / label, layer_sets, args.progress)
                test = {m: preds[m]["test"] for m in MODELS}
                models, vs = session_cell(ds.test.responses, test, n_boot)
                for m in MODELS:  # ridge is refitted on train + val: its score is ridge_train's (the layer choice's)
                    models[m]["val_mean_r"] = float(np.nanmean(pearson_r(
                        ds.val.responses, preds["ridge_train" if m == "ridge" else m]["val"])))
                cells.append({"size": label, "n_train": n, "ridge_layers": info["ridge_layers"], "models": models,
                              "vs_lambda0": vs, "seconds": time.perf_counter() - t if label != "all" else None})
                pooled_in.setdefault(label, {})[sid] = (ds.test.responses, test)
                print(f"[curves_v4] session {sid} n={n}: " + ", ".join(f"{m} {models[m]['mean_r']:.3f}"
                                                                     for m in MODELS), file=sys.stderr, flush=True)
            sessions[sid] = {"n_neurons": ds.n_voxels, "n_train_all": len(ds.train), "n_val": len(ds.val),
                             "n_test": len(ds.test), "sizes": cells, "seconds_inputs": p["inputs"].timing,
                             "seconds_lambda_grid": p["seconds"]}
    # 3. pooled over sessions (sizes every session has)
    pooled_sizes = []
    for label, by_session in pooled_in.items():
        if len(by_session) != len(sessions):
            continue
        models = {m: pooled_mean_ci([(y, t[m]) for y, t in by_session.values()], n_boot) for m in MODELS}
        vs = {}
        for m in MODELS:
            if m != "lambda0":
                b = bench_v4.pooled_bootstrap([(y, t["lambda0"], t[m]) for y, t in by_session.values()], n_boot, 0)
                vs[m] = {"diff": b["diff"], "ci": [b["ci_low"], b["ci_high"]], "p": b["p_value"],
                         "fraction_improved": b["fraction_improved"]}
        n_train = {sid: next(c["n_train"] for c in sessions[sid]["sizes"] if c["size"] == label) for sid in by_session}
        pooled_sizes.append({"size": label, "n_train": n_train, "n_train_mean": float(np.mean(list(n_train.values()))),
                             "models": models, "vs_lambda0": vs})
    pooled_sizes.sort(key=lambda c: c["n_train_mean"])
    stream = next(iter(streams.values()), None)
    results = {
        **bench_v4.result_header("curves_v4", "bench_curves_v4.py", argv),
        "settings": {"sessions": settings["sessions"], "sizes": settings["sizes"], "lambda_grid": lambdas,
                     "lambda_chosen": chosen, "lambda_val_r": val_scores, "bootstrap": n_boot,
                     "max_images": settings["max_images"], "quick": args.quick, "smoke": args.smoke,
                     "subset_seed": SUBSET_SEED, "models": {m: LABELS[m] for m in MODELS},
                     "stream": stream.describe() if stream is not None else None,
                     "overrides": [o for o in bench_v4.bench_overrides(bargs) if not o.startswith("cache_dir=")]},
        "sessions": sessions,
        "pooled": {"sizes": pooled_sizes},
        "seconds_total": time.perf_counter() - t0,
    }
    bench_v4.write_results(args.out, results)
    plot_path = args.plot or args.out.with_suffix(".png")
    plot(results, plot_path)
    print(format_tables(results))
    print(f"results: {args.out}, plot: {plot_path}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
