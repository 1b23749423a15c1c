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

A second table (``--memory``) gives the size of the feature cache per 1,000 images for each spatial option of
EfficientNet-Lite0 at 224 px (:mod:`llmvem.embed.spatial`): pooled blocks, 2×2 / 4×4 / 7×7 grids, full maps and
512-d random projections of the maps, in float32 and float16. It is measured on ``--memory-images`` images
written to a real cache file (uncompressed HDF5, as llmvem writes it) and scaled to 1,000; the last column is the
file's storage of each dataset over its rows' bytes on the sample (the overhead is at most one partly filled
chunk of ≤ 1,024 rows and ≤ ~4 MB, so it vanishes at scale).

Usage::

    python bench/bench_features.py                           # lite0, resnet18, vit_tiny; 128 images (~1.5 min)
    python bench/bench_features.py --model timm:convnext_atto --n-images 256
    python bench/bench_features.py --memory-only             # the cache-memory table alone (~1 min)

Writes ``bench/results/features.json`` (``--out``; strict JSON with the provenance header).
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
DEFAULT_OUT = ROOT / "bench" / "results" / "features.json"
sys.path.insert(0, str(ROOT))

from llmvem.data.images import ArrayImages, FileImages, ImageCollection  # noqa: E402
from llmvem.embed import FeatureCache, compute_features, extract_features, load_backbone  # noqa: E402
from llmvem.provenance import result_header, write_results  # noqa: E402


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


def bench_one(name: str, fresh: Callable[[], ImageCollection], n: int, bs: int, repeats: int) -> dict:
    """Forward, end-to-end and cached-rerun images/s of backbone ``name`` (one table row, :func:`format_row`)."""
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
    return {"backbone": backbone.model_id, "params_m": n_params, "input_px": s, "forward_img_s": fwd,
            "end_to_end_img_s": e2e, "cached_img_s": cached}


def format_row(r: dict) -> str:
    return (f"| {r['backbone']} | {r['params_m']:.1f} M | {r['input_px']}² | {r['forward_img_s']:.1f} | "
            f"{r['end_to_end_img_s']:.1f} | {r['cached_img_s']:.0f} |")


MEMORY_BLOCKS = ("block2", "block5", "block8", "block12", "block15")
MEMORY_MODES = ("", "@grid2", "@grid4", "@grid7", "@map", "@proj512")


def cache_memory(fresh: Callable[[], ImageCollection], n: int, bs: int) -> list[dict]:
    """Feature-cache size per 1,000 images of each layer spec of EfficientNet-Lite0 at 224 px.

    Returns one dict per spec: ``spec``, ``shape`` (per image), ``mb_float32`` and ``mb_float16`` (MB per 1,000
    images: the rows' bytes measured on ``n`` images, scaled), ``storage_ratio_<dtype>`` (HDF5 storage of the
    dataset in the cache file / its rows' bytes, on the ``n`` images; > 1 by at most one partly filled chunk),
    ``seconds`` (float32 extraction of all specs at once, CPU).
    """
    import h5py

    backbone = load_backbone("efficientnet_lite0", device="cpu").eval()
    specs = ["pooled"] + [b + m for b in MEMORY_BLOCKS for m in MEMORY_MODES]
    rows: dict[str, dict] = {}
    for dtype in ("float32", "float16"):
        with tempfile.TemporaryDirectory() as tmp:
            cache = FeatureCache(Path(tmp) / "f.h5")
            t0 = time.perf_counter()
            images = fresh()
            result = compute_features(images, backbone, layers=specs, cache=cache, batch_size=bs, device="cpu",
                                      dtype=dtype, show_progress=False)  # type: ignore[arg-type]
            seconds = time.perf_counter() - t0
            with h5py.File(cache.path, "r") as f:
                grp = f[result.key]
                for spec in specs:
                    row = rows.setdefault(spec, {"spec": spec, "shape": tuple(grp[spec].shape[1:]),
                                                 "seconds": seconds})
                    raw = result.features[spec].nbytes
                    row[f"mb_{dtype}"] = raw / len(images) * 1000 / 1e6
                    # uncompressed HDF5: storage = raw + the unfilled rest of the last chunk (≤ 1 chunk, ≤ ~4 MB)
                    row[f"storage_ratio_{dtype}"] = grp[spec].id.get_storage_size() / raw
    return list(rows.values())


def format_memory(rows: list[dict]) -> str:
    lines = ["| layer spec | per image | values | MB / 1,000 images (float32) | (float16) | HDF5 file / rows, "
             "float32 (on the sample) |", "|---|---|---|---|---|---|"]
    for r in rows:
        shape = "×".join(str(v) for v in r["shape"])
        lines.append(f"| {r['spec']} | {shape} | {int(np.prod(r['shape'])):,} | {r['mb_float32']:.2f} | "
                     f"{r['mb_float16']:.2f} | {r['storage_ratio_float32']:.2f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", action="append", default=None,
                        help="backbone name (repeatable); default: efficientnet_lite0, timm:resnet18, "
                        "timm:vit_tiny_patch16_224")
    parser.add_argument("--n-images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--memory", action="store_true", help="also print the cache-memory table")
    parser.add_argument("--memory-only", action="store_true", help="only the cache-memory table")
    parser.add_argument("--memory-images", type=int, default=64, help="images the memory table is measured on")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")
    models = args.model or ["efficientnet_lite0", "timm:resnet18", "timm:vit_tiny_patch16_224"]
    fresh, what = bench_images(args.n_images)
    n, bs = len(fresh()), args.batch_size
    print(f"{what}, batch {bs}, torch {torch.__version__}, {torch.get_num_threads()} threads, CPU")
    print()
    results = {**result_header("feature_extraction", "bench/bench_features.py", argv, seeds=[0]),
               "settings": {"images": what, "batch_size": bs, "repeats": args.repeats,
                            "threads": torch.get_num_threads()}}
    if not args.memory_only:
        print("| backbone | params | input | forward img/s | end-to-end img/s | cached rerun img/s |")
        print("|---|---|---|---|---|---|")
        results["speed"] = []
        for name in models:
            results["speed"].append(bench_one(name, fresh, n, bs, args.repeats))
            print(format_row(results["speed"][-1]), flush=True)
        print()
    if args.memory or args.memory_only:
        mem_fresh, mem_what = bench_images(args.memory_images)
        rows = cache_memory(mem_fresh, args.memory_images, bs)
        print(f"Feature cache per 1,000 images, EfficientNet-Lite0 at 224 px (measured on {mem_what}, "
              f"{rows[0]['seconds']:.0f} s for all specs in float32):")
        print(format_memory(rows))
        results["cache_memory"] = {"images": mem_what, "rows": rows}
    write_results(args.out, results)
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
