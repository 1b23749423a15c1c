"""Positive control of language alignment on the virtual brain, with and without extra captioned scenes.

The virtual brain's ``relational`` voxels respond to what the exact scene descriptions state in words but frozen,
spatially pooled image features encode poorly (number of objects, positions, same-category pairs, category
pairs; see :mod:`llmvem.data.virtual_brain`). With few training images (150 + 50 validation), MiniLM embeddings
of the exact descriptions and EfficientNet-Lite0 features (cached), this benchmark trains LLM-VEM with a shared
core (``model.core`` linear/mlp, chosen on validation at λ = 0) and compares, on the relational voxels of 200 test
images, λ > 0 (chosen on validation) with λ = 0 **with the same core**, by a paired bootstrap over test images:

* ``positive_control``: captions only for the images with responses;
* ``positive_control_extra``: plus a captioned-image stream of many more scenes without responses
  (``align_data.spec = virtual-scenes:n=N,seed=7``);
* shuffled descriptions (permuted across the images of each split, and across the stream) at the same settings
  are the control that must not help.

Diagnostics (why λ helps or not): ridge from the core output (fitted on the training images) to the 17 ground-
truth relational attributes, test r; image→caption top-1 retrieval among the validation images. Learning curves:
mean test r on the relational voxels against the number of training images for ridge, λ = 0, λ > 0 and λ > 0 with
the stream, with bootstrap 95% CIs. ``rsa92``: the 92-image RSA of language-aligned encoders (descriptions and
label captions → MiniLM, backbone layers, an encoder aligned on Flickr8k captions only, LLM-VEM on V4 with and
without the Flickr8k stream) with a bootstrap over images (``bench/rsa92_alignment.py``; skipped without
``../shared/data``).

Usage::

    python bench/bench_alignment.py            # full: 100 epochs, 2,000 extra scenes, + stage 2 (4 epochs)
    python bench/bench_alignment.py --quick    # λ ∈ {1, 3}, 500 extra scenes, n ∈ {50, 150}, no stage 2
    python bench/bench_alignment.py --quick --readout-aligned   # + the no-core readout-on-the-embedding rows
    python bench/bench_alignment.py --smoke    # tiny, for the test suite

``positive_control_stage2`` / ``positive_control_extra_stage2`` repeat the comparison with the backbone fine-tuned
(``--stage2 EPOCHS``; blocks 8-15 and the head; one λ = 0 fine-tuned model for both). Timing on the shared dev
box (2026-12-02, load average ~3.5-4 on 2 cores, one thread): full 1,813 s (932 s of it stage 2); ``--quick``
657 s (2026-12-02, beside two V4 runs).

Writes ``bench/results/alignment.json`` (``--out``) and the learning-curve plot beside it (``alignment.png``).
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))  # bench/ modules, also when imported from elsewhere

from llmvem import inputs
from llmvem.config import RunConfig, apply_overrides
from llmvem.data import load_dataset
from llmvem.data.dataset import EncodingDataset
from llmvem.evaluate.metrics import pearson_r
from llmvem.evaluate.stats import paired_bootstrap
from llmvem.model.ridge import RidgeCV
from llmvem.train import train_encoding_model
from llmvem.train.stream import CaptionStream, load_align_stream
from llmvem.utils import floored_std

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "alignment.json"
SPLITS = ("train", "val", "test")

#: Sizes and sweeps of each mode.
MODES: dict[str, dict[str, Any]] = {
    "full": {"n_train": 150, "n_val": 50, "n_test": 200, "n_extra": 2000, "cores": ["linear", "mlp"],
             "lambdas": [0.1, 0.3, 1.0, 3.0], "curve": [50, 100, 200, 400], "epochs": 100, "n_boot": 2000,
             "image_size": 96, "stage2_epochs": 4},
    "quick": {"n_train": 150, "n_val": 50, "n_test": 200, "n_extra": 500, "cores": ["linear"],
              "lambdas": [1.0, 3.0], "curve": [50, 150], "epochs": 30, "n_boot": 1000, "image_size": 96,
              "stage2_epochs": 0},
    "smoke": {"n_train": 30, "n_val": 16, "n_test": 30, "n_extra": 60, "cores": ["linear"], "lambdas": [1.0],
              "curve": [20, 30], "epochs": 3, "n_boot": 50, "image_size": 48,
              "stage2_epochs": 1},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="fewer settings, shorter stream (<= 6 min)")
    mode.add_argument("--smoke", action="store_true", help="tiny sizes (the test suite's check of the outputs)")
    ap.add_argument("--cache-dir", type=Path, default=None, help="caption-embedding / feature cache (default: temp)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the virtual brain and of training")
    ap.add_argument("--stage2", type=int, default=None, metavar="EPOCHS",
                    help="fine-tune the backbone this many epochs in the stage-2 positive control (0: skip it; "
                         "default: 4 full, 0 --quick, 1 --smoke)")
    ap.add_argument("--readout-aligned", action="store_true",
                    help="also compare λ > 0 with λ = 0 without a core and with model.readout_aligned (the readout "
                         "reads the aligned embedding next to the features)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------------- data
def make_brain(n_train: int, n_val: int, n_test: int, image_size: int, seed: int) -> EncodingDataset:
    """Virtual brain with 100 relational voxels (and 30 + 30 early / semantic ones); the first ``n_train`` images
    of its training split train, the next ``n_val`` validate."""
    ds = load_dataset("virtual:n_relational=100,n_early=30,n_semantic=30", n_train=n_train + n_val, n_test=n_test,
                      image_size=image_size, seed=seed)
    idx = np.arange(n_train + n_val)
    splits = {"train": ds.train.subset(idx[:n_train]), "val": ds.train.subset(idx[n_train:]), "test": ds.test}
    return EncodingDataset(ds.name, splits, ds.roi_masks, ds.hemisphere, ds.noise_ceiling, ds.captions,
                           source=ds.source, meta=ds.meta)


def subset_train(ds: EncodingDataset, n: int) -> EncodingDataset:
    """The dataset with its first ``n`` training images."""
    splits = {**ds.splits, "train": ds.train.subset(np.arange(n))}
    ids = {i for sp in splits.values() for i in sp.images.ids}
    captions = {i: c for i, c in ds.captions.items() if i in ids}
    return EncodingDataset(ds.name, splits, ds.roi_masks, ds.hemisphere, ds.noise_ceiling, captions,
                           source=ds.source, meta=ds.meta)


def shuffled(emb: dict[str, np.ndarray], seed: int) -> dict[str, np.ndarray]:
    """Caption embeddings permuted across the images of each split (= ``captions.shuffle``: one caption per image)."""
    rng = np.random.default_rng(seed)
    return {s: e[rng.permutation(len(e))] for s, e in emb.items()}


# ---------------------------------------------------------------------------------------------- models
def base_config(mode: dict[str, Any], cache_dir: Path, seed: int) -> RunConfig:
    return apply_overrides(RunConfig(), [
        f"cache_dir={cache_dir}", f"seed={seed}", f"data.image_size={mode['image_size']}",
        f"backbone.image_size={mode['image_size']}", "backbone.layers=[block5, block10, pooled]",
        "backbone.device=cpu", "text.device=cpu", "train.device=cpu", "train.precision=fp32",
        f"train.stage1.epochs={mode['epochs']}", "train.stage1.batch_size=32", "train.stage1.lr=0.002",
        "train.stage1.early_stopping_patience=8", "train.stage2.epochs=0", "train.checkpoint_every=100000",
        "train.stage2.batch_size=32", "train.stage2.lr=0.0003", "train.stage2.backbone_lr=0.0001",
        "train.stage2.unfreeze_last_n=4", "train.stage2.warmup_steps=0", "train.stage2.early_stopping_patience=2",
        "model.core_dim=128", "model.core_dropout=0.1", "model.feature_dropout=0", "align_data.batch_size=128"])


class Runner:
    """Trains LLM-VEM variants on one brain and remembers what it trained."""

    def __init__(self, mode: dict[str, Any], cache_dir: Path, work: Path, seed: int):
        self.mode, self.work, self.seed = mode, work, seed
        self.config = base_config(mode, cache_dir, seed)
        self.count = 0
        self.backbone: Any = None  # the frozen backbone, set by run(); needed by stage 2

    def train(self, ds: EncodingDataset, features: dict, text: dict | None, core: str, lam: float,
              stream: CaptionStream | None = None, stage2: int = 0, extra: tuple[str, ...] = ()) -> Any:
        cfg = apply_overrides(self.config, [f"model.core={core}", f"model.lambda_align={lam}",
                                            f"train.stage2.epochs={stage2}", *extra])
        self.count += 1
        sub = {s: features[s] for s in SPLITS}
        if len(ds.train) != len(features["train"]["pooled"]):
            sub["train"] = {k: v[: len(ds.train)] for k, v in features["train"].items()}
        if text is not None and len(text["train"]) != len(ds.train):  # the first images, as for the features
            text = {**text, "train": text["train"][: len(ds.train)]}
        # stage 2 fine-tunes the backbone in place: each model gets a private copy of the frozen one
        backbone = copy.deepcopy(self.backbone) if stage2 else None
        return train_encoding_model(cfg, ds, text_embeddings=text if lam > 0 else None, features=sub,
                                    backbone=backbone, out_dir=self.work / f"run{self.count:03d}",
                                    show_progress=False, align_stream=stream)


def rel_r(ds: EncodingDataset, pred: np.ndarray, split: str) -> float:
    mask = ds.roi_masks["relational"]
    return float(np.nanmean(pearson_r(ds.splits[split].responses[:, mask], pred[:, mask])))


def compare(ds: EncodingDataset, pred_a: np.ndarray, pred_b: np.ndarray, n_boot: int, seed: int,
            roi: str = "relational") -> dict[str, Any]:
    """Paired bootstrap over test images, the voxels of ``roi``: b − a in mean r."""
    mask = ds.roi_masks[roi]
    res = paired_bootstrap(ds.test.responses[:, mask], pred_a[:, mask], pred_b[:, mask], n_boot=n_boot, seed=seed)
    r = res["overall"]["r"]
    return {"a": r["a"], "b": r["b"], "delta_mean_r": r["diff"], "ci": [r["ci_low"], r["ci_high"]],
            "p": r["p_value"], "fraction_improved": res["overall"]["fraction_improved"]}


def comparison_record(ds: EncodingDataset, zero: Any, best: Any, shuf: Any, n_boot: int, seed: int) -> dict[str, Any]:
    """One positive-control row: aligned and shuffled − λ = 0 on the relational test voxels (paired bootstraps),
    plus the three models' validation r."""
    c = compare(ds, zero.predictions["test"], best.predictions["test"], n_boot, seed)
    s = compare(ds, zero.predictions["test"], shuf.predictions["test"], n_boot, seed)
    return {"delta_mean_r": c["delta_mean_r"], "ci": c["ci"], "p": c["p"],
            "shuffled_delta_mean_r": s["delta_mean_r"], "shuffled_ci": s["ci"], "shuffled_p": s["p"],
            "lambda_mean_r": c["a"], "aligned_mean_r": c["b"], "shuffled_mean_r": s["b"],
            "fraction_improved": c["fraction_improved"],
            "val_r": {"lambda0": rel_r(ds, zero.predictions["val"], "val"),
                      "aligned": rel_r(ds, best.predictions["val"], "val"),
                      "shuffled": rel_r(ds, shuf.predictions["val"], "val")}}


