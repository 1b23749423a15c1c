"""92-image RSA of language-aligned encoders, with a bootstrap over images (issue 14 item 5).

Rows (model RDMs of the 92 Kriegeskorte images, correlation distance; :func:`llmvem.evaluate.rsa.rdm`):

* ``descriptions_minilm`` — MiniLM embeddings of the shipped descriptions (``bench/data/
  kriegeskorte92_descriptions.csv``, written before any RSA result; see its README);
* ``label_captions_minilm`` — the offline ImageNet-label captions → MiniLM (the captions of the V4 benchmark);
* ``backbone<size>_<layer>`` — frozen EfficientNet-Lite0 layers (block12, block14, pooled) at 224 px (and 112 px);
* ``flickr8k_aligned`` / ``flickr8k_aligned_core`` — an encoder aligned on Flickr8k captions only, no brain data
  (``../shared/data/flickr8k_1000``: a linear shared core + alignment head trained with the contrastive loss on
  cached EfficientNet-Lite0 features at 224 px, :func:`llmvem.train.train_alignment_model`; its epochs chosen
  on held-out Flickr8k image → caption retrieval, never on RSA): aligned embedding (head output) and core
  output; ``flickr8k_backbone`` — the standardised backbone features it reads;
* ``v4_lambda0`` (core output), ``v4_aligned`` / ``v4_aligned_flickr`` (aligned embedding; ``_core``: core
  output) — LLM-VEM with the same linear core trained on one V4 session (bench_v4 settings, 112 px, stage 1 on
  cached features) with λ = 0, λ = ``V4_LAMBDA`` on the label captions, and the same plus the Flickr8k stream
  (``align_data.spec``); ``v4_backbone`` — the standardised backbone features those networks read.

Each row: Spearman r of the model RDM with each of the 4 human subjects' IT RDMs (averaged over the 2 sessions)
→ ``hit_subject_mean``, with the subject-averaged human RDM → ``human_avg`` and with monkey IT → ``monkey``, with
percentile 95% CIs of a **bootstrap over images**: the 92 images are resampled with replacement and every RDM is
correlated over the pairs of distinct source images of the resample (pairs of a duplicated image with itself are
dropped). The same resamples serve every row, so a row with a ``baseline`` (its own backbone features) gets the
paired ``delta_vs_backbone`` of ``hit_subject_mean`` with its CI and two-sided bootstrap p.

``bench/bench_rsa92.py`` prints these rows (``--alignment-mode``) and stores them in its results
(``bench/bench_alignment.py`` no longer does: it is the virtual-brain positive control only).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
from scipy import stats

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
DESCRIPTIONS = ROOT / "bench" / "data" / "kriegeskorte92_descriptions.csv"
BACKBONE_LAYERS = ("block12", "block14", "pooled")
#: Layers the Flickr8k-aligned encoder reads (EfficientNet-Lite0 at 224 px, its training size): the backbone rows'.
FLICKR_LAYERS = BACKBONE_LAYERS
#: λ of the aligned V4 models (fixed, not tuned: bench_alignment's quick sweep chose 1-3 on the virtual brain).
V4_LAMBDA = 1.0
V4_SESSION = "210322"

#: Sizes of each mode: bootstrap resamples, backbone sizes, Flickr8k images / candidate epochs (chosen on held-out
#: Flickr8k retrieval), V4 images / epochs.
MODES: dict[str, dict[str, Any]] = {
    "full": {"n_boot": 1000, "sizes": (224, 112), "flickr_images": None, "flickr_epochs": (5, 10, 20, 40),
             "v4_images": None, "v4_epochs": 60},
    "quick": {"n_boot": 200, "sizes": (224,), "flickr_images": 300, "flickr_epochs": (10, 20), "v4_images": 400,
              "v4_epochs": 15},
    "smoke": {"n_boot": 50, "sizes": (224,), "flickr_images": 40, "flickr_epochs": (1, 2), "v4_images": 60,
              "v4_epochs": 2},
}


# --------------------------------------------------------------------------------------------- bootstrap
def resample_pairs(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Source images of the pairs of one bootstrap resample of ``n`` images.

    The images are drawn with replacement; the pairs are those of the resampled RDM's upper triangle whose two
    source images differ.

    Returns
    -------
    a, b : int arrays of shape (n_pairs,)
        Row and column (source image indices) of each kept pair, ``a != b``.
    """
    idx = rng.integers(0, n, n)
    iu, ju = np.triu_indices(n, k=1)
    a, b = idx[iu], idx[ju]
    keep = a != b
    return a[keep], b[keep]


