"""One Algonauts 2023 / NSD subject through the whole route on one machine: wall time and peak memory per command.

Builds a fake subject in the exact challenge layout (``training_split/training_fmri/<h>_training_fmri.npy``,
``training_images/train-NNNN_nsd-NNNNN.png``, ``test_split/test_images``, ``roi_masks/<h>.<class>_challenge_space.npy``
and ``mapping_<class>.npy`` for the 6 classes and 31 ROIs, ``<h>.all-vertices_fsaverage_space.npy``, noise-ceiling
files in percent) at the real size of subject 1 (9,841 training images, 19,004 + 20,544 vertices, 159 challenge
test images) or a given size, then runs through the CLI, each command in its own subprocess::

    llmvem data inspect SUBJ --json
    llmvem train --config demo --set data.spec=SUBJ --set backbone.image_size=112 --set train.stage2.epochs=0 \\
        --set model.core=linear --set model.readout_init=ridge --set train.stage1.lr=0.0001 \\
        --set captions.backend=file ...        (stage 2 off; the issue's command + the NSD-scale stage-1 recipe)
    llmvem report RUN
    llmvem export RUN --subject-dir SUBJ
    llmvem predict --run RUN --images SUBJ/test_split/test_images --out preds.h5

and records each command's wall time and peak resident memory (the child's VmHWM, sampled while it runs), its
ratio to the float32 response matrix, and, for ``train``, every pipeline stage's seconds and peak memory from
``metrics.json["timing"]`` and the test mean r of every model.

The responses: 500 virtual-brain voxels (:func:`llmvem.data.virtual_brain.make_virtual_brain`: Gabor-energy
"early visual" and category "semantic" units of the rendered scenes) are the sources; each vertex mixes 4 sources
of its ROI's kind (early ROIs: early units, category ROIs: semantic units, elsewhere any) with random weights, is
z-scored and gets Gaussian noise (noise ceiling 5–75 %; 20 % of the vertices are pure noise, as cortex outside
the visual system is). The images are the scenes (rendered at 72 px, stored at ``--image-size``), and their exact
descriptions are the captions (``captions.csv``; NSD images come with COCO captions, so ``captions.backend=file``
is what a researcher would do; ``--captions labels`` runs the ImageNet-label captioner instead, ~17 min at full
size).

Usage::

    python bench/bench_nsd_scale.py                            # real size: ~45 min on 2 idle cores (captions file)
    python bench/bench_nsd_scale.py --n-train 2000 --n-vertices 4000,4000 --out bench/results/nsd_scale_small.json
    python bench/bench_nsd_scale.py --work /tmp/nsd --keep     # keep the subject, cache and run folder for reruns
    python bench/bench_nsd_scale.py --set model.lambda_align=0 --skip predict

Writes ``bench/results/nsd_scale.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "nsd_scale.json"

#: Subject 1 of the Algonauts 2023 challenge.
NSD_TRAIN, NSD_VERTICES, NSD_CHALLENGE = 9841, (19004, 20544), 159
FSAVERAGE_N_VERTICES = 163_842

#: The challenge's ROI classes and names (31 ROIs), each with the fraction of a hemisphere's vertices it labels
#: and the kind of source its vertices mix ("early", "semantic" or "any").
ROI_CLASSES: dict[str, tuple[str, float, list[str]]] = {
    "prf-visualrois": ("early", 0.16, ["V1v", "V1d", "V2v", "V2d", "V3v", "V3d", "hV4"]),
    "floc-bodies": ("semantic", 0.06, ["EBA", "FBA-1", "FBA-2", "mTL-bodies"]),
    "floc-faces": ("semantic", 0.05, ["OFA", "FFA-1", "FFA-2", "mTL-faces", "aTL-faces"]),
    "floc-places": ("semantic", 0.05, ["OPA", "PPA", "RSC"]),
    "floc-words": ("semantic", 0.05, ["OWFA", "VWFA-1", "VWFA-2", "mfs-words", "mTL-words"]),
    "streams": ("any", 0.70, ["early", "midventral", "midlateral", "midparietal", "ventral", "lateral", "parietal"]),
}
MIX_SOURCES = 4  # sources per vertex
NOISE_FRACTION = 0.2  # vertices with no signal


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n-train", type=int, default=NSD_TRAIN, help="training images (default: %(default)s)")
    ap.add_argument("--n-vertices", default=",".join(map(str, NSD_VERTICES)),
                    help="lh,rh vertices (default: %(default)s)")
    ap.add_argument("--n-challenge", type=int, default=NSD_CHALLENGE, help="challenge test images")
    ap.add_argument("--image-size", type=int, default=64, help="side of the stored images in pixels")
    ap.add_argument("--captions", choices=("file", "labels"), default="file",
                    help="file: the scenes' exact descriptions (captions.csv); labels: the ImageNet-label captioner")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra train override KEY=VALUE")
    ap.add_argument("--skip", action="append", default=[], choices=("inspect", "train", "report", "export", "predict"),
                    help="leave out a command (repeatable)")
    ap.add_argument("--work", type=Path, default=None, help="folder for the subject, cache and run (default: temp)")
    ap.add_argument("--keep", action="store_true", help="keep --work (reruns reuse the subject and the cache)")
    ap.add_argument("--fresh-run", action="store_true", help="delete the run folder of --work before training")
    ap.add_argument("--threads", type=int, default=None, help="--threads of the llmvem commands")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--timeout", type=float, default=4 * 3600.0, help="seconds per command")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    return ap.parse_args(argv)


# ------------------------------------------------------------------------------------------ the fake subject
def _roi_labels(rng: np.random.Generator, n: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """Per class: int labels (n,) (0 = none, k = ROI k), and each vertex's source kind (0 any, 1 early, 2 sem)."""
    kind = np.zeros(n, dtype=np.int64)
    order = rng.permutation(n)
    labels: dict[str, np.ndarray] = {}
    start = 0
    for cls, (what, fraction, names) in ROI_CLASSES.items():
        lab = np.zeros(n, dtype=np.int64)
        if cls == "streams":  # a coarser parcellation over most vertices, overlapping the others
            chosen = np.sort(rng.choice(n, int(fraction * n), replace=False))
        else:
            size = int(fraction * n)
            chosen = order[start:start + size]
            start += size
            kind[chosen] = 1 if what == "early" else 2
        parts = np.array_split(chosen, len(names))
        for k, part in enumerate(parts, start=1):
            lab[part] = k
        labels[cls] = lab
    return labels, kind