def mean_r_ci(ds: EncodingDataset, pred: np.ndarray, n_boot: int, seed: int, roi: str = "relational"
              ) -> dict[str, Any]:
    """Mean test r on the voxels of ``roi`` with a bootstrap 95% CI over test images (the paired bootstrap
    against a constant prediction, whose r is 0 in every resample)."""
    c = compare(ds, np.zeros_like(pred), pred, n_boot, seed, roi)
    return {"mean_r": c["b"], "ci": c["ci"]}


def ridge_predictions(X: dict[str, np.ndarray], Y: np.ndarray, fit_rows: list[str], splits: tuple[str, ...] = SPLITS
                      ) -> dict[str, np.ndarray]:
    """Ridge (per-target α by 5-fold CV) from standardised ``X[fit_rows]`` to ``Y``; predictions per split."""
    Xf = np.concatenate([X[s] for s in fit_rows])
    mu, sd = Xf.mean(0), floored_std(Xf.std(0))
    model = RidgeCV(alphas=np.logspace(-2, 6, 9), cv=5, device="cpu", progress_bar=False).fit((Xf - mu) / sd, Y)
    return {s: model.predict((X[s] - mu) / sd) for s in splits}


def core_output(network: Any, features: dict[str, np.ndarray]) -> np.ndarray:
    """Core output (n_images, core_dim) of a trained network (eval mode) on cached features."""
    with torch.no_grad():
        out = network(features={k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in features.items()},
                      with_voxels=False)
    return out.readout_input.numpy()


