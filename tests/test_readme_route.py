"""README's real-data route, run in order on a two-subject fake Algonauts 2023 challenge folder.

caption → embed → train → report → predict → export, through ``llmvem.cli.main`` with the commands of README's
"Real data" section (the shipped config replaced by a tiny one; a fake OpenAI-compatible server as the VLM).
Asserts that embed and train caption nothing and compute no feature again, that the submission files have the
challenge shapes, and that ``results.csv`` has one row per model × ROI × hemisphere × metric. Also the bad
inputs of the route: a store from another captioner configuration, a wrong subject folder, a run without
challenge test predictions (each one stderr line, exit 2).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import yaml
from fake_openai_server import FakeOpenAIServer
from PIL import Image

import llmvem.embed.cache
import llmvem.embed.text
from llmvem.cli import main
from llmvem.data.algonauts import FSAVERAGE_N_VERTICES
from llmvem.explain.predictions import read_predictions_h5
from llmvem.report.roi import ALGONAUTS_ROI_CLASSES

N_TRAIN, N_CHALLENGE = 60, 5
N_VERT = [{"lh": 70, "rh": 66}, {"lh": 64, "rh": 60}]  # per subject: other brains, other sizes
ROI_NAMES = [r for rois in ALGONAUTS_ROI_CLASSES.values() for r in rois]


def make_challenge_subject(root: Path, name: str, seed: int, n_vert: dict[str, int]) -> Path:
    """An Algonauts 2023 subject folder with the 31 challenge ROIs of 6 classes, noise ceilings (percent),
    challenge file names; responses follow the images' mean colour so a model has something to learn."""
    rng = np.random.default_rng(seed)
    subj = root / name
    dirs = {k: subj / p for k, p in {"train": "training_split/training_images", "test": "test_split/test_images",
                                      "fmri": "training_split/training_fmri", "roi": "roi_masks"}.items()}
    for d in dirs.values():
        d.mkdir(parents=True)
    colours = rng.integers(0, 256, (N_TRAIN + N_CHALLENGE, 3))
    for i, c in enumerate(colours):
        img = np.broadcast_to(c.astype(np.uint8), (24, 24, 3)).copy()
        img[:8, :8] = 255 - img[:8, :8]
        path = (dirs["train"] / f"train-{i + 1:04d}_nsd-{100 + 7 * i:05d}.png" if i < N_TRAIN else
                dirs["test"] / f"test-{i - N_TRAIN + 1:04d}_nsd-{9000 + i:05d}.png")
        Image.fromarray(img).save(path)
    for h, n in n_vert.items():
        w = rng.standard_normal((3, n))
        fmri = (colours[:N_TRAIN] / 255.0) @ w + 0.3 * rng.standard_normal((N_TRAIN, n))
        np.save(dirs["fmri"] / f"{h}_training_fmri.npy", fmri.astype(np.float32))
        for cls, rois in ALGONAUTS_ROI_CLASSES.items():
            labels = np.arange(n) % (len(rois) + 1)  # 0 = unknown; every ROI gets vertices
            np.save(dirs["roi"] / f"{h}.{cls}_challenge_space.npy", labels.astype(np.float32))
        mask = np.zeros(FSAVERAGE_N_VERTICES, dtype=bool)
        mask[np.sort(rng.choice(FSAVERAGE_N_VERTICES, n, replace=False))] = True
        np.save(dirs["roi"] / f"{h}.all-vertices_fsaverage_space.npy", mask.astype(np.float32))
        np.save(subj / f"{h}_noise_ceiling.npy", rng.uniform(20, 90, n))
    for cls, rois in ALGONAUTS_ROI_CLASSES.items():
        np.save(dirs["roi"] / f"mapping_{cls}.npy", {0: "Unknown", **{k + 1: r for k, r in enumerate(rois)}},
                allow_pickle=True)
    return subj


