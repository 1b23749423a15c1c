"""The one dataset shape every llmvem stage consumes: :class:`EncodingDataset`."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from llmvem.data.images import ImageCollection
from llmvem.errors import DataValidationError

SPLIT_NAMES = ("train", "val", "test")
#: Entries checked for NaN/Inf at a time by :meth:`EncodingDataset.validate` (bounded scratch memory).
_CHECK_BYTES = 16 * 2**20


def validation_indices(n_train: int, fraction: float, seed: int, source: str | None = None
                       ) -> tuple[np.ndarray, np.ndarray]:
    """The rows of a training split that stay in training and those carved out as validation
    (:meth:`EncodingDataset.with_validation_split`): ``round(fraction * n_train)`` (at least one) seeded rows.

    Returns
    -------
    train, val : int arrays, sorted
    """
    if not 0.0 < fraction < 1.0:
        raise DataValidationError(source, "val_fraction", f"got {fraction}, expected 0 < fraction < 1")
    n_val = max(1, int(round(fraction * n_train)))
    if n_val >= n_train:
        raise DataValidationError(source, "train", f"{n_train} training images are too few to carve a validation "
                                  "split")
    perm = np.random.default_rng(seed).permutation(n_train)
    return np.sort(perm[n_val:]), np.sort(perm[:n_val])


@dataclass
class Split:
    """Images of one split and the responses they evoked.

    Attributes
    ----------
    images : ImageCollection
        ``n_images`` stimuli, in response-row order.
    responses : array of shape (n_images, n_voxels), float32, or None
        Response averaged over repeats. ``None`` when withheld (Algonauts test split).
    repeats : array of shape (n_images, n_repeats, n_voxels), float32, or None
        Single-trial responses, NaN where an image had fewer repeats.
    """

    images: ImageCollection
    responses: np.ndarray | None
    repeats: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.images)

    def subset(self, indices: np.ndarray) -> Split:
        """The split restricted to rows ``indices``."""
        idx = np.asarray(indices, dtype=np.int64)
        return Split(
            images=self.images.subset(idx),
            responses=None if self.responses is None else self.responses[idx],
            repeats=None if self.repeats is None else self.repeats[idx],
        )


@dataclass
class EncodingDataset:
    """Stimuli, responses and voxel metadata of one subject (or one recording session).

    Attributes
    ----------
    name : str
        Short identifier (``"virtual_brain"``, ``"algonauts_subj01"``, ``"v4_210325"``...).
    splits : dict of str to Split
        ``"train"`` and ``"test"`` always, ``"val"`` after :meth:`with_validation_split`.
    roi_masks : dict of str to bool array of shape (n_voxels,)
        Named regions of interest.
    hemisphere : array of shape (n_voxels,) of ``"lh"``/``"rh"``, or None
    noise_ceiling : array of shape (n_voxels,), or None
        Fraction of response variance that is explainable (0–1, in r² units) for the test responses.
    captions : dict of image id to list of str
        Captions that come with the data (human captions, scene descriptions).
    fsaverage_index : int array of shape (n_voxels,), or None
        Vertex of each voxel in fsaverage space, for cortical maps.
    source : str or None
        File or folder the data came from (used in error messages).
    meta : dict
        Anything else (ground truth of the virtual brain, session info).
    """

    name: str
    splits: dict[str, Split]
    roi_masks: dict[str, np.ndarray] = field(default_factory=dict)
    hemisphere: np.ndarray | None = None
    noise_ceiling: np.ndarray | None = None
    captions: dict[str, list[str]] = field(default_factory=dict)
    fsaverage_index: np.ndarray | None = None
    source: str | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.validate()

    # ------------------------------------------------------------------ access
    @property
    def train(self) -> Split:
        return self.splits["train"]

    @property
    def test(self) -> Split:
        return self.splits["test"]

    @property
    def val(self) -> Split | None:
        return self.splits.get("val")

    @property
    def n_voxels(self) -> int:
        for split in self.splits.values():
            if split.responses is not None:
                return int(split.responses.shape[1])
        raise DataValidationError(self.source, "responses", "no split has responses")

    def all_images(self) -> ImageCollection:
        """All images of all splits, in split order (train, val, test)."""
        from llmvem.data.images import ConcatImages

        return ConcatImages([self.splits[s].images for s in SPLIT_NAMES if s in self.splits])

    def captions_for(self, split: str) -> list[list[str]]:
        """Captions of the images of ``split`` (empty lists where none)."""
        return [self.captions.get(i, []) for i in self.splits[split].images.ids]

    # -------------------------------------------------------------- validation
    def validate(self) -> None:
        """Check shapes and values; raise :class:`DataValidationError` naming the field on the first problem."""
        src = self.source
        if "train" not in self.splits or "test" not in self.splits:
            raise DataValidationError(src, "splits", f"expected 'train' and 'test' splits, got {sorted(self.splits)}")
        unknown = set(self.splits) - set(SPLIT_NAMES)
        if unknown:
            raise DataValidationError(src, "splits", f"unknown split names {sorted(unknown)}; expected {SPLIT_NAMES}")
        n_vox: int | None = None
        for name, split in self.splits.items():
            n_img = len(split.images)
            if n_img == 0:
                raise DataValidationError(src, f"{name}.images", "no images; expected at least one")
            if split.responses is not None:
                r = np.asarray(split.responses)
                if r.ndim != 2:
                    raise DataValidationError(
                        src, f"{name}.responses", f"expected shape (n_images, n_voxels), got {r.shape}")
                if r.shape[0] != n_img:
                    raise DataValidationError(
                        src, f"{name}.responses",
                        f"{r.shape[0]} response rows but {n_img} images; expected one row per image")
                if not np.issubdtype(r.dtype, np.number):
                    raise DataValidationError(src, f"{name}.responses", f"expected numbers, got dtype {r.dtype}")
                r = r.astype(np.float32, copy=False)
                step = max(1, _CHECK_BYTES // max(1, r.shape[1]))  # rows at a time: no full-size mask
                for start in range(0, r.shape[0], step):
                    bad = ~np.isfinite(r[start:start + step])
                    if bad.any():
                        rows, cols = np.nonzero(bad)
                        kind = "NaN" if np.isnan(r[start + rows[0], cols[0]]) else "Inf"
                        raise DataValidationError(
                            src, f"{name}.responses",
                            f"{int(bad.sum())} non-finite values ({kind} at image {start + int(rows[0])}, voxel "
                            f"{int(cols[0])}); expected finite numbers")
                split.responses = r
                if n_vox is None:
                    n_vox = r.shape[1]
                elif r.shape[1] != n_vox:
                    raise DataValidationError(
                        src, f"{name}.responses", f"{r.shape[1]} voxels but other splits have {n_vox}")
            if split.repeats is not None:
                rep = np.asarray(split.repeats, dtype=np.float32)
                if rep.ndim != 3 or rep.shape[0] != n_img:
                    raise DataValidationError(
                        src, f"{name}.repeats", f"expected shape (n_images={n_img}, n_repeats, n_voxels), got {rep.shape}")
                if n_vox is not None and rep.shape[2] != n_vox:
                    raise DataValidationError(src, f"{name}.repeats", f"{rep.shape[2]} voxels, expected {n_vox}")
                if np.isinf(rep).any():
                    raise DataValidationError(src, f"{name}.repeats", "contains Inf; expected finite values or NaN padding")
                split.repeats = rep
        if n_vox is None:
            raise DataValidationError(src, "responses", "no split has responses")
        counts = Counter(i for s in self.splits.values() for i in s.images.ids)
        dups = [i for i, c in counts.items() if c > 1]
        if dups:
            raise DataValidationError(
                src, "image ids", f"{len(dups)} duplicate ids (first: {dups[0]!r}); expected each id once across splits")
        for roi, mask in list(self.roi_masks.items()):
            m = np.asarray(mask)
            if m.ndim != 1 or m.shape[0] != n_vox:
                raise DataValidationError(
                    src, f"roi_masks[{roi!r}]", f"mask of shape {m.shape}, expected ({n_vox},) to match the voxels")
            if m.dtype != bool:
                if not np.isin(m, (0, 1)).all():
                    raise DataValidationError(src, f"roi_masks[{roi!r}]", "expected a boolean (0/1) mask")
                m = m.astype(bool)
            self.roi_masks[roi] = m
        if self.hemisphere is not None:
            h = np.asarray(self.hemisphere).astype(str)
            if h.shape != (n_vox,):
                raise DataValidationError(src, "hemisphere", f"shape {h.shape}, expected ({n_vox},)")
            if not set(np.unique(h)) <= {"lh", "rh"}:
                raise DataValidationError(src, "hemisphere", f"values {sorted(set(h.tolist()))}, expected 'lh' or 'rh'")
            self.hemisphere = h
        if self.noise_ceiling is not None:
            nc = np.asarray(self.noise_ceiling, dtype=np.float64)
            if nc.shape != (n_vox,):
                raise DataValidationError(src, "noise_ceiling", f"shape {nc.shape}, expected ({n_vox},)")
            if not np.isfinite(nc).all():
                raise DataValidationError(src, "noise_ceiling", "contains NaN/Inf; expected values in [0, 1]")
            if (nc < 0).any() or (nc > 1.0 + 1e-6).any():
                raise DataValidationError(
                    src, "noise_ceiling", f"values in [{nc.min():.3g}, {nc.max():.3g}]; expected fractions in [0, 1]"
                    " (divide percentages by 100)")
            self.noise_ceiling = nc
        if self.fsaverage_index is not None:
            fi = np.asarray(self.fsaverage_index)
            if fi.shape != (n_vox,):
                raise DataValidationError(src, "fsaverage_index", f"shape {fi.shape}, expected ({n_vox},)")
            self.fsaverage_index = fi.astype(np.int64)
        known = set(counts)
        for img_id, caps in self.captions.items():
            if img_id not in known:
                raise DataValidationError(src, "captions", f"caption for unknown image id {img_id!r}")
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise DataValidationError(src, "captions", f"captions of {img_id!r} must be a list of strings")
            if any(not c.strip() for c in caps):
                raise DataValidationError(src, "captions", f"empty or whitespace caption for image {img_id!r}")

    # ------------------------------------------------------------ derivation
    def with_validation_split(self, fraction: float = 0.1, seed: int = 0) -> EncodingDataset:
        """Carve a seeded, held-out validation split from the training split.

        Returns a new dataset whose ``train`` has ``round(fraction * n_train)`` fewer images and whose ``val``
        holds them. A dataset that already has a validation split is returned unchanged.
        """
        if "val" in self.splits:
            return self
        train_idx, val_idx = validation_indices(len(self.train), fraction, seed, self.source)
        splits = {"train": self.train.subset(train_idx), "val": self.train.subset(val_idx), "test": self.test}
        return replace(self, splits=splits, meta={**self.meta, "val_fraction": fraction, "val_seed": seed})

    def summary(self) -> dict[str, Any]:
        """Counts and medians for ``llmvem data inspect``."""
        out: dict[str, Any] = {"name": self.name, "source": self.source, "n_voxels": self.n_voxels}
        for name, split in self.splits.items():
            out[f"n_{name}"] = len(split)
            if split.repeats is not None:
                out[f"{name}_repeats"] = int(split.repeats.shape[1])
            if split.responses is None:
                out[f"{name}_responses"] = "withheld"
        out["rois"] = {k: int(v.sum()) for k, v in self.roi_masks.items()}
        if self.hemisphere is not None:
            out["hemispheres"] = {h: int((self.hemisphere == h).sum()) for h in ("lh", "rh")}
        if self.noise_ceiling is not None:
            out["noise_ceiling_median"] = float(np.median(self.noise_ceiling))
        out["n_captioned_images"] = len(self.captions)
        return out