def retrieval_top1(network: Any, features: dict[str, np.ndarray], text: np.ndarray) -> float:
    """Image → caption top-1 accuracy among the given images (a distinct caption counts as its own group)."""
    with torch.no_grad():
        out = network(features={k: torch.as_tensor(np.asarray(v), dtype=torch.float32) for k, v in features.items()},
                      with_embedding=True, with_voxels=False)
    if out.embedding is None or out.embedding.shape[1] != np.asarray(text).shape[1]:
        return float("nan")  # trained without captions (λ = 0): the head was never fitted to the text space
    sim = out.embedding.numpy() @ np.asarray(text).T
    best = sim.argmax(1)
    return float(np.mean(np.all(np.isclose(text[best], text), axis=1)))


def attribute_r(ds: EncodingDataset, X: dict[str, np.ndarray]) -> dict[str, float]:
    """Test r of ridge from ``X`` (fitted on train) to the ground-truth relational attributes: mean and per group."""
    gt = ds.meta["ground_truth"]
    rel = np.asarray(gt["relational"])
    # rows of the table: the generated training split (train rows first), then the test split (last)
    y = {"train": rel[: len(ds.train)], "test": rel[len(rel) - len(ds.test):]}
    pred = ridge_predictions(X, y["train"], ["train"], ("test",))["test"]
    r = pearson_r(y["test"], pred)
    names = list(gt["relational_names"])
    groups = {"n_objects": [0], "positions": [1, 2, 3, 4, 5], "same_category": [6],
              "category_pairs": list(range(7, len(names)))}
    return {"mean": float(np.nanmean(r)), **{g: float(np.nanmean(r[i])) for g, i in groups.items()}}


