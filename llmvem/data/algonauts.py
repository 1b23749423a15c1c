"""The Algonauts 2023 challenge layout (Natural Scenes Dataset fMRI, one subject per folder).

Layout of one subject (as released by the challenge; ``<h>`` is ``lh`` or ``rh``)::

    subj01/
      training_split/training_fmri/<h>_training_fmri.npy   float (n_train, n_vertices_<h>), required
      training_split/training_images/*.png                 n_train images, sorted name order = fMRI rows
                                                           (train-0001_nsd-00013.png, ...), required
      test_split/test_images/*.png                         challenge test images (fMRI withheld), optional
      roi_masks/<h>.<class>_challenge_space.npy            int labels over the hemisphere's vertices:
                                                           0 = none, k > 0 = ROI k of the class
      roi_masks/mapping_<class>.npy                        {k: ROI name} dict saved with np.save; read with a
                                                           restricted unpickler (see llmvem.data.safe_load)
      roi_masks/<h>.all-vertices_fsaverage_space.npy       0/1 mask over the 163,842 fsaverage vertices that
                                                           selects the challenge vertices, optional
      <h>_noise_ceiling.npy                                optional NSD noise ceiling per vertex, in percent;
        or noise_ceiling/<h>_noise_ceiling.npy             any one of these three names (divided by 100 on
        or noise_ceiling/<h>.npy                           loading)

``<class>`` is any class with a mapping file; the release has prf-visualrois, floc-bodies, floc-faces,
floc-places, floc-words and streams.

What the loader returns:

* voxels are the lh vertices followed by the rh vertices (``hemisphere`` says which is which);
* one boolean ROI mask per ROI name (``"V1v"``, ``"FFA-1"``, ...) over all voxels, true in both hemispheres;
  ROIs with no vertex in either hemisphere are left out, and a name used by two classes is stored as
  ``"<class>/<name>"`` for the second; ``meta["roi_classes"]`` lists the ROI names of each class;
* ``fsaverage_index``: each voxel's fsaverage vertex within its own hemisphere (0-163,841);
* the challenge withholds the test fMRI, so the ``test`` split is a seeded ``test_fraction`` (default 10%) of
  the training images, and ``val`` a seeded ``val_fraction`` of the rest; the challenge test images are kept
  in ``meta["challenge_test_images"]`` (a :class:`~llmvem.data.images.FileImages`) for predictions;
* ``meta["nsd_id"]``: image id → NSD image index, parsed from ``..._nsd-NNNNN`` file names when present.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmvem.data.dataset import EncodingDataset, Split, validation_indices
from llmvem.data.folder import holdout_indices
from llmvem.data.images import FileImages, list_image_files
from llmvem.data.noise_ceiling import SOURCE_KEY as NC_SOURCE_KEY
from llmvem.data.safe_load import check_finite, check_nonempty_files, load_array, load_label_mapping
from llmvem.errors import DataValidationError

log = logging.getLogger(__name__)

ROI_CLASSES = ("prf-visualrois", "floc-bodies", "floc-faces", "floc-places", "floc-words", "streams")
HEMISPHERES = ("lh", "rh")
FSAVERAGE_N_VERTICES = 163_842
NOISE_CEILING_NAMES = ("{h}_noise_ceiling.npy", "noise_ceiling/{h}_noise_ceiling.npy", "noise_ceiling/{h}.npy")
_NSD_ID = re.compile(r"nsd-(\d+)")
_CHUNK_BYTES = 32 * 2**20  # bytes of fMRI rows read (and checked for NaN/Inf) at a time


@dataclass
class _Hemisphere:
    """What one hemisphere's files hold (internal)."""

    path: Path
    fmri: np.ndarray  # (n_train, n_vertices), memory-mapped (never read through the map: see _stream_rows)
    labels: dict[str, np.ndarray]  # class -> int labels (n_vertices,)
    fsaverage_index: np.ndarray | None  # (n_vertices,)
    fsaverage_size: int | None
    noise_ceiling: np.ndarray | None  # (n_vertices,), fraction


