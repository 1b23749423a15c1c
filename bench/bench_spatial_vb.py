"""Spatial readouts on the virtual brain: do early-visual voxels gain over the pooled readout, and do semantic
voxels keep what they had? A client of llmvem.

The shipped ``demo`` config (virtual brain 500/100, EfficientNet-Lite0, readout layers block5/block10/pooled, PCA
voxel mapping, stage 1 on cached features) at λ = 0 with no stage 2, so the readout is the only difference, with
``evaluate.per_voxel_choice``: one :func:`llmvem.pipeline.run_experiment` run folder per candidate spatial readout
(``model.spatial_readout`` in residual mode on the map ``backbone.spatial_layers``), each with the runner's models

* ``llmvem_lambda0`` — the network with the spatial readout;
* ``llmvem_lambda0_pooled`` — the same network without it (pooled readout only);
* ``per_voxel_choice`` — per voxel, the pooled or the spatial model's prediction, whichever has the higher
  validation r for that voxel (so semantic voxels that the spatial residual does not help keep the pooled one);

and the runner's paired bootstraps over test images, per ROI (``early_visual``, ``semantic``). With several
candidates (``--maps``, ``--readouts``) the one with the best validation mean r (:func:`llmvem.evaluate.selection.
choose_model`) is reported. Stage-1 wall time of the spatial and pooled models comes from their training records
(train loops only; per epoch as well, since early stopping may end them at different epochs).

Usage::

    python bench/bench_spatial_vb.py --set model.spatial_l1=1e-4     # factorized on block5@grid7
    python bench/bench_spatial_vb.py --readouts factorized,gaussian --maps block5@grid7,block5@map

Writes ``bench/results/spatial_vb.json`` (``--out``; strict JSON with the provenance header) and, since it prints
test figures of the virtual brain's test split, one line of ``bench/results/ledger.csv``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "spatial_vb.json"
ROIS = ("early_visual", "semantic")
SPATIAL, POOLED, CHOICE = "llmvem_lambda0", "llmvem_lambda0_pooled", "per_voxel_choice"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maps", default="block5@grid7", help="candidate spatial layers, comma-separated "
                    "(default: %(default)s)")
    ap.add_argument("--readouts", default="factorized", help="spatial readouts to try (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--cache-dir", default=None, help="feature cache folder (default: the config's cache_dir)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_spatial_vb",
                    help="one run folder per candidate (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=ROOT / "bench" / "results" / "ledger.csv",
                    help="test-read ledger (default: %(default)s)")
    return ap.parse_args(argv)


def base_overrides(args: argparse.Namespace) -> list[str]:
    """λ = 0 only (no ridge, no λ > 0), stage 1 only, no variance partition; then ``--set``. (The per-voxel choice
    is switched on with each candidate's spatial readout: the config refuses it without one.)"""
    base = ["model.lambda_align=0", "evaluate.compare_lambdas=[]", "evaluate.baselines=[]", "train.stage2.epochs=0",
            "train.device=cpu", "evaluate.text_to_brain=false", "evaluate.variance_partition=false",
            f"evaluate.bootstrap={args.n_boot}"]
    return [*base, *([f"cache_dir={args.cache_dir}"] if args.cache_dir else []), *args.overrides]


def stage1(run: Path, model: str) -> dict[str, float]:
    """Stage-1 loop seconds, epochs and seconds per epoch from a model's training record."""
    from llmvem.train.load import read_training_summary

    st = read_training_summary(run / "models" / model)["stages"]["stage1"]
    return {"stage1_s": float(st["train_seconds"]), "epochs": int(st["epochs_run"]),
            "s_per_epoch": float(st["train_seconds"]) / max(int(st["epochs_run"]), 1)}


def fraction_spatial(choice: dict[str, Any]) -> dict[str, float]:
    """Fraction of voxels whose per-voxel choice took the spatial model, of all voxels and per ROI (from the
    ``per_voxel_choice`` record of metrics.json: :attr:`llmvem.PerVoxelChoice.choice_summary_`)."""
    return {"all": choice["fractions"]["spatial"],
            **{roi: choice["fractions_per_roi"][roi]["spatial"] for roi in ROIS if roi in choice["fractions_per_roi"]}}


def delta(c: dict[str, Any], flip: bool = False) -> dict[str, Any]:
    """A comparison record of metrics.json as (b − a) per voxel group; ``flip`` reports a − b instead."""
    def one(g: dict[str, Any]) -> dict[str, Any]:
        s = -1.0 if flip else 1.0
        lo, hi = sorted((s * g["ci_low"], s * g["ci_high"]))
        return {"diff": s * g["diff"], "ci": [lo, hi], "p": g["p_value"],
                "fraction_improved": 1.0 - g["fraction_improved"] if flip else g["fraction_improved"]}

    return {"all": one(c), **{roi: one(c["per_roi"][roi]) for roi in ROIS if roi in c["per_roi"]}}


def format_tables(res: dict[str, Any]) -> str:
    lines = [f"virtual brain, demo config, λ = 0, stage 1 only; candidate chosen on validation: {res['chosen']}", "",
             "| readout | val r | test r all | test r early visual | test r semantic | stage 1 s | epochs | s/epoch |",
             "|---|---|---|---|---|---|---|---|"]
    for name, r in res["models"].items():
        t = r.get("stage1", {})
        lines.append(f"| {name} | {r['val_mean_r']:.3f} | {r['test']['all']:.3f} | {r['test']['early_visual']:.3f} "
                     f"| {r['test']['semantic']:.3f} | {t.get('stage1_s', 0):.1f} | {t.get('epochs', 0)} | "
                     f"{t.get('s_per_epoch', 0):.2f} |")
    fr = res["per_voxel_choice_fraction_spatial"]
    lines.append("\nper-voxel choice: fraction of voxels taking the spatial model: "
                 + ", ".join(f"{g} {v:.2f}" for g, v in fr.items()))
    for key, d in res["vs_pooled"].items():
        lines += [f"\npaired bootstrap over the test images ({res['n_boot']} resamples), {key} − pooled:", "",
                  "| voxels | Δ mean r | 95% CI | p | fraction improved |", "|---|---|---|---|---|"]
        lines += [f"| {g} | {v['diff']:+.4f} | [{v['ci'][0]:+.4f}, {v['ci'][1]:+.4f}] | {v['p']:.3g} | "
                  f"{v['fraction_improved']:.2f} |" for g, v in d.items()]
    lines.append(f"\nstage-1 wall time, spatial / pooled: {res['stage1_time_ratio']:.2f}× in total, "
                 f"{res['stage1_time_ratio_per_epoch']:.2f}× per epoch")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    from llmvem.config import apply_overrides, load_config
    from llmvem.evaluate.selection import choose_model
    from llmvem.pipeline import run_experiment
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime()
    base = base_overrides(args)
    config = apply_overrides(load_config("demo"), base)
    candidates = [(m, k) for m in args.maps.split(",") if m for k in args.readouts.split(",") if k]
    runs: dict[str, tuple[Path, dict[str, Any]]] = {}
    for m, kind in candidates:
        name = f"{kind} on {m}"
        cfg = apply_overrides(config, [f"backbone.spatial_layers=[{m}]", f"model.spatial_readout={kind}",
                                       "evaluate.per_voxel_choice=true"])
        run = args.runs_dir / f"{kind}_{m.replace('@', '_')}"
        metrics = run_experiment(cfg, run, overwrite=True, show_progress=False, report=False,
                                 on_stage=lambda s, n=name: print(f"[bench_spatial_vb] {n}: {s}", file=sys.stderr,
                                                                  flush=True))
        runs[name] = (run, metrics)
        print(f"{name}: val r {metrics['models'][SPATIAL]['val_mean_r']:.4f}", file=sys.stderr, flush=True)
    chosen = choose_model({n: r[1]["models"][SPATIAL] for n, r in runs.items()}).model or next(iter(runs))
    run, metrics = runs[chosen]
    names = {"pooled": POOLED, chosen: SPATIAL, f"per-voxel choice (pooled or {chosen})": CHOICE}
    models: dict[str, Any] = {}
    for label, model in names.items():
        m = metrics["models"][model]
        models[label] = {"model": model, "val_mean_r": m["val_mean_r"],
                         "test": {"all": m["mean_r"], **{roi: m["per_roi"][roi]["mean_r"] for roi in ROIS}}}
        if model != CHOICE:
            models[label]["stage1"] = stage1(run, model)
    for other, (_, met) in runs.items():
        if other != chosen:
            models[other] = {"model": SPATIAL, "val_mean_r": met["models"][SPATIAL]["val_mean_r"], "test": {
                "all": met["models"][SPATIAL]["mean_r"],
                **{roi: met["models"][SPATIAL]["per_roi"][roi]["mean_r"] for roi in ROIS}}}
    cmps = {(c["a"], c["b"]): c for c in metrics["comparisons"]}
    vs_pooled = {chosen: delta(cmps[(SPATIAL, POOLED)], flip=True),  # the runner reports pooled − spatial
                 f"per-voxel choice (pooled or {chosen})": delta(cmps[(POOLED, CHOICE)])}
    sp, po = models[chosen]["stage1"], models["pooled"]["stage1"]
    res = {**result_header("virtual_brain_spatial", "bench/bench_spatial_vb.py", argv, config=config,
                           seeds=[config.seed]),
           "settings": {"config": "demo", "overrides": base, "maps": args.maps, "readouts": args.readouts},
           "runs": {n: str(r[0]) for n, r in runs.items()}, "chosen": chosen, "models": models,
           "per_voxel_choice_fraction_spatial": fraction_spatial(metrics["models"][CHOICE]["per_voxel_choice"]),
           "vs_pooled": vs_pooled, "n_boot": args.n_boot,
           "stage1_time_ratio": sp["stage1_s"] / max(po["stage1_s"], 1e-9),
           "stage1_time_ratio_per_epoch": sp["s_per_epoch"] / max(po["s_per_epoch"], 1e-9),
           "feature_seconds": metrics["timing"]["stages"].get("image_features")}
    write_results(args.out, res)
    append_ledger(args.ledger, "bench_spatial_vb", f"test: pooled, {chosen}, per-voxel choice -> {args.out.name}",
                  config=config, sessions=["virtual"])
    print(format_tables(res))
    print(f"results: {args.out}  (run folders under {args.runs_dir})")
    return res


if __name__ == "__main__":
    main()
