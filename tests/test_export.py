"""``llmvem export --format algonauts``: submission files, per-vertex maps, the tidy results table."""

from __future__ import annotations

import csv
import shutil

import numpy as np
import pytest
from fake_runs import make_subject_run
from test_adapters import N_CHALLENGE_TEST, N_VERT, make_subject

from llmvem.cli import main
from llmvem.data.algonauts import FSAVERAGE_N_VERTICES
from llmvem.export import RESULT_COLUMNS, export_algonauts


@pytest.fixture
def challenge(tmp_path):
    """Two subjects in the challenge layout (subj01, subj02) and a run folder for each."""
    subjects = []
    for k in (1, 2):
        made = make_subject(tmp_path / f"raw{k}")
        target = tmp_path / "data" / f"subj0{k}"
        target.parent.mkdir(exist_ok=True)
        shutil.move(made["subj"], target)
        if k == 2:  # another brain: its challenge vertices sit on other fsaverage vertices
            rng = np.random.default_rng(7)
            for h, n in N_VERT.items():
                mask = np.zeros(FSAVERAGE_N_VERTICES, dtype=bool)
                mask[np.sort(rng.choice(FSAVERAGE_N_VERTICES, n, replace=False))] = True
                np.save(target / "roi_masks" / f"{h}.all-vertices_fsaverage_space.npy", mask.astype(np.float32))
                made["fs"][h] = np.flatnonzero(mask)
        subjects.append((target, made))
    runs = [make_subject_run(tmp_path / "runs", s, seed=k) for k, (s, _) in enumerate(subjects)]
    return tmp_path, [s for s, _ in subjects], runs, [m for _, m in subjects]


def test_export_writes_challenge_shapes_order_maps_and_table(challenge):
    root, subjects, runs, made = challenge
    out = root / "export"
    rc = main(["export", *map(str, runs), "--format", "algonauts", "--subject-dir", str(subjects[0]),
               "--subject-dir", str(subjects[1]), "--out", str(out), "--n-boot", "50"])
    assert rc == 0
    for subj, m in zip(subjects, made, strict=True):
        for h in ("lh", "rh"):
            pred = np.load(out / subj.name / f"{h}_pred_test.npy")
            assert pred.dtype == np.float32 and pred.shape == (N_CHALLENGE_TEST, N_VERT[h])
            # rows are back in the challenge order (the run listed them shuffled); the best-validation model
            # (llmvem_lambda0, val 0.2 > 0.1) is the one submitted
            np.testing.assert_allclose(pred[:, 0], np.arange(N_CHALLENGE_TEST) + 0.001, atol=1e-6)
            r = np.load(out / subj.name / "vertex_metrics" / "ridge" / f"{h}_r.npy")
            assert r.shape == (N_VERT[h],)
            full = np.load(out / subj.name / "vertex_metrics" / "ridge" / f"{h}_accuracy_fsaverage.npy")
            assert full.shape == (FSAVERAGE_N_VERTICES,)
            assert np.isfinite(full).sum() == N_VERT[h] and np.isfinite(full[m["fs"][h]]).all()
            vox = np.load(runs[subjects.index(subj)] / "voxel_metrics.npz")
            sel = vox["hemisphere"] == h
            np.testing.assert_allclose(r, vox["r__ridge"][sel], rtol=1e-6)
    with open(out / "results.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert tuple(rows[0]) == RESULT_COLUMNS
    # one row per model × subject × ROI (+ all voxels) × hemisphere × metric; ROIs: V1v, V1d, OFA, FFA-1
    n_rois = 1 + 4
    assert len(rows) == 2 * 2 * n_rois * 2 * 2
    keys = {(r["model"], r["subject"], r["roi"], r["hemisphere"], r["metric"]) for r in rows}
    assert len(keys) == len(rows)
    ffa = next(r for r in rows if r["roi"] == "FFA-1" and r["metric"] == "accuracy" and r["subject"] == "subj01"
               and r["model"] == "ridge" and r["hemisphere"] == "rh")
    assert ffa["roi_class"] == "floc-faces"
    assert float(ffa["ci_low"]) <= float(ffa["value"]) <= float(ffa["ci_high"])


def test_export_refuses_wrong_subject_and_missing_predictions(challenge, capsys):
    root, subjects, runs, _ = challenge
    out = root / "export"
    # subj02's folder for subj01's run: same vertex counts, other fsaverage vertices
    assert main(["export", str(runs[0]), "--subject-dir", str(subjects[1]), "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "fsaverage vertices" in err and "subj02" in err
    assert not (out / "subj02").exists()
    # a folder that is not a subject folder
    assert main(["export", str(runs[0]), "--subject-dir", str(root), "--out", str(out)]) == 2
    assert "training_fmri" in capsys.readouterr().err
    # a run without challenge predictions
    bare = make_subject_run(root / "bare", subjects[0], challenge=False)
    assert main(["export", str(bare), "--subject-dir", str(subjects[0]), "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "no predictions for the challenge test images" in err and err.count("\n") == 1
    with pytest.raises(Exception, match="one --subject-dir per run"):
        export_algonauts(runs, subjects[:1], out)
