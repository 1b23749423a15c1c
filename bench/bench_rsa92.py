"""92-image RSA benchmark: model RDMs vs human and monkey IT RDMs (Kriegeskorte et al. 2008), a client of llmvem.

Data: the 92 object images with human IT RDMs (4 subjects x 2 sessions, fMRI) and the monkey IT RDM (cell
recordings) of Kriegeskorte et al. (2008, Neuron), as shipped in the rsatoolbox demos (MIT),
``../shared/data/kriegeskorte92`` (``--data``), read by :func:`llmvem.data.rdm_sets.load_kriegeskorte92`.

**Main table.** Model RDMs (correlation distance, :func:`llmvem.evaluate.rsa.rdm`) of the 92 images from:

* EfficientNet-Lite0 (ImageNet weights) blocks and the pooled embedding, at 224 px (its training size) and at
  112 px (the V4 stimuli's size); at 224 px also each block's map pooled to 2×2 and 4×4 grids and the full map
  (``block12@grid4``, ``block12@map``: :mod:`llmvem.embed.spatial`), whose RDMs keep where things are;
* the caption text embeddings: offline ImageNet-label captioner → MiniLM;
* LLM-VEM networks trained on a V4 session (``--v4-session``, default 210322) with the shipped ``v4_spatial``
  settings (its pooled readout; ``evaluate.models`` replaced by the three networks below), fitted by
  :func:`llmvem.pipeline.run_experiment` into an ordinary run folder (``--runs-dir``) and loaded back from it
  (:func:`llmvem.train.load.load_trained_model`): the aligned embedding (alignment-head output) of the λ > 0
  model with the backbone frozen and fine-tuned, and the pooled embedding of the fine-tuned backbone for λ > 0
  and for the λ = 0 control, applied to the 92 images at their input size.

Each RDM is compared (Spearman r over the 4,186 upper-triangle dissimilarities, :func:`llmvem.evaluate.rsa.
compare_rdms`) with the subject-averaged human IT RDM, each subject's RDM (averaged over the two sessions) and the
monkey IT RDM; the leave-one-subject-out noise ceiling (:func:`~llmvem.evaluate.rsa.leave_one_subject_out_ceiling`)
bounds the per-subject mean.

**Aligned encoders** (``--alignment-mode``; JSON key ``alignment``), each row with 95% CIs of a bootstrap over the
92 images (:func:`llmvem.evaluate.rsa.rsa_rows`; the same resamples for every row, so a row's Δ against its own
backbone features is paired):

* ``descriptions_minilm`` — MiniLM embeddings of the shipped descriptions (``bench/data/
  kriegeskorte92_descriptions.csv``, written before any RSA result; see its README);
* ``label_captions_minilm`` — the label captions → MiniLM (the main table's caption row);
* ``backbone<size>_<layer>`` — frozen EfficientNet-Lite0 block12, block14 and pooled at 224 px (and 112 px);
* ``flickr8k_aligned`` / ``_core`` — an encoder aligned on Flickr8k captions only, no brain data (a linear core
  + alignment head on cached 224-px features, :func:`llmvem.train.train_alignment_model`; its epochs chosen on
  held-out Flickr8k image → caption retrieval, :func:`llmvem.evaluate.retrieval.retrieval_top1`, never on RSA);
  ``flickr8k_backbone`` — the standardised features it reads;
* ``v4_lambda0`` (core output), ``v4_aligned`` / ``v4_aligned_flickr`` (aligned embedding; ``_core``: core
  output) — LLM-VEM with one linear core trained on the V4 session (``v4_spatial`` settings, stage 1 on cached
  features, one run folder) at λ = 0, λ = ``V4_LAMBDA`` on the label captions, and the same plus the Flickr8k
  stream (``align_data.spec``); ``v4_backbone`` — the standardised features those networks read.

**Map-reading aligned encoder** (``--flickr-maps``; its own results file): the same Flickr8k-only training, but
the linear core reads grid maps of the backbone (``block12@grid4`` = block12's map average-pooled to 4×4,
flattened, :mod:`llmvem.embed.spatial`) instead of pooled features. Each ``--flickr-maps`` value is one candidate
set of layer specs; the candidate and its epochs are chosen together on held-out Flickr8k image → caption top-1
(every candidate's figures recorded), never on RSA. Rows ``map-reading aligned: aligned embedding`` / ``: core
output`` and ``its input maps`` (the standardised grid features the core reads, the baseline of the paired Δ),
plus each chosen map unstandardised (``backbone224_<spec>``). Only these rows run (no main table, no V4
networks); written to ``bench/results/rsa92_map_aligned.json`` unless ``--out`` says otherwise.

The 92-image comparisons and the V4 networks' test r are test reads: each run appends one line to
``bench/results/ledger.csv`` (``--ledger``).

Usage::

    python bench/bench_rsa92.py                     # main table + aligned encoders (full)
    python bench/bench_rsa92.py --quick             # short training, quick aligned-encoder rows
    python bench/bench_rsa92.py --no-llmvem --alignment-mode off   # backbone and caption RDMs only (< 1 min)
    python bench/bench_rsa92.py --alignment-only    # only the aligned-encoder rows
    python bench/bench_rsa92.py --flickr-maps block12@grid2,block14@grid2 --flickr-maps block12@grid4,block14@grid4
                                                    # only the map-reading aligned encoder (2 candidates)

Writes ``bench/results/rsa92.json`` (``--out``; ``rsa92_map_aligned.json`` with ``--flickr-maps``; strict JSON
with the provenance header) and prints the tables.
Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DEFAULT_OUT = ROOT / "bench" / "results" / "rsa92.json"
DEFAULT_MAPS_OUT = ROOT / "bench" / "results" / "rsa92_map_aligned.json"
LEDGER = ROOT / "bench" / "results" / "ledger.csv"
DESCRIPTIONS = ROOT / "bench" / "data" / "kriegeskorte92_descriptions.csv"
BACKBONE_LAYERS = ["block2", "block5", "block8", "block10", "block12", "block14", "block15", "pooled"]
BACKBONE_SIZES = (224, 112)
#: Spatial rows (224 px only): each block's map pooled to a 2×2 and a 4×4 grid, and the full map (no pooling).
SPATIAL_LAYERS = [f"{b}@{mode}" for b in ("block2", "block5", "block8", "block10", "block12", "block14", "block15")
                  for mode in ("grid2", "grid4", "map")]
#: Layers of the aligned-encoder rows and of the Flickr8k-aligned encoder (EfficientNet-Lite0 at 224 px).
ALIGN_LAYERS = ("block12", "block14", "pooled")
#: Rows of the map-reading aligned encoder (``--flickr-maps``): aligned embedding, core output, the input maps.
MAP_ROWS = ("map-reading aligned: aligned embedding", "map-reading aligned: core output", "its input maps")
#: λ of the aligned V4 networks of the aligned-encoder rows (fixed, not tuned).
V4_LAMBDA = 1.0
#: ``--quick``: short training of the main table's networks (a code-path check, not a figure).
QUICK_OVERRIDES = ["train.stage1.epochs=15", "train.stage2.epochs=1", "train.stage2.unfreeze_last_n=1"]
#: The shared linear core of the aligned-encoder rows' V4 networks (stage 1 only, on the CPU, reproducible).
V4_CORE_OVERRIDES = ["model.core=linear", "model.core_dim=128", "model.core_dropout=0.1", "train.stage2.epochs=0",
                     "train.device=cpu", "train.precision=fp32", "backbone.device=cpu", "text.device=cpu",
                     "train.checkpoint_every=100000"]
#: Sizes of the aligned-encoder rows: bootstrap resamples, backbone sizes, Flickr8k images / candidate epochs
#: (chosen on held-out Flickr8k retrieval), V4 images / epochs.
MODES: dict[str, dict[str, Any]] = {
    "full": {"n_boot": 1000, "sizes": (224, 112), "flickr_images": None, "flickr_epochs": (5, 10, 20, 40),
             "v4_images": None, "v4_epochs": 60},
    "quick": {"n_boot": 200, "sizes": (224,), "flickr_images": 300, "flickr_epochs": (10, 20), "v4_images": 400,
              "v4_epochs": 15},
    "smoke": {"n_boot": 50, "sizes": (224,), "flickr_images": 40, "flickr_epochs": (1, 2), "v4_images": 60,
              "v4_epochs": 2},
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DATA / "kriegeskorte92", help="Kriegeskorte 92 folder (default: "
                    "%(default)s)")
    ap.add_argument("--v4-data", type=Path, default=DATA / "v4_cowley2023",
                    help="V4 data folder for training the LLM-VEM models (default: %(default)s)")
    ap.add_argument("--v4-session", default="210322", help="V4 session the LLM-VEM models are trained on")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.1, help="λ of the aligned model (default 0.1)")
    ap.add_argument("--quick", action="store_true", help="short training, quick aligned-encoder rows")
    ap.add_argument("--max-images", type=int, default=None, help="train on the first N images of the V4 session")
    ap.add_argument("--no-llmvem", action="store_true", help="skip the main table's LLM-VEM networks")
    ap.add_argument("--alignment-mode", choices=("full", "quick", "smoke", "off"), default=None,
                    help="sizes of the aligned-encoder rows (default: full, or quick with --quick)")
    ap.add_argument("--alignment-only", action="store_true", help="only the aligned-encoder rows")
    ap.add_argument("--flickr", type=Path, default=DATA / "flickr8k_1000",
                    help="Flickr8k folder of the Flickr8k-aligned rows (default: %(default)s)")
    ap.add_argument("--flickr-maps", action="append", default=[], metavar="SPEC[,SPEC...]",
                    help="one candidate set of map layer specs of the map-reading Flickr8k-aligned encoder, e.g. "
                    "block12@grid4,block14@grid4 (repeatable: the candidate with the best held-out Flickr8k top-1 "
                    "is kept); runs only those rows and writes rsa92_map_aligned.json (unless --out)")
    ap.add_argument("--flickr-epochs", default=None, metavar="N[,N...]",
                    help="candidate epochs of the Flickr8k-aligned encoders (default: the alignment mode's)")
    ap.add_argument("--set", dest="overrides", action="append", default=[],
                    help="config override KEY=VALUE of the main table's networks (repeatable)")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_rsa92",
                    help="run folders of the V4 networks (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=None, help=f"results JSON (default: {DEFAULT_OUT}, or "
                    f"{DEFAULT_MAPS_OUT} with --flickr-maps)")
    ap.add_argument("--ledger", type=Path, default=LEDGER, help="test-read ledger (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--progress", action="store_true", help="show progress bars")
    args = ap.parse_args(argv)
    try:
        args.flickr_maps = [map_candidate(c) for c in args.flickr_maps]
        if args.flickr_epochs is not None:
            args.flickr_epochs = tuple(int(e) for e in args.flickr_epochs.split(","))
            if not args.flickr_epochs or min(args.flickr_epochs) < 1:
                raise ValueError("epochs must be integers >= 1")
    except ValueError as e:
        ap.error(f"--flickr-maps / --flickr-epochs: {e}")
    if args.out is None:
        args.out = DEFAULT_MAPS_OUT if args.flickr_maps else DEFAULT_OUT
    return args


def map_candidate(text: str) -> tuple[str, ...]:
    """``"block12@grid4,block14@grid4"`` → ``("block12@grid4", "block14@grid4")``, each spec checked by
    :func:`llmvem.embed.spatial.parse_layer_spec` and keeping space (``@grid<G>`` / ``@map``)."""
    from llmvem.embed.spatial import parse_layer_spec
    from llmvem.errors import ConfigError

    specs = tuple(t.strip() for t in text.split(",") if t.strip())
    if not specs:
        raise ValueError(f"{text!r}: expected comma-separated layer specs such as block12@grid4,block14@grid4")
    for spec in specs:
        try:
            parsed = parse_layer_spec(spec)
        except ConfigError as e:
            raise ValueError(str(e)) from None
        if not parsed.spatial:
            raise ValueError(f"{spec!r} is not a map; expected '<layer>@grid<G>' or '<layer>@map'")
    return specs


def alignment_mode(args: argparse.Namespace) -> str:
    """Sizes of the aligned-encoder rows: ``--alignment-mode``, else quick with ``--quick``, else full."""
    return args.alignment_mode or ("quick" if args.quick else "full")


def run_mode(mode_name: str, args: argparse.Namespace) -> dict[str, Any]:
    """The sizes of ``MODES[mode_name]`` (with its ``name``), the Flickr8k epochs replaced by ``--flickr-epochs``."""
    mode = {"name": mode_name, **MODES[mode_name]}
    if args.flickr_epochs:
        mode["flickr_epochs"] = tuple(args.flickr_epochs)
    return mode


def v4_config(v4_data: Path, session: str, cache_dir: str | Path, overrides: list[str]):
    """The shipped ``v4_spatial`` settings for one session (``evaluate.models`` emptied; the caller declares its
    networks), with ``overrides`` applied last."""
    from llmvem.config import apply_overrides, load_config

    cfg = apply_overrides(load_config("v4_spatial"), [f"data.spec=v4:{v4_data}:{session}", f"cache_dir={cache_dir}",
                                                      "evaluate.text_to_brain=false", *overrides])
    cfg.evaluate.models = []
    return cfg


def run_networks(config, entries: list, out: Path, max_images: int | None, progress: bool):
    """Fit ``entries`` (``evaluate.models`` of LLM-VEM networks) on the V4 session through the package's runner,
    into the run folder ``out``: (metrics.json, the prepared inputs, {name: trained network})."""
    from llmvem.data.splits import first_images
    from llmvem.inputs import load_config_dataset, prepare_inputs
    from llmvem.pipeline import extraction_config, run_experiment
    from llmvem.train.load import load_trained_model

    config = config.model_copy(deep=True)
    config.evaluate.models = entries
    config.evaluate.bootstrap = 0  # no comparisons are declared: the 92-image rows are what this run is for
    ds = load_config_dataset(config)
    if max_images:
        ds = first_images(ds, max_images)
    inputs = prepare_inputs(extraction_config(config), show_progress=progress, dataset=ds)
    metrics = run_experiment(config, out, overwrite=True, show_progress=progress, report=False, inputs=inputs,
                             on_stage=lambda m: print(f"[bench_rsa92] {out.name}: {m}", file=sys.stderr, flush=True))
    nets = {e.name: load_trained_model(out / "models" / e.name, backbone=inputs.backbone).network_ for e in entries}
    return metrics, inputs, nets


# ------------------------------------------------------------------------------------------ representations
def backbone_patterns(images, size: int, layers: list[str] = BACKBONE_LAYERS) -> dict[str, np.ndarray]:
    """Frozen EfficientNet-Lite0 features of the images at ``size`` px: layer spec → (n_images, d_layer), or
    (n_images, C, H, W) for grids and maps (``"block12@grid4"``, ``"block12@map"``)."""
    from llmvem.embed.cache import extract_features
    from llmvem.embed.image import load_backbone

    backbone = load_backbone("efficientnet_lite0", image_size=size)
    feats = extract_features(images, backbone, layers=layers, cache=None, batch_size=32, show_progress=False)
    return {f"EfficientNet-Lite0@{size} {layer}": np.asarray(v, dtype=np.float64) for layer, v in feats.items()}


def caption_patterns(config, images) -> tuple[dict[str, np.ndarray], list[list[str]]]:
    """Caption text embeddings of the images (the config's captioner and text encoder, both cached)."""
    from llmvem.captions.run import run_captioning
    from llmvem.captions.store import CaptionStore
    from llmvem.inputs import build_captioner, caption_store_path, embed_captions

    captioner = build_captioner(config, None)
    with CaptionStore(caption_store_path(config)) as store:
        summary = run_captioning(images, captioner, store, show_progress=False, raise_on_failure=True)
        captions = store.get_for(images, summary.config_hash)
    emb = embed_captions(config, {"k92": captions}, show_progress=False)["k92"]
    name = f"captions ({config.captions.backend}) → {config.text.encoder}"
    return {name: np.asarray(emb, dtype=np.float64)}, captions


def llmvem_patterns(args: argparse.Namespace, images_uint8: np.ndarray) -> tuple[dict[str, np.ndarray], dict]:
    """Train the main table's networks on the V4 session (one run folder) and apply them to the 92 images.

    Returns
    -------
    patterns : dict of row name to array of shape (92, dim)
    info : dict
        Session, run folder, readout layers and each network's validation / test mean r on V4.
    """
    import torch

    from llmvem.config_models import ModelEntry

    config = v4_config(args.v4_data, args.v4_session, args.cache_dir,
                       [*(QUICK_OVERRIDES if args.quick else []), *args.overrides])
    finetune = config.train.stage2.epochs > 0
    entries = [ModelEntry(name="aligned_frozen", kind="llmvem", lambda_align=args.lam,
                          set={"train.stage2.epochs": 0})]
    if finetune:
        entries += [ModelEntry(name="aligned_finetuned", kind="llmvem", lambda_align=args.lam),
                    ModelEntry(name="lambda0_finetuned", kind="llmvem", lambda_align=0.0)]
    out = args.runs_dir / f"{args.v4_session}_encoders"
    metrics, inputs, nets = run_networks(config, entries, out, args.max_images, args.progress)
    x = torch.from_numpy(images_uint8)
    patterns: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"v4_session": args.v4_session, "run": str(out), "n_train": metrics["dataset"]["n_train"],
                            "readout_layers": list(config.backbone.layers), "models": {},
                            "image_size": int(inputs.backbone.image_size)}
    for e in entries:
        lam, tuned = float(e.lambda_align), e.name.endswith("finetuned")
        name = f"LLM-VEM λ={lam:g} {'finetuned' if tuned else 'frozen'}"
        net = nets[e.name].eval()
        with torch.no_grad():
            res = net(images=x.to(next(net.parameters()).device), with_embedding=lam > 0)
            pooled = net.backbone_features(x, ["pooled"])["pooled"]
        if lam > 0:
            patterns[f"{name}: aligned embedding"] = res.embedding.float().cpu().numpy().astype(np.float64)
        if tuned:
            patterns[f"{name}: pooled"] = pooled.float().cpu().numpy().astype(np.float64)
        m = metrics["models"][e.name]
        info["models"][name] = {"v4_val_mean_r": m["val_mean_r"], "v4_test_mean_r": m["mean_r"],
                                "seconds": metrics["timing"]["stages"].get(e.name)}
    return patterns, info