def tiny_config(path: Path, base_url: str, cache: Path) -> Path:
    """The shipped Algonauts config shrunk for a test: fake VLM server, MiniLM, EfficientNet at 64 px."""
    cfg = {"data": {"spec": "set-by-the-commands", "val_fraction": 0.1, "seed": 0},
           "captions": {"backend": "openai", "model": "fake-vlm", "base_urls": [base_url], "max_in_flight": 4,
                        "prompt": "Describe the image in one sentence.", "max_new_tokens": 40},
           "text": {"encoder": "minilm", "device": "cpu"},
           "backbone": {"name": "efficientnet_lite0", "layers": ["block5", "pooled"], "image_size": 64,
                        "device": "cpu", "batch_size": 32},
           "model": {"lambda_align": 0.5},
           "train": {"device": "cpu", "stage1": {"epochs": 2, "batch_size": 16}, "stage2": {"epochs": 0}},
           "evaluate": {"bootstrap": 20, "ridge_folds": 3, "baselines": ["ridge"], "compare_lambdas": [],
                        "variance_partition": True},
           "cache_dir": str(cache)}
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.mark.slow
def test_readme_real_data_route_computes_each_stage_once(tmp_path, monkeypatch, capsys):
    data = tmp_path / "data" / "algonauts_2023"
    subjects = [make_challenge_subject(data, f"subj0{k}", seed=k, n_vert=N_VERT[k - 1]) for k in (1, 2)]
    feature_writes, encoder_loads = [], []
    write_part, load_text_encoder = llmvem.embed.cache.FeatureCache.write_part, llmvem.embed.text.load_text_encoder
    monkeypatch.setattr(llmvem.embed.cache.FeatureCache, "write_part",
                        lambda self, *a, **k: feature_writes.append(1) or write_part(self, *a, **k))
    monkeypatch.setattr(llmvem.embed.text, "load_text_encoder",
                        lambda *a, **k: encoder_loads.append(1) or load_text_encoder(*a, **k))
    with FakeOpenAIServer() as srv:
        cfg = str(tiny_config(tmp_path / "algonauts_tiny.yaml", srv.base_url, tmp_path / "cache"))

        def step(*args: str, subj: Path | None = None) -> str:
            extra = [] if subj is None else ["--set", f"data.spec={subj}",
                                             "--set", f"captions.store={tmp_path / 'captions' / subj.name}.sqlite"]
            assert main([*args, *extra, "--no-progress"]) == 0, capsys.readouterr().err
            return capsys.readouterr().out

        for subj in subjects:  # README step 2: captions
            step("caption", "--config", cfg, subj=subj)
        n_requests = srv.n_requests
        assert n_requests == 2 * N_TRAIN  # every training image (train/val/test splits) once
        for subj in subjects:  # README step 3: embeddings and features, then training
            step("embed", "--config", cfg, subj=subj)
        writes, loads = len(feature_writes), len(encoder_loads)
        assert writes > 0 and loads == 2
        for subj in subjects:
            out = step("train", "--config", cfg, "--out", str(tmp_path / "runs" / subj.name), subj=subj)
            assert "selected: llmvem_lambda0.5 (chosen on validation among llmvem_lambda0.5; ridge not eligible: " \
                   "fitted on val)" in out
        assert srv.n_requests == n_requests  # train captioned nothing ...
        assert len(feature_writes) == writes and len(encoder_loads) == loads  # ... and embedded nothing
        run1, run2 = (tmp_path / "runs" / s.name for s in subjects)
        # README step 3: the report of a train folder
        index = Path(step("report", str(run1)).strip())
        page = index.read_text()
        assert index.is_file() and "FFA-1" in page
        # one answer to "which model won": the ridge, refitted on train + val, has the higher (in-sample) val r,
        # but the summary, metrics.json, the report and export all name the validation-chosen LLM-VEM model
        metrics = json.loads((run1 / "metrics.json").read_text())
        recs = metrics["models"]
        assert recs["ridge"]["val_in_fit"] and recs["ridge"]["val_mean_r"] > recs["llmvem_lambda0.5"]["val_mean_r"]
        assert metrics["selected_model"] == metrics["selection"]["model"] == "llmvem_lambda0.5"
        assert page.count("(chosen on validation)") == 1
        assert "validation chose LLM-VEM λ=0.5" in page and "llmvem export submits this model" in page
        # README step 4: predictions of the ridge for the challenge test images
        preds = tmp_path / "ridge_preds.h5"
        step("predict", "--run", str(run1), "--model", "ridge", "--images",
             str(subjects[0] / "test_split" / "test_images"), "--out", str(preds))
        saved = read_predictions_h5(preds)
        n_vox = sum(N_VERT[0].values())
        assert saved["responses"].shape == (N_CHALLENGE, n_vox)
        assert saved["image_ids"][0] == "test-0001_nsd-09060" and saved["hemisphere"][0] == "lh"
        assert len(saved["fsaverage_index"]) == n_vox
        # the same images predicted by the runner (challenge predictions) and by predict agree
        np.testing.assert_allclose(saved["responses"],
                                   np.load(run1 / "models" / "ridge" / "predictions_challenge_test.npy"), atol=1e-4)
        # README step 5: the submission and the tidy table
        sub = tmp_path / "submission"
        step("export", str(run1), str(run2), "--format", "algonauts", "--subject-dir", str(subjects[0]),
             "--subject-dir", str(subjects[1]), "--out", str(sub), "--n-boot", "20")
        for subj, n_vert, run in zip(subjects, N_VERT, (run1, run2), strict=True):
            chosen = json.loads((run / "metrics.json").read_text())["selected_model"]
            ids = json.loads((run / "challenge_test_ids.json").read_text())
            submitted = np.load(run / "models" / chosen / "predictions_challenge_test.npy")[np.argsort(ids)]
            parts = []
            for h, n in n_vert.items():
                pred = np.load(sub / subj.name / f"{h}_pred_test.npy")
                assert pred.shape == (N_CHALLENGE, n) and pred.dtype == np.float32
                parts.append(pred)
            # export submitted the chosen model (not the in-sample-best ridge)
            assert chosen == "llmvem_lambda0.5"
            np.testing.assert_allclose(np.concatenate(parts, axis=1), submitted, rtol=1e-6)
        with open(sub / "results.csv", newline="") as fh:
            rows = list(csv.DictReader(fh))
        metrics = json.loads((run1 / "metrics.json").read_text())
        models = list(metrics["models"])
        assert models == ["ridge", "llmvem_lambda0.5"] and len(metrics["dataset"]["roi_classes"]) == 6
        partition = [r for r in rows if r["model"] == "variance_partition"]
        assert {r["metric"] for r in partition} == {"unique_image_r2", "shared_r2", "unique_language_r2"}
        assert {r["roi"] for r in partition} >= {"all voxels", "FFA-1"} and all(float(r["value"]) >= 0 for r in partition)
        rows = [r for r in rows if r["model"] != "variance_partition"]
        keys = {(r["model"], r["subject"], r["roi"], r["hemisphere"], r["metric"]) for r in rows}
        assert len(keys) == len(rows)  # one row per model × subject × ROI × hemisphere × metric
        rois = {r["roi"] for r in rows}
        assert set(ROI_NAMES) <= rois and len(ROI_NAMES) == 31
        per_subject_model = len(rows) // (2 * len(models))
        assert per_subject_model == len(rois) * len({r["hemisphere"] for r in rows}) * len({r["metric"] for r in rows})

        # bad inputs of the route: one stderr line, exit 2
        other = tmp_path / "other.yaml"
        cfg_other = yaml.safe_load(Path(cfg).read_text())
        cfg_other["captions"]["prompt"] = "List the objects."
        other.write_text(yaml.safe_dump(cfg_other))
        store = f"captions.store={tmp_path / 'captions' / 'subj01'}.sqlite"
        assert main(["train", "--config", str(other), "--out", str(tmp_path / "runs" / "x"), "--no-progress",
                     "--set", f"data.spec={subjects[0]}", "--set", store]) == 2
        err = [ln for ln in capsys.readouterr().err.strip().splitlines() if not ln.startswith("[llmvem]")]
        assert len(err) == 1 and "another configuration" in err[0] and "prompt" in err[0]
        assert srv.n_requests == n_requests  # stopped before captioning again
        assert not (tmp_path / "runs" / "x").exists()  # and left no half-made run folder
    assert main(["export", str(run1), "--subject-dir", str(subjects[1]), "--out", str(tmp_path / "e2")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "vertices" in err[0]
    for f in (run2 / "models").glob("*/predictions_challenge_test.npy"):
        f.unlink()
    assert main(["export", str(run2), "--subject-dir", str(subjects[1]), "--out", str(tmp_path / "e3")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "challenge test predictions" in err[0]