def _roi_classes(roi_dir: Path) -> list[str]:
    """Classes with a mapping file, in the release's order, then any others sorted by name."""
    if not roi_dir.is_dir():
        return []
    found = {p.name[len("mapping_"):-len(".npy")] for p in roi_dir.glob("mapping_*.npy")}
    suffix = "_challenge_space.npy"
    with_labels = {p.name.split(".", 1)[1][:-len(suffix)] for p in roi_dir.glob(f"*.*{suffix}")}
    unnamed = sorted(with_labels - found)
    if unnamed:
        raise DataValidationError(
            roi_dir, "roi mapping", f"label files for {unnamed} but no mapping_<class>.npy naming their ROIs")
    return [c for c in ROI_CLASSES if c in found] + sorted(found - set(ROI_CLASSES))


def _integer_labels(path: Path, n_vertices: int) -> np.ndarray:
    labels = load_array(path, "roi labels", ndim=1)
    if labels.shape[0] != n_vertices:
        raise DataValidationError(
            path, "roi labels", f"{labels.shape[0]} vertices, expected {n_vertices} to match the hemisphere's fMRI")
    if labels.dtype.kind == "f" and not (np.isfinite(labels).all() and (labels == np.round(labels)).all()):
        raise DataValidationError(path, "roi labels", "non-integer values; expected integer ROI indices")
    return labels.astype(np.int64)


def _fsaverage_index(path: Path, n_vertices: int) -> tuple[np.ndarray, int]:
    mask = load_array(path, "fsaverage mask", ndim=1)
    if mask.dtype != bool and not np.isin(mask, (0, 1)).all():
        raise DataValidationError(path, "fsaverage mask", "expected a boolean (0/1) mask over fsaverage vertices")
    index = np.flatnonzero(mask)
    if index.size != n_vertices:
        raise DataValidationError(
            path, "fsaverage mask", f"selects {index.size} vertices but the fMRI has {n_vertices}; expected equal")
    if mask.shape[0] != FSAVERAGE_N_VERTICES:
        log.warning("%s has %d entries; fsaverage has %d vertices per hemisphere", path, mask.shape[0],
                    FSAVERAGE_N_VERTICES)
    return index, int(mask.shape[0])


def _noise_ceiling(subject: Path, hemi: str, n_vertices: int) -> np.ndarray | None:
    found = [subject / n.format(h=hemi) for n in NOISE_CEILING_NAMES if (subject / n.format(h=hemi)).is_file()]
    if len(found) > 1:
        raise DataValidationError(subject, "noise_ceiling", f"several files {found}; keep only one")
    if not found:
        return None
    path = found[0]
    nc = load_array(path, "noise_ceiling", ndim=1).astype(np.float64)
    if nc.shape[0] != n_vertices:
        raise DataValidationError(path, "noise_ceiling", f"{nc.shape[0]} vertices, expected {n_vertices}")
    check_finite(nc, path, "noise_ceiling")
    if nc.min() < 0 or nc.max() > 100:
        raise DataValidationError(
            path, "noise_ceiling", f"values in [{nc.min():.3g}, {nc.max():.3g}]; expected percent in [0, 100]")
    if nc.max() <= 1.0:
        log.warning("%s: all values <= 1 %%; NSD noise ceilings are in percent - is this file in fractions?", path)
    return nc / 100.0


def _load_hemisphere(subject: Path, hemi: str, image_ids: list[str], classes: list[str]) -> _Hemisphere:
    fmri_path = subject / "training_split" / "training_fmri" / f"{hemi}_training_fmri.npy"
    fmri = load_array(fmri_path, "training fmri", ndim=2, mmap=True)
    if fmri.shape[0] != len(image_ids):
        raise DataValidationError(
            fmri_path, "training fmri", f"{fmri.shape[0]} rows but {len(image_ids)} training images; expected one "
            "row per image")
    n_vertices = int(fmri.shape[1])
    roi_dir = subject / "roi_masks"
    labels = {c: _integer_labels(roi_dir / f"{hemi}.{c}_challenge_space.npy", n_vertices) for c in classes}
    fs_path = roi_dir / f"{hemi}.all-vertices_fsaverage_space.npy"
    fs_index, fs_size = _fsaverage_index(fs_path, n_vertices) if fs_path.is_file() else (None, None)
    return _Hemisphere(fmri_path, fmri, labels, fs_index, fs_size, _noise_ceiling(subject, hemi, n_vertices))