# ---------------------------------------------------------------------------------- aligned-encoder rows
def text_config(cache_dir: Path | str, *overrides: str):
    """A RunConfig with the label captioner, the bundled MiniLM, EfficientNet-Lite0 on the CPU and ``cache_dir``."""
    from llmvem.config import apply_overrides, load_config

    return apply_overrides(load_config("demo"), [
        "captions.backend=labels", "text.encoder=minilm", "backbone.name=efficientnet_lite0", "backbone.device=cpu",
        "text.device=cpu", "train.device=cpu", "train.precision=fp32", f"cache_dir={cache_dir}", *overrides])


def description_patterns(config: Any, ids: list[str], path: Path = DESCRIPTIONS) -> np.ndarray:
    """MiniLM embeddings (the config's text encoder) of the shipped descriptions, in ``ids`` order: (92, dim)."""
    from llmvem.captions.existing import read_caption_file
    from llmvem.errors import DataValidationError
    from llmvem.inputs import embed_captions

    table = read_caption_file(path)
    missing = [i for i in ids if i not in table]
    if missing:
        raise DataValidationError(path, "image", f"no description of {missing[:5]}; expected one per image id")
    emb = embed_captions(config, {"k92": [table[i] for i in ids]}, show_progress=False)["k92"]
    return np.asarray(emb, dtype=np.float64)


