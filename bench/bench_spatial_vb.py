"""Spatial readouts on the virtual brain: do early-visual voxels gain over the pooled readout, and do semantic
voxels keep what they had?

The demo-like setting (the shipped ``demo`` config: virtual brain 500/100, EfficientNet-Lite0, readout layers
block5/block10/pooled, PCA voxel mapping, stage 1 on cached features) with λ = 0 and no stage 2, so the readout is
the only difference, against the same network plus a spatial readout (``model.spatial_readout``, residual mode)
on each candidate map (``backbone.spatial_layers``). The candidate with the best validation mean r is compared
with the pooled readout by a paired bootstrap over test images, per ROI (``early_visual``, ``semantic``); stage-1
wall time of the two is reported from the same run (train loops only, per epoch as well, since early stopping
may end them at different epochs).

A third row, **per-voxel choice**, needs no training: each voxel keeps the pooled or the chosen spatial model's
prediction, whichever has the higher validation r for that voxel (so semantic voxels that the spatial residual
does not help can keep the pooled readout); it is bootstrapped against the pooled readout as well.

Usage::

    python bench/bench_spatial_vb.py      # factorized on block5@grid7: ~7 min on the loaded 2-core box
    python bench/bench_spatial_vb.py --readouts factorized,gaussian --maps block5@grid7,block5@map   # ~25 min

Writes ``bench/results/spatial_vb.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from llmvem.config import apply_overrides, load_config
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.selection import choose_per_voxel, pick_per_voxel
from llmvem.evaluate.stats import paired_bootstrap
from llmvem.inputs import extract_split_features, load_config_backbone, load_config_dataset
from llmvem.train import train_encoding_model

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "spatial_vb.json"
ROIS = ("early_visual", "semantic")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--maps", default="block5@grid7", help="candidate spatial layers, comma-separated "
                    "(default: %(default)s)")
    ap.add_argument("--readouts", default="factorized", help="spatial readouts to try (default: "
                    "%(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--cache-dir", default=None, help="feature cache folder (default: the config's cache_dir)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    return ap.parse_args(argv)


def roi_r(y: np.ndarray, pred: np.ndarray, masks: dict[str, np.ndarray]) -> dict[str, float]:
    """Mean Pearson r over all voxels and within each ROI."""
    r = pearson_r(y, pred)
    return {"all": float(np.nanmean(r)), **{k: float(np.nanmean(r[masks[k]])) for k in ROIS}}


def train_one(config, ds, feats, out: Path) -> dict[str, Any]:
    res = train_encoding_model(config, ds, features=feats, out_dir=out, show_progress=False)
    st = res.stages["stage1"]
    return {"val": roi_r(ds.val.responses, res.predictions["val"], ds.roi_masks),
            "test": roi_r(ds.test.responses, res.predictions["test"], ds.roi_masks),
            "stage1_s": float(st["train_seconds"]), "epochs": int(st["epochs_run"]),
            "s_per_epoch": float(st["train_seconds"]) / max(int(st["epochs_run"]), 1),
            "pred_test": res.predictions["test"], "pred_val": res.predictions["val"]}


def per_voxel_choice(y_val: np.ndarray, a: dict[str, Any], b: dict[str, Any], y_test: np.ndarray,
                     masks: dict[str, np.ndarray]) -> dict[str, Any]:
    """Per voxel, run ``b``'s predictions where its validation r beats ``a``'s, else ``a``'s.

    Parameters
    ----------
    y_val : array of shape (n_val, n_voxels)
    a, b : dict
        Runs of :func:`train_one` (``pred_val``, ``pred_test`` of shapes (n_val | n_test, n_voxels)).
    y_test : array of shape (n_test, n_voxels)
    masks : dict of ROI → bool array of shape (n_voxels,)

    Returns
    -------
    dict shaped like a run of :func:`train_one` (no training time) plus ``fraction_b`` per ROI.
    """
    choice, _ = choose_per_voxel(y_val, [a["pred_val"], b["pred_val"]])  # ties keep a (pooled)
    use_b = choice == 1
    pred_val = pick_per_voxel([a["pred_val"], b["pred_val"]], choice)
    pred_test = pick_per_voxel([a["pred_test"], b["pred_test"]], choice)
    return {"val": roi_r(y_val, pred_val, masks), "test": roi_r(y_test, pred_test, masks), "stage1_s": 0.0,
            "epochs": 0, "s_per_epoch": 0.0, "pred_test": pred_test, "pred_val": pred_val,
            "fraction_b": {"all": float(use_b.mean()), **{k: float(use_b[masks[k]].mean()) for k in ROIS}}}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    base = ["model.lambda_align=0", "train.stage2.epochs=0", "train.device=cpu", *args.overrides]
    if args.cache_dir:
        base.append(f"cache_dir={args.cache_dir}")
    config = apply_overrides(load_config("demo"), base)
    maps = [m for m in args.maps.split(",") if m]
    kinds = [k for k in args.readouts.split(",") if k]
    t0 = time.perf_counter()
    ds = load_config_dataset(config)
    backbone = load_config_backbone(config)
    feats = extract_split_features(config, ds, backbone, layers=[*config.backbone.layers, *maps],
                                   show_progress=False)
    feat_s = time.perf_counter() - t0
    runs: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        runs["pooled"] = train_one(config, ds, feats, Path(tmp) / "pooled")
        for m in maps:
            for kind in kinds:
                name = f"{kind} on {m}"
                cfg = apply_overrides(config, [f"backbone.spatial_layers=[{m}]", f"model.spatial_readout={kind}"])
                runs[name] = train_one(cfg, ds, feats, Path(tmp) / name.replace(" ", "_"))
                print(f"{name}: val r {runs[name]['val']['all']:.4f}", flush=True)
    best = max((k for k in runs if k != "pooled"), key=lambda k: runs[k]["val"]["all"])
    masks = {k: ds.roi_masks[k] for k in ROIS}
    boot = paired_bootstrap(ds.test.responses, runs["pooled"]["pred_test"], runs[best]["pred_test"],
                            n_boot=args.n_boot, seed=0, roi_masks=masks)
    choice = f"per-voxel choice (pooled or {best})"
    runs[choice] = per_voxel_choice(ds.val.responses, runs["pooled"], runs[best], ds.test.responses, ds.roi_masks)
    boot_choice = paired_bootstrap(ds.test.responses, runs["pooled"]["pred_test"], runs[choice]["pred_test"],
                                   n_boot=args.n_boot, seed=0, roi_masks=masks)

    print(f"\nvirtual brain {config.data.n_train}/{config.data.n_test}, {config.backbone.name} {config.backbone.layers}, "
          f"λ = 0, stage 1 only; "
          f"features {feat_s:.0f} s\n")
    print("| readout | val r | test r all | test r early visual | test r semantic | stage 1 s | epochs | s/epoch |")
    print("|---|---|---|---|---|---|---|---|")
    for name, r in runs.items():
        mark = " (chosen)" if name == best else ""
        print(f"| {name}{mark} | {r['val']['all']:.3f} | {r['test']['all']:.3f} | {r['test']['early_visual']:.3f} | "
              f"{r['test']['semantic']:.3f} | {r['stage1_s']:.1f} | {r['epochs']} | {r['s_per_epoch']:.2f} |")
    fr = runs[choice]["fraction_b"]
    print(f"\n{choice}: fraction of voxels taking the spatial model: all {fr['all']:.2f}, "
          + ", ".join(f"{k} {fr[k]:.2f}" for k in ROIS))
    for name, bt in ((best, boot), (choice, boot_choice)):
        print(f"\npaired bootstrap over {bt['n_images']} test images ({args.n_boot} resamples), {name} − pooled:\n")
        print("| voxels | n | Δ mean r | 95% CI | p | fraction improved |")
        print("|---|---|---|---|---|---|")
        for label, g in [("all", bt["overall"]), *bt["per_roi"].items()]:
            c = g["r"]
            print(f"| {label} | {g['n_voxels']} | {c['diff']:+.4f} | [{c['ci_low']:+.4f}, {c['ci_high']:+.4f}] | "
                  f"{c['p_value']:.3g} | {g['fraction_improved']:.2f} |")
    ratio = runs[best]["stage1_s"] / max(runs["pooled"]["stage1_s"], 1e-9)
    ratio_ep = runs[best]["s_per_epoch"] / max(runs["pooled"]["s_per_epoch"], 1e-9)
    print(f"\nstage-1 wall time, {best} / pooled: {ratio:.2f}× in total, {ratio_ep:.2f}× per epoch")
    result = {"setting": {"config": "demo", "overrides": base, "maps": maps, "readouts": kinds},
              "feature_seconds": feat_s, "chosen": best, "stage1_time_ratio": ratio,
              "stage1_time_ratio_per_epoch": ratio_ep,
              "runs": {k: {kk: vv for kk, vv in v.items() if not kk.startswith("pred_")} for k, v in runs.items()},
              "bootstrap": boot, "bootstrap_per_voxel_choice": boot_choice, "machine": {"platform": platform.platform(), "torch": torch.__version__,
                                             "threads": torch.get_num_threads()}}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
