"""The generic dataset folder: your own images and responses, no code needed.

Layout (only ``images/`` and one responses file are required)::

    my_dataset/
      images/             the stimuli: .png .jpg .jpeg .bmp .tif .tiff .webp files (any mode: grayscale, RGBA,
                          CMYK, palette and 16-bit images are converted to 8-bit RGB). An image's id is its file
                          name without extension, so ids must be unique (no a.png next to a.jpg).
      responses.npy       float array of shape (n_images, n_voxels): one row per image, averaged over repeats
        or responses.h5   the same as HDF5 dataset "responses"
      stimuli.csv         optional, UTF-8 with a header row. Columns:
                            image    (required) file name inside images/ (or its name without extension)
                            split    (optional) train / test / val, the same for every row of an image
                            caption  (optional) one caption per row; several rows per image give several
                                     captions; an empty caption is an error
                          other columns are ignored.
      repeats.npy         optional float array of shape (n_images, n_repeats, n_voxels): single trials, NaN
        or repeats.h5     where an image had fewer repeats (HDF5 dataset "repeats"; it may also sit inside
                          responses.h5). The noise ceiling is computed from the test images' repeats with the
                          Algonauts 2023 formula (:func:`llmvem.data.noise_ceiling.algonauts_noise_ceiling`).
      noise_ceiling.npy   optional float array of shape (n_voxels,): a precomputed ceiling as a fraction of
                          explainable variance (0-1); used instead of the one computed from repeats.
      rois.npz            optional: one boolean (or 0/1) array of shape (n_voxels,) per region name
                          (``np.savez("rois.npz", V1=mask_v1, FFA=mask_ffa)``).
      hemisphere.npy      optional array of shape (n_voxels,) of the strings "lh" / "rh".

Rows of the responses follow ``stimuli.csv`` (images in order of their first row) when it exists, otherwise
the image files sorted by name; image files the CSV does not name are ignored. Without a ``split`` column a
seeded ``test_fraction`` of the images is held out as the test split. A ``val_fraction`` of the training
images then becomes the validation split (unless the CSV already names ``val`` images). No file is unpickled.
"""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import FileImages, list_image_files
from llmvem.data.noise_ceiling import SOURCE_KEY as NC_SOURCE_KEY
from llmvem.data.noise_ceiling import algonauts_noise_ceiling
from llmvem.data.safe_load import (
    check_finite,
    check_nonempty_files,
    load_array,
    read_utf8_text,
)
from llmvem.data.text import check_text
from llmvem.errors import DataValidationError, quote

SPLIT_VALUES = ("train", "val", "test")


def holdout_indices(n: int, fraction: float, seed: int, source: str | Path | None,
                    field: str = "test_fraction") -> tuple[np.ndarray, np.ndarray]:
    """Seeded random hold-out of ``round(fraction * n)`` (at least one) of ``n`` rows.

    Returns
    -------
    keep, held_out : int arrays, sorted
        Indices of the remaining rows and of the held-out rows.
    """
    if not 0.0 < fraction < 1.0:
        raise DataValidationError(source, field, f"got {fraction}, expected 0 < fraction < 1")
    n_out = max(1, int(round(fraction * n)))
    if n_out >= n:
        raise DataValidationError(source, field, f"{n} images are too few to hold out {fraction:.0%} of them")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_out:]), np.sort(perm[:n_out])


def find_one(folder: Path, stem: str, suffixes: tuple[str, ...] = (".npy", ".h5", ".hdf5"),
             required: bool = False) -> Path | None:
    """The single file ``folder/stem<suffix>``; error when several exist (ambiguous) or a required one is absent."""
    found = [folder / f"{stem}{s}" for s in suffixes if (folder / f"{stem}{s}").is_file()]
    if len(found) > 1:
        raise DataValidationError(folder, stem, f"found {[p.name for p in found]}; keep only one of them")
    if not found:
        if required:
            names = " or ".join(f"{stem}{s}" for s in suffixes)
            raise DataValidationError(folder, stem, f"file not found; expected {names}")
        return None
    return found[0]


