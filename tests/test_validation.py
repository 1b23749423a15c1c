"""Bad inputs: every error names the file, the field and what was expected; odd image modes load as RGB."""

from __future__ import annotations

import io
import zipfile
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from llmvem.data.algonauts import load_algonauts
from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.folder import load_folder
from llmvem.data.images import ArrayImages
from llmvem.data.v4 import load_v4
from llmvem.errors import DataValidationError, LLMVEMError


def make_folder(root: Path, n: int = 6, n_vox: int = 4, suffix: str = ".png") -> Path:
    (root / "images").mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(root / "images" / f"im{i}{suffix}")
    np.save(root / "responses.npy", rng.normal(size=(n, n_vox)))
    return root


def error_of(fn, *args, **kwargs) -> str:
    with pytest.raises(DataValidationError) as info:
        fn(*args, **kwargs)
    assert isinstance(info.value, LLMVEMError)
    return str(info.value)


# ------------------------------------------------------------------------------------------- responses
def test_image_count_vs_response_rows(tmp_path):
    root = make_folder(tmp_path)
    np.save(root / "responses.npy", np.zeros((5, 4)))
    msg = error_of(load_folder, root)
    assert msg.startswith(f"{root / 'responses.npy'}: responses: 5 rows but 6 images")
    assert "expected one row per image" in msg