def _ranks(v: np.ndarray) -> np.ndarray:
    """Centred, unit-norm ranks of ``v`` (Spearman r of two such vectors = their dot product)."""
    r = stats.rankdata(v)
    r -= r.mean()
    norm = np.linalg.norm(r)
    return r / norm if norm > 0 else r * np.nan


def image_bootstrap(model_rdms: Mapping[str, np.ndarray], target_rdms: Mapping[str, np.ndarray], n_boot: int,
                    seed: int = 0) -> dict[str, dict[str, np.ndarray]]:
    """Spearman r of every model RDM with every target RDM on bootstrap resamples of the images.

    Parameters
    ----------
    model_rdms, target_rdms : mapping of name to array of shape (n, n)
        Square RDMs of the same ``n`` images.
    n_boot : int
        Resamples (the same for every model and target: differences between rows are paired).
    seed : int

    Returns
    -------
    dict of model name to dict of target name to array of shape (n_boot,)
    """
    n = next(iter(target_rdms.values())).shape[0]
    rng = np.random.default_rng(seed)
    out = {m: {t: np.empty(n_boot) for t in target_rdms} for m in model_rdms}
    for k in range(n_boot):
        a, b = resample_pairs(n, rng)
        targets = {t: _ranks(np.asarray(r)[a, b]) for t, r in target_rdms.items()}
        for m, r in model_rdms.items():
            mr = _ranks(np.asarray(r)[a, b])
            for t, tr in targets.items():
                out[m][t][k] = float(mr @ tr)
    return out


def _ci(values: np.ndarray) -> list[float]:
    lo, hi = np.nanpercentile(values, [2.5, 97.5])
    return [float(lo), float(hi)]


def rsa_rows(patterns: Mapping[str, np.ndarray], rset: Any, n_boot: int, seed: int = 0,
             baselines: Mapping[str, str] | None = None) -> dict[str, dict[str, Any]]:
    """Score each pattern's RDM against human and monkey IT, with bootstrap CIs over images.

    Parameters
    ----------
    patterns : mapping of row name to array of shape (92, dim)
    rset : RDMSet
        :func:`llmvem.data.rdm_sets.load_kriegeskorte92` (per-subject human IT, mean human IT, monkey IT).
    n_boot : int
    seed : int
    baselines : mapping of row name to the row name of its own backbone features, optional
        Adds ``delta_vs_backbone`` (row − baseline, hit_subject_mean), ``delta_ci`` and ``delta_p`` (paired).

    Returns
    -------
    dict of row name to dict
        ``hit_subject_mean``, ``ci``, ``human_avg``, ``human_avg_ci``, ``monkey``, ``monkey_ci``,
        ``hit_subjects`` (per subject), ``dim``, ``n_boot`` (and the delta fields).
    """
    import bench_v4

    from llmvem.evaluate.rsa import compare_rdms, rdm

    subjects = {f"hIT_{s}": m for s, m in zip(rset.human_it_subjects, rset.human_it_per_subject, strict=True)}
    targets = {**subjects, "human_avg": rset.human_it_mean, "monkey": rset.monkey_it}
    rdms = {name: rdm(x) for name, x in patterns.items()}
    boot = image_bootstrap(rdms, targets, n_boot, seed)
    rows: dict[str, dict[str, Any]] = {}
    subject_mean_boot: dict[str, np.ndarray] = {}
    for name, m in rdms.items():
        subj = {t[4:]: compare_rdms(m, r) for t, r in subjects.items()}
        subject_mean_boot[name] = np.mean([boot[name][t] for t in subjects], axis=0)
        rows[name] = {"hit_subject_mean": float(np.mean(list(subj.values()))), "ci": _ci(subject_mean_boot[name]),
                      "human_avg": compare_rdms(m, rset.human_it_mean), "human_avg_ci": _ci(boot[name]["human_avg"]),
                      "monkey": compare_rdms(m, rset.monkey_it), "monkey_ci": _ci(boot[name]["monkey"]),
                      "hit_subjects": subj, "dim": int(np.prod(patterns[name].shape[1:])), "n_boot": n_boot}
    for name, base in (baselines or {}).items():
        if name in rows and base in rows:
            delta = rows[name]["hit_subject_mean"] - rows[base]["hit_subject_mean"]
            diffs = subject_mean_boot[name] - subject_mean_boot[base]
            rows[name].update(baseline=base, delta_vs_backbone=delta, delta_ci=_ci(diffs),
                              delta_p=bench_v4.bootstrap_p(delta, diffs))
    return rows


