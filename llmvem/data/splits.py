"""Splits that agree across subjects: each image goes to train, val or test by a hash of its key and the seed.

Several subjects (NSD participants, recording sessions, virtual brains) may have seen the same image. If the
image is a training image for one subject and a test image for another, a model trained jointly (or a summary
pooled over subjects) has seen the test image: a leak. :func:`split_by_image_key` assigns each image from its
**key** alone, so subjects split independently still put every shared image on the same side:

* the key is the NSD image id when every image id names one (Algonauts ``train-0001_nsd-00013.png`` →
  ``"nsd-13"``), else the SHA-256 content hash of the stored image bytes
  (:meth:`~llmvem.data.images.ImageCollection.content_hash`), so a renamed copy is still the same image;
* ``u = hash(seed, key)`` is a number in [0, 1); ``u < test_fraction`` → test, then the next
  ``val_fraction · (1 − test_fraction)`` → val, the rest → train.

Split sizes are therefore close to, not exactly, the fractions (binomial spread); a split left empty gets the
image with the nearest ``u`` so that no split is empty (only possible on tiny data, where it is logged).
"""

from __future__ import annotations

import hashlib
import logging
import re
from collections.abc import Sequence
from dataclasses import replace

import numpy as np

from llmvem.data.dataset import SPLIT_NAMES, EncodingDataset, Split
from llmvem.data.images import ConcatImages, ImageCollection
from llmvem.errors import DataValidationError

__all__ = ["check_split_agreement", "first_images", "image_keys", "key_positions", "shared_test_fraction",
           "split_by_image_key", "train_subset"]

log = logging.getLogger(__name__)

_NSD_ID = re.compile(r"nsd-(\d+)")


def image_keys(images: ImageCollection) -> list[str]:
    """The key of every image: ``"nsd-<n>"`` when every id names an NSD image, else its content hash."""
    nsd = [m.group(1) if (m := _NSD_ID.search(i)) else None for i in images.ids]
    if nsd and all(n is not None for n in nsd):
        return [f"nsd-{int(n)}" for n in nsd if n is not None]
    return images.content_hashes()


def key_positions(keys: Sequence[str], seed: int) -> np.ndarray:
    """``u`` in [0, 1) of each key: the first 8 bytes of SHA-256(``"<seed>:<key>"``), array of shape (n_keys,)."""
    out = np.empty(len(keys), dtype=np.float64)
    for i, key in enumerate(keys):
        digest = hashlib.sha256(f"{int(seed)}:{key}".encode()).digest()
        out[i] = int.from_bytes(digest[:8], "big") / 2.0**64
    return out


def check_split_agreement(datasets: Sequence[EncodingDataset], names: Sequence[str]) -> int:
    """Refuse subjects whose own splits disagree on a shared image: a test image of one is a training or
    validation image of another (the leak :func:`split_by_image_key` prevents).

    Returns the number of images seen by more than one subject (all on the same side of the test line).

    Raises
    ------
    DataValidationError
        Naming both subjects, the image and the two splits.
    """
    side: dict[str, tuple[str, str]] = {}
    shared: set[str] = set()
    for name, ds in zip(names, datasets, strict=True):
        for split_name, split in ds.splits.items():
            test = split_name == "test"
            for key, image_id in zip(image_keys(split.images), split.images.ids, strict=True):
                if key not in side:
                    side[key] = (name, split_name)
                    continue
                other, other_split = side[key]
                if other != name:
                    shared.add(key)
                if (other_split == "test") != test:
                    raise DataValidationError(
                        ds.source, f"splits[{split_name!r}]", f"image {image_id!r} of subject {name} is in its "
                        f"{split_name} split but in the {other_split} split of subject {other}: with "
                        "multisubject.split='dataset' every shared image must be a test image for all subjects or "
                        "for none; use multisubject.split='image_key'")
    return len(shared)


def shared_test_fraction(datasets: Sequence[EncodingDataset]) -> float:
    """One test share for several subjects: their pooled share of test images, rounded to 0.01 (in [0.01, 0.99])."""
    n_test = sum(len(d.test) for d in datasets)
    n_all = sum(len(d.splits[s]) for d in datasets for s in d.splits)
    return min(max(round(n_test / max(n_all, 1), 2), 0.01), 0.99)


