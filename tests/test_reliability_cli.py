"""Bad input through the ``llmvem`` command: exit code 2 and one line on stderr naming the file and the problem.

Each case builds a small generic dataset folder (see :mod:`llmvem.data.folder`) or config with one thing wrong and
runs a real command in-process (``main([...])``): ``data inspect``, ``caption``, ``embed``, ``train``, ``demo``,
``sweep``. A few run through a subprocess to show that the user sees exactly one line and no traceback. Images
that are not 8-bit RGB (grayscale, RGBA, LA, palette, 1-bit, CMYK, 16-bit) are not bad input: they are converted,
and the converted image gives the same features and captions as the equivalent RGB file.

The same validations are unit-tested on the library side in ``test_validation.py``, ``test_config.py``,
``test_captions_files.py`` and ``test_adapters.py``; this file checks what reaches the user through the CLI.
"""

from __future__ import annotations

import io
import os
import shutil
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from PIL import Image
from test_train_cli import frozen_features
from test_train_trainer import backbone, make_dataset

import llmvem.inputs
import llmvem.pipeline
from llmvem.cli import main
from llmvem.data.images import FileImages

REPO_ROOT = Path(__file__).resolve().parents[1]
N_IMAGES = 8


# ---------------------------------------------------------------------------------------------------- helpers
def dataset_folder(root: Path, n: int = N_IMAGES, captions: bool = False, seed: int = 0) -> Path:
    """A valid generic dataset folder: ``images/im00.png`` … (16×16 RGB), ``responses.npy`` (n, 5)."""
    rng = np.random.default_rng(seed)
    (root / "images").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).save(root / "images" / f"im{i:02d}.png")
    np.save(root / "responses.npy", rng.normal(size=(n, 5)).astype(np.float32))
    if captions:
        (root / "stimuli.csv").write_text("image,caption\n" + "".join(f"im{i:02d}.png,picture number {i}\n"
                                                                      for i in range(n)))
    return root


def embed_images(folder: Path, tmp: Path, *extra: str) -> list[str]:
    return ["embed", str(folder), "--images", "--backbone", "timm:test_resnet", "--random-init", "--cache",
            str(tmp / "features.h5"), "--device", "cpu", *extra]


def write_yaml(path: Path, data: object) -> Path:
    path.write_text(data if isinstance(data, str) else yaml.safe_dump(data))
    return path


def user_error(capsys, args: list[str]) -> str:
    """Run the command; require exit code 2 and exactly one error line, last on stderr, without a traceback."""
    rc = main(args)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("llmvem: error: ")]
    assert rc == 2, captured.err
    assert len(errors) == 1 and lines[-1] == errors[0], captured.err
    assert "Traceback" not in captured.err
    return errors[0]