CURVE_LABELS = {"ridge": "ridge (frozen features)", "lambda0": "LLM-VEM λ = 0", "aligned": "λ > 0, brain captions",
                "aligned_extra": "λ > 0 + extra captioned scenes"}


def plot_curves(res: dict[str, Any], path: Path) -> None:
    """Learning curves as a PNG: mean test r vs training images (log axis) with 95% CI bands, one panel per voxel
    kind (relational, then ``other_rois`` when present); drawn by ``bench_curves_v4.plot_panels``."""
    from bench_curves_v4 import plot_panels

    lc = res["learning_curves"]
    x = lc["n_train"]
    panels = [(f"{roi} voxels", x, {CURVE_LABELS.get(name, name): (
        [row[str(n)]["mean_r"] for n in x], [row[str(n)]["ci"][0] for n in x], [row[str(n)]["ci"][1] for n in x])
        for name, row in table.items()})
        for roi, table in [(lc["roi"], lc["models"]), *lc.get("other_rois", {}).items()]]
    plot_panels(panels, path)


# ------------------------------------------------------------------------------------------------- main
def run(mode_name: str, cache_dir: Path, work: Path, seed: int, log_fn: Any = print, stage2: int | None = None,
        readout_aligned: bool = False) -> dict[str, Any]:
    mode = {**MODES[mode_name], **({} if stage2 is None else {"stage2_epochs": stage2})}
    t0 = time.perf_counter()
    n_max = max(mode["n_train"], *mode["curve"])
    ds_all = make_brain(n_max, mode["n_val"], mode["n_test"], mode["image_size"], seed)
    runner = Runner(mode, cache_dir, work, seed)
    cfg = runner.config
    backbone = runner.backbone = inputs.load_config_backbone(cfg)
    features = inputs.extract_split_features(cfg, ds_all, backbone, show_progress=False)
    captions = {s: ds_all.captions_for(s) for s in SPLITS}
    text = inputs.embed_captions(cfg, captions, show_progress=False)
    text_shuf = shuffled(text, seed + 1)
    stream_cfg = apply_overrides(cfg, [f"align_data.spec=virtual-scenes:n={mode['n_extra']},seed={seed + 7}"])
    stream = load_align_stream(stream_cfg, backbone, show_progress=False)
    assert stream is not None
    stream_shuf = CaptionStream(stream.images, shuffled({"s": stream.text_embeddings}, seed + 2)["s"],
                                stream.features, stream.weight, stream.batch_size)
    t_inputs = time.perf_counter() - t0
    log_fn(f"inputs ready in {t_inputs:.0f} s ({len(stream.images)} extra captioned scenes)")

    ds = subset_train(ds_all, mode["n_train"])
    n_boot = mode["n_boot"]

    # 1. core chosen on validation at λ = 0 (the baseline every comparison uses)
    sweep: list[dict[str, Any]] = []
    base: dict[str, Any] = {}
    for core in mode["cores"]:
        res = runner.train(ds, features, None, core, 0.0)
        base[core] = res
        sweep.append({"core": core, "lambda": 0.0, "stream": False, "val_r": rel_r(ds, res.predictions["val"], "val")})
    core = max(mode["cores"], key=lambda c: rel_r(ds, base[c].predictions["val"], "val"))
    zero = base[core]
    # 2. λ chosen on validation, with captions only and with the stream
    trained: dict[tuple[float, bool], Any] = {}
    for with_stream in (False, True):
        for lam in mode["lambdas"]:
            res = runner.train(ds, features, text, core, lam, stream if with_stream else None)
            trained[(lam, with_stream)] = res
            sweep.append({"core": core, "lambda": lam, "stream": with_stream,
                          "val_r": rel_r(ds, res.predictions["val"], "val")})
    chosen = {w: max(mode["lambdas"], key=lambda lam, w=w: rel_r(ds, trained[(lam, w)].predictions["val"], "val"))
              for w in (False, True)}
    results: dict[str, Any] = {}
    shuffled_runs: dict[bool, Any] = {}
    for with_stream, label in ((False, "positive_control"), (True, "positive_control_extra")):
        lam = chosen[with_stream]
        best = trained[(lam, with_stream)]
        shuf = runner.train(ds, features, text_shuf, core, lam, stream_shuf if with_stream else None)
        shuffled_runs[with_stream] = shuf
        results[label] = {**comparison_record(ds, zero, best, shuf, n_boot, seed), "lambda": lam, "core": core,
                          "n_extra": mode["n_extra"] if with_stream else 0}
    # 2b. the same comparison with the backbone fine-tuned (stage 2: blocks 8-15 and the head; the stream's images
    # go through the backbone too), settings as chosen above on validation; one λ = 0 model for both runs
    if mode["stage2_epochs"]:
        t2 = time.perf_counter()
        e2 = mode["stage2_epochs"]
        zero2 = runner.train(ds, features, None, core, 0.0, stage2=e2)
        for with_stream, label in ((False, "positive_control_stage2"), (True, "positive_control_extra_stage2")):
            lam = chosen[with_stream]
            best = runner.train(ds, features, text, core, lam, stream if with_stream else None, stage2=e2)
            shuf = runner.train(ds, features, text_shuf, core, lam, stream_shuf if with_stream else None, stage2=e2)
            results[label] = {**comparison_record(ds, zero2, best, shuf, n_boot, seed), "lambda": lam, "core": core,
                              "n_extra": mode["n_extra"] if with_stream else 0, "stage2_epochs": e2}
        results["stage2_seconds"] = time.perf_counter() - t2
        log_fn(f"stage-2 positive control in {results['stage2_seconds']:.0f} s")
    # 2c. no core, the readout reads the aligned embedding next to the features (model.readout_aligned): the
    # head is the only place captions act, the features reach the readout unchanged; λ chosen on validation
    if readout_aligned:
        extra = ("model.readout_aligned=true", f"model.align_dim={text['train'].shape[1]}")
        zero_ra = runner.train(ds, features, None, "null", 0.0, extra=extra)
        for with_stream, label in ((False, "readout_aligned"), (True, "readout_aligned_extra")):
            runs = {lam: runner.train(ds, features, text, "null", lam, stream if with_stream else None, extra=extra)
                    for lam in mode["lambdas"]}
            lam = max(runs, key=lambda v: rel_r(ds, runs[v].predictions["val"], "val"))
            shuf = runner.train(ds, features, text_shuf, "null", lam, stream_shuf if with_stream else None,
                                extra=extra)
            results[label] = {**comparison_record(ds, zero_ra, runs[lam], shuf, n_boot, seed), "lambda": lam,
                              "core": "none", "n_extra": mode["n_extra"] if with_stream else 0,
                              "val_r_by_lambda": {str(v): rel_r(ds, r.predictions["val"], "val") for v, r in runs.items()}}
    # 3. diagnostics: does the core output encode the relational attributes better after alignment?
    feat_cat = {s: np.concatenate([features[s][k] for k in cfg.backbone.layers], 1) for s in SPLITS}
    feat_cat["train"] = feat_cat["train"][: len(ds.train)]
    diag: dict[str, Any] = {"features": {"attribute_r": attribute_r(ds, feat_cat)},
                            "description_embeddings": {"attribute_r": attribute_r(
                                ds, {"train": text["train"][: len(ds.train)], "test": text["test"]})}}
    models = {"lambda0": zero, "aligned": trained[(chosen[False], False)],
              "aligned_extra": trained[(chosen[True], True)], "shuffled": shuffled_runs[False],
              "shuffled_extra": shuffled_runs[True]}
    for name, res in models.items():
        net = res.network.cpu().eval()
        X = {s: core_output(net, {k: (features[s][k][: len(ds.train)] if s == "train" else features[s][k])
                                  for k in cfg.backbone.layers}) for s in ("train", "test")}
        val_feats = {k: features["val"][k] for k in cfg.backbone.layers}
        diag[name] = {"attribute_r": attribute_r(ds, X), "val_retrieval_top1": retrieval_top1(net, val_feats,
                                                                                             text["val"])}
    diag["chance_retrieval_top1"] = 1.0 / mode["n_val"]

    # 4. learning curves on the relational voxels (settings chosen above, on validation)
    curves: dict[str, dict[str, Any]] = {"ridge": {}, "lambda0": {}, "aligned": {}, "aligned_extra": {}}
    # the same models on the virtual brain's default voxel kinds (retinotopic early / category semantic)
    curves_other = {roi: {name: {} for name in curves} for roi in ("early_visual", "semantic")}
    for n in mode["curve"]:
        dn = subset_train(ds_all, n)
        X = {s: feat_cat[s] if s != "train" else np.concatenate(
            [features["train"][k][:n] for k in cfg.backbone.layers], 1) for s in SPLITS}
        ridge = ridge_predictions(X, np.concatenate([dn.train.responses, dn.val.responses]), ["train", "val"])
        preds = {"ridge": ridge["test"]}
        if n == mode["n_train"]:
            preds.update(lambda0=zero.predictions["test"], aligned=models["aligned"].predictions["test"],
                         aligned_extra=models["aligned_extra"].predictions["test"])
        else:
            tn = {"train": text["train"][:n], "val": text["val"], "test": text["test"]}
            preds["lambda0"] = runner.train(dn, features, None, core, 0.0).predictions["test"]
            preds["aligned"] = runner.train(dn, features, tn, core, chosen[False]).predictions["test"]
            preds["aligned_extra"] = runner.train(dn, features, tn, core, chosen[True], stream).predictions["test"]
        for name, p in preds.items():
            curves[name][str(n)] = mean_r_ci(dn, p, n_boot, seed)
            for roi, table in curves_other.items():
                table[name][str(n)] = mean_r_ci(dn, p, n_boot, seed, roi)
    # 5. 92-image RSA of the aligned encoders (bench/rsa92_alignment.py; rows skipped without ../shared/data)
    import rsa92_alignment

    rsa92 = rsa92_alignment.alignment_rows(mode_name, cache_dir, work / "rsa92", seed=seed, log_fn=log_fn)
    out = {**results, "learning_curves": {"roi": "relational", "n_train": mode["curve"], "models": curves,
                                              "other_rois": curves_other},
           "diagnostics": diag, "sweep": sweep,
           "rsa92": rsa92.get("rows", {}), "rsa92_settings": rsa92.get("settings", rsa92),
           "settings": {"mode": mode_name, **mode, "seed": seed, "core_chosen": core, "lambda_chosen": chosen[False],
                        "lambda_chosen_extra": chosen[True], "runs": runner.count,
                        "selection": "validation r, "
                        "relational voxels", "inputs_s": t_inputs},
           "seconds": time.perf_counter() - t0}
    return out


