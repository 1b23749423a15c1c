"""A run folder at the Algonauts scale: 31 ROI names, two hemispheres on fsaverage5, several models.

Used by the report-at-scale tests, the export tests and the screenshot check (``python tests/fake_runs.py OUT``).
ROIs are contiguous patches of posterior fsaverage5 vertices (nearest of 31 seeds), so outlines look like ROIs.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from llmvem.report.roi import ALGONAUTS_ROI_CLASSES
from llmvem.utils import write_json

ROI_NAMES = [r for rois in ALGONAUTS_ROI_CLASSES.values() for r in rois]
MODELS = {"ridge": ("Ridge (frozen features)", "ridge", None),
          "llmvem_lambda0": ("LLM-VEM λ=0 (no alignment)", "llmvem", 0.0),
          "llmvem_lambda0.1": ("LLM-VEM λ=0.1", "llmvem", 0.1),
          "llmvem_lambda1": ("LLM-VEM λ=1", "llmvem", 1.0)}


def _posterior_vertices(n: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """``n`` fsaverage5 vertices of the occipital pole of each hemisphere (indices, coordinates)."""
    from llmvem.report.cortex import _fsaverage5  # noqa: PLC2701 - test-only use of the cached mesh

    mesh, _ = _fsaverage5()
    coords = np.asarray(mesh.parts["left"].coordinates)
    order = np.argsort(coords[:, 1])  # most posterior first
    chosen = np.sort(order[:n])
    return chosen, coords[chosen]


def make_scaled_run(root: Path, n_rois: int = 31, n_models: int = 3, n_per_hemi: int = 600, n_test: int = 40,
                    seed: int = 0, val: bool = True, name: str = "run") -> Path:
    """Write a run folder with ``n_rois`` Algonauts ROIs, lh + rh voxels, ``n_models`` models.

    The folder has metrics.json (per-ROI figures, val_mean_r when ``val``), voxel_metrics.npz (r, accuracy, ROI
    masks, noise ceiling, hemisphere, fsaverage_index), test_responses.npy, models/<m>/predictions_test.npy and
    curves.csv with the voxel and alignment loss terms.
    """
    from llmvem.evaluate.metrics import evaluate_predictions

    rng = np.random.default_rng(seed)
    run = root / name
    (run / "models").mkdir(parents=True)
    rois = ROI_NAMES[:n_rois]
    vertices, coords = _posterior_vertices(n_per_hemi, rng)
    seeds = coords[rng.choice(len(coords), n_rois, replace=False)]
    nearest = np.argmin(((coords[:, None, :] - seeds[None]) ** 2).sum(-1), axis=1)
    n_vox = 2 * n_per_hemi
    hemisphere = np.repeat(np.array(["lh", "rh"]), n_per_hemi)
    fs_index = np.concatenate([vertices, vertices])
    masks = {roi: np.concatenate([nearest == k, nearest == k]) for k, roi in enumerate(rois)}
    nc = rng.uniform(0.2, 0.8, n_vox)
    y = rng.standard_normal((n_test, n_vox)).astype(np.float32)
    np.save(run / "test_responses.npy", y)
    names = list(MODELS)[:n_models]
    metrics_models, arrays = {}, {}
    for i, m in enumerate(names):
        label, kind, lam = MODELS[m]
        signal = 0.4 + 0.15 * i + 0.3 * np.sin(np.arange(n_vox) / 40.0)
        pred = (signal * y + rng.standard_normal(y.shape)).astype(np.float32)
        (run / "models" / m).mkdir()
        np.save(run / "models" / m / "predictions_test.npy", pred)
        ev = evaluate_predictions(y, pred, nc, masks, hemisphere)
        entry = {"label": label, "kind": kind, "lambda": lam, **ev["summary"]}
        if val:
            entry["val_mean_r"] = [0.2, 0.3, 0.35, 0.25][i]  # λ=0.1 best on validation
        metrics_models[m] = entry
        arrays[f"r__{m}"], arrays[f"accuracy__{m}"] = ev["r"], ev["accuracy"]
        lines = ["stage,epoch,step,train_loss,val_mean_r,lr,train_voxel_loss,train_align_loss"]
        for step in range(10):
            loss = 2.0 * np.exp(-0.2 * step)
            lines.append(f"{'align' if step < 5 else 'finetune'},{step // 2},{step},{loss:.4f},"
                         f"{0.03 * step:.3f},0.001,{0.7 * loss:.4f},{0.3 * loss:.4f}")
        (run / "models" / m / "curves.csv").write_text("\n".join(lines) + "\n")
    arrays |= {f"roi__{k}": v for k, v in masks.items()}
    arrays |= {"noise_ceiling": nc, "hemisphere": hemisphere, "fsaverage_index": fs_index}
    np.savez(run / "voxel_metrics.npz", **arrays)
    classes = {c: [r for r in rs if r in rois] for c, rs in ALGONAUTS_ROI_CLASSES.items()}
    metrics = {"dataset": {"name": "algonauts_subj01", "n_train": 100, "n_val": 10, "n_test": n_test,
                           "n_voxels": n_vox, "rois": {k: int(v.sum()) for k, v in masks.items()},
                           "roi_classes": {c: rs for c, rs in classes.items() if rs}},
               "models": metrics_models, "comparisons": [], "timing": {}, "captions": {}}
    write_json(run / "metrics.json", metrics)
    return run


if __name__ == "__main__":  # python tests/fake_runs.py OUT_DIR N_ROIS
    out = Path(sys.argv[1])
    make_scaled_run(out, n_rois=int(sys.argv[2]) if len(sys.argv) > 2 else 31, name=f"run{sys.argv[2]}")


def make_subject_run(root: Path, subject_dir: Path, models: tuple[str, ...] = ("ridge", "llmvem_lambda0"),
                     n_test: int = 12, seed: int = 0, challenge: bool = True) -> Path:
    """A run folder for an Algonauts subject folder: its voxels, ROIs, noise ceiling, fsaverage indices, test
    predictions, and (``challenge``) predictions for the challenge test images listed in shuffled order."""
    from llmvem.data.algonauts import load_algonauts
    from llmvem.evaluate.metrics import evaluate_predictions

    rng = np.random.default_rng(seed)
    ds = load_algonauts(subject_dir, val_fraction=0)
    run = root / f"run_{subject_dir.name}"
    (run / "models").mkdir(parents=True)
    y = rng.standard_normal((n_test, ds.n_voxels)).astype(np.float32)
    np.save(run / "test_responses.npy", y)
    arrays: dict[str, np.ndarray] = {}
    entries = {}
    test_ids = [p.stem for p in sorted((subject_dir / "test_split" / "test_images").iterdir())]
    shuffled = [test_ids[i] for i in rng.permutation(len(test_ids))]
    for i, m in enumerate(models):
        pred = (0.5 * (i + 1) * y + rng.standard_normal(y.shape)).astype(np.float32)
        (run / "models" / m).mkdir()
        np.save(run / "models" / m / "predictions_test.npy", pred)
        if challenge:
            # row k holds the prediction for image shuffled[k]; its value encodes the image's challenge position
            rows = np.array([[test_ids.index(t) + 0.001 * i] * ds.n_voxels for t in shuffled], dtype=np.float32)
            np.save(run / "models" / m / "predictions_challenge_test.npy", rows)
        ev = evaluate_predictions(y, pred, ds.noise_ceiling, ds.roi_masks, ds.hemisphere)
        label, kind, lam = MODELS[m]
        entries[m] = {"label": label, "kind": kind, "lambda": lam, "val_mean_r": 0.1 * (i + 1), **ev["summary"]}
        arrays[f"r__{m}"], arrays[f"accuracy__{m}"] = ev["r"], ev["accuracy"]
    if challenge:
        write_json(run / "challenge_test_ids.json", [f"{t}.png" for t in shuffled])
    arrays |= {f"roi__{k}": v for k, v in ds.roi_masks.items()}
    arrays |= {"noise_ceiling": ds.noise_ceiling, "hemisphere": ds.hemisphere, "fsaverage_index": ds.fsaverage_index}
    np.savez(run / "voxel_metrics.npz", **arrays)
    write_json(run / "metrics.json", {"dataset": {"name": ds.name, "n_voxels": ds.n_voxels,
                                                  "roi_classes": ds.meta["roi_classes"]},
                                      "models": entries})
    return run