def network_patterns(network: Any, features: Mapping[str, np.ndarray], prefix: str, embedding: bool = True
                     ) -> dict[str, np.ndarray]:
    """Rows of a trained network applied to features of the 92 images (eval mode): ``prefix`` → aligned embedding
    (head output; with ``embedding``), ``prefix_core`` → core output (``prefix`` itself when not ``embedding``)
    and ``"input"`` → the standardised features the core reads."""
    import torch

    net = network.cpu().eval()
    feats = {k: torch.as_tensor(np.asarray(features[k]), dtype=torch.float32) for k in net.layers}
    with torch.no_grad():
        out = net(features=feats, with_embedding=embedding, with_voxels=False)
        x = net.concat(feats)
        if net.standardize_features:
            x = (x - net.feature_mean) / net.feature_std
    rows = {"input": x.double().numpy()}
    if embedding:
        rows[prefix] = out.embedding.double().numpy()
    rows[f"{prefix}_core" if embedding else prefix] = out.readout_input.double().numpy()
    return rows


def flickr_config(cache_dir: Path, flickr: Path, layers: Sequence[str], seed: int, max_images: int | None):
    """The settings of the Flickr8k-only aligned encoders: a 256-unit linear core over ``layers`` of
    EfficientNet-Lite0 at 224 px, the alignment head toward MiniLM caption embeddings, stage 1 only."""
    return text_config(cache_dir, "backbone.image_size=224", f"backbone.layers=[{','.join(layers)}]",
                       "model.core=linear", "model.core_dim=256", "model.core_dropout=0.1", "model.feature_dropout=0.1",
                       "model.lambda_align=1", "train.stage1.batch_size=128", "train.stage1.lr=0.001",
                       "train.stage2.epochs=0", "train.checkpoint_every=100000", f"align_data.spec={flickr}",
                       f"seed={seed}", *([f"align_data.max_images={max_images}"] if max_images else []))


