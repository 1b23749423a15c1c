"""Stimulus image collections: lazy loading, stable ids, content hashes.

Every collection answers the same questions: how many images, their ids (stable strings), the image ``i`` as an
RGB :class:`PIL.Image.Image`, and a content hash of image ``i`` (SHA-256 of the stored bytes) that caches and
the caption store use as key, so renaming a file does not invalidate its captions or features.
Images in any mode (grayscale, RGBA, CMYK, palette, 16-bit) are converted to 8-bit RGB; unreadable files raise
:class:`~llmvem.errors.DataValidationError` naming the file.
"""

from __future__ import annotations

import hashlib
import io
import os
import struct
import warnings
import zipfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from llmvem.errors import DataValidationError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp")

#: Default cap on the pixels of one decoded image (width x height): 100 megapixels, far above any stimulus set
#: (NSD: 0.18 MP) and far below what a 100 KB "decompression bomb" file can declare. The environment variable
#: ``LLMVEM_MAX_IMAGE_PIXELS`` changes it for a process.
DEFAULT_MAX_PIXELS = 100_000_000


def max_image_pixels() -> int:
    """The pixel cap in force: ``LLMVEM_MAX_IMAGE_PIXELS`` if set (a positive integer), else 100 MP."""
    raw = os.environ.get("LLMVEM_MAX_IMAGE_PIXELS", "").strip()
    if not raw:
        return DEFAULT_MAX_PIXELS
    try:
        value = int(float(raw))
    except ValueError:
        value = 0
    if value < 1:
        raise DataValidationError("LLMVEM_MAX_IMAGE_PIXELS", "environment", f"{raw[:50]!r}; expected a positive "
                                  "number of pixels such as 100000000")
    return value


def to_rgb(img: Image.Image, source: str = "<image>") -> Image.Image:
    """Convert any PIL image mode to 8-bit RGB.

    16-bit and 32-bit integer images (modes ``I;16``, ``I``) are rescaled by their dynamic range rather than
    clipped; float images (``F``) likewise. Alpha is composited on white.
    """
    mode = img.mode
    if mode == "RGB":
        return img
    if mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(np.nanmin(arr)), float(np.nanmax(arr))
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        arr8 = np.clip((arr - lo) * scale, 0, 255).astype(np.uint8)
        return Image.fromarray(arr8, mode="L").convert("RGB")
    if mode in ("RGBA", "LA", "PA") or (mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    try:
        return img.convert("RGB")
    except (ValueError, OSError) as exc:
        raise DataValidationError(source, "image", f"cannot convert mode {mode!r} to RGB ({exc})") from exc


def decode_image(data: bytes, source: str, max_pixels: int | None = None) -> Image.Image:
    """Decode encoded image bytes to RGB, with a clear error for empty, truncated, corrupt or oversized files.

    Parameters
    ----------
    data : bytes
        The encoded file.
    source : str
        Where the bytes came from (named in errors).
    max_pixels : int, optional
        Largest width x height accepted, checked from the header before any pixel is decoded (default:
        :func:`max_image_pixels`).
    """
    if len(data) == 0:
        raise DataValidationError(source, "image", "file is empty (0 bytes); expected an encoded image")
    cap = max_image_pixels() if max_pixels is None else max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            img = Image.open(io.BytesIO(data))
            width, height = img.size
            if width * height > cap:
                raise DataValidationError(
                    source, "image", f"{width}x{height} pixels is more than the cap of {cap} pixels (a decompression"
                    " bomb?); set LLMVEM_MAX_IMAGE_PIXELS to allow larger images")
            img.load()
    except Image.DecompressionBombError as exc:  # PIL's own cap (2x its warning limit) tripped first
        raise DataValidationError(source, "image", f"declares too many pixels ({exc}); a decompression bomb? set "
                                  "LLMVEM_MAX_IMAGE_PIXELS to allow larger images") from exc
    except DataValidationError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, EOFError, MemoryError, IndexError,
            TypeError, struct.error, ZeroDivisionError) as exc:
        raise DataValidationError(
            source, "image", f"cannot decode image ({type(exc).__name__}: {exc}); the file is corrupt or truncated"
        ) from exc
    return to_rgb(img, source)


class ImageCollection:
    """Abstract ordered collection of stimulus images."""

    ids: list[str]

    def __len__(self) -> int:
        return len(self.ids)

    def load(self, i: int) -> Image.Image:
        """Image ``i`` as an RGB PIL image."""
        raise NotImplementedError

    def raw_bytes(self, i: int) -> bytes:
        """The stored bytes of image ``i`` (used for the content hash)."""
        raise NotImplementedError

    def source(self, i: int) -> str:
        """Human-readable location of image ``i`` for error messages."""
        return f"{type(self).__name__}[{self.ids[i]}]"

    def content_hash(self, i: int) -> str:
        """SHA-256 (first 32 hex digits) of the stored bytes of image ``i``."""
        cache = self.__dict__.setdefault("_hash_cache", {})
        if i not in cache:
            cache[i] = hashlib.sha256(self.raw_bytes(i)).hexdigest()[:32]
        return cache[i]

    def content_hashes(self) -> list[str]:
        """Content hashes of all images, in order."""
        return [self.content_hash(i) for i in range(len(self))]

    def load_array(self, i: int, size: int | None = None) -> np.ndarray:
        """Image ``i`` as uint8 array of shape (H, W, 3), optionally resized to (size, size) (bicubic)."""
        img = self.load(i)
        if size is not None and img.size != (size, size):
            img = img.resize((size, size), Image.Resampling.BICUBIC)
        return np.asarray(img, dtype=np.uint8)

    def subset(self, indices: Sequence[int] | np.ndarray) -> ImageCollection:
        """A view on the images at ``indices`` (same hashes, same ids)."""
        return SubsetImages(self, [int(i) for i in indices])