# ------------------------------------------------------------------------------------------ patterns
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
    """Rows of a trained network applied to features of the 92 images (eval mode).

    Returns ``prefix`` → aligned embedding (head output; with ``embedding``), ``prefix_core`` → core output
    (``prefix`` itself when not ``embedding``) and ``"input"`` → the standardised features the core reads.
    """
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


def flickr_patterns(mode: dict[str, Any], cache_dir: Path, work: Path, k92: Mapping[str, np.ndarray], flickr: Path,
                    seed: int) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train the Flickr8k-only aligned encoder and apply it to the 92 images, whose 224 px features of
    ``FLICKR_LAYERS`` are ``k92`` (layer → (92, d_layer)).

    A captions-only run has no brain data to validate on, so the number of epochs is chosen here on held-out
    captioned images: the encoder is trained on the first 90% of the Flickr8k images for each of
    ``mode["flickr_epochs"]`` and the one with the best image → caption top-1 retrieval among the last 10% is kept.
    """
    from llmvem.config import apply_overrides
    from llmvem.evaluate.retrieval import retrieval_top1
    from llmvem.inputs import load_config_backbone
    from llmvem.train import train_alignment_model
    from llmvem.train.stream import CaptionStream, load_align_stream

    t = time.perf_counter()
    layers = ",".join(FLICKR_LAYERS)
    cfg = text_config(cache_dir, "backbone.image_size=224", f"backbone.layers=[{layers}]", "model.core=linear",
                      "model.core_dim=256", "model.core_dropout=0.1", "model.feature_dropout=0.1",
                      "model.lambda_align=1", "train.stage1.batch_size=128", "train.stage1.lr=0.001",
                      "train.stage2.epochs=0", "train.checkpoint_every=100000", f"align_data.spec={flickr}",
                      f"seed={seed}", *([f"align_data.max_images={mode['flickr_images']}"] if mode["flickr_images"]
                                        else []))
    backbone = load_config_backbone(cfg)
    stream = load_align_stream(cfg, backbone, show_progress=False)
    assert stream is not None and stream.features is not None
    n = len(stream.images)
    n_fit = n - max(4, n // 10)
    fit = CaptionStream(stream.images.subset(np.arange(n_fit)), stream.text_embeddings[:n_fit],
                        {k: np.asarray(v)[:n_fit] for k, v in stream.features.items()}, stream.weight, None)
    held = {k: np.asarray(v)[n_fit:] for k, v in stream.features.items()}
    val_top1: dict[str, float] = {}
    best: tuple[float, int, Any] | None = None
    for epochs in mode["flickr_epochs"]:
        net = train_alignment_model(apply_overrides(cfg, [f"train.stage1.epochs={epochs}"]), fit,
                                    out_dir=work / f"flickr8k_aligned_e{epochs}", show_progress=False)
        val_top1[str(epochs)] = top1 = retrieval_top1(net.cpu().eval(), held, stream.text_embeddings[n_fit:])
        if best is None or top1 > best[0]:
            best = (top1, epochs, net)
    assert best is not None
    rows = network_patterns(best[2], k92, "flickr8k_aligned")
    rows["flickr8k_backbone"] = rows.pop("input")
    return rows, {"n_images": n_fit, "n_heldout": n - n_fit, "layers": list(FLICKR_LAYERS), "image_size": 224,
                  "epochs": best[1], "heldout_top1": val_top1, "chance_top1": 1.0 / (n - n_fit), "core": "linear",
                  "core_dim": 256, "seconds": time.perf_counter() - t}


def v4_patterns(mode: dict[str, Any], cache_dir: Path, work: Path, images: Any, v4_data: Path, flickr: Path,
                seed: int, session: str = V4_SESSION) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Train LLM-VEM with one linear core on a V4 session (λ = 0, λ > 0, λ > 0 + Flickr8k stream); apply the
    three networks to the 92 images (112 px)."""
    import bench_v4

    from llmvem.config import apply_overrides
    from llmvem.embed.cache import extract_features
    from llmvem.inputs import load_config_dataset, prepare_inputs
    from llmvem.train import train_encoding_model
    from llmvem.train.stream import load_align_stream

    t = time.perf_counter()
    argv = ["--data", str(v4_data), "--sessions", session, "--cache-dir", str(cache_dir)]
    config = apply_overrides(bench_v4.session_config(bench_v4.parse_args(argv), session), [
        "model.core=linear", "model.core_dim=128", "model.core_dropout=0.1", "train.stage2.epochs=0",
        f"train.stage1.epochs={mode['v4_epochs']}", "train.device=cpu", "train.precision=fp32", "backbone.device=cpu",
        "text.device=cpu", "train.checkpoint_every=100000", f"seed={seed}"])
    ds = load_config_dataset(config)
    if mode["v4_images"]:
        ds = bench_v4.truncate_dataset(ds, mode["v4_images"])
    prep = config.model_copy(deep=True)
    prep.backbone.layers = list(bench_v4.CANDIDATE_LAYERS)  # the cache key bench_v4 and bench_rsa92 use
    inputs = prepare_inputs(prep, show_progress=False, dataset=ds)
    layers = list(config.backbone.layers)
    feats = {s: {k: v for k, v in f.items() if k in layers} for s, f in inputs.features.items()}
    stream_cfg = apply_overrides(config, [f"align_data.spec={flickr}", *(
        [f"align_data.max_images={mode['flickr_images']}"] if mode["flickr_images"] else [])])
    stream = load_align_stream(stream_cfg, inputs.backbone, show_progress=False)
    k92 = extract_features(images, inputs.backbone, layers=layers, cache=None, batch_size=32, show_progress=False)
    rows: dict[str, np.ndarray] = {}
    info: dict[str, Any] = {"session": session, "n_train": len(inputs.dataset.train), "layers": layers,
                            "image_size": int(inputs.backbone.image_size), "lambda": V4_LAMBDA, "core": "linear",
                            "core_dim": 128, "epochs": mode["v4_epochs"], "models": {}}
    for name, lam, st in (("v4_lambda0", 0.0, None), ("v4_aligned", V4_LAMBDA, None),
                          ("v4_aligned_flickr", V4_LAMBDA, stream)):
        cfg = apply_overrides(config, [f"model.lambda_align={lam}"])
        res = train_encoding_model(cfg, inputs.dataset, text_embeddings=inputs.text_embeddings if lam > 0 else None,
                                   features=feats, out_dir=work / name, show_progress=False, align_stream=st)
        got = network_patterns(res.network, k92, name, embedding=lam > 0)
        rows["v4_backbone"] = got.pop("input")  # the same standardised features for the three (same V4 train rows)
        rows.update(got)
        info["models"][name] = {"v4_val_mean_r": res.metrics["val_mean_r"], "v4_test_mean_r":
                                res.metrics.get("test_mean_r")}
    info["n_flickr_images"] = len(stream.images) if stream is not None else 0
    info["seconds"] = time.perf_counter() - t
    return rows, info


