"""92-image RSA benchmark: model RDMs vs human and monkey IT RDMs (Kriegeskorte et al. 2008).

Data: the 92 object images with human IT RDMs (4 subjects x 2 sessions, fMRI) and the monkey IT RDM (cell
recordings) of Kriegeskorte et al. (2008, Neuron), as shipped in the rsatoolbox demos (MIT),
``../shared/data/kriegeskorte92`` (``--data``), read by :func:`llmvem.data.rdm_sets.load_kriegeskorte92`.

Model RDMs (correlation distance, :func:`llmvem.evaluate.rsa.rdm`) of the 92 images from:

* EfficientNet-Lite0 (ImageNet weights) blocks and the pooled embedding, at 224 px (its training size) and at
  112 px (the size the V4 benchmark uses); at 224 px also each block's map pooled to 2×2 and 4×4 grids and the
  full map (``block12@grid4``, ``block12@map``: :mod:`llmvem.embed.spatial`), whose RDMs keep where things are;
* the caption text embeddings: offline ImageNet-label captioner → MiniLM (the captions LLM-VEM is aligned to
  in the offline benchmarks);
* LLM-VEM networks trained on a V4 session through the pipeline with the V4 benchmark's settings
  (``bench/bench_v4.py``; session ``--v4-session``, default 210322): the aligned embedding (alignment-head
  output) of the λ > 0 model with the backbone frozen and fine-tuned, and the pooled embedding of the fine-tuned
  backbone for λ > 0 and for the λ = 0 control. The networks are applied to the 92 images at their input size.

Each RDM is compared (Spearman r over the 4,186 upper-triangle dissimilarities, :func:`llmvem.evaluate.rsa.
compare_rdms`) with the subject-averaged human IT RDM, with each subject's RDM (averaged over the two
sessions) and with the monkey IT RDM. The leave-one-subject-out noise ceiling
(:func:`llmvem.evaluate.rsa.leave_one_subject_out_ceiling`) bounds the per-subject mean.

Usage::

    python bench/bench_rsa92.py                     # 1-2 min with warm caches (trains 3 LLM-VEM models)
    python bench/bench_rsa92.py --quick             # short training
    python bench/bench_rsa92.py --no-llmvem         # backbone and caption RDMs only (< 1 min)
    python bench/bench_rsa92.py --alignment-only    # only the aligned-encoder rows with bootstrap CIs

The aligned-encoder rows (descriptions and label captions → MiniLM, backbone layers, an encoder aligned on
Flickr8k captions only, LLM-VEM on V4 with and without the Flickr8k stream; :mod:`rsa92_alignment`) come with
95% CIs of a bootstrap over the 92 images and are printed as a second table (JSON key ``alignment``).

Writes ``bench/results/rsa92.json`` (``--out``) and prints the table. Exits 0 with a message when the data
folder is absent.
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_v4  # noqa: E402  (the V4 benchmark's settings and helpers)
import rsa92_alignment  # noqa: E402  (the rows of language-aligned encoders, bootstrap over images)

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "kriegeskorte92"
DEFAULT_OUT = ROOT / "bench" / "results" / "rsa92.json"
BACKBONE_LAYERS = ["block2", "block5", "block8", "block10", "block12", "block14", "block15", "pooled"]
BACKBONE_SIZES = (224, 112)
# Spatial rows (224 px only): each block's map pooled to a 2×2 and a 4×4 grid, and the full map (no pooling).
SPATIAL_LAYERS = [f"{b}@{mode}" for b in ("block2", "block5", "block8", "block10", "block12", "block14", "block15")
                  for mode in ("grid2", "grid4", "map")]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="Kriegeskorte 92 folder (default: %(default)s)")
    ap.add_argument("--v4-data", type=Path, default=bench_v4.DEFAULT_DATA,
                    help="V4 data folder for training the LLM-VEM models (default: %(default)s)")
    ap.add_argument("--v4-session", default="210322", help="V4 session the LLM-VEM models are trained on")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.1, help="λ of the aligned model (default 0.1)")
    ap.add_argument("--stage2-epochs", type=int, default=None, help="fine-tuning epochs (default: bench_v4's)")
    ap.add_argument("--quick", action="store_true", help="short training (bench_v4 --quick settings)")
    ap.add_argument("--max-images", type=int, default=None, help="train on the first N images of the V4 session")
    ap.add_argument("--no-llmvem", action="store_true", help="skip the LLM-VEM models (no V4 data needed)")
    ap.add_argument("--alignment-mode", choices=("full", "quick", "smoke", "off"), default=None,
                    help="rows of language-aligned encoders with a bootstrap over images (bench/rsa92_alignment.py):"
                         " sizes of that run (default: full, or quick with --quick)")
    ap.add_argument("--alignment-only", action="store_true", help="only the aligned-encoder rows (a few minutes)")
    ap.add_argument("--flickr", type=Path, default=rsa92_alignment.DATA / "flickr8k_1000",
                    help="Flickr8k folder of the Flickr8k-aligned rows (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override KEY=VALUE")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    return ap.parse_args(argv)


def alignment_mode(args: argparse.Namespace) -> str:
    """Sizes of the aligned-encoder rows: ``--alignment-mode``, else quick with ``--quick``, else full."""
    return args.alignment_mode or ("quick" if args.quick else "full")


def v4_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_v4's arguments matching this run (same settings, cache and overrides)."""
    argv = ["--data", str(args.v4_data), "--sessions", args.v4_session, "--lambda", str(args.lam),
            "--cache-dir", args.cache_dir]
    if args.quick:
        argv.append("--quick")
    if args.stage2_epochs is not None:
        argv += ["--stage2-epochs", str(args.stage2_epochs)]
    if args.max_images:
        argv += ["--max-images", str(args.max_images)]
    for o in args.overrides:
        argv += ["--set", o]
    return bench_v4.parse_args(argv)


