"""Captioned images without brain data: the images and captions of the alignment stream (``align_data``).

Two kinds of spec:

* ``"virtual-scenes:n=2000,seed=7"`` — extra virtual-brain scenes with their exact descriptions
  (:func:`llmvem.data.virtual_brain.make_virtual_scenes`);
* a folder with ``images/`` and a caption file (``captions.csv`` / ``.tsv`` / ``.json`` / ``.jsonl``, or the
  file given) that :func:`llmvem.captions.existing.read_caption_file` reads, keyed by image file name or stem,
  e.g. ``../shared/data/flickr8k_1000`` (1,000 images × 5 human captions). Images without a caption are skipped.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from llmvem.data.images import FileImages, ImageCollection
from llmvem.errors import DataValidationError

__all__ = ["CaptionedImages", "CaptionedSpec", "load_captioned_images", "parse_captioned_spec"]

_IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")
_CAPTION_FILES = ("captions.csv", "captions.tsv", "captions.json", "captions.jsonl")


@dataclass
class CaptionedImages:
    """Images and their captions (no responses).

    Attributes
    ----------
    images : ImageCollection
        ``n`` images.
    captions : list of list of str
        The captions of each image (at least one each), in image order.
    source : str
        The spec it was loaded from.
    attributes : array of shape (n, n_attributes), optional
        Each image's exact attribute vector (virtual scenes: :meth:`~llmvem.data.virtual_brain.Scene.
        attribute_vector`), the non-language alignment target; None for a folder.
    """

    images: ImageCollection
    captions: list[list[str]]
    source: str
    attributes: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.captions)


@dataclass(frozen=True)
class CaptionedSpec:
    """A checked spec (:func:`parse_captioned_spec`): virtual scenes, or a folder and its caption file.

    Attributes
    ----------
    spec : str
    n, seed : int or None
        Scenes and seed of ``"virtual-scenes:..."``.
    root, captions_file : Path or None
        The folder (holding ``images/``) and its caption file.
    """

    spec: str
    n: int | None = None
    seed: int | None = None
    root: Path | None = None
    captions_file: Path | None = None

    def describe(self) -> str:
        """One line: what the spec names."""
        if self.root is None:
            return f"{self.n} virtual scenes (seed {self.seed}) with their exact descriptions"
        return f"captioned folder {self.root} (images/, caption file {self.captions_file})"


def parse_captioned_spec(spec: str, captions_file: str | Path | None = None, image_size: int = 64,
                         max_images: int | None = None) -> CaptionedSpec:
    """Check a spec's syntax and paths without reading an image or the caption file.

    Parameters
    ----------
    spec : str
        ``"virtual-scenes:n=N,seed=S"`` or a folder with ``images/`` and a caption file.
    captions_file : str or Path, optional
        Caption file of a folder spec (relative paths are relative to the folder); default: found in it.
    image_size, max_images : int
        Side of virtual scenes and the stream's cap (``align_data.max_images``): the scenes to draw, at most
        :data:`llmvem.data.sizes.MAX_GENERATED_IMAGES`, must fit the memory available
        (:func:`llmvem.data.sizes.check_generated_size`).

    Raises
    ------
    DataValidationError
        Unknown or malformed virtual-scenes options, a folder that does not exist or lacks ``images/``, no
        caption file (naming the spec / folder / file and what was expected).
    """
    if spec.startswith("virtual-scenes"):
        from llmvem.data import parse_options

        try:
            options = parse_options(spec.split(":", 1)[1]) if ":" in spec else {}
        except DataValidationError as exc:  # name the whole spec and the field, not only the options
            raise DataValidationError(spec, "align_data.spec", f"{exc.problem}; expected "
                                      "'virtual-scenes:n=N,seed=S'") from exc
        unknown = set(options) - {"n", "seed"}
        if unknown:
            raise DataValidationError(spec, "virtual-scenes options", f"unknown {sorted(unknown)}; expected n, seed")
        n, seed = options.get("n", 1000), options.get("seed", 7)
        for key, value, low in (("n", n, 2), ("seed", seed, 0)):
            if not isinstance(value, int) or value < low:
                raise DataValidationError(spec, f"virtual-scenes option {key}", f"got {value!r}; expected an "
                                          f"integer >= {low}")
        from llmvem.data.sizes import check_generated_size

        check_generated_size(n if max_images is None else min(n, max_images), image_size, spec,
                             "virtual-scenes option n")
        return CaptionedSpec(spec, n=n, seed=seed)
    root = Path(spec).expanduser()
    if not (root / "images").is_dir():
        what = "folder has no images/ subfolder" if root.is_dir() else "is not a folder"
        raise DataValidationError(root, "align_data.spec", f"{what}; expected 'virtual-scenes:n=N,seed=S' or a "
                                  "folder with images/ and a caption file")
    if captions_file is not None:
        path = Path(captions_file).expanduser()
        path = path if path.is_absolute() else root / path
        if not path.is_file():
            raise DataValidationError(path, "align_data.captions_file", "is not a file; expected a caption file "
                                      "(absolute, or relative to the folder)")
    else:
        found = [root / name for name in _CAPTION_FILES if (root / name).is_file()]
        if not found:
            raise DataValidationError(root, "captions file", f"none of {list(_CAPTION_FILES)}; set "
                                      "align_data.captions_file")
        path = found[0]
    return CaptionedSpec(spec, root=root, captions_file=path)


def load_captioned_images(spec: str, captions_file: str | Path | None = None, image_size: int = 64,
                          max_images: int | None = None) -> CaptionedImages:
    """Load the captioned images a spec names (see the module docstring).

    Parameters
    ----------
    spec : str
        ``"virtual-scenes:n=N,seed=S"`` or a folder.
    captions_file : str or Path, optional
        Caption file of a folder spec (relative paths are relative to the folder); default: found in it.
    image_size : int
        Side of virtual scenes in pixels.
    max_images : int, optional
        Keep only the first ``max_images`` images.

    Raises
    ------
    DataValidationError
        Naming the spec / folder / file and what was expected (:func:`parse_captioned_spec` first).
    """
    parsed = parse_captioned_spec(spec, captions_file, image_size, max_images)
    if parsed.root is None:
        from llmvem.data.virtual_brain import make_virtual_scenes

        n = parsed.n if max_images is None else min(parsed.n, max_images)  # type: ignore[type-var]
        images, descriptions, scenes = make_virtual_scenes(n, image_size=image_size, seed=parsed.seed)
        return CaptionedImages(images, [[d] for d in descriptions], spec,
                               np.stack([s.attribute_vector() for s in scenes]))
    from llmvem.captions.existing import read_caption_file

    root, path = parsed.root, parsed.captions_file
    assert path is not None
    table = read_caption_file(path)
    files = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in _IMAGE_SUFFIXES)
    paths, captions = [], []
    for p in files:
        caps = table.get(p.name) or table.get(p.stem)
        if caps:
            paths.append(p)
            captions.append(list(caps))
        if max_images is not None and len(paths) >= max_images:
            break
    if len(paths) < 2:
        raise DataValidationError(path, "captions", f"{len(paths)} images of {root / 'images'} have a caption here; "
                                  "expected keys that are the image file names or stems, for at least 2 images")
    return CaptionedImages(FileImages(paths), captions, str(spec))