def confine(path: Path, images_dir: Path, where: str | Path, field: str, allow_symlinks: bool = False) -> Path:
    """``path`` if it lies inside ``images_dir`` once links are followed, else a :class:`DataValidationError`.

    Keeps a dataset from naming (and a caption server from receiving) any readable file on the machine. A
    symlinked ``images/`` folder is fine; links inside it that lead out are refused unless ``allow_symlinks``.
    """
    if allow_symlinks:
        return path
    inside = images_dir.resolve()
    target = path.resolve()
    if target != inside and inside not in target.parents:
        raise DataValidationError(
            where, field, f"{path.name!r} resolves to {str(target)[:150]!r}, outside {images_dir}; expected image "
            "files inside the dataset (loader option allow_symlinks=true follows links out of it)")
    return path


def _read_stimuli_csv(csv_path: Path, images_dir: Path, allow_symlinks: bool = False
                      ) -> tuple[list[Path], dict[str, str] | None, dict[str, list[str]]]:
    """Parse stimuli.csv → image paths (row order), split per image id (or None), captions per image id."""
    text = read_utf8_text(csv_path, "encoding")
    reader = csv.DictReader(io.StringIO(text, newline=""))
    columns = [c.strip() for c in (reader.fieldnames or [])]
    if "image" not in columns:
        raise DataValidationError(csv_path, "image", f"no 'image' column; found columns {columns}")
    reader.fieldnames = columns
    has_split, has_caption = "split" in columns, "caption" in columns
    by_stem: dict[str, list[Path]] = {}
    for p in list_image_files(images_dir):
        by_stem.setdefault(p.stem, []).append(p)
    order: list[Path] = []
    seen: dict[str, Path] = {}
    splits: dict[str, str] = {}
    captions: dict[str, list[str]] = {}
    rows = iter(reader)
    while True:
        try:
            row = next(rows)
        except StopIteration:
            break
        except csv.Error as exc:  # NUL bytes, a field over the CSV size limit, ...
            raise DataValidationError(csv_path, f"line {reader.line_num}", f"not valid CSV ({exc})") from exc
        line = reader.line_num
        name = (row.get("image") or "").strip()
        if not name:
            raise DataValidationError(csv_path, f"image (line {line})", "empty; expected an image file name")
        if Path(name).is_absolute() or ".." in Path(name).parts:
            raise DataValidationError(
                csv_path, f"image (line {line})", f"{name[:150]!r} leaves the images folder; expected a file name "
                "inside images/")
        path = images_dir / name
        try:
            found = path.is_file()
        except OSError:  # e.g. a name longer than the file system allows
            found = False
        if not found:
            candidates = by_stem.get(name, []) if not Path(name).suffix else []
            if len(candidates) != 1:
                raise DataValidationError(
                    csv_path, f"image (line {line})", f"{quote(name)} not found in {images_dir}; expected an existing "
                    "image file name")
            path = candidates[0]
        confine(path, images_dir, csv_path, f"image (line {line})", allow_symlinks)
        img_id = path.stem
        if img_id in seen and seen[img_id] != path:
            raise DataValidationError(
                csv_path, f"image (line {line})", f"{path.name!r} and {seen[img_id].name!r} share the id {img_id!r};"
                " expected unique file names without extension")
        if img_id not in seen:
            seen[img_id] = path
            order.append(path)
        if has_split:
            split = (row.get("split") or "").strip().lower()
            if split not in SPLIT_VALUES:
                raise DataValidationError(
                    csv_path, f"split (line {line})", f"{row.get('split')!r}; expected one of {SPLIT_VALUES}")
            if splits.setdefault(img_id, split) != split:
                raise DataValidationError(
                    csv_path, f"split (line {line})", f"image {img_id!r} is in both {splits[img_id]!r} and "
                    f"{split!r}; expected one split per image")
        if has_caption:
            caption = row.get("caption")
            if caption is None or not caption.strip():
                raise DataValidationError(
                    csv_path, f"caption (line {line})", f"empty caption for image {img_id!r}; expected text "
                    "(leave out the row instead)")
            check_text(caption, csv_path, f"caption (line {line})")  # the rule every caption file follows
            captions.setdefault(img_id, []).append(caption.strip())
    if not order:
        raise DataValidationError(csv_path, "image", "no rows; expected one row per image")
    return order, (splits if has_split else None), captions