def split_by_image_key(dataset: EncodingDataset, val_fraction: float, test_fraction: float, seed: int
                       ) -> EncodingDataset:
    """Re-split all images of ``dataset`` (train, val and test together) by image key.

    Parameters
    ----------
    dataset : EncodingDataset
        Every split must have responses (a withheld test split cannot be re-split).
    val_fraction : float
        Share of the non-test images that go to validation (0 ≤ val_fraction < 1; 0: no val split).
    test_fraction : float
        Share of all images that go to test (0 < test_fraction < 1). Use the same value for every subject.
    seed : int

    Returns
    -------
    EncodingDataset
        Same voxels, noise ceiling, captions and meta (plus ``split_by`` = ``"image key"`` and the fractions);
        responses and repeats travel with their images.
    """
    src = dataset.source
    if not 0.0 < test_fraction < 1.0:
        raise DataValidationError(src, "test_fraction", f"got {test_fraction}, expected 0 < fraction < 1")
    if not 0.0 <= val_fraction < 1.0:
        raise DataValidationError(src, "val_fraction", f"got {val_fraction}, expected 0 <= fraction < 1")
    names = [s for s in SPLIT_NAMES if s in dataset.splits]
    for s in names:
        if dataset.splits[s].responses is None:
            raise DataValidationError(src, f"{s}.responses", "withheld; cannot re-split images without responses")
    parts = [dataset.splits[s] for s in names]
    have_repeats = all(p.repeats is not None for p in parts)
    if have_repeats and len({p.repeats.shape[1] for p in parts if p.repeats is not None}) > 1:
        have_repeats = False  # different repeat counts per split cannot be stacked; keep the averages only
        log.warning("%s: splits have different numbers of repeats; the re-split keeps repeat averages only",
                    dataset.name)
    images = ConcatImages([p.images for p in parts])
    responses = np.concatenate([p.responses for p in parts if p.responses is not None])
    repeats = np.concatenate([p.repeats for p in parts if p.repeats is not None]) if have_repeats else None
    everything = Split(images, responses, repeats)
    u = key_positions(image_keys(images), seed)
    val_end = test_fraction + val_fraction * (1.0 - test_fraction)
    side = np.where(u < test_fraction, 2, np.where(u < val_end, 1, 0))  # 0 train, 1 val, 2 test
    wanted = [0, 2] + ([1] if val_fraction > 0 else [])
    if len(u) < len(wanted):
        raise DataValidationError(src, "images", f"{len(u)} images are too few for {len(wanted)} splits")
    for k in wanted:
        if not (side == k).any():
            # nearest free image to the split's interval, taken from the largest split
            centre = {0: (val_end + 1.0) / 2, 1: (test_fraction + val_end) / 2, 2: test_fraction / 2}[k]
            donor = np.bincount(side, minlength=3).argmax()
            pick = np.flatnonzero(side == donor)[np.argmin(np.abs(u[side == donor] - centre))]
            log.warning("%s: no image fell in the %s split by key; moved image %r there", dataset.name,
                        SPLIT_NAMES[k], images.ids[int(pick)])
            side[pick] = k
    splits = {SPLIT_NAMES[k]: everything.subset(np.flatnonzero(side == k)) for k in (0, 1, 2) if (side == k).any()}
    meta = {**dataset.meta, "split_by": "image key", "val_fraction": val_fraction, "test_fraction": test_fraction,
            "split_seed": seed}
    return replace(dataset, splits=splits, meta=meta)


def first_images(dataset: EncodingDataset, max_images: int) -> EncodingDataset:
    """The first images of each split, about ``max_images`` in total (split proportions kept, at least 4 per
    split) — a small copy of a dataset for smoke tests and quick benchmarks; the noise ceiling is recomputed
    from the kept test images' repeats when there are any."""
    from llmvem.data.noise_ceiling import split_half_noise_ceiling

    total = sum(len(s) for s in dataset.splits.values())
    if max_images >= total:
        return dataset
    splits = {}
    for name, split in dataset.splits.items():
        k = max(4, int(round(max_images * len(split) / total)))
        splits[name] = split.subset(np.arange(min(k, len(split))))
    nc = dataset.noise_ceiling
    if "test" in splits and splits["test"].repeats is not None:
        nc = split_half_noise_ceiling(splits["test"].repeats, seed=dataset.meta.get("seed", 0))
    return replace(dataset, splits=splits, noise_ceiling=nc)


def train_subset(dataset: EncodingDataset, n_train: int, seed: int = 0) -> EncodingDataset:
    """``dataset`` with ``n_train`` of its training images (a learning curve's point); validation and test kept.

    The images are the first ``n_train`` of one seeded permutation of the training split, kept in their original
    order, so the subsets are nested: for the same ``seed``, a smaller subset is contained in every larger one.
    ``n_train`` at or above the training size returns ``dataset`` itself.

    Raises
    ------
    DataValidationError
        ``n_train`` < 1, or the dataset has no training split.
    """
    if "train" not in dataset.splits:
        raise DataValidationError(None, "train", f"dataset {dataset.name!r} has no training split to subsample")
    n_all = len(dataset.splits["train"])
    if int(n_train) < 1:
        raise DataValidationError(None, "n_train", f"got {n_train}, expected at least 1 training image")
    if n_train >= n_all:
        return dataset
    idx = np.sort(np.random.default_rng(seed).permutation(n_all)[: int(n_train)])
    return replace(dataset, splits={**dataset.splits, "train": dataset.splits["train"].subset(idx)},
                   meta={**dataset.meta, "train_subset": {"n_train": int(n_train), "of": n_all, "seed": int(seed)}})