# ------------------------------------------------------------------------------------------------ rows
def alignment_rows(mode_name: str, cache_dir: Path, work: Path, k92: Path = DATA / "kriegeskorte92",
                   flickr: Path = DATA / "flickr8k_1000", v4_data: Path = DATA / "v4_cowley2023",
                   v4_session: str = V4_SESSION, seed: int = 0, precomputed: Mapping[str, np.ndarray] | None = None, log_fn: Any = print) -> dict[str, Any]:
    """Every row of the module docstring (those whose data exist), scored with the image bootstrap.

    ``precomputed`` rows (e.g. ``backbone224_block12``, ``label_captions_minilm`` from ``bench_rsa92``, which
    computes the same patterns) are used as given instead of being computed again.

    Returns
    -------
    dict
        ``{"rows": {row: {...}}, "settings": {...}}``; ``{"skipped": reason}`` when the 92-image set is absent.
        Rows whose data folder (Flickr8k, V4) is absent are listed under ``settings["skipped"]``.
    """
    import bench_rsa92

    from llmvem.data.rdm_sets import load_kriegeskorte92

    if not k92.is_dir():
        return {"skipped": f"92-image data folder {k92} is absent"}
    mode = MODES[mode_name]
    t0 = time.perf_counter()
    rset = load_kriegeskorte92(k92)
    images = rset.images
    cfg = text_config(cache_dir)
    given = dict(precomputed or {})
    patterns: dict[str, np.ndarray] = {"descriptions_minilm": description_patterns(cfg, list(images.ids))}
    patterns["label_captions_minilm"] = given["label_captions_minilm"] if "label_captions_minilm" in given else \
        next(iter(bench_rsa92.caption_patterns(cfg, images)[0].values()))
    for size in mode["sizes"]:
        names = [f"backbone{size}_{layer}" for layer in BACKBONE_LAYERS]
        if all(n in given for n in names):
            patterns.update({n: given[n] for n in names})
            continue
        feats = bench_rsa92.backbone_patterns(images, size, list(BACKBONE_LAYERS))
        patterns.update({f"backbone{size}_{k.split()[-1]}": v for k, v in feats.items()})
    baselines: dict[str, str] = {}
    settings: dict[str, Any] = {"mode": mode_name, **mode, "seed": seed, "skipped": []}
    if flickr.is_dir():
        k224 = {layer: patterns[f"backbone224_{layer}"] for layer in FLICKR_LAYERS}
        rows, settings["flickr8k"] = flickr_patterns(mode, cache_dir, work, k224, flickr, seed)
        patterns.update(rows)
        baselines.update(flickr8k_aligned="flickr8k_backbone", flickr8k_aligned_core="flickr8k_backbone")
    else:
        settings["skipped"].append(f"flickr8k rows: {flickr} is absent")
    if v4_data.is_dir() and flickr.is_dir():
        rows, settings["v4"] = v4_patterns(mode, cache_dir, work, images, v4_data, flickr, seed, v4_session)
        patterns.update(rows)
        baselines.update({k: "v4_backbone" for k in rows if k != "v4_backbone"})
    else:
        settings["skipped"].append(f"v4 rows: {v4_data} or {flickr} is absent")
    for note in settings["skipped"]:
        log_fn(f"rsa92: {note}")
    t_patterns = time.perf_counter() - t0
    rows = rsa_rows(patterns, rset, mode["n_boot"], seed, baselines)
    settings.update(patterns_s=t_patterns, seconds=time.perf_counter() - t0,
                    bootstrap="images resampled with replacement; pairs of distinct source images; percentile 95% CI")
    return {"rows": rows, "settings": settings}


def format_rows(rows: Mapping[str, Mapping[str, Any]]) -> str:
    """Table of the rows: hIT subject mean [CI], hIT mean RDM, mIT, Δ vs own backbone [CI]."""

    def ci(c: list[float]) -> str:
        return f"[{c[0]:+.3f}, {c[1]:+.3f}]"

    lines = [f"{'row':<26}{'dim':>6}{'hIT subj. mean':>16}{'95% CI':>18}{'hIT avg':>9}{'mIT':>8}"
             f"{'Δ vs backbone':>15}{'Δ 95% CI':>18}"]
    for name, r in rows.items():
        delta = f"{r['delta_vs_backbone']:>+15.3f}{ci(r['delta_ci']):>18}" if "delta_vs_backbone" in r else ""
        lines.append(f"{name:<26}{r['dim']:>6}{r['hit_subject_mean']:>16.3f}{ci(r['ci']):>18}"
                     f"{r['human_avg']:>9.3f}{r['monkey']:>8.3f}{delta}")
    lines.append("bootstrap over the 92 images (resampled with replacement; pairs of distinct source images); "
                 "Δ: paired, same resamples")
    return "\n".join(lines)
