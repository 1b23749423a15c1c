"""Feature-extraction speed on CPU at batch 32: EfficientNet-Lite0 and small timm models.

For each backbone three rates are measured (images per second, best of ``--repeats`` runs after one warm-up
batch):

* *forward*: the model alone on one preprocessed batch (B, 3, S, S) of the photos, under ``torch.inference_mode``;
* *end-to-end*: :func:`llmvem.embed.extract_features` without a cache on real JPEG files (decode, resize to the
  backbone's input size, normalise, forward, copy out) — what a first ``llmvem embed --images`` run sees;
* *cached*: the same call reading every row back from the HDF5 feature cache (a rerun: hashing the image files
  and reading the rows).

Images: the first ``--n-images`` Flickr8k photos of ``../shared/data/flickr8k_1000`` (~200×150 JPEGs), or random
images when that folder is absent. Threads: ``torch.get_num_threads()`` (2 on the dev box).

Usage::

    python bench/bench_features.py                           # lite0, resnet18, vit_tiny; 128 images (~1.5 min)
    python bench/bench_features.py --model timm:convnext_atto --n-images 256
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from llmvem.data.images import ArrayImages, FileImages, ImageCollection  # noqa: E402
from llmvem.embed import FeatureCache, extract_features, load_backbone  # noqa: E402


def bench_images(n: int) -> tuple[Callable[[], ImageCollection], str]:
    """A factory of fresh collections (content hashes are memoised per instance, a new process has none)."""
    folder = ROOT.parent / "shared" / "data" / "flickr8k_1000" / "images"
    if folder.is_dir():
        files = sorted(folder.glob("*.jpg"))[:n]
        return (lambda: FileImages(files)), f"{len(files)} Flickr8k JPEGs"
    array = np.random.default_rng(0).integers(0, 256, (n, 160, 200, 3), dtype=np.uint8)
    return (lambda: ArrayImages(array)), f"{n} random 200×160 images"


def best_rate(fn, n: int, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return n / min(times)


def bench_one(name: str, fresh: Callable[[], ImageCollection], n: int, bs: int, repeats: int) -> str:
    """One table row: forward, end-to-end and cached-rerun images/s of backbone ``name``."""
    # timm models are random-init here: speed does not depend on the weights, and nothing downloads.
    backbone = load_backbone(name, pretrained=name == "efficientnet_lite0", device="cpu").eval()
    s = backbone.image_size
    # Real photos, not random tensors: on this CPU EfficientNet-Lite0 runs ~1.5× slower on randn inputs.
    sample = fresh()
    x = backbone.preprocess(torch.from_numpy(np.stack([sample.load_array(i % len(sample), s) for i in range(bs)])))

    def forward() -> None:
        with torch.inference_mode():
            for _ in range(0, n, bs):
                backbone.features(x)

    def extract(cache: FeatureCache | None) -> None:
        extract_features(fresh(), backbone, cache=cache, batch_size=bs, device="cpu", show_progress=False)

    with torch.inference_mode():
        backbone.features(x)  # warm-up
    fwd = best_rate(forward, (n + bs - 1) // bs * bs, repeats)
    e2e = best_rate(lambda: extract(None), n, repeats)
    with tempfile.TemporaryDirectory() as tmp:
        cache = FeatureCache(Path(tmp) / "f.h5")
        extract(cache)
        cached = best_rate(lambda: extract(cache), n, repeats)
    n_params = sum(p.numel() for p in backbone.parameters()) / 1e6
    return f"| {backbone.model_id} | {n_params:.1f} M | {s}² | {fwd:.1f} | {e2e:.1f} | {cached:.0f} |"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="backbone name (repeatable); default: efficientnet_lite0, timm:resnet18, "
                        "timm:vit_tiny_patch16_224")
    parser.add_argument("--n-images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")
    models = args.model or ["efficientnet_lite0", "timm:resnet18", "timm:vit_tiny_patch16_224"]
    fresh, what = bench_images(args.n_images)
    n, bs = len(fresh()), args.batch_size
    print(f"{what}, batch {bs}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print()
    print("| backbone | params | input | forward img/s | end-to-end img/s | cached rerun img/s |")
    print("|---|---|---|---|---|---|")
    for name in models:
        print(bench_one(name, fresh, n, bs, args.repeats), flush=True)

if __name__ == "__main__":
    main()