# ------------------------------------------------------------------------------------------ representations
def backbone_patterns(images, size: int, layers: list[str] = BACKBONE_LAYERS) -> dict[str, np.ndarray]:
    """Frozen EfficientNet-Lite0 features of the images at ``size`` px: layer spec → (n_images, d_layer), or
    (n_images, C, H, W) for grids and maps (``"block12@grid4"``, ``"block12@map"``)."""
    from llmvem.embed.cache import extract_features
    from llmvem.embed.image import load_backbone

    backbone = load_backbone("efficientnet_lite0", image_size=size)
    feats = extract_features(images, backbone, layers=layers, cache=None, batch_size=32,
                             show_progress=False)
    return {f"EfficientNet-Lite0@{size} {layer}": np.asarray(v, dtype=np.float64) for layer, v in feats.items()}


def caption_patterns(config, images) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Caption text embeddings of the images (the config's captioner and text encoder, both cached)."""
    from llmvem.captions.run import run_captioning
    from llmvem.captions.store import CaptionStore
    from llmvem.inputs import build_captioner, cache_root, embed_captions

    captioner = build_captioner(config, None)
    with CaptionStore(cache_root(config) / "captions.sqlite") as store:
        summary = run_captioning(images, captioner, store, show_progress=False, raise_on_failure=True)
        captions = store.get_for(images, summary.config_hash)
    emb = embed_captions(config, {"k92": captions}, show_progress=False)["k92"]
    name = f"captions ({config.captions.backend}) → {config.text.encoder}"
    return {name: np.asarray(emb, dtype=np.float64)}, captions


def llmvem_patterns(args: argparse.Namespace, images_uint8: np.ndarray, work: Path
                    ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the LLM-VEM models on the V4 session and apply them to the 92 images.

    Returns
    -------
    patterns : dict of row name to array of shape (92, dim)
    info : dict
        Session, settings and each model's validation / test mean r on V4.
    """
    import torch

    from llmvem.inputs import load_config_dataset, prepare_inputs
    from llmvem.train import train_encoding_model

    vargs = v4_args(args)
    config = bench_v4.session_config(vargs, args.v4_session)
    ds = load_config_dataset(config)
    if vargs.max_images:
        ds = bench_v4.truncate_dataset(ds, vargs.max_images)
    prep = config.model_copy(deep=True)
    prep.backbone.layers = list(bench_v4.CANDIDATE_LAYERS)
    inputs = prepare_inputs(prep, show_progress=args.progress, dataset=ds)
    layers = list(config.backbone.layers)
    if vargs.llmvem_layers == "ridge":  # as in bench_v4: the ridge baseline's validation choice of layers
        sets = bench_v4.QUICK_RIDGE_LAYER_SETS if vargs.quick else bench_v4.RIDGE_LAYER_SETS
        layers = list(bench_v4.select_ridge_layers(config, inputs, sets)[0])
    x = torch.from_numpy(images_uint8)
    epochs2 = config.train.stage2.epochs
    variants = [("frozen", args.lam, 0), ("finetuned", args.lam, epochs2), ("finetuned", 0.0, epochs2)]
    patterns: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"v4_session": args.v4_session, "n_train": len(ds.train), "readout_layers": layers,
                            "models": {}}
    for kind, lam, stage2 in variants:
        if kind == "finetuned" and stage2 == 0:
            continue
        cfg = config.model_copy(deep=True)
        cfg.model.lambda_align = lam
        cfg.train.stage2.epochs = stage2
        cfg.backbone.layers = layers
        backbone = copy.deepcopy(inputs.backbone) if stage2 > 0 else inputs.backbone
        name = f"LLM-VEM λ={lam:g} {kind}"
        t = time.perf_counter()
        result = train_encoding_model(cfg, ds, text_embeddings=inputs.text_embeddings if lam > 0 else None,
                                      backbone=backbone, features=inputs.features, out_dir=work / name.replace(" ", "_"),
                                      show_progress=args.progress)
        net = result.network.eval()
        with torch.no_grad():
            out = net(images=x.to(next(net.parameters()).device), with_embedding=lam > 0)
            pooled = net.backbone_features(x, ["pooled"])["pooled"]
        if lam > 0:
            patterns[f"{name}: aligned embedding"] = out.embedding.float().cpu().numpy().astype(np.float64)
        if stage2 > 0:
            patterns[f"{name}: pooled"] = pooled.float().cpu().numpy().astype(np.float64)
        info["models"][name] = {"v4_val_mean_r": result.metrics["val_mean_r"],
                                "v4_test_mean_r": result.metrics.get("test_mean_r"),
                                "seconds": time.perf_counter() - t}
    info["image_size"] = int(inputs.backbone.image_size)
    return patterns, info


# ----------------------------------------------------------------------------------------------- scoring
def score_rdms(patterns: dict[str, np.ndarray], rset, reference: bool = True) -> dict[str, dict[str, Any]]:
    """Spearman r of each model RDM with human IT (mean and per subject) and monkey IT.

    ``patterns`` maps a row name to features of shape (92, dim) or (92, C, H, W) (flattened); with ``reference`` the reference model RDMs
    shipped with the set (animacy, category, HMAX, V1...) are added as ``"reference: <name>"`` rows (dim 0).
    """
    from llmvem.evaluate.rsa import compare_rdms, rdm

    per_subject = rset.human_it_per_subject
    rdms = {name: (rdm(x), int(np.prod(x.shape[1:]))) for name, x in patterns.items()}
    if reference:
        rdms.update({f"reference: {name}": (m, 0) for name, m in rset.model_rdms.items() if name != "monkeyIT"})
    out: dict[str, dict[str, Any]] = {}
    for name, (m, dim) in rdms.items():
        subj = [compare_rdms(m, s) for s in per_subject]
        out[name] = {"human_it_mean": compare_rdms(m, rset.human_it_mean),
                     "human_it_subjects": dict(zip(rset.human_it_subjects, subj, strict=True)),
                     "human_it_subject_mean": float(np.mean(subj)), "monkey_it": compare_rdms(m, rset.monkey_it),
                     "dim": dim}
    return out


def format_table(results: dict[str, Any]) -> str:
    rows = [["model RDM", "dim", "hIT (mean RDM)", "hIT per subject " + "/".join(results["subjects"]),
             "hIT subj. mean", "mIT"]]
    for name, s in results["models"].items():
        subj = "/".join(f"{v:.3f}" for v in s["human_it_subjects"].values())
        rows.append([name, str(s["dim"] or "-"), f"{s['human_it_mean']:.3f}", subj, f"{s['human_it_subject_mean']:.3f}",
                     f"{s['monkey_it']:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = results["noise_ceiling"]
    lines.append(f"human IT noise ceiling (leave one subject out, Spearman, per-subject RDMs): lower {c['lower']:.3f}, "
                 f"upper {c['upper']:.3f}; monkey IT vs human IT (mean RDM): {results['monkey_vs_human']:.3f}")
    lines.append("cells: Spearman r between RDMs over the 4,186 image pairs")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_rsa92: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not args.progress:
        os.environ["LLMVEM_NO_PROGRESS"] = "1"
    import torch

    from llmvem.data.rdm_sets import load_kriegeskorte92
    from llmvem.evaluate.rsa import compare_rdms, leave_one_subject_out_ceiling

    if args.threads:
        torch.set_num_threads(args.threads)
    t0 = time.perf_counter()
    rset = load_kriegeskorte92(args.data)
    images = rset.images
    pixels = np.stack([images.load_array(i) for i in range(len(images))])  # uint8 (92, 175, 175, 3)
    patterns: dict[str, np.ndarray] = {}
    for size in BACKBONE_SIZES:
        if args.alignment_only and size not in rsa92_alignment.MODES[alignment_mode(args)]["sizes"]:
            continue
        layers = BACKBONE_LAYERS if args.alignment_only else BACKBONE_LAYERS + (SPATIAL_LAYERS if size == 224 else [])
        patterns.update(backbone_patterns(images, size, layers))
    config = bench_v4.session_config(v4_args(args), args.v4_session)
    text, captions = caption_patterns(config, images)
    patterns.update(text)
    llm_info: dict[str, Any] = {}
    if args.no_llmvem or args.alignment_only:
        llm_info["skipped"] = "--no-llmvem" if args.no_llmvem else "--alignment-only"
    elif not args.v4_data.is_dir():
        llm_info["skipped"] = f"V4 data folder {args.v4_data} is absent"
        print(f"bench_rsa92: {llm_info['skipped']}; LLM-VEM rows skipped", file=sys.stderr)
    else:
        with tempfile.TemporaryDirectory(prefix="llmvem_bench_rsa92_") as tmp:
            llm_patterns, llm_info = llmvem_patterns(args, pixels, Path(tmp))
        patterns.update(llm_patterns)
    aligned: dict[str, Any] = {"skipped": "--alignment-mode off"}
    if alignment_mode(args) != "off":
        given = {"label_captions_minilm": next(iter(text.values()))}
        given.update({f"backbone{size}_{layer}": patterns[f"EfficientNet-Lite0@{size} {layer}"]
                      for size in BACKBONE_SIZES for layer in rsa92_alignment.BACKBONE_LAYERS
                      if f"EfficientNet-Lite0@{size} {layer}" in patterns})
        with tempfile.TemporaryDirectory(prefix="llmvem_bench_rsa92_align_") as tmp:
            aligned = rsa92_alignment.alignment_rows(
                alignment_mode(args), Path(args.cache_dir).expanduser(), Path(tmp), k92=args.data,
                flickr=args.flickr, v4_data=args.v4_data, v4_session=args.v4_session, precomputed=given,
                log_fn=lambda m: print(m, file=sys.stderr))
    if args.alignment_only:
        patterns = {}
    lower, upper = leave_one_subject_out_ceiling(rset.human_it_per_subject)
    results = {
        **bench_v4.result_header("kriegeskorte92_rsa", "bench_rsa92.py", argv),
        "subjects": list(rset.human_it_subjects),
        "noise_ceiling": {"lower": lower, "upper": upper, "method": "leave one subject out, Spearman, "
                          "per-subject RDMs averaged over the 2 sessions"},
        "monkey_vs_human": compare_rdms(rset.monkey_it, rset.human_it_mean),
        "models": score_rdms(patterns, rset, reference=not args.alignment_only),
        "llmvem": llm_info,
        "alignment": aligned,
        "captions_examples": {rset.images.ids[i]: captions[i] for i in (0, 20, 45, 70)},
        "seconds_total": time.perf_counter() - t0,
    }
    bench_v4.write_results(args.out, results)
    if results["models"]:
        print(format_table(results))
    if "rows" in aligned:
        print("\nLanguage-aligned encoders (Spearman r; hIT subj. mean = mean over the 4 subjects' RDMs)")
        print(rsa92_alignment.format_rows(aligned["rows"]))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