def _load_rois(path: Path, n_voxels: int) -> dict[str, np.ndarray]:
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataValidationError(path, "rois", f"not a readable .npz file ({exc})") from exc
    rois: dict[str, np.ndarray] = {}
    with archive:
        for roi in archive.files:
            try:
                mask = archive[roi]
            except ValueError as exc:
                raise DataValidationError(path, f"rois[{roi!r}]", "holds Python objects; expected a boolean mask") from exc
            if mask.ndim != 1 or mask.shape[0] != n_voxels:
                raise DataValidationError(
                    path, f"rois[{roi!r}]", f"mask of shape {mask.shape}, expected ({n_voxels},) to match the "
                    "voxels of the responses")
            if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
                raise DataValidationError(path, f"rois[{roi!r}]", "expected a boolean (or 0/1) mask")
            rois[roi] = mask.astype(bool)
    return rois


def _load_hemisphere(path: Path, n_voxels: int) -> np.ndarray:
    try:
        hemi = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise DataValidationError(path, "hemisphere", f"expected a string array saved without pickle ({exc})") from exc
    if hemi.dtype.kind not in "US":
        raise DataValidationError(path, "hemisphere", f"expected strings 'lh'/'rh', got dtype {hemi.dtype}")
    hemi = hemi.astype(str)
    if hemi.shape != (n_voxels,):
        raise DataValidationError(path, "hemisphere", f"shape {hemi.shape}, expected ({n_voxels},)")
    bad = sorted(set(np.unique(hemi).tolist()) - {"lh", "rh"})
    if bad:
        raise DataValidationError(path, "hemisphere", f"values {bad}; expected 'lh' or 'rh'")
    return hemi


def _load_repeats(root: Path, resp_path: Path, n_images: int, n_voxels: int, ids: list[str]) -> np.ndarray | None:
    rep_path = find_one(root, "repeats")
    if rep_path is None and resp_path.suffix.lower() != ".npy":
        import h5py

        with h5py.File(resp_path, "r") as fh:
            if "repeats" in fh:
                rep_path = resp_path
    if rep_path is None:
        return None
    rep = load_array(rep_path, "repeats", ndim=3)
    if rep.shape[0] != n_images or rep.shape[2] != n_voxels:
        raise DataValidationError(
            rep_path, "repeats", f"shape {rep.shape}, expected (n_images={n_images}, n_repeats, n_voxels={n_voxels})")
    check_finite(rep, rep_path, "repeats", ids, allow_nan=True)
    return rep.astype(np.float32)