@pytest.mark.parametrize(("value", "kind"), [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_responses(tmp_path, value, kind):
    root = make_folder(tmp_path)
    r = np.load(root / "responses.npy")
    r[3, 2] = value
    np.save(root / "responses.npy", r)
    msg = error_of(load_folder, root)
    assert msg.startswith(f"{root / 'responses.npy'}: responses: 1 non-finite values ({kind} at image 'im3'")
    assert "expected finite numbers" in msg


def test_missing_responses_file(tmp_path):
    root = make_folder(tmp_path)
    (root / "responses.npy").unlink()
    assert error_of(load_folder, root) == (
        f"{root}: responses: file not found; expected responses.npy or responses.h5 or responses.hdf5")


def test_two_responses_files_are_ambiguous(tmp_path):
    root = make_folder(tmp_path)
    (root / "responses.h5").write_bytes(b"")
    assert "responses: found ['responses.npy', 'responses.h5']; keep only one" in error_of(load_folder, root)


def test_responses_with_pickled_objects_are_refused(tmp_path):
    root = make_folder(tmp_path)
    np.save(root / "responses.npy", np.array([{"a": 1}] * 6, dtype=object), allow_pickle=True)
    msg = error_of(load_folder, root)
    assert msg == f"{root / 'responses.npy'}: responses: holds Python objects (pickle); expected a numeric array"


def test_repeats_shape(tmp_path):
    root = make_folder(tmp_path)
    np.save(root / "repeats.npy", np.zeros((6, 3, 5)))
    msg = error_of(load_folder, root)
    assert msg.startswith(f"{root / 'repeats.npy'}: repeats: shape (6, 3, 5), expected (n_images=6, n_repeats, n_voxels=4)")


# ----------------------------------------------------------------------------------------- ROI / hemis
def test_roi_mask_length_folder(tmp_path):
    root = make_folder(tmp_path)
    np.savez(root / "rois.npz", V1=np.ones(3, dtype=bool))
    msg = error_of(load_folder, root)
    assert msg == (f"{root / 'rois.npz'}: rois['V1']: mask of shape (3,), expected (4,) to match the voxels of the "
                   "responses")


def test_roi_mask_length_algonauts(tmp_path):
    subj = tmp_path / "subj05"
    for d in ("training_split/training_images", "training_split/training_fmri", "roi_masks"):
        (subj / d).mkdir(parents=True)
    for i in range(5):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(subj / "training_split/training_images" / f"train-{i:04d}.png")
    for h in ("lh", "rh"):
        np.save(subj / f"training_split/training_fmri/{h}_training_fmri.npy", np.zeros((5, 7), dtype=np.float32))
        np.save(subj / f"roi_masks/{h}.streams_challenge_space.npy", np.zeros(7 if h == "lh" else 6))
    np.save(subj / "roi_masks/mapping_streams.npy", {0: "Unknown", 1: "early"}, allow_pickle=True)
    msg = error_of(load_algonauts, subj)
    assert msg == (f"{subj / 'roi_masks/rh.streams_challenge_space.npy'}: roi labels: 6 vertices, expected 7 to "
                   "match the hemisphere's fMRI")


def test_hemisphere_values(tmp_path):
    root = make_folder(tmp_path)
    np.save(root / "hemisphere.npy", np.array(["lh", "left", "rh", "rh"]))
    assert error_of(load_folder, root) == f"{root / 'hemisphere.npy'}: hemisphere: values ['left']; expected 'lh' or 'rh'"


# ---------------------------------------------------------------------------------------------- ids
def test_duplicate_ids_in_folder(tmp_path):
    root = make_folder(tmp_path)
    Image.new("RGB", (8, 8)).save(root / "images" / "im2.jpg")  # same id 'im2' as im2.png
    msg = error_of(load_folder, root)
    assert msg == (f"{root / 'images'}: image ids: 'im2.png' and 'im2.jpg' share the id 'im2'; expected unique "
                   "file names without extension")


def test_duplicate_ids_across_splits_in_memory():
    images = ArrayImages(np.zeros((2, 4, 4, 3), dtype=np.uint8), ids=["a", "b"])
    other = ArrayImages(np.zeros((1, 4, 4, 3), dtype=np.uint8), ids=["a"])
    msg = error_of(EncodingDataset, name="x", source="my.h5",
                   splits={"train": Split(images, np.zeros((2, 3))), "test": Split(other, np.zeros((1, 3)))})
    assert msg == "my.h5: image ids: 1 duplicate ids (first: 'a'); expected each id once across splits"


# ------------------------------------------------------------------------------------------ image files
def test_zero_byte_image(tmp_path):
    root = make_folder(tmp_path)
    (root / "images" / "im4.png").write_bytes(b"")
    assert error_of(load_folder, root) == (
        f"{root / 'images' / 'im4.png'}: image: file is empty (0 bytes); expected an encoded image")


def test_truncated_jpeg(tmp_path):
    root = make_folder(tmp_path, suffix=".jpg")
    path = root / "images" / "im1.jpg"
    big = Image.fromarray(np.random.default_rng(1).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    big.save(path, quality=95)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    ds = load_folder(root)  # images are decoded lazily ...
    images = ds.all_images()
    i = images.ids.index("im1")
    msg = error_of(images.load, i)  # ... and the broken one names itself when read
    assert msg.startswith(f"{path}: image: cannot decode image (OSError: image file is truncated")
    assert msg.endswith("the file is corrupt or truncated")
    assert images.load(images.ids.index("im0")).size == (8, 8)


def test_non_rgb_images_load_as_rgb(tmp_path):
    root = tmp_path
    (root / "images").mkdir()
    Image.new("L", (4, 4), 77).save(root / "images" / "gray.png")
    rgba = np.zeros((4, 4, 4), dtype=np.uint8)
    rgba[:2] = (200, 10, 10, 255)  # opaque red on top, fully transparent below (composited on white)
    Image.fromarray(rgba, mode="RGBA").save(root / "images" / "rgba.png")
    Image.new("CMYK", (4, 4), (255, 0, 0, 0)).save(root / "images" / "cmyk.tif")  # pure cyan ink
    Image.new("CMYK", (4, 4), (0, 0, 0, 0)).save(root / "images" / "cmyk_jpeg.jpg", quality=100)
    deep = np.array([[0, 1000], [2000, 4000]], dtype=np.uint16).repeat(2, 0).repeat(2, 1)
    Image.fromarray(deep).save(root / "images" / "deep16.png")
    Image.new("P", (4, 4), 3).save(root / "images" / "palette.png")
    np.save(root / "responses.npy", np.zeros((6, 2)))
    ds = load_folder(root, test_fraction=0.5, val_fraction=0)
    images = ds.all_images()
    arrays = {i: images.load_array(k) for k, i in enumerate(images.ids)}
    for a in arrays.values():
        assert a.dtype == np.uint8 and a.shape == (4, 4, 3)
    assert Image.open(root / "images" / "deep16.png").mode.startswith("I")  # really stored as 16-bit
    assert (arrays["gray"] == 77).all()
    assert tuple(arrays["rgba"][0, 0]) == (200, 10, 10) and tuple(arrays["rgba"][3, 3]) == (255, 255, 255)
    assert tuple(arrays["cmyk"][0, 0]) == (0, 255, 255)
    assert (arrays["cmyk_jpeg"] >= 250).all()  # no ink = white
    # 16-bit values are rescaled over their range (0 -> 0, 1000 -> 63, 4000 -> 255), not clipped at 255
    np.testing.assert_array_equal(arrays["deep16"][::2, ::2, 0], [[0, 63], [127, 255]])
    assert tuple(arrays["palette"][0, 0]) == Image.new("P", (1, 1), 3).convert("RGB").getpixel((0, 0))


# ----------------------------------------------------------------------------------------------- CSV
def test_non_utf8_csv(tmp_path):
    root = make_folder(tmp_path)
    (root / "stimuli.csv").write_bytes("image,caption\nim0.png,un café\n".encode("latin-1"))
    assert error_of(load_folder, root) == (
        f"{root / 'stimuli.csv'}: encoding: not valid UTF-8 (byte 0xe9 at offset 28); save the file as UTF-8")


def test_csv_with_bom_is_accepted(tmp_path):
    root = make_folder(tmp_path, n=2)
    (root / "stimuli.csv").write_text("\ufeffimage,caption\nim1.png,un café\nim0.png,b\n", encoding="utf-8")
    assert load_folder(root, test_fraction=0.5, val_fraction=0).captions["im1"] == ["un café"]


@pytest.mark.parametrize("caption", ["", "   "])
def test_empty_caption(tmp_path, caption):
    root = make_folder(tmp_path, n=2)
    (root / "stimuli.csv").write_text(f"image,caption\nim0.png,a cat\nim1.png,{caption}\n", encoding="utf-8")
    assert error_of(load_folder, root) == (
        f"{root / 'stimuli.csv'}: caption (line 3): empty caption for image 'im1'; expected text (leave out the row "
        "instead)")


def test_csv_names_missing_image(tmp_path):
    root = make_folder(tmp_path, n=2)
    (root / "stimuli.csv").write_text("image\nim0.png\nim9.png\n", encoding="utf-8")
    assert error_of(load_folder, root) == (
        f"{root / 'stimuli.csv'}: image (line 3): 'im9.png' not found in {root / 'images'}; expected an existing "
        "image file name")


def test_csv_without_image_column_and_bad_split(tmp_path):
    root = make_folder(tmp_path, n=2)
    (root / "stimuli.csv").write_text("file\nim0.png\n", encoding="utf-8")
    assert "stimuli.csv: image: no 'image' column; found columns ['file']" in error_of(load_folder, root)
    (root / "stimuli.csv").write_text("image,split\nim0.png,train\nim1.png,holdout\n", encoding="utf-8")
    assert error_of(load_folder, root) == (
        f"{root / 'stimuli.csv'}: split (line 3): 'holdout'; expected one of ('train', 'val', 'test')")
    (root / "stimuli.csv").write_text("image,split\nim0.png,train\nim1.png,train\n", encoding="utf-8")
    assert error_of(load_folder, root) == f"{root / 'stimuli.csv'}: split: no 'test' images; expected at least one"


# ------------------------------------------------------------------------------------------------ V4
def test_v4_raw_responses_of_another_shape(tmp_path):
    (tmp_path / "images").mkdir()
    (tmp_path / "responses_repeat_averaged").mkdir()
    (tmp_path / "responses_raw").mkdir()
    with zipfile.ZipFile(tmp_path / "images" / "images_7.zip", "w") as zf:
        for i in range(12):
            buf = io.BytesIO()
            Image.new("RGB", (4, 4), (i, i, i)).save(buf, format="JPEG")
            zf.writestr(f"image{i + 1:04d}.jpg", buf.getvalue())
    np.save(tmp_path / "responses_repeat_averaged" / "responses_7.npy", np.ones((2, 12)))
    np.save(tmp_path / "responses_raw" / "responses_7.npy", np.ones((2, 11, 3)))
    assert error_of(load_v4, tmp_path, "7") == (
        f"{tmp_path / 'responses_raw' / 'responses_7.npy'}: responses_raw: shape (2, 11, 3), expected "
        "(n_neurons=2, n_images=12, n_repeats)")