def _stream_rows(part: _Hemisphere, image_ids: list[str], targets: list[tuple[np.ndarray, np.ndarray]],
                 column: int) -> None:
    """Read one hemisphere's fMRI file once, in chunks of rows, check every value is finite and copy each row
    into the split it belongs to.

    The file is read with plain reads into one reused buffer, not through the memory map: pages read through a
    map count as this process's resident memory until the kernel drops them, so reading a 1.5 GB file that way
    raises the peak by 1.5 GB even though nothing is kept.

    Parameters
    ----------
    targets : list of (rows, out)
        ``rows``: sorted file rows of a split; ``out`` (len(rows), n_voxels) float32, filled at columns
        ``column .. column + n_vertices``. Empty to only check the values.
    """
    fmri = part.fmri
    n, n_vert = fmri.shape
    owner = np.full(n, -1, dtype=np.int64)
    where = np.zeros(n, dtype=np.int64)
    for k, (rows, _) in enumerate(targets):
        owner[rows], where[rows] = k, np.arange(len(rows))
    step = max(1, _CHUNK_BYTES // max(1, n_vert * fmri.dtype.itemsize))
    contiguous = isinstance(fmri, np.memmap) and fmri.flags.c_contiguous
    buf = np.empty((min(step, n), n_vert), dtype=fmri.dtype)
    with open(part.path, "rb") if contiguous else nullcontext() as fh:
        if fh is not None:
            fh.seek(fmri.offset)
        for start in range(0, n, step):
            stop = min(start + step, n)
            chunk = buf[:stop - start]
            if fh is not None:
                if fh.readinto(memoryview(chunk).cast("B")) != chunk.nbytes:
                    raise DataValidationError(part.path, "training fmri", "file is shorter than its header says")
            else:  # Fortran-ordered or not a map: rows through the array itself
                chunk[...] = fmri[start:stop]
            check_finite(chunk, part.path, "training fmri", image_ids[start:stop])
            for k, (_, out) in enumerate(targets):
                mine = owner[start:stop] == k
                if mine.any():
                    out[where[start:stop][mine], column:column + n_vert] = chunk[mine]


def _all_or_none(subject: Path, field: str, parts: list[np.ndarray | None], hemis: Sequence[str]) -> np.ndarray | None:
    """Concatenate per-hemisphere arrays; error when only some hemispheres have the file."""
    have = [h for h, p in zip(hemis, parts, strict=True) if p is not None]
    if not have:
        return None
    if len(have) != len(hemis):
        missing = [h for h in hemis if h not in have]
        raise DataValidationError(subject, field, f"found for {have} but not for {missing}; expected every hemisphere")
    return np.concatenate([p for p in parts if p is not None])


def _roi_masks(subject: Path, classes: list[str], hemis: list[_Hemisphere]
               ) -> tuple[dict[str, np.ndarray], dict[str, list[str]]]:
    masks: dict[str, np.ndarray] = {}
    by_class: dict[str, list[str]] = {}
    for cls in classes:
        mapping_path = subject / "roi_masks" / f"mapping_{cls}.npy"
        mapping = load_label_mapping(mapping_path)
        labels = np.concatenate([h.labels[cls] for h in hemis])
        unknown = sorted(set(np.unique(labels).tolist()) - set(mapping) - {0})
        if unknown:
            raise DataValidationError(
                subject / "roi_masks", f"{cls} labels", f"values {unknown[:5]} have no name in {mapping_path.name};"
                f" expected keys of {sorted(mapping)}")
        by_class[cls] = []
        for k, roi in sorted(mapping.items()):
            if k == 0:
                continue
            mask = labels == k
            if not mask.any():
                continue
            key = roi if roi not in masks else f"{cls}/{roi}"
            masks[key] = mask
            by_class[cls].append(key)
    return masks, by_class


def load_algonauts(subject_dir: str | Path, val_fraction: float = 0.1, seed: int = 0,
                   hemispheres: Sequence[str] = HEMISPHERES, test_fraction: float = 0.1,
                   load_responses: bool = True) -> EncodingDataset:
    """Load one subject of the Algonauts 2023 challenge (layout in the module docstring).

    Parameters
    ----------
    subject_dir : str or Path
        The ``subjNN`` folder.
    val_fraction : float
        Fraction of the remaining training images held out as the validation split; 0 for none.
    seed : int
        Seed of the test and validation hold-outs.
    hemispheres : sequence of {"lh", "rh"}
        Hemispheres to load, in voxel order.
    test_fraction : float
        Fraction of the training images held out as the test split (the challenge's own test fMRI is withheld).
    load_responses : bool
        False: check the fMRI files (shapes, finite values, read in chunks) but keep no response: every split's
        ``responses`` is a read-only zero-stride array of the right shape (no memory), for ``llmvem data
        inspect``; ``meta["responses_loaded"]`` is False. Never train on such a dataset.

    Returns
    -------
    EncodingDataset
        Responses float32 of shape (n_images, n_vertices_lh + n_vertices_rh); ROI masks, hemisphere,
        fsaverage_index and noise_ceiling over those voxels. Each split's responses are filled straight from the
        files (one pass, in chunks of rows), so the loader's peak memory is the responses themselves.
    """
    subject = Path(subject_dir)
    if not subject.is_dir():
        raise DataValidationError(subject, "subject folder", "not a directory; expected an Algonauts subjNN folder")
    hemis = list(hemispheres)
    if not hemis or len(set(hemis)) != len(hemis) or not set(hemis) <= set(HEMISPHERES):
        raise DataValidationError(subject, "hemispheres", f"got {hemis}; expected distinct values of {HEMISPHERES}")
    image_dir = subject / "training_split" / "training_images"
    paths = list_image_files(image_dir)
    if not paths:
        raise DataValidationError(image_dir, "training images", "no image files; expected train-*.png")
    check_nonempty_files(paths)
    ids = [p.stem for p in paths]
    classes = _roi_classes(subject / "roi_masks")
    parts = [_load_hemisphere(subject, h, ids, classes) for h in hemis]

    n_vertices = [p.fmri.shape[1] for p in parts]
    hemisphere = np.repeat(np.array(hemis), n_vertices)
    roi_masks, roi_classes = _roi_masks(subject, classes, parts)
    fsaverage_index = _all_or_none(subject, "fsaverage mask (roi_masks/<h>.all-vertices_fsaverage_space.npy)",
                                   [p.fsaverage_index for p in parts], hemis)
    noise_ceiling = _all_or_none(subject, "noise_ceiling", [p.noise_ceiling for p in parts], hemis)

    train_idx, test_idx = holdout_indices(len(ids), test_fraction, seed, subject)
    rows = {"train": train_idx, "test": test_idx}
    if val_fraction:  # carved here (as EncodingDataset.with_validation_split would) so no split is copied
        keep, val = validation_indices(len(train_idx), val_fraction, seed, str(subject))
        rows = {"train": train_idx[keep], "val": train_idx[val], "test": test_idx}
    n_total = sum(n_vertices)
    if load_responses:
        arrays = {k: np.empty((len(r), n_total), dtype=np.float32) for k, r in rows.items()}
    else:
        arrays = {k: np.broadcast_to(np.float32(0.0), (len(r), n_total)) for k, r in rows.items()}
    offset = 0
    for part, n in zip(parts, n_vertices, strict=True):
        _stream_rows(part, ids, [(rows[k], arrays[k]) for k in rows] if load_responses else [], offset)
        offset += n
    images = FileImages(paths, ids)
    splits = {k: Split(images.subset(r), arrays[k]) for k, r in rows.items()}

    test_dir = subject / "test_split" / "test_images"
    challenge_test = None
    if test_dir.is_dir():
        test_paths = list_image_files(test_dir)
        challenge_test = FileImages(test_paths) if test_paths else None
    nsd = {i: int(m.group(1)) for i in ids if (m := _NSD_ID.search(i))}
    meta = {
        "format": "algonauts2023", "subject": subject.name, "hemispheres": hemis, "roi_classes": roi_classes,
        "challenge_test_images": challenge_test, "test_fraction": test_fraction, "seed": seed,
        "fsaverage_n_vertices": {h: p.fsaverage_size for h, p in zip(hemis, parts, strict=True)},
        "nsd_id": nsd if len(nsd) == len(ids) else {},
        "responses_loaded": load_responses,
    }
    if "val" in rows:
        meta.update(val_fraction=val_fraction, val_seed=seed)
    if noise_ceiling is not None:
        meta[NC_SOURCE_KEY] = ("whole set: the NSD noise ceiling shipped in the challenge folder (all of the subject's"
                               " images), not computed for the held-out test images")
    return EncodingDataset(
        name=f"algonauts_{subject.name}", splits=splits, roi_masks=roi_masks, hemisphere=hemisphere,
        noise_ceiling=noise_ceiling, fsaverage_index=fsaverage_index, source=str(subject), meta=meta)