def load_folder(path: str | Path, test_fraction: float = 0.2, val_fraction: float = 0.1, seed: int = 0,
                name: str | None = None, allow_symlinks: bool = False) -> EncodingDataset:
    """Load a generic dataset folder (layout in the module docstring).

    Parameters
    ----------
    path : str or Path
        The dataset folder.
    test_fraction : float
        Fraction of images held out as the test split when ``stimuli.csv`` has no ``split`` column.
    val_fraction : float
        Fraction of the training images carved out as the validation split; 0 for none.
    seed : int
        Seed of the test and validation hold-outs.
    name : str, optional
        Dataset name (default: the folder name).
    allow_symlinks : bool
        Accept image files that are links leading out of ``images/`` (off: every image must resolve inside it,
        and ``stimuli.csv`` may not name absolute paths or ``..``).

    Returns
    -------
    EncodingDataset
        Splits ``train``, ``val`` (when ``val_fraction > 0`` or named in the CSV) and ``test``; responses
        float32 of shape (n_images, n_voxels); captions from the CSV.
    """
    root = Path(path)
    if not root.is_dir():
        raise DataValidationError(root, "folder", "not a directory; expected a folder with images/ and responses.npy")
    images_dir = root / "images"
    if not images_dir.is_dir():
        raise DataValidationError(root, "images", "no images/ folder; expected the stimulus images in images/")
    resp_path = find_one(root, "responses", required=True)
    assert resp_path is not None
    csv_path = root / "stimuli.csv"
    split_of: dict[str, str] | None = None
    captions: dict[str, list[str]] = {}
    if csv_path.is_file():
        paths, split_of, captions = _read_stimuli_csv(csv_path, images_dir, allow_symlinks)
        rows_from = csv_path
    else:
        paths = list_image_files(images_dir)
        rows_from = images_dir
        if not paths:
            raise DataValidationError(images_dir, "images", "no image files; expected .png/.jpg/... files")
        stems: dict[str, Path] = {}
        for p in paths:
            if p.stem in stems:
                raise DataValidationError(
                    images_dir, "image ids", f"{p.name!r} and {stems[p.stem].name!r} share the id {p.stem!r}; "
                    "expected unique file names without extension")
            stems[p.stem] = p
            confine(p, images_dir, images_dir, "image", allow_symlinks)
    check_nonempty_files(paths)
    ids = [p.stem for p in paths]
    n_images = len(paths)

    responses = load_array(resp_path, "responses", ndim=2)
    if responses.shape[0] != n_images:
        raise DataValidationError(
            resp_path, "responses", f"{responses.shape[0]} rows but {n_images} images (from {rows_from}); "
            "expected one row per image")
    check_finite(responses, resp_path, "responses", ids)
    responses = responses.astype(np.float32)
    n_voxels = responses.shape[1]
    repeats = _load_repeats(root, resp_path, n_images, n_voxels, ids)
    rois = _load_rois(root / "rois.npz", n_voxels) if (root / "rois.npz").is_file() else {}
    hemi = _load_hemisphere(root / "hemisphere.npy", n_voxels) if (root / "hemisphere.npy").is_file() else None

    if split_of is not None:
        labels = np.array([split_of[i] for i in ids])
        for required in ("train", "test"):
            if not (labels == required).any():
                raise DataValidationError(csv_path, "split", f"no {required!r} images; expected at least one")
        index = {s: np.flatnonzero(labels == s) for s in SPLIT_VALUES if (labels == s).any()}
    else:
        train_idx, test_idx = holdout_indices(n_images, test_fraction, seed, root)
        index = {"train": train_idx, "test": test_idx}

    everything = Split(FileImages(paths, ids), responses, repeats)
    splits = {s: everything.subset(idx) for s, idx in index.items()}

    noise_ceiling = None
    nc_path = root / "noise_ceiling.npy"
    if nc_path.is_file():
        noise_ceiling = load_array(nc_path, "noise_ceiling", ndim=1).astype(np.float64)
        if noise_ceiling.shape != (n_voxels,):
            raise DataValidationError(nc_path, "noise_ceiling", f"shape {noise_ceiling.shape}, expected ({n_voxels},)")
        check_finite(noise_ceiling, nc_path, "noise_ceiling")
        if noise_ceiling.min() < 0 or noise_ceiling.max() > 1:
            raise DataValidationError(
                nc_path, "noise_ceiling", f"values in [{noise_ceiling.min():.3g}, {noise_ceiling.max():.3g}]; "
                "expected fractions in [0, 1] (divide percentages by 100)")
    elif repeats is not None:
        noise_ceiling = algonauts_noise_ceiling(splits["test"].repeats)

    ds = EncodingDataset(
        name=name or root.name, splits=splits, roi_masks=rois, hemisphere=hemi, noise_ceiling=noise_ceiling,
        captions=captions, source=str(root),
        meta={"format": "folder", "test_fraction": None if split_of is not None else test_fraction, "seed": seed,
              **({NC_SOURCE_KEY: f"given: {nc_path.name} (not computed for the held-out test images)"}
                 if nc_path.is_file() else {})},
    )
    if val_fraction and "val" not in ds.splits:
        ds = ds.with_validation_split(val_fraction, seed)
    return ds