def make_fake_subject(folder: Path, n_train: int = NSD_TRAIN, n_vertices: tuple[int, int] = NSD_VERTICES,
                      n_challenge: int = NSD_CHALLENGE, image_size: int = 64, seed: int = 0) -> dict[str, Any]:
    """Write a fake Algonauts 2023 subject into ``folder`` (see the module docstring); returns its description.

    A folder already holding a subject made with the same arguments is reused (``fake_subject.json``).
    """
    from PIL import Image

    from llmvem.data.virtual_brain import make_virtual_brain

    folder = Path(folder)
    spec = {"n_train": n_train, "n_vertices": list(n_vertices), "n_challenge": n_challenge,
            "image_size": image_size, "seed": seed, "version": 1}
    marker = folder / "fake_subject.json"
    if marker.is_file() and json.loads(marker.read_text())["spec"] == spec:
        return json.loads(marker.read_text())
    if folder.exists():
        shutil.rmtree(folder)
    t0 = time.perf_counter()
    n_total = n_train + n_challenge
    vb = make_virtual_brain(n_train=n_total, n_test=2, image_size=72, seed=seed)
    sources = vb.meta["ground_truth"]["signal"][:n_total].astype(np.float32)  # (n_total, 500), z-scored
    is_early = vb.roi_masks["early_visual"]
    src_hemi = vb.hemisphere
    images, ids = vb.train.images, vb.train.images.ids
    rng = np.random.default_rng(seed + 1)
    nsd = np.sort(rng.choice(73_000, n_total, replace=False))
    train_names = [f"train-{i + 1:04d}_nsd-{nsd[i]:05d}" for i in range(n_train)]
    test_names = [f"test-{i + 1:04d}_nsd-{nsd[n_train + i]:05d}" for i in range(n_challenge)]
    dirs = {k: folder / p for k, p in (("img", "training_split/training_images"), ("test", "test_split/test_images"),
                                       ("fmri", "training_split/training_fmri"), ("roi", "roi_masks"),
                                       ("nc", "noise_ceiling"))}
    for d in dirs.values():
        d.mkdir(parents=True, exist_ok=True)
    with open(folder / "captions.csv", "w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", "caption"])
        for i, name in enumerate(train_names + test_names):
            img = images.load(i)
            if image_size != img.size[0]:
                img = img.resize((image_size, image_size), Image.LANCZOS)
            img.save((dirs["img"] if i < n_train else dirs["test"]) / f"{name}.png")
            for caption in vb.captions[ids[i]]:
                writer.writerow([name, caption])
    for c, (_, _, names) in ROI_CLASSES.items():
        np.save(dirs["roi"] / f"mapping_{c}.npy", {0: "Unknown", **dict(enumerate(names, start=1))},
                allow_pickle=True)
    signal_rows = sources[:n_train]
    for h, n in zip(("lh", "rh"), n_vertices, strict=True):
        labels, kind = _roi_labels(rng, n)
        for c, lab in labels.items():
            np.save(dirs["roi"] / f"{h}.{c}_challenge_space.npy", lab.astype(np.float32))  # float, as released
        fs = np.zeros(FSAVERAGE_N_VERTICES, dtype=np.float32)
        fs[np.sort(rng.choice(FSAVERAGE_N_VERTICES, n, replace=False))] = 1.0
        np.save(dirs["roi"] / f"{h}.all-vertices_fsaverage_space.npy", fs)
        # each vertex: MIX_SOURCES sources of its hemisphere and kind, random weights
        own = src_hemi == h
        pools = {0: np.flatnonzero(own), 1: np.flatnonzero(own & is_early), 2: np.flatnonzero(own & ~is_early)}
        mix = np.zeros((n, sources.shape[1]), dtype=np.float32)
        for k, pool in pools.items():
            verts = np.flatnonzero(kind == k)
            picks = np.stack([rng.choice(pool, MIX_SOURCES, replace=False) for _ in verts]) if verts.size else \
                np.zeros((0, MIX_SOURCES), dtype=np.int64)
            mix[verts[:, None], picks] = rng.standard_normal(picks.shape).astype(np.float32)
        mix[rng.random(n) < NOISE_FRACTION] = 0.0
        sub = signal_rows[np.sort(rng.choice(n_train, min(n_train, 2000), replace=False))]
        signal_sd = np.sqrt(((sub @ mix.T) ** 2).mean(0))  # sources are z-scored: the mixture's SD
        signal_sd = np.where(signal_sd > 0, signal_sd, 1.0).astype(np.float32)
        nc = rng.uniform(0.05, 0.75, n)  # noise ceiling (fraction of variance) of vertices with signal
        nc[~mix.any(axis=1)] = 0.0
        noise_sd = np.sqrt(np.where(nc > 0, (1.0 - nc) / np.maximum(nc, 1e-9), 1.0)).astype(np.float32)
        out = np.lib.format.open_memmap(dirs["fmri"] / f"{h}_training_fmri.npy", mode="w+", dtype=np.float32,
                                        shape=(n_train, n))
        step = 512
        for s in range(0, n_train, step):
            e = min(s + step, n_train)
            block = (signal_rows[s:e] @ mix.T) / signal_sd
            block += rng.standard_normal(block.shape, dtype=np.float32) * noise_sd
            out[s:e] = block
        out.flush()
        del out
        np.save(dirs["nc"] / f"{h}_noise_ceiling.npy", 100.0 * nc)
    info = {"spec": spec, "folder": str(folder), "seconds": time.perf_counter() - t0,
            "response_bytes": 4 * n_train * sum(n_vertices), "n_rois": sum(len(v[2]) for v in ROI_CLASSES.values())}
    marker.write_text(json.dumps(info, indent=1))
    return info