def _fmt_ci(ci: list[float]) -> str:
    return f"[{ci[0]:+.3f}, {ci[1]:+.3f}]"


def print_tables(res: dict[str, Any]) -> None:
    print("\nPositive control (relational voxels, test; paired bootstrap over test images)")
    print(f"{'run':<30}{'core':>7}{'λ':>6}{'λ=0 r':>8}{'λ>0 r':>8}{'Δ r':>8}{'95% CI':>20}{'p':>7}"
          f"{'shuffled Δ':>12}{'shuffled CI':>20}")
    for label in ("positive_control", "positive_control_extra", "positive_control_stage2",
                  "positive_control_extra_stage2", "readout_aligned", "readout_aligned_extra"):
        if label not in res:
            continue
        r = res[label]
        print(f"{label:<30}{r['core']:>7}{r['lambda']:>6g}{r['lambda_mean_r']:>8.3f}{r['aligned_mean_r']:>8.3f}"
              f"{r['delta_mean_r']:>+8.3f}{_fmt_ci(r['ci']):>20}{r['p']:>7.3f}{r['shuffled_delta_mean_r']:>+12.3f}"
              f"{_fmt_ci(r['shuffled_ci']):>20}")
    d = res["diagnostics"]
    print("\nDiagnostics: test r of ridge (fit on the training images) to the ground-truth relational attributes")
    print(f"{'input':<24}{'mean':>7}{'n_obj':>7}{'posit.':>7}{'same':>7}{'pairs':>7}{'val top-1':>11}")
    for name in ("features", "description_embeddings", "lambda0", "aligned", "aligned_extra", "shuffled",
                 "shuffled_extra"):
        a = d[name]["attribute_r"]
        top1 = d[name].get("val_retrieval_top1")
        print(f"{name:<24}{a['mean']:>7.3f}{a['n_objects']:>7.3f}{a['positions']:>7.3f}{a['same_category']:>7.3f}"
              f"{a['category_pairs']:>7.3f}{'' if top1 is None else f'{top1:.3f}':>11}")
    print(f"(chance top-1 = {d['chance_retrieval_top1']:.3f})")
    lc = res["learning_curves"]
    print("\nLearning curves: mean test r, relational voxels (95% CI)")
    print(f"{'model':<16}" + "".join(f"{'n=' + str(n):>22}" for n in lc["n_train"]))
    for name, row in lc["models"].items():
        print(f"{name:<16}" + "".join(f"{row[str(n)]['mean_r']:>7.3f} {_fmt_ci(row[str(n)]['ci']):>14}"
                                      for n in lc["n_train"]))
    for roi, table in lc.get("other_rois", {}).items():
        print(f"\nLearning curves: mean test r, {roi} voxels (settings chosen on the relational voxels)")
        for name, row in table.items():
            print(f"{name:<16}" + "".join(f"{row[str(n)]['mean_r']:>7.3f} {_fmt_ci(row[str(n)]['ci']):>14}"
                                          for n in lc["n_train"]))
    if res["rsa92"]:
        import rsa92_alignment

        print("\n92-image RSA of aligned encoders (Spearman r with human / monkey IT RDMs)")
        print(rsa92_alignment.format_rows(res["rsa92"]))
    print("\nValidation sweep (relational voxels): " + ", ".join(
        f"{s['core']}/λ={s['lambda']:g}{'+extra' if s['stream'] else ''}: {s['val_r']:.3f}" for s in res["sweep"]))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    quiet = logging.getLogger("llmvem")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # the inert-λ warnings of the sweep would drown the tables
    try:
        return _main(args)
    finally:
        quiet.setLevel(level)  # called in-process (tests): leave logging as it was


def _main(args: argparse.Namespace) -> dict[str, Any]:
    mode = "smoke" if args.smoke else "quick" if args.quick else "full"
    torch.set_num_threads(max(1, min(2, torch.get_num_threads())))
    with tempfile.TemporaryDirectory() as tmp:
        cache = args.cache_dir or Path(tmp) / "cache"
        res = run(mode, cache, Path(tmp) / "runs", args.seed, stage2=args.stage2,
                  readout_aligned=args.readout_aligned)
    print_tables(res)
    print(f"\n{mode} run: {res['seconds']:.0f} s")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(res, indent=2, default=float))
    plot_curves(res, args.out.with_suffix(".png"))
    print(f"results: {args.out}, learning-curve plot: {args.out.with_suffix('.png')}")
    return res


if __name__ == "__main__":
    main()