def train_flickr_encoder(mode: dict[str, Any], cache_dir: Path, work: Path, flickr: Path, seed: int,
                         candidates: Sequence[Sequence[str]], name: str) -> tuple[Any, dict[str, Any]]:
    """Train the Flickr8k-only aligned encoder for every candidate set of layers × ``mode["flickr_epochs"]`` and
    keep the one with the best held-out image → caption top-1.

    A captions-only run has no brain data to validate on, so the layers and the number of epochs are chosen on
    held-out captioned images: each encoder is trained on the first 90% of the Flickr8k images and scored by
    :func:`llmvem.evaluate.retrieval.retrieval_top1` among the last 10% (ties: the first candidate, the fewest
    epochs). The features of every candidate come from one pass of the backbone over the Flickr8k images.

    Returns
    -------
    network : LLMVEM
        The chosen encoder (eval mode, on the CPU).
    info : dict
        ``layers`` (chosen), ``epochs`` (chosen), ``heldout_top1`` ({candidate "a,b": {epochs: top1}}), sizes,
        ``config`` (the chosen encoder's RunConfig; not JSON) and ``seconds``.
    """
    from llmvem.config import apply_overrides
    from llmvem.evaluate.retrieval import retrieval_top1
    from llmvem.inputs import load_config_backbone
    from llmvem.train import train_alignment_model
    from llmvem.train.stream import CaptionStream, load_align_stream

    t = time.perf_counter()
    every = list(dict.fromkeys(spec for c in candidates for spec in c))
    cfg = flickr_config(cache_dir, flickr, every, seed, mode["flickr_images"])
    stream = load_align_stream(cfg, load_config_backbone(cfg), show_progress=False)
    assert stream is not None and stream.features is not None
    n = len(stream.images)
    n_fit = n - max(4, n // 10)
    ids = None if stream.text_ids is None else stream.text_ids[:n_fit]
    val_top1: dict[str, dict[str, float]] = {}
    best: tuple[float, tuple[str, ...], int, Any, Any] | None = None
    for layers in map(tuple, candidates):
        key = ",".join(layers)
        cand_cfg = flickr_config(cache_dir, flickr, layers, seed, mode["flickr_images"])
        feats = {k: np.asarray(stream.features[k]) for k in (*layers, "pooled") if k in stream.features}
        fit = CaptionStream(stream.images.subset(np.arange(n_fit)), stream.text_embeddings[:n_fit],
                            {k: v[:n_fit] for k, v in feats.items()}, weight=stream.weight, text_ids=ids)
        held = {k: v[n_fit:] for k, v in feats.items()}
        val_top1[key] = {}
        for epochs in mode["flickr_epochs"]:
            tag = key.replace(",", "+").replace("@", "_")
            net = train_alignment_model(apply_overrides(cand_cfg, [f"train.stage1.epochs={epochs}"]), fit,
                                        out_dir=work / f"{name}_{tag}_e{epochs}", show_progress=False)
            val_top1[key][str(epochs)] = top1 = retrieval_top1(net.cpu().eval(), held, stream.text_embeddings[n_fit:])
            if best is None or top1 > best[0]:
                best = (top1, layers, epochs, net, cand_cfg)
    assert best is not None
    return best[3], {"n_images": n_fit, "n_heldout": n - n_fit, "layers": list(best[1]), "image_size": 224,
                     "epochs": best[2], "heldout_top1": val_top1, "chance_top1": 1.0 / (n - n_fit), "core": "linear",
                     "core_dim": 256, "config": best[4], "seconds": time.perf_counter() - t}


def flickr_patterns(mode: dict[str, Any], cache_dir: Path, work: Path, k92: Mapping[str, np.ndarray], flickr: Path,
                    seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the Flickr8k-only aligned encoder on ``ALIGN_LAYERS`` (epochs chosen on held-out retrieval,
    :func:`train_flickr_encoder`) and apply it to the 92 images, whose 224 px features of ``ALIGN_LAYERS`` are
    ``k92`` (layer → (92, d_layer))."""
    net, info = train_flickr_encoder(mode, cache_dir, work, flickr, seed, [ALIGN_LAYERS], "flickr8k_aligned")
    info.pop("config")
    info["heldout_top1"] = info["heldout_top1"][",".join(ALIGN_LAYERS)]
    rows = network_patterns(net, k92, "flickr8k_aligned")
    rows["flickr8k_backbone"] = rows.pop("input")
    return rows, info


def flickr_map_patterns(mode: dict[str, Any], cache_dir: Path, work: Path, images: Any, flickr: Path, seed: int,
                        candidates: Sequence[Sequence[str]]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """The map-reading Flickr8k-aligned encoder (layers among ``candidates``, each a set of ``@grid`` / ``@map``
    specs, and epochs chosen on held-out retrieval: :func:`train_flickr_encoder`) applied to the 92 images.

    Returns
    -------
    patterns : dict of row name to array of shape (92, dim)
        :data:`MAP_ROWS` (aligned embedding (92, 384), core output (92, 256), the standardised flattened input
        maps (92, Σ C·G·G)) and ``backbone224_<spec>`` (each chosen map as extracted, flattened by the RDM).
    info : dict
        As :func:`train_flickr_encoder` (``config`` included).
    """
    net, info = train_flickr_encoder(mode, cache_dir, work, flickr, seed, candidates, "flickr8k_maps")
    raw = backbone_patterns(images, 224, info["layers"])
    k92 = {k.split()[-1]: v for k, v in raw.items()}
    got = network_patterns(net, k92, "aligned")
    rows = {MAP_ROWS[0]: got["aligned"], MAP_ROWS[1]: got["aligned_core"], MAP_ROWS[2]: got["input"]}
    rows.update({f"backbone224_{spec}": v for spec, v in k92.items()})
    return rows, info


def v4_patterns(mode: dict[str, Any], args: argparse.Namespace, images: Any, seed: int
                ) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train LLM-VEM with one linear core on the V4 session (λ = 0, λ > 0, λ > 0 + Flickr8k stream; one run
    folder) and apply the three networks to the 92 images."""
    from llmvem.config_models import ModelEntry
    from llmvem.embed.cache import extract_features

    t = time.perf_counter()
    config = v4_config(args.v4_data, args.v4_session, args.cache_dir,
                       [*V4_CORE_OVERRIDES, f"train.stage1.epochs={mode['v4_epochs']}", f"seed={seed}"])
    stream = {"align_data.spec": str(args.flickr)}
    if mode["flickr_images"]:
        stream["align_data.max_images"] = mode["flickr_images"]
    entries = [ModelEntry(name="v4_lambda0", kind="llmvem", lambda_align=0.0),
               ModelEntry(name="v4_aligned", kind="llmvem", lambda_align=V4_LAMBDA),
               ModelEntry(name="v4_aligned_flickr", kind="llmvem", lambda_align=V4_LAMBDA, set=stream)]
    out = args.runs_dir / f"{args.v4_session}_alignment_{mode['name']}"
    metrics, inputs, nets = run_networks(config, entries, out, mode["v4_images"], False)
    layers = list(config.backbone.layers)
    k92 = extract_features(images, inputs.backbone, layers=layers, cache=None, batch_size=32, show_progress=False)
    rows: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"session": args.v4_session, "run": str(out), "n_train": metrics["dataset"]["n_train"],
                            "layers": layers, "image_size": int(inputs.backbone.image_size), "lambda": V4_LAMBDA,
                            "core": "linear", "core_dim": 128, "epochs": mode["v4_epochs"], "models": {}}
    for e in entries:
        got = network_patterns(nets[e.name], k92, e.name, embedding=float(e.lambda_align) > 0)
        rows["v4_backbone"] = got.pop("input")  # the same standardised features for the three (same V4 train rows)
        rows.update(got)
        m = metrics["models"][e.name]
        info["models"][e.name] = {"v4_val_mean_r": m["val_mean_r"], "v4_test_mean_r": m["mean_r"]}
    info["n_flickr_images"] = (metrics["models"]["v4_aligned_flickr"].get("align_stream") or {}).get("n_images")
    info["seconds"] = time.perf_counter() - t
    return rows, info


def alignment_rows(mode_name: str, args: argparse.Namespace, work: Path, seed: int = 0,
                   precomputed: Mapping[str, np.ndarray] | None = None) -> dict[str, Any]:
    """Every aligned-encoder row (those whose data exist), scored with the bootstrap over images.

    ``precomputed`` rows (``backbone224_block12``, ``label_captions_minilm``...: the main table computes the same
    patterns) are used as given instead of being computed again.

    Returns
    -------
    dict
        ``{"rows": {row: {...}}, "settings": {...}}``; rows whose data folder (Flickr8k, V4) is absent are listed
        under ``settings["skipped"]``.
    """
    from llmvem.data.rdm_sets import load_kriegeskorte92
    from llmvem.evaluate.rsa import rsa_rows

    mode = run_mode(mode_name, args)
    cache_dir = Path(args.cache_dir).expanduser()
    t0 = time.perf_counter()
    rset = load_kriegeskorte92(args.data)
    images = rset.images
    cfg = text_config(cache_dir)
    given = dict(precomputed or {})
    patterns: dict[str, np.ndarray] = {"descriptions_minilm": description_patterns(cfg, list(images.ids))}
    patterns["label_captions_minilm"] = given["label_captions_minilm"] if "label_captions_minilm" in given else \
        next(iter(caption_patterns(cfg, images)[0].values()))
    for size in mode["sizes"]:
        names = [f"backbone{size}_{layer}" for layer in ALIGN_LAYERS]
        if all(n in given for n in names):
            patterns.update({n: given[n] for n in names})
            continue
        feats = backbone_patterns(images, size, list(ALIGN_LAYERS))
        patterns.update({f"backbone{size}_{k.split()[-1]}": v for k, v in feats.items()})
    baselines: dict[str, str] = {}
    settings: dict[str, Any] = {**mode, "seed": seed, "skipped": []}
    if args.flickr.is_dir():
        k224 = {layer: patterns[f"backbone224_{layer}"] for layer in ALIGN_LAYERS}
        rows, settings["flickr8k"] = flickr_patterns(mode, cache_dir, work, k224, args.flickr, seed)
        patterns.update(rows)
        baselines.update(flickr8k_aligned="flickr8k_backbone", flickr8k_aligned_core="flickr8k_backbone")
    else:
        settings["skipped"].append(f"flickr8k rows: {args.flickr} is absent")
    if args.v4_data.is_dir() and args.flickr.is_dir():
        rows, settings["v4"] = v4_patterns(mode, args, images, seed)
        patterns.update(rows)
        baselines.update({k: "v4_backbone" for k in rows if k != "v4_backbone"})
    else:
        settings["skipped"].append(f"v4 rows: {args.v4_data} or {args.flickr} is absent")
    for note in settings["skipped"]:
        print(f"bench_rsa92: {note}", file=sys.stderr)
    t_patterns = time.perf_counter() - t0
    subjects = dict(zip(rset.human_it_subjects, rset.human_it_per_subject, strict=True))
    rows = rsa_rows(patterns, subjects, rset.human_it_mean, rset.monkey_it, mode["n_boot"], seed, baselines)
    settings.update(patterns_s=t_patterns, seconds=time.perf_counter() - t0,
                    bootstrap="images resampled with replacement; pairs of distinct source images; percentile 95% CI")
    return {"rows": rows, "settings": settings}


# ----------------------------------------------------------------------------------------------- scoring
def score_rdms(patterns: dict[str, np.ndarray], rset, reference: bool = True) -> dict[str, dict[str, Any]]:
    """Spearman r of each model RDM with human IT (mean and per subject) and monkey IT.

    ``patterns`` maps a row name to features of shape (92, dim) or (92, C, H, W) (flattened); with ``reference``
    the reference model RDMs shipped with the set (animacy, category, HMAX, V1...) are added as
    ``"reference: <name>"`` rows (dim 0).
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
        rows.append([name, str(s["dim"] or "-"), f"{s['human_it_mean']:.3f}", subj,
                     f"{s['human_it_subject_mean']:.3f}", f"{s['monkey_it']:.3f}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    c = results["noise_ceiling"]
    lines.append(f"human IT noise ceiling (leave one subject out, Spearman, per-subject RDMs): lower {c['lower']:.3f}, "
                 f"upper {c['upper']:.3f}; monkey IT vs human IT (mean RDM): {results['monkey_vs_human']:.3f}")
    lines.append("cells: Spearman r between RDMs over the 4,186 image pairs")
    return "\n".join(lines)


def format_rows(rows: Mapping[str, Mapping[str, Any]], delta_label: str = "Δ vs backbone") -> str:
    """Table of the aligned-encoder rows: hIT subject mean [CI], hIT mean RDM, mIT, Δ vs own backbone [CI]
    (``delta_label``: the heading of that column)."""

    def ci(c: list[float]) -> str:
        return f"[{c[0]:+.3f}, {c[1]:+.3f}]"

    w = max(26, *(len(name) + 2 for name in rows))
    dw = max(15, len(delta_label) + 2)
    lines = [f"{'row':<{w}}{'dim':>6}{'hIT subj. mean':>16}{'95% CI':>18}{'hIT avg':>9}{'mIT':>8}"
             f"{delta_label:>{dw}}{'Δ 95% CI':>18}"]
    for name, r in rows.items():
        delta = f"{r['delta_vs_backbone']:>+{dw}.3f}{ci(r['delta_ci']):>18}" if "delta_vs_backbone" in r else ""
        lines.append(f"{name:<{w}}{r['dim']:>6}{r['hit_subject_mean']:>16.3f}{ci(r['ci']):>18}"
                     f"{r['human_avg']:>9.3f}{r['monkey']:>8.3f}{delta}")
    lines.append("bootstrap over the 92 images (resampled with replacement; pairs of distinct source images); "
                 "Δ: paired, same resamples")
    return "\n".join(lines)


def map_aligned_main(args: argparse.Namespace, argv: list[str] | None) -> dict[str, Any] | None:
    """``--flickr-maps``: the map-reading Flickr8k-aligned encoder's rows alone (no main table, no V4 networks),
    scored with the image bootstrap (Δ paired against its input maps), written to ``args.out`` with one ledger
    line; None (and a message) when the Flickr8k folder is absent."""
    from llmvem.data.rdm_sets import load_kriegeskorte92
    from llmvem.evaluate.rsa import leave_one_subject_out_ceiling, rsa_rows
    from llmvem.provenance import append_ledger, result_header, write_results

    if not args.flickr.is_dir():
        print(f"bench_rsa92: Flickr8k folder {args.flickr} is absent; no map-reading rows (use --flickr)")
        return None
    t0 = time.perf_counter()
    seed = 0
    mode_name = alignment_mode(args)
    mode = run_mode("full" if mode_name == "off" else mode_name, args)
    rset = load_kriegeskorte92(args.data)
    with tempfile.TemporaryDirectory(prefix="llmvem_bench_rsa92_maps_") as tmp:
        patterns, info = flickr_map_patterns(mode, Path(args.cache_dir).expanduser(), Path(tmp), rset.images,
                                             args.flickr, seed, args.flickr_maps)
    config = info.pop("config")
    t_patterns = time.perf_counter() - t0
    subjects = dict(zip(rset.human_it_subjects, rset.human_it_per_subject, strict=True))
    rows = rsa_rows(patterns, subjects, rset.human_it_mean, rset.monkey_it, mode["n_boot"], seed,
                    {MAP_ROWS[0]: MAP_ROWS[2], MAP_ROWS[1]: MAP_ROWS[2]})
    lower, upper = leave_one_subject_out_ceiling(rset.human_it_per_subject)
    results = {
        **result_header("kriegeskorte92_rsa_map_aligned", "bench/bench_rsa92.py", argv, config=config, seeds=[seed]),
        "settings": {"mode": mode, "candidates": [",".join(c) for c in args.flickr_maps], "flickr": str(args.flickr),
                     "selection": "layers and epochs by held-out Flickr8k image -> caption top-1 (never RSA)",
                     "bootstrap": "images resampled with replacement; pairs of distinct source images; "
                                  "percentile 95% CI; delta paired (same resamples)"},
        "subjects": list(rset.human_it_subjects),
        "noise_ceiling": {"lower": lower, "upper": upper, "method": "leave one subject out, Spearman, "
                          "per-subject RDMs averaged over the 2 sessions"},
        "flickr8k_maps": info,
        "rows": rows,
        "patterns_s": t_patterns,
        "seconds_total": time.perf_counter() - t0,
    }
    write_results(args.out, results)
    append_ledger(args.ledger, "bench_rsa92", f"test: 92-image RSA, map-reading Flickr8k-aligned encoder "
                  f"({','.join(info['layers'])}, {info['epochs']} epochs, chosen on held-out Flickr8k retrieval "
                  f"among {len(args.flickr_maps)} candidates) vs its input maps -> {args.out.name}", config=config,
                  sessions=["kriegeskorte92"])
    print(f"Map-reading Flickr8k-aligned encoder: {','.join(info['layers'])}, {info['epochs']} epochs "
          f"(held-out top-1 {info['heldout_top1']}, chance {info['chance_top1']:.3f})")
    print(format_rows(rows, delta_label="Δ vs input maps"))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_rsa92: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    from llmvem.data.rdm_sets import load_kriegeskorte92
    from llmvem.evaluate.rsa import compare_rdms, leave_one_subject_out_ceiling
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(args.progress, args.threads)
    if args.flickr_maps:
        return map_aligned_main(args, argv)
    t0 = time.perf_counter()
    rset = load_kriegeskorte92(args.data)
    images = rset.images
    pixels = np.stack([images.load_array(i) for i in range(len(images))])  # uint8 (92, 175, 175, 3)
    mode = alignment_mode(args)
    patterns: dict[str, np.ndarray] = {}
    for size in BACKBONE_SIZES:
        if args.alignment_only and (mode == "off" or size not in MODES[mode]["sizes"]):
            continue
        layers = BACKBONE_LAYERS if args.alignment_only else BACKBONE_LAYERS + (SPATIAL_LAYERS if size == 224 else [])
        patterns.update(backbone_patterns(images, size, layers))
    config = v4_config(args.v4_data, args.v4_session, args.cache_dir, args.overrides)
    text, captions = caption_patterns(config, images)
    patterns.update(text)
    llm_info: dict[str, Any] = {}
    if args.no_llmvem or args.alignment_only:
        llm_info["skipped"] = "--no-llmvem" if args.no_llmvem else "--alignment-only"
    elif not args.v4_data.is_dir():
        llm_info["skipped"] = f"V4 data folder {args.v4_data} is absent"
        print(f"bench_rsa92: {llm_info['skipped']}; LLM-VEM rows skipped", file=sys.stderr)
    else:
        llm_patterns, llm_info = llmvem_patterns(args, pixels)
        patterns.update(llm_patterns)
    aligned: dict[str, Any] = {"skipped": "--alignment-mode off"}
    if mode != "off":
        given = {"label_captions_minilm": next(iter(text.values()))}
        given.update({f"backbone{size}_{layer}": patterns[f"EfficientNet-Lite0@{size} {layer}"]
                      for size in BACKBONE_SIZES for layer in ALIGN_LAYERS
                      if f"EfficientNet-Lite0@{size} {layer}" in patterns})
        with tempfile.TemporaryDirectory(prefix="llmvem_bench_rsa92_align_") as tmp:
            aligned = alignment_rows(mode, args, Path(tmp), precomputed=given)
    if args.alignment_only:
        patterns = {}
    lower, upper = leave_one_subject_out_ceiling(rset.human_it_per_subject)
    results = {
        **result_header("kriegeskorte92_rsa", "bench/bench_rsa92.py", argv, config=config, seeds=[config.seed]),
        "settings": {"v4_session": args.v4_session, "lambda": args.lam, "quick": args.quick,
                     "max_images": args.max_images, "alignment_mode": mode, "overrides": list(args.overrides)},
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
    write_results(args.out, results)
    v4_read = "skipped" not in llm_info or "v4" in aligned.get("settings", {})
    parts = [*(["main table"] if results["models"] else []), *([f"aligned encoders ({mode})"] if "rows" in aligned
                                                               else [])]
    append_ledger(args.ledger, "bench_rsa92", f"test: 92-image RSA, {' + '.join(parts) or 'nothing'}"
                  f"{'; V4 test r of the LLM-VEM networks' if v4_read else ''} -> {args.out.name}", config=config,
                  sessions=["kriegeskorte92", *([f"v4:{args.v4_session}"] if v4_read else [])])
    if results["models"]:
        print(format_table(results))
    if "rows" in aligned:
        print("\nLanguage-aligned encoders (Spearman r; hIT subj. mean = mean over the 4 subjects' RDMs)")
        print(format_rows(aligned["rows"]))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