# ------------------------------------------------------------------------------------------------ commands
def llmvem_command(*args: str) -> list[str]:
    """An ``llmvem`` command line through this interpreter (the active environment)."""
    return [sys.executable, "-c", "from llmvem.cli import console_main; console_main()", *args]


def run_measured(cmd: list[str], cwd: Path, timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run ``cmd``; wall seconds, peak RSS of the child (bytes: its VmHWM sampled while it runs; ``wait4``'s
    ``ru_maxrss`` beside it), exit code, output tails."""
    from llmvem.resources import peak_rss

    log_out = tempfile.TemporaryFile(mode="w+")
    log_err = tempfile.TemporaryFile(mode="w+")
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=log_out, stderr=log_err, text=True)
    deadline = t0 + timeout
    hwm = 0  # the child's own high-water mark (VmHWM of its memory after exec), sampled while it runs
    while True:
        hwm = max(hwm, peak_rss(proc.pid))
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.05)
    wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)
    log_out.seek(0)
    log_err.seek(0)
    out, err = log_out.read(), log_err.read()
    return {"command": " ".join(["llmvem", *cmd[3:]]), "rc": proc.returncode, "wall_s": wall,
            # ru_maxrss of a child counts the peak of the parent it was forked from (Linux keeps the old memory's
            # high-water mark across fork and exec), so a parent that built the subject in memory inflates it;
            # VmHWM sampled every 0.05 s is the child's own (where /proc exists)
            "peak_rss_bytes": hwm or int(usage.ru_maxrss) * 1024, "ru_maxrss_bytes": int(usage.ru_maxrss) * 1024,
            "stdout_tail": out[-3000:], "stderr_tail": err[-3000:],
            "stage_lines": [line for line in err.splitlines() if line.startswith("[llmvem]")]}


def train_overrides(subject: Path, cache: Path, captions: str, extra: list[str]) -> list[str]:
    """The ``--set`` overrides of the issue's ``train`` command."""
    # the demo config's variance partition (banded ridge of features x caption embeddings) is an analysis on top of
    # the encoding route, not part of it: off here (at 600 x 20,000 it alone took 51 s and +0.4 GB)
    # stage 1 at this size: the readout and the linear core start at the (reduced-rank) ridge solution of the PCA
    # scores and take small steps from there; chosen on validation at full size (bench/results/nsd_recipe_val.json:
    # random start, lr 1e-3 0.364; ridge start, lr 1e-3 0.407 (best epoch 0); ridge start, lr 1e-4 0.408)
    sets = [f"data.spec={subject}", "backbone.image_size=112", "train.stage2.epochs=0", "model.core=linear",
            "model.readout_init=ridge", "train.stage1.lr=0.0001",
            f"cache_dir={cache}", f"captions.backend={captions}", "evaluate.variance_partition=false"]
    if captions == "file":
        sets.append(f"captions.captions_file={subject / 'captions.csv'}")
    return [*sets, *extra]


def load_now() -> dict[str, Any]:
    """The box's load: 1/5/15-minute load averages and the idle CPUs over a quarter second."""
    from llmvem.resources import idle_cpus

    return {"loadavg": list(os.getloadavg()), "idle_cpus": idle_cpus(), "cpus": os.cpu_count()}


def stage_rows(metrics: dict[str, Any], response_bytes: int) -> list[dict[str, Any]]:
    """Pipeline stages of ``metrics.json["timing"]``: seconds, peak memory and its ratio to the responses."""
    timing = metrics.get("timing", {})
    peaks = timing.get("peak_rss_bytes", {})
    return [{"stage": k, "seconds": float(v), "peak_rss_bytes": peaks.get(k),
             "ratio": peaks[k] / response_bytes if peaks.get(k) else None}
            for k, v in timing.get("stages", {}).items()]


def format_table(commands: dict[str, dict[str, Any]], stages: list[dict[str, Any]], response_bytes: int) -> str:
    gb = 2**30
    lines = [f"responses: {response_bytes / gb:.2f} GB float32",
             f"{'command':<10}{'rc':>4}{'seconds':>10}{'peak GB':>10}{'× resp':>8}", "-" * 42]
    for name, c in commands.items():
        lines.append(f"{name:<10}{c['rc']:>4}{c['wall_s']:>10.1f}{c['peak_rss_bytes'] / gb:>10.2f}"
                     f"{c['peak_rss_bytes'] / response_bytes:>8.2f}")
    if stages:
        lines += ["", f"{'train stage':<28}{'seconds':>10}{'peak GB':>10}{'× resp':>8}", "-" * 56]
        for r in stages:
            peak = r["peak_rss_bytes"]
            lines.append(f"{r['stage']:<28}{r['seconds']:>10.1f}" + (f"{peak / gb:>10.2f}{r['ratio']:>8.2f}"
                                                                     if peak else f"{'-':>10}{'-':>8}"))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from llmvem.provenance import read_results, result_header, write_results

    args = parse_args(argv)
    n_vertices = tuple(int(x) for x in args.n_vertices.split(","))
    if len(n_vertices) != 2:
        raise SystemExit("--n-vertices: expected lh,rh such as 19004,20544")
    work = args.work or Path(tempfile.mkdtemp(prefix="llmvem_nsd_scale_"))
    work.mkdir(parents=True, exist_ok=True)
    subject, cache, run, export = work / "subj01", work / "cache", work / "run", work / "export"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLMVEM_NO_PROGRESS="1")
    results: dict[str, Any] = {**result_header("nsd_scale", "bench/bench_nsd_scale.py", argv),
                               "load_start": load_now()}
    try:
        info = make_fake_subject(subject, args.n_train, n_vertices, args.n_challenge, args.image_size, args.seed)
        resp = int(info["response_bytes"])
        results["subject"] = info
        threads = ["--threads", str(args.threads)] if args.threads else []
        sets = [a for o in train_overrides(subject, cache, args.captions, args.overrides) for a in ("--set", o)]
        if args.fresh_run and run.exists():
            shutil.rmtree(run)
        plan = {
            "inspect": llmvem_command("data", "inspect", str(subject), "--json"),
            "train": llmvem_command("train", "--config", "demo", "--out", str(run), "--no-progress", *threads,
                                    *sets),
            "report": llmvem_command("report", str(run), "--no-progress"),
            "export": llmvem_command("export", str(run), "--subject-dir", str(subject), "--out", str(export),
                                     "--no-progress"),
            "predict": llmvem_command("predict", "--run", str(run), "--images", str(subject / "test_split" /
                                      "test_images"), "--out", str(work / "predictions.h5"), "--no-progress",
                                      *threads),
        }
        commands: dict[str, dict[str, Any]] = {}
        for name, cmd in plan.items():
            if name in args.skip:
                continue
            if name == "export" and export.exists():
                shutil.rmtree(export)
            print(f"[bench_nsd_scale] {name}: {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
            commands[name] = run_measured(cmd, ROOT, args.timeout, env)
            commands[name]["ratio"] = commands[name]["peak_rss_bytes"] / resp
            print(f"[bench_nsd_scale] {name}: rc {commands[name]['rc']}, {commands[name]['wall_s']:.0f} s, "
                  f"peak {commands[name]['peak_rss_bytes'] / 2**30:.2f} GB", file=sys.stderr, flush=True)
            if commands[name]["rc"] != 0:
                sys.stderr.write(commands[name]["stderr_tail"])
                break
        results["commands"] = commands
        stages: list[dict[str, Any]] = []
        if (run / "metrics.json").is_file():
            metrics = read_results(run / "metrics.json")
            stages = stage_rows(metrics, resp)
            results["train_stages"] = stages
            results["process_peak_rss_bytes"] = metrics["timing"].get("process_peak_rss_bytes")
            results["models"] = {k: {"label": m.get("label"), "test_mean_r": m.get("mean_r"),
                                     "val_mean_r": m.get("val_mean_r")} for k, m in metrics["models"].items()}
            for name in metrics["models"]:
                training = run / "models" / name / "training.json"
                if training.is_file():
                    results["models"][name]["training"] = json.loads(training.read_text()).get("stages")
            results["versions"] = json.loads((run / "versions.json").read_text())
        results["load_end"] = load_now()
        write_results(args.out, results)
        print(format_table(commands, stages, resp))
        for k, m in results.get("models", {}).items():
            print(f"{k}: test mean r {m['test_mean_r']:.4f}, val mean r "
                  + (f"{m['val_mean_r']:.4f}" if m["val_mean_r"] is not None else "-"))
        print(f"results: {args.out}")
        return results
    finally:
        if args.work is None and not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
