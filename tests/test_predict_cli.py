"""``llmvem predict`` and ``llmvem describe`` through the user's entry point (``llmvem.cli.main``)."""

from __future__ import annotations

import shutil

import numpy as np
import pytest
from PIL import Image
from test_text_to_brain import MODEL, run_dir  # noqa: F401  (run_dir is a fixture)

from llmvem.cli import main
from llmvem.explain.predictions import read_predictions_h5, write_predictions_h5
from llmvem.explain.text_to_brain import READOUT_FILE, SUMMARY_FILE, TextToBrain


def test_help_lists_examples_and_the_output_layout(capsys):
    assert main(["predict", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--text", "--text-file", "--images", "--out", "--readout", "--fit-readouts",
                 'llmvem predict --run runs/demo --images stimuli/ --out preds.h5', "`responses` (n, n_voxels)"):
        assert text in out
    assert main(["describe", "--help"]) == 0
    assert "--vocabulary" in capsys.readouterr().out


def test_usage_errors_exit_2_before_loading_anything(tmp_path, capsys):
    cases = [
        (["predict", "--run", str(tmp_path)], "nothing to predict"),
        (["predict", "--run", str(tmp_path), "--text", "a", "--images", str(tmp_path)], "not both"),
        (["predict", "--run", str(tmp_path), "--images", str(tmp_path)], "--images needs --out"),
        (["predict", "--run", str(tmp_path), "--text", "a", "--readout", "pixels"], "--readout"),
        (["predict", "--run", str(tmp_path / "nope"), "--text", "a"], "no such run folder"),
        (["predict", "--run", str(tmp_path), "--text", "a"], "neither a trained-model folder"),
        (["predict", "--run", str(tmp_path), "--text-file", str(tmp_path / "t.txt")], "t.txt: file: not found"),
    ]
    for argv, message in cases:
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("llmvem: error:") and message in err, (argv, err)


def test_predictions_file_roundtrip(tmp_path):
    y = np.arange(6, dtype=np.float32).reshape(2, 3)
    path = write_predictions_h5(tmp_path / "p.h5", y, texts=["a dog", "ünïcode"], attrs={"model": "m"},
                                roi_masks={"v1": np.array([True, False, True])})
    back = read_predictions_h5(path)
    np.testing.assert_array_equal(back["responses"], y)
    assert back["texts"] == ["a dog", "ünïcode"] and back["attrs"]["kind"] == "text"
    assert back["attrs"]["n_voxels"] == 3 and back["roi"]["v1"].tolist() == [True, False, True]
    from llmvem.errors import DataValidationError

    with pytest.raises(DataValidationError, match="exactly one"):
        write_predictions_h5(tmp_path / "q.h5", y, texts=["a", "b"], image_ids=["1", "2"])
    with pytest.raises(DataValidationError, match="1 names for 2 rows"):
        write_predictions_h5(tmp_path / "q.h5", y, image_ids=["1"])
    assert not (tmp_path / "q.h5").exists()


# ------------------------------------------------------------------------------- on the tiny run (slow)
@pytest.mark.slow
def test_predict_text_prints_the_mapping_and_writes_hdf5(run_dir, tmp_path, capsys):  # noqa: F811
    out = tmp_path / "text.h5"
    texts = ["a large red circle", "a small blue star on a checkered background"]
    assert main(["predict", "--run", str(run_dir), "--text", texts[0], "--text", texts[1], "--out", str(out)]) == 0
    stdout = capsys.readouterr().out
    assert "How the mapping is made: Aligned readout" in stdout and "modality-gap" in stdout
    assert "semantic_circle" in stdout and f"2 texts × 100 voxels → {out}" in stdout
    saved = read_predictions_h5(out)
    assert saved["texts"] == texts and saved["responses"].shape == (2, 100)
    assert saved["attrs"]["readout"] == "aligned" and saved["attrs"]["model"] == MODEL
    assert saved["attrs"]["lambda_align"] == 0.5 and saved["attrs"]["text_encoder"] == "minilm"
    t2b = TextToBrain.load(run_dir / "models" / MODEL)
    np.testing.assert_allclose(saved["responses"], t2b.predict_texts(texts), atol=1e-5)
    # The circle sentence drives the circle-preferring voxels, the star sentence the star-preferring ones.
    y, roi = saved["responses"], saved["roi"]
    assert y[0, roi["semantic_circle"]].mean() > y[1, roi["semantic_circle"]].mean() + 0.5
    assert y[1, roi["semantic_star"]].mean() > y[0, roi["semantic_star"]].mean() + 0.5


@pytest.mark.slow
def test_text_file_and_the_text_readout(run_dir, tmp_path, capsys):  # noqa: F811
    (tmp_path / "t.txt").write_text("# sentences\na green triangle\n\na cross\n", encoding="utf-8")
    out = tmp_path / "t.h5"
    argv = ["predict", "--run", str(run_dir), "--model", MODEL, "--text-file", str(tmp_path / "t.txt"),
            "--readout", "text", "--out", str(out), "--no-progress"]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "How the mapping is made: Text readout" in stdout and "text readout" in stdout
    saved = read_predictions_h5(out)
    assert saved["texts"] == ["a green triangle", "a cross"] and saved["attrs"]["readout"] == "text"
    t2b = TextToBrain.load(run_dir / "models" / MODEL)
    np.testing.assert_allclose(saved["responses"], t2b.predict_texts(saved["texts"], "text"), atol=1e-5)
    assert main(["predict", "--run", str(run_dir), "--model", "llmvem_lambda9", "--text", "a"]) == 2
    assert f"models in {run_dir}: {MODEL}" in capsys.readouterr().err


@pytest.mark.slow
def test_predict_images_matches_the_trained_predictions(run_dir, tmp_path, capsys):  # noqa: F811
    import llmvem.inputs
    from llmvem.config import load_config

    model_dir = run_dir / "models" / MODEL
    ds = llmvem.inputs.load_config_dataset(load_config(model_dir / "config.yaml"))
    folder = tmp_path / "stimuli"
    folder.mkdir()
    for i in range(5):  # lossless PNGs of the first test images
        Image.fromarray(ds.test.images.load_array(i)).save(folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    out = tmp_path / "preds.h5"
    assert main(["predict", "--run", str(run_dir), "--images", str(folder), "--out", str(out)]) == 0
    assert f"predicted responses of 5 images × 100 voxels ({MODEL})" in capsys.readouterr().out
    saved = read_predictions_h5(out)
    assert saved["image_ids"] == [f"img{i}" for i in range(5)] and saved["attrs"]["kind"] == "images"
    np.testing.assert_allclose(saved["responses"], np.load(model_dir / "predictions_test.npy")[:5], atol=1e-5)
    assert saved["roi"]["semantic"].sum() == 60 and saved["attrs"]["backbone"] == "efficientnet_lite0"
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main(["predict", "--run", str(run_dir), "--images", str(empty), "--out", str(out)]) == 2
    assert "no image files" in capsys.readouterr().err


@pytest.mark.slow
def test_fit_readouts_for_a_model_folder_without_them(run_dir, tmp_path, capsys):  # noqa: F811
    """A folder written by `llmvem train` has no readouts: predict says how to get them, --fit-readouts fits
    them from the cached inputs, identical to those the pipeline fitted."""
    source = run_dir / "models" / MODEL
    bare = tmp_path / "trained"
    shutil.copytree(source, bare, ignore=shutil.ignore_patterns(READOUT_FILE, SUMMARY_FILE, "voxel_*",
                                                                "vocabulary.txt"))
    assert main(["predict", "--run", str(bare), "--text", "a circle"]) == 2
    assert "--fit-readouts" in capsys.readouterr().err
    assert main(["predict", "--run", str(bare), "--fit-readouts", "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "captions alone" in stdout and "semantic" in stdout
    fitted, original = TextToBrain.load(bare), TextToBrain.load(source)
    for part in ("aligned", "text"):
        np.testing.assert_allclose(getattr(fitted, part).coef, getattr(original, part).coef, atol=1e-5)
    assert (bare / "vocabulary.txt").is_file()


@pytest.mark.slow
def test_describe_ranks_phrases_per_roi_and_voxel(run_dir, tmp_path, capsys):  # noqa: F811
    import json

    out = tmp_path / "d.json"
    circle_voxel = int(np.flatnonzero(TextToBrain.load(run_dir / "models" / MODEL).roi_masks["semantic_circle"])[0])
    argv = ["describe", "--run", str(run_dir), "--top", "3", "--roi", "semantic_circle", "--voxel",
            str(circle_voxel), "--out", str(out)]
    assert main(argv) == 0
    stdout = capsys.readouterr().out
    assert "150 phrases" in stdout and "semantic_circle: a" in stdout and "circle" in stdout.split("\n")[1]
    saved = json.loads(out.read_text())
    assert list(saved["per_roi"]) == ["semantic_circle"] and len(saved["per_roi"]["semantic_circle"]) == 3
    assert "circle" in saved["per_voxel"][str(circle_voxel)][0][0]
    vocab = tmp_path / "v.txt"
    vocab.write_text("a circle\na square\na striped background\n")
    assert main(["describe", "--run", str(run_dir), "--vocabulary", str(vocab), "--roi", "semantic_square",
                 "--top", "1"]) == 0
    assert "semantic_square: a square" in capsys.readouterr().out
    assert main(["describe", "--run", str(run_dir), "--roi", "v9"]) == 2
    assert "unknown ROI" in capsys.readouterr().err
    assert main(["describe", "--run", str(run_dir), "--voxel", "100"]) == 2
    assert "outside 0..99" in capsys.readouterr().err