class FileImages(ImageCollection):
    """Images stored as files on disk, loaded lazily."""

    def __init__(self, paths: Sequence[str | Path], ids: Sequence[str] | None = None):
        self.paths = [Path(p) for p in paths]
        self.ids = list(ids) if ids is not None else [p.stem for p in self.paths]

    def raw_bytes(self, i: int) -> bytes:
        path = self.paths[i]
        try:
            return path.read_bytes()
        except OSError as exc:
            raise DataValidationError(path, "image", f"cannot read file ({exc})") from exc

    def load(self, i: int) -> Image.Image:
        return decode_image(self.raw_bytes(i), str(self.paths[i]))

    def source(self, i: int) -> str:
        return str(self.paths[i])


class ZipImages(ImageCollection):
    """Images stored as members of a zip archive (sorted member order unless given)."""

    def __init__(self, zip_path: str | Path, members: Sequence[str] | None = None):
        self.zip_path = Path(zip_path)
        try:
            with zipfile.ZipFile(self.zip_path) as zf:
                names = zf.namelist()
        except (OSError, zipfile.BadZipFile) as exc:
            raise DataValidationError(self.zip_path, "archive", f"not a readable zip file ({exc})") from exc
        if members is None:
            members = sorted(n for n in names if n.lower().endswith(IMAGE_SUFFIXES) and not n.endswith("/"))
        self.members = list(members)
        self.ids = [Path(m).stem for m in self.members]
        self._zf: zipfile.ZipFile | None = None

    def _zip(self) -> zipfile.ZipFile:
        if self._zf is None:
            self._zf = zipfile.ZipFile(self.zip_path)
        return self._zf

    def __getstate__(self):  # zip handles cannot cross process boundaries
        state = dict(self.__dict__)
        state["_zf"] = None
        return state

    def raw_bytes(self, i: int) -> bytes:
        return self._zip().read(self.members[i])

    def load(self, i: int) -> Image.Image:
        return decode_image(self.raw_bytes(i), self.source(i))

    def source(self, i: int) -> str:
        return f"{self.zip_path}:{self.members[i]}"


class ArrayImages(ImageCollection):
    """Images held in memory as a uint8 array of shape (n_images, H, W, 3)."""

    def __init__(self, array: np.ndarray, ids: Sequence[str] | None = None):
        array = np.asarray(array)
        if array.ndim != 4 or array.shape[-1] != 3 or array.dtype != np.uint8:
            raise DataValidationError(
                None, "images", f"expected uint8 array of shape (n_images, H, W, 3), got {array.dtype} {array.shape}"
            )
        self.array = array
        self.ids = list(ids) if ids is not None else [f"img{i:05d}" for i in range(len(array))]

    def raw_bytes(self, i: int) -> bytes:
        a = self.array[i]
        return np.asarray(a.shape, dtype=np.int64).tobytes() + np.ascontiguousarray(a).tobytes()

    def load(self, i: int) -> Image.Image:
        return Image.fromarray(self.array[i], mode="RGB")

    def load_array(self, i: int, size: int | None = None) -> np.ndarray:
        if size is None or self.array.shape[1:3] == (size, size):
            return self.array[i]
        return super().load_array(i, size)


class SubsetImages(ImageCollection):
    """A view on some images of another collection."""

    def __init__(self, parent: ImageCollection, indices: list[int]):
        self.parent = parent
        self.indices = indices
        self.ids = [parent.ids[i] for i in indices]

    def raw_bytes(self, i: int) -> bytes:
        return self.parent.raw_bytes(self.indices[i])

    def content_hash(self, i: int) -> str:
        return self.parent.content_hash(self.indices[i])

    def load(self, i: int) -> Image.Image:
        return self.parent.load(self.indices[i])

    def load_array(self, i: int, size: int | None = None) -> np.ndarray:
        return self.parent.load_array(self.indices[i], size)

    def source(self, i: int) -> str:
        return self.parent.source(self.indices[i])


class ConcatImages(ImageCollection):
    """Several collections one after another (e.g. train + test for captioning a whole dataset)."""

    def __init__(self, parts: Sequence[ImageCollection]):
        self.parts = list(parts)
        self.ids = [i for p in self.parts for i in p.ids]
        self._where = [(k, j) for k, p in enumerate(self.parts) for j in range(len(p))]

    def raw_bytes(self, i: int) -> bytes:
        k, j = self._where[i]
        return self.parts[k].raw_bytes(j)

    def content_hash(self, i: int) -> str:
        k, j = self._where[i]
        return self.parts[k].content_hash(j)

    def load(self, i: int) -> Image.Image:
        k, j = self._where[i]
        return self.parts[k].load(j)

    def load_array(self, i: int, size: int | None = None) -> np.ndarray:
        k, j = self._where[i]
        return self.parts[k].load_array(j, size)

    def source(self, i: int) -> str:
        k, j = self._where[i]
        return self.parts[k].source(j)


def list_image_files(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder``, sorted by name."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DataValidationError(folder, "images", "expected a directory of image files")
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file())
    return files
