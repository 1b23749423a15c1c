"""Quick V4 check of spatial features: ridge on grid-pooled vs globally pooled EfficientNet-Lite0 blocks.

A direction check for issue 15 on ONE V4 session (not the 9-session target of ``bench/bench_v4.py``): on the
split of :func:`llmvem.data.v4.load_v4` (every 6th image is a test image, 10% of the rest validation), frozen
EfficientNet-Lite0 features at the V4 stimuli's native 112 px (as ``bench_v4``) are read as

* ``pooled`` — each block averaged over space (what llmvem extracted before);
* ``grid2`` / ``grid4`` — each block's map adaptive-average pooled to a 2×2 / 4×4 grid
  (``"block8@grid4"``, :mod:`llmvem.embed.spatial`), flattened.

For each family, the layer set (single blocks and one pair) is chosen by the mean validation r of a voxelwise
RidgeCV fitted on the training split (features z-scored with training statistics,
:class:`llmvem.model.features.FeatureStandardizer`), then refitted on train + val (``bench_v4``'s convention)
and scored on the test images: mean and median r across neurons, and a paired bootstrap over test images of each
grid family's mean r against the pooled family's.

Usage::

    python bench/bench_spatial_v4.py                       # session 210322, ~2-4 min on 2 CPU cores
    python bench/bench_spatial_v4.py --session 190925 --grids 2 4 7

Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
BLOCKS = ("block5", "block8", "block10", "block12", "block15")
PAIR = ("block8", "block12")


def layer_sets(mode: str) -> list[tuple[str, ...]]:
    """Candidate layer sets of one family: every block alone and the pair, with ``mode`` (``""`` = pooled,
    ``"@grid4"`` ...) appended to each block name."""
    return [(b + mode,) for b in BLOCKS] + [tuple(b + mode for b in PAIR)]


def _fit_predict(x_fit: np.ndarray, y_fit: np.ndarray, x_eval: np.ndarray, alphas: np.ndarray) -> np.ndarray:
    from llmvem.evaluate.ridge import RidgeCV
    from llmvem.model.features import FeatureStandardizer

    std = FeatureStandardizer().fit(x_fit)
    ridge = RidgeCV(alphas=alphas, cv=5, progress_bar=False).fit(std.transform(x_fit), y_fit)
    return ridge.predict(std.transform(x_eval))


def spatial_ridge_v4(root: Path, session: str, grids: Sequence[int] = (2, 4), image_size: int = 112,
                     n_boot: int = 1000, max_images: int | None = None) -> dict[str, Any]:
    """Ridge on pooled vs grid-pooled block features of one V4 session; layer sets chosen on validation.

    ``max_images`` keeps the first images of each split, about that many in total (split proportions kept; for
    smoke tests).

    Returns
    -------
    dict with ``session``, ``n_images`` per split, ``n_neurons``, ``seconds`` and ``families``: family name →
    ``{"layers", "val_r": {set: mean val r}, "test_mean_r", "test_median_r", "dim"}``, and ``"vs_pooled"``
    (paired bootstrap of the mean test r, grid family b against pooled a) for grid families.
    """
    from llmvem.data.v4 import load_v4
    from llmvem.embed.cache import extract_features
    from llmvem.embed.image import load_backbone
    from llmvem.evaluate.metrics import pearson_r
    from llmvem.evaluate.stats import paired_bootstrap
    from llmvem.model.features import concat_features

    t0 = time.perf_counter()
    ds = load_v4(root, session)
    splits = {name: ds.splits[name] for name in ("train", "val", "test")}
    total = sum(len(sp) for sp in splits.values())
    if max_images and max_images < total:
        splits = {name: sp.subset(np.arange(min(len(sp), max(8, round(max_images * len(sp) / total)))))
                  for name, sp in splits.items()}
    families = {"pooled": ""} | {f"grid{g}": f"@grid{g}" for g in grids}
    specs = sorted({spec for mode in families.values() for s in layer_sets(mode) for spec in s})
    backbone = load_backbone("efficientnet_lite0", image_size=image_size)
    feats = {split: extract_features(splits[split].images, backbone, layers=specs, cache=None, batch_size=64,
                                     device="cpu", show_progress=False) for split in ("train", "val", "test")}
    t_feat = time.perf_counter() - t0
    y = {split: splits[split].responses for split in ("train", "val", "test")}
    alphas = np.logspace(-1, 6, 8)
    out: dict[str, Any] = {"session": session, "image_size": image_size, "n_neurons": int(y["train"].shape[1]),
                           "n_images": {k: int(len(v)) for k, v in y.items()}, "families": {}}
    test_pred: dict[str, np.ndarray] = {}
    for family, mode in families.items():
        val_r = {}
        for ls in layer_sets(mode):
            pred = _fit_predict(concat_features(feats["train"], ls), y["train"], concat_features(feats["val"], ls),
                                alphas)
            val_r["+".join(ls)] = float(np.nanmean(pearson_r(y["val"], pred)))
        best = max(layer_sets(mode), key=lambda ls: val_r["+".join(ls)])
        x_fit = np.concatenate([concat_features(feats["train"], best), concat_features(feats["val"], best)])
        pred = _fit_predict(x_fit, np.concatenate([y["train"], y["val"]]), concat_features(feats["test"], best),
                            alphas)
        r = pearson_r(y["test"], pred)
        test_pred[family] = pred
        out["families"][family] = {"layers": list(best), "dim": int(x_fit.shape[1]), "val_r": val_r,
                                   "test_mean_r": float(np.nanmean(r)), "test_median_r": float(np.nanmedian(r))}
        if family != "pooled":
            cmp = paired_bootstrap(y["test"], test_pred["pooled"], pred, n_boot=n_boot)["overall"]["r"]
            out["families"][family]["vs_pooled"] = cmp
    out["seconds"] = {"features": t_feat, "total": time.perf_counter() - t0}
    return out


def format_table(res: dict[str, Any]) -> str:
    lines = [f"V4 session {res['session']} ({res['n_neurons']} neurons; train/val/test "
             f"{res['n_images']['train']}/{res['n_images']['val']}/{res['n_images']['test']} images), "
             f"EfficientNet-Lite0 at {res['image_size']} px, ridge; layers chosen on validation",
             "| features | chosen layers | dim | val r | test mean r | test median r | Δ mean r vs pooled [95% CI] |",
             "|---|---|---|---|---|---|---|"]
    for family, f in res["families"].items():
        cmp = f.get("vs_pooled")
        delta = (f"{cmp['diff']:+.3f} [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]" if cmp else "-")
        lines.append(f"| {family} | {' + '.join(f['layers'])} | {f['dim']} | {f['val_r']['+'.join(f['layers'])]:.3f} "
                     f"| {f['test_mean_r']:.3f} | {f['test_median_r']:.3f} | {delta} |")
    lines.append(f"({res['seconds']['total']:.0f} s, of which features {res['seconds']['features']:.0f} s)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--session", default="210322", help="session id (default: %(default)s)")
    ap.add_argument("--grids", type=int, nargs="+", default=[2, 4], help="grid sides G (default: 2 4)")
    ap.add_argument("--image-size", type=int, default=112, help="backbone input px (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--max-images", type=int, default=None, help="about N images in all (smoke tests)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_spatial_v4: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    res = spatial_ridge_v4(args.data, args.session, args.grids, args.image_size, args.n_boot, args.max_images)
    print(format_table(res))
    return res


if __name__ == "__main__":
    main()
