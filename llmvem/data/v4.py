"""Macaque V4 spike counts to natural images (Cowley, Stan, Pillow & Smith 2023, cowleygroup/V4_compact_models).

Layout of the data folder (any session id ``<s>``; each session records its own neurons)::

    root/
      images/images_<s>.zip                          JPEGs image0001.jpg ... (112x112 RGB); sorted member
        (or images_<s>.zip directly in root)         order = response column order
      responses_repeat_averaged/responses_<s>.npy    float (n_neurons, n_images): spike counts in a 100 ms bin
        (or responses_repeataveraged/...)            averaged over repeats
      responses_raw/responses_<s>.npy                optional float (n_neurons, n_images, n_repeats), NaN-padded
                                                     where an image had fewer repeats

Fixed split: image ``i`` (0-based, in column order) is a test image when ``i % test_every == test_every - 1``,
i.e. the 6th, 12th, 18th... image with the default ``test_every=6``; the others are training images, of which
a seeded ``val_fraction`` becomes the validation split. When raw responses exist, every split keeps its
repeats (array of shape (n_images, n_repeats, n_neurons)) and the noise ceiling is the Spearman–Brown
corrected split-half reliability of the test images
(:func:`llmvem.data.noise_ceiling.split_half_noise_ceiling`).
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ZipImages
from llmvem.data.noise_ceiling import METHOD_KEY as NC_METHOD_KEY
from llmvem.data.noise_ceiling import split_half_noise_ceiling
from llmvem.data.safe_load import check_finite, load_array
from llmvem.errors import DataValidationError

_IMAGE_ZIPS = ("images/images_{s}.zip", "images_{s}.zip")
_AVERAGED = ("responses_repeat_averaged/responses_{s}.npy", "responses_repeataveraged/responses_{s}.npy")
_RAW = "responses_raw/responses_{s}.npy"
_SESSION = re.compile(r"^images_(.+)\.zip$")


def _first_existing(root: Path, patterns: tuple[str, ...], session: str) -> Path | None:
    for pattern in patterns:
        path = root / pattern.format(s=session)
        if path.is_file():
            return path
    return None


def list_v4_sessions(root: str | Path) -> list[str]:
    """Session ids under ``root`` that have both an image zip and repeat-averaged responses, sorted."""
    root = Path(root)
    if not root.is_dir():
        raise DataValidationError(root, "root", "not a directory; expected the V4 data folder")
    zips = list((root / "images").glob("images_*.zip")) + list(root.glob("images_*.zip"))
    sessions = {m.group(1) for p in zips if (m := _SESSION.match(p.name))}
    return sorted(s for s in sessions if _first_existing(root, _AVERAGED, s) is not None)


def load_v4(root: str | Path, session: str, test_every: int = 6, val_fraction: float = 0.1,
            seed: int = 0) -> EncodingDataset:
    """Load one V4 recording session (layout in the module docstring).

    Parameters
    ----------
    root : str or Path
        The data folder (e.g. ``../shared/data/v4_cowley2023``).
    session : str
        Session id such as ``"210325"`` (see :func:`list_v4_sessions`).
    test_every : int
        Every ``test_every``-th image is a test image.
    val_fraction : float
        Fraction of the training images held out (seeded) as the validation split; 0 for none.
    seed : int
        Seed of the validation hold-out and of the split-half noise ceiling.

    Returns
    -------
    EncodingDataset
        Responses float32 of shape (n_images, n_neurons) (spike counts per 100 ms, repeat-averaged); repeats
        of shape (n_images, n_repeats, n_neurons) and a noise ceiling of shape (n_neurons,) when raw
        responses exist.
    """
    root = Path(root)
    session = str(session)
    if not root.is_dir():
        raise DataValidationError(root, "root", "not a directory; expected the V4 data folder")
    if test_every < 2:
        raise DataValidationError(root, "test_every", f"got {test_every}, expected an integer >= 2")
    zip_path = _first_existing(root, _IMAGE_ZIPS, session)
    avg_path = _first_existing(root, _AVERAGED, session)
    if zip_path is None or avg_path is None:
        missing = _IMAGE_ZIPS[0] if zip_path is None else _AVERAGED[0]
        available = list_v4_sessions(root)
        raise DataValidationError(
            root / missing.format(s=session), f"session {session}", f"file not found; sessions here: {available}")
    images = ZipImages(zip_path)
    avg = load_array(avg_path, "responses", ndim=2)
    n_neurons, n_images = avg.shape
    if n_images != len(images):
        raise DataValidationError(
            avg_path, "responses", f"shape (n_neurons, n_images) = {avg.shape} but {zip_path.name} holds "
            f"{len(images)} images; expected one column per image")
    responses = np.ascontiguousarray(avg.T, dtype=np.float32)
    check_finite(responses, avg_path, "responses", images.ids)

    repeats = None
    raw_path = root / _RAW.format(s=session)
    if raw_path.is_file():
        raw = load_array(raw_path, "responses_raw", ndim=3)
        if raw.shape[:2] != (n_neurons, n_images):
            raise DataValidationError(
                raw_path, "responses_raw", f"shape {raw.shape}, expected (n_neurons={n_neurons}, "
                f"n_images={n_images}, n_repeats)")
        repeats = np.ascontiguousarray(raw.transpose(1, 2, 0), dtype=np.float32)
        check_finite(repeats, raw_path, "responses_raw", images.ids, allow_nan=True)
        n_valid = np.isfinite(repeats).sum(axis=1)  # (n_images, n_neurons)
        if (n_valid == 0).any():
            i = int(np.argwhere(n_valid == 0)[0, 0])
            raise DataValidationError(raw_path, "responses_raw", f"image {images.ids[i]!r} has no repeat; expected >= 1")
        mean = np.nanmean(repeats, axis=1, dtype=np.float64)
        gap = np.abs(mean - responses)
        if (gap > 1e-4 * (1.0 + np.abs(responses))).any():
            raise DataValidationError(
                raw_path, "responses_raw", f"averaged over repeats it differs from {avg_path.name} by up to "
                f"{gap.max():.3g}; expected the same responses (files of different sessions?)")

    is_test = np.arange(n_images) % test_every == test_every - 1
    everything = Split(images, responses, repeats)
    splits = {"train": everything.subset(np.flatnonzero(~is_test)), "test": everything.subset(np.flatnonzero(is_test))}
    noise_ceiling = None if repeats is None else split_half_noise_ceiling(splits["test"].repeats, seed=seed)
    ds = EncodingDataset(
        name=f"v4_{session}", splits=splits, noise_ceiling=noise_ceiling, source=str(root),
        meta={"format": "v4_cowley2023", "session": session, "test_every": test_every, "seed": seed,
              "units": "spike counts per 100 ms bin, averaged over repeats", NC_METHOD_KEY: "split_half"},
    )
    if val_fraction:
        ds = ds.with_validation_split(val_fraction, seed)
    return ds