# ------------------------------------------------------------------------------------------- the bad inputs
def _truncated_jpeg(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    png = d / "images" / "im03.png"
    buf = io.BytesIO()
    Image.open(png).save(buf, "JPEG")
    png.unlink()
    (d / "images" / "im03.jpg").write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    return embed_images(d, tmp), [str(d / "images" / "im03.jpg"), "image: cannot decode", "corrupt or truncated"]


def _truncated_png(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    png = d / "images" / "im05.png"
    png.write_bytes(png.read_bytes()[:200])
    return embed_images(d, tmp), [str(png), "image: cannot decode", "corrupt or truncated"]


def _corrupt_png_caption(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    png = d / "images" / "im02.png"
    png.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(np.random.default_rng(1).integers(0, 256, 300, dtype=np.uint8)))
    return (["caption", str(d), "--store", str(tmp / "c.sqlite"), "--backend", "labels", "--device", "cpu"],
            [str(png), "image: cannot decode"])


def _zero_byte_image(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    (d / "images" / "im01.png").write_bytes(b"")
    return ["data", "inspect", str(d)], [str(d / "images" / "im01.png"), "file is empty (0 bytes)"]


def _nan_responses(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    r = np.load(d / "responses.npy")
    r[2, 1] = np.nan
    np.save(d / "responses.npy", r)
    return ["data", "inspect", str(d)], [str(d / "responses.npy"), "NaN at image 'im02'", "expected finite"]


def _inf_responses(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    r = np.load(d / "responses.npy")
    r[6, 4] = -np.inf
    np.save(d / "responses.npy", r)
    return ["data", "inspect", str(d)], [str(d / "responses.npy"), "Inf at image 'im06'", "expected finite"]


def _rows_vs_images(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    np.save(d / "responses.npy", np.zeros((N_IMAGES - 1, 5), np.float32))
    return ["data", "inspect", str(d)], [str(d / "responses.npy"), "7 rows but 8 images", "one row per image"]


def _roi_wrong_length(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    np.savez(d / "rois.npz", V1=np.ones(5, bool), FFA=np.ones(4, bool))
    return ["data", "inspect", str(d)], [str(d / "rois.npz"), "rois['FFA']", "shape (4,), expected (5,)"]


def _caption_csv(tmp: Path, last: str) -> Path:
    d = dataset_folder(tmp / "ds")
    rows = "".join(f"im{i:02d}.png,picture {i}\n" for i in range(N_IMAGES - 1))
    (d / "stimuli.csv").write_text(f"image,caption\n{rows}im07.png,{last}\n")
    return d


def _empty_caption(tmp: Path) -> tuple[list[str], list[str]]:
    d = _caption_csv(tmp, "")
    return ["data", "inspect", str(d)], [str(d / "stimuli.csv"), "caption (line 9)", "empty caption for image 'im07'"]


def _whitespace_caption(tmp: Path) -> tuple[list[str], list[str]]:
    d = _caption_csv(tmp, "   \t ")
    return ["data", "inspect", str(d)], [str(d / "stimuli.csv"), "caption (line 9)", "empty caption for image 'im07'"]


def _latin1_stimuli_csv(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    (d / "stimuli.csv").write_bytes("image,caption\nim00.png,un caf\xe9\n".encode("latin-1"))
    return ["data", "inspect", str(d)], [str(d / "stimuli.csv"), "not valid UTF-8 (byte 0xe9", "save the file as UTF-8"]


def _latin1_captions_file(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    caps = tmp / "captions.csv"
    caps.write_bytes(("image,caption\n" + "".join(f"im{i:02d}.png,caf\xe9 {i}\n" for i in range(N_IMAGES)))
                     .encode("latin-1"))
    return (["caption", str(d), "--store", str(tmp / "c.sqlite"), "--backend", "file", "--captions-file", str(caps)],
            [str(caps), "not valid UTF-8", "line 2"])


def _unknown_config_key(tmp: Path) -> tuple[list[str], list[str]]:
    cfg = write_yaml(tmp / "cfg.yaml", {"model": {"lamda_align": 0.1}})
    return (["train", "--config", str(cfg), "--out", str(tmp / "run")],
            [str(cfg), "model.lamda_align: unknown key", "lambda_align"])


def _wrong_config_type(tmp: Path) -> tuple[list[str], list[str]]:
    cfg = write_yaml(tmp / "cfg.yaml", {"train": {"stage1": {"epochs": "three"}}})
    return (["train", "--config", str(cfg), "--out", str(tmp / "run")],
            [str(cfg), "train.stage1.epochs", "valid integer", "'three'"])


def _config_not_a_mapping(tmp: Path) -> tuple[list[str], list[str]]:
    cfg = write_yaml(tmp / "cfg.yaml", "- data\n- model\n")
    return (["demo", "--config", str(cfg), "--out", str(tmp / "run")],
            [str(cfg), "expected a mapping of sections"])


def _unknown_override(tmp: Path) -> tuple[list[str], list[str]]:
    return (["train", "--config", "demo", "--out", str(tmp / "run"), "--set", "train.stage3.epochs=1"],
            ["train.stage3: unknown section", "stage1, stage2"])


def _wrong_override_type(tmp: Path) -> tuple[list[str], list[str]]:
    return (["sweep", "--config", "demo", "--out", str(tmp / "run"), "--set", "train.stage1.batch_size=big"],
            ["train.stage1.batch_size", "valid integer", "'big'"])


def _missing_vlm_dir(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    return (["caption", str(d), "--store", str(tmp / "c.sqlite"), "--backend", "transformers", "--model",
             str(tmp / "no_such_model"), "--device", "cpu"], [str(tmp / "no_such_model"), "cannot load"])


def _missing_text_encoder_dir(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds", captions=True)
    return (["embed", str(d), "--text", "--text-encoder", f"st:{tmp / 'no_such_model'}", "--text-out",
             str(tmp / "t.npz")], [str(tmp / "no_such_model"), "cannot load a sentence-transformers model"])


def _empty_backbone_dir(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    (tmp / "empty_model").mkdir()
    return (["embed", str(d), "--images", "--backbone", f"hf:{tmp / 'empty_model'}", "--cache", str(tmp / "f.h5")],
            [str(tmp / "empty_model"), "cannot load a transformers vision model", "save_pretrained"])


def _missing_weights_file(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    return (["embed", str(d), "--images", "--backbone", "timm:test_resnet", "--weights", str(tmp / "w.safetensors"),
             "--cache", str(tmp / "f.h5")], [str(tmp / "w.safetensors"), "weights: file not found"])


def _store_of_another_dataset(tmp: Path) -> tuple[list[str], list[str]]:
    other = dataset_folder(tmp / "other", captions=True, seed=5)
    store = tmp / "other.sqlite"
    assert main(["caption", str(other), "--store", str(store), "--backend", "dataset"]) == 0
    d = dataset_folder(tmp / "ds", captions=True)
    return (["embed", str(d), "--text", "--captions", str(store), "--text-out", str(tmp / "t.npz")],
            [str(store), "8 of 8 images have no captions", "run `llmvem caption`"])


def _not_a_caption_store(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds", captions=True)
    store = tmp / "notes.sqlite"
    con = sqlite3.connect(store)
    con.execute("CREATE TABLE notes (text TEXT)")
    con.commit()
    con.close()
    return (["embed", str(d), "--text", "--captions", str(store), "--text-out", str(tmp / "t.npz")],
            [str(store), "is not an llmvem caption store"])


def _missing_dataset(tmp: Path) -> tuple[list[str], list[str]]:
    return ["data", "inspect", str(tmp / "nothing_here")], [str(tmp / "nothing_here"), "no such file or folder"]


def _noise_ceiling_in_percent(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    np.save(d / "noise_ceiling.npy", np.full(5, 42.0))
    return ["data", "inspect", str(d)], [str(d / "noise_ceiling.npy"), "divide percentages by 100"]


def _duplicate_image_ids(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    Image.new("RGB", (16, 16)).save(d / "images" / "im04.jpg")
    return ["data", "inspect", str(d)], [str(d / "images"), "share the id 'im04'"]


def _csv_names_missing_image(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds")
    (d / "stimuli.csv").write_text("image,split\nim00.png,train\nim99.png,test\n")
    return ["data", "inspect", str(d)], [str(d / "stimuli.csv"), "image (line 3)", "'im99.png' not found"]


def _train_on_nan_dataset(tmp: Path) -> tuple[list[str], list[str]]:
    d = dataset_folder(tmp / "ds", captions=True)
    r = np.load(d / "responses.npy")
    r[0, 0] = np.nan
    np.save(d / "responses.npy", r)
    cfg = write_yaml(tmp / "cfg.yaml", {"data": {"spec": str(d)}, "cache_dir": str(tmp / "cache")})
    return (["train", "--config", str(cfg), "--out", str(tmp / "run")],
            [str(d / "responses.npy"), "NaN at image 'im00'"])


def _resume_and_overwrite(tmp: Path) -> tuple[list[str], list[str]]:
    return (["train", "--config", "demo", "--out", str(tmp / "run"), "--resume", "--overwrite"],
            ["resume and overwrite exclude each other"])


BAD_INPUTS: dict[str, Callable[[Path], tuple[list[str], list[str]]]] = {
    "truncated JPEG (embed)": _truncated_jpeg,
    "truncated PNG (embed)": _truncated_png,
    "corrupt PNG (caption)": _corrupt_png_caption,
    "zero-byte image": _zero_byte_image,
    "NaN in responses": _nan_responses,
    "Inf in responses": _inf_responses,
    "response rows != images": _rows_vs_images,
    "ROI mask of the wrong length": _roi_wrong_length,
    "empty caption": _empty_caption,
    "whitespace caption": _whitespace_caption,
    "non-UTF-8 stimuli.csv": _latin1_stimuli_csv,
    "non-UTF-8 captions file": _latin1_captions_file,
    "unknown config key": _unknown_config_key,
    "config value of the wrong type": _wrong_config_type,
    "config that is not a mapping": _config_not_a_mapping,
    "unknown --set key": _unknown_override,
    "--set value of the wrong type": _wrong_override_type,
    "missing VLM directory": _missing_vlm_dir,
    "missing text-encoder directory": _missing_text_encoder_dir,
    "empty backbone directory": _empty_backbone_dir,
    "missing weights file": _missing_weights_file,
    "caption store of another dataset": _store_of_another_dataset,
    "SQLite file that is not a caption store": _not_a_caption_store,
    "missing dataset folder": _missing_dataset,
    "noise ceiling in percent": _noise_ceiling_in_percent,
    "duplicate image ids": _duplicate_image_ids,
    "stimuli.csv names a missing image": _csv_names_missing_image,
    "train on a dataset with NaN": _train_on_nan_dataset,
    "--resume with --overwrite": _resume_and_overwrite,
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_exits_2_with_one_line_naming_the_file_and_the_problem(case, tmp_path, capsys):
    args, expected = BAD_INPUTS[case](tmp_path)
    capsys.readouterr()
    line = user_error(capsys, args)
    for fragment in expected:
        assert fragment in line, f"{fragment!r} not in {line!r}"


def test_invalid_yaml_names_the_file_and_the_line(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "cfg.yaml", "train:\n  stage1: {epochs: 3\n")
    assert main(["train", "--config", str(cfg), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"llmvem: error: {cfg}: invalid YAML") and "line 3" in err and "Traceback" not in err


def test_invalid_yaml_is_reported_on_one_line(tmp_path, capsys):
    cfg = write_yaml(tmp_path / "cfg.yaml", "train:\n  stage1: {epochs: 3\n")
    user_error(capsys, ["train", "--config", str(cfg), "--out", str(tmp_path / "run")])


@pytest.mark.parametrize("command", ["train", "demo", "sweep"])
def test_an_existing_run_folder_is_refused_before_any_work(command, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    for module in (llmvem.inputs, llmvem.pipeline):
        monkeypatch.setattr(module, "prepare_inputs", lambda *a, **k: pytest.fail("prepared inputs"))
    line = user_error(capsys, [command, "--config", "demo", "--out", str(out)])
    assert f"{out}: run folder already exists" in line and "--resume" in line and "--overwrite" in line
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


# ------------------------------------------------------------------------------ checkpoints of another config
@pytest.fixture
def tiny_inputs(monkeypatch):
    """``llmvem train`` on the tiny in-memory dataset of test_train_trainer instead of captions + features."""

    def prepare_inputs(config, show_progress=True, dataset=None, **kwargs):
        ds, text = make_dataset()
        captions = {s: [[f"image {i}"] for i in range(len(ds.splits[s]))] for s in ds.splits}
        return llmvem.inputs.PreparedInputs(dataset=ds, captions=captions,
                                              caption_info={"backend": "file", "model_id": "tiny", "config_hash": "x"},
                                              text_embeddings=text, backbone=backbone(), features=frozen_features(ds))

    monkeypatch.setattr(llmvem.inputs, "prepare_inputs", prepare_inputs)


def _train_config(path: Path, lr: float) -> Path:
    return write_yaml(path, {"backbone": {"layers": ["block0", "pooled"]}, "model": {"lambda_align": 0.5},
                             "train": {"device": "cpu", "stage1": {"epochs": 2, "batch_size": 16, "lr": lr},
                                       "stage2": {"epochs": 0}}})


def test_resuming_with_another_config_or_its_checkpoints_is_refused(tmp_path, capsys, tiny_inputs):
    cfg_a, cfg_b = _train_config(tmp_path / "a.yaml", 0.01), _train_config(tmp_path / "b.yaml", 0.02)
    run_a, run_b = tmp_path / "run_a", tmp_path / "run_b"
    assert main(["train", "--config", str(cfg_a), "--out", str(run_a), "--no-progress"]) == 0
    assert main(["train", "--config", str(cfg_b), "--out", str(run_b), "--no-progress"]) == 0
    capsys.readouterr()
    tr_a, tr_b = run_a / "models" / "llmvem_lambda0.5", run_b / "models" / "llmvem_lambda0.5"  # trainer folders
    # 1. the same folder resumed under another config: both values are named
    line = user_error(capsys, ["train", "--config", str(cfg_b), "--out", str(run_a), "--no-progress", "--resume"])
    assert str(tr_a) in line and "0.02 now" in line
    # 2. checkpoints copied in from a run of another config (config.yaml still matches)
    shutil.rmtree(tr_a / "checkpoints")
    shutil.copytree(tr_b / "checkpoints", tr_a / "checkpoints")
    line = user_error(capsys, ["train", "--config", str(cfg_a), "--out", str(run_a), "--no-progress", "--resume"])
    assert "checkpoint was written by configuration" in line and str(tr_a / "checkpoints") in line
    assert "start a new run folder or pass overwrite" in line
    # and a resume with the matching config still works
    shutil.rmtree(tr_a / "checkpoints")
    shutil.copytree(tr_b / "checkpoints", tr_a / "checkpoints")
    assert main(["train", "--config", str(cfg_b), "--out", str(run_b), "--no-progress", "--resume"]) == 0


# ----------------------------------------------------------------------------------- images that are not RGB
def _non_rgb_folder(root: Path) -> dict[str, str]:
    """One image per PIL mode, plus for some of them the RGB file a correct conversion must equal.

    Returns image id → id of its RGB twin.
    """
    rng = np.random.default_rng(0)
    images = root / "images"
    images.mkdir(parents=True)
    rgb = rng.integers(0, 256, (24, 24, 3), dtype=np.uint8)
    gray = rng.integers(0, 256, (24, 24), dtype=np.uint8)
    deep = (np.arange(24 * 24).reshape(24, 24) * 97 + 300).astype(np.uint16)  # 300 … 56 075 of 65 535
    deep8 = ((deep - deep.min()) * (255.0 / (deep.max() - deep.min()))).astype(np.uint8)  # range-stretched
    Image.fromarray(rgb).save(images / "rgb.png")
    Image.fromarray(np.dstack([rgb, np.full((24, 24), 255, np.uint8)]), "RGBA").save(images / "rgba_opaque.png")
    Image.fromarray(np.dstack([rgb, gray]), "RGBA").save(images / "rgba.png")
    Image.fromarray(gray, "L").save(images / "gray.png")
    Image.fromarray(np.dstack([gray] * 3)).save(images / "gray_as_rgb.png")
    Image.fromarray(gray, "L").convert("LA").save(images / "gray_alpha.png")
    Image.fromarray(gray > 127).save(images / "bilevel.png")
    Image.fromarray(rgb).convert("P", palette=Image.Palette.ADAPTIVE).save(images / "palette.png")
    Image.fromarray(rgb).convert("CMYK").save(images / "cmyk.jpg")
    Image.fromarray(deep).save(images / "deep16.png")
    Image.fromarray(deep).save(images / "deep16_tiff.tif")
    Image.fromarray(np.dstack([deep8] * 3)).save(images / "deep16_as_rgb.png")
    modes = {p.stem: Image.open(p).mode for p in images.iterdir()}
    assert modes == {"rgb": "RGB", "rgba_opaque": "RGBA", "rgba": "RGBA", "gray": "L", "gray_as_rgb": "RGB",
                     "gray_alpha": "LA", "bilevel": "1", "palette": "P", "cmyk": "CMYK", "deep16": "I;16",
                     "deep16_tiff": "I;16", "deep16_as_rgb": "RGB"}
    np.save(root / "responses.npy", rng.normal(size=(len(modes), 4)).astype(np.float32))
    return {"rgba_opaque": "rgb", "gray": "gray_as_rgb", "gray_alpha": "gray_as_rgb", "deep16": "deep16_as_rgb",
            "deep16_tiff": "deep16_as_rgb"}


def test_images_that_are_not_rgb_are_converted_not_rejected(tmp_path, capsys):
    twins = _non_rgb_folder(tmp_path / "ds")
    files = sorted((tmp_path / "ds" / "images").iterdir())
    n = len(files)
    assert main(["data", "inspect", str(tmp_path / "ds")]) == 0
    cache = tmp_path / "features.h5"
    assert main(embed_images(tmp_path / "ds", tmp_path)) == 0
    out = capsys.readouterr().out
    assert f"images computed: {n}" in out
    with h5py.File(cache, "r") as fh:
        (grp,) = fh.values()
        row_of = {h.decode(): i for i, h in enumerate(grp["hashes"][()])}
        pooled = grp["pooled"][()]
    hashes = dict(zip([p.stem for p in files], FileImages(files).content_hashes(), strict=True))
    assert sorted(row_of) == sorted(hashes.values())  # every image has its features
    assert np.isfinite(pooled).all()
    for image, twin in twins.items():
        np.testing.assert_array_equal(pooled[row_of[hashes[image]]], pooled[row_of[hashes[twin]]], err_msg=image)
    # the 16-bit image is stretched over its range, not clipped to white
    assert not np.array_equal(pooled[row_of[hashes["deep16"]]], pooled[row_of[hashes["rgba"]]])

    store = tmp_path / "captions.sqlite"
    assert main(["caption", str(tmp_path / "ds"), "--store", str(store), "--backend", "labels", "--device",
                 "cpu"]) == 0
    assert f"done: {n}, skipped (already stored): 0, failed: 0 of {n} images" in capsys.readouterr().out
    con = sqlite3.connect(store)
    caption = dict(con.execute("SELECT image_id, caption FROM captions").fetchall())
    con.close()
    assert len(caption) == n and all(c.startswith("A photo that looks like") for c in caption.values())
    for image, twin in twins.items():
        assert caption[image] == caption[twin], image


# --------------------------------------------------------------------------- what the user sees, for real
def _subprocess_cases(tmp: Path) -> dict[str, tuple[list[str], str]]:
    return {"NaN responses (data inspect)": (_nan_responses(tmp / "a")[0], "responses.npy: responses: 1 non-finite"),
            "truncated JPEG (embed)": (_truncated_jpeg(tmp / "b")[0], "im03.jpg: image: cannot decode image"),
            "unknown config key (train)": (_unknown_config_key(tmp / "c")[0], "model.lamda_align: unknown key")}


@pytest.mark.parametrize("case", ["NaN responses (data inspect)", "truncated JPEG (embed)",
                                  "unknown config key (train)"])
def test_the_console_shows_exactly_one_line_and_no_traceback(case, tmp_path):
    for sub in ("a", "b", "c"):
        (tmp_path / sub).mkdir()
    args, fragment = _subprocess_cases(tmp_path)[case]
    env = {**os.environ, "LLMVEM_NO_PROGRESS": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "llmvem", *args], cwd=tmp_path, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stdout == ""
    lines = proc.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("llmvem: error: ") and fragment in lines[0], proc.stderr
