"""On-disk feature cache (HDF5) and the feature extraction loop that fills it.

Features are computed once per (image content, backbone configuration) and reused by every later run. Rows are
keyed by the images' content hashes (:meth:`~llmvem.data.images.ImageCollection.content_hash`), so renaming or
reordering images does not invalidate them; configurations are keyed by a stable hash of
``backbone.config_dict()`` + layers + storage dtype, one HDF5 group per configuration.

Crash safety. HDF5 is not safe against a process killed in the middle of a write (the file's metadata can be
left inconsistent and the whole file unreadable), so the cache never writes into a file that holds finished
work:

* ``<cache>.h5`` — the consolidated store: group ``/<config key>`` with attributes ``config`` (JSON), ``layers``,
  ``dtype`` and datasets ``hashes`` (n,) ``S32`` and one dataset per layer spec, named by the spec: (n, d)
  for pooled layers, (n, C, G, G) for ``@grid<G>``, (n, C, H, W) for ``@map`` (:mod:`llmvem.embed.spatial`).
* ``<cache>.h5.parts/<config key>/part-*.h5`` — one small file per finished chunk, written to a temporary name,
  flushed, fsync'ed and renamed into place (atomic), so a chunk is either complete or absent.
* At the end of an extraction the parts are merged into a new copy of the store, which replaces the old one by
  an atomic rename; then the merged parts are deleted. A crash between the two steps only leaves duplicate rows,
  which readers ignore.
* On open, a store or part that cannot be read is moved aside (``*.corrupt-<time>``) with a warning, and the
  rows it held are recomputed; temporary files of dead processes are removed.

A reader takes a shared lock and the merge an exclusive one (``fcntl.flock`` on ``<cache>.h5.lock``), so several
processes can extract into the same cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import time
import uuid
import warnings
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import h5py
import numpy as np
import torch

from llmvem.data.images import ImageCollection
from llmvem.embed.base import ImageBackbone
from llmvem.embed.spatial import validate_layer_specs
from llmvem.errors import ConfigError, DiskFullError, is_disk_full
from llmvem.utils import progress_bar, resolve_device, stable_hash

logger = logging.getLogger(__name__)

StorageDtype = Literal["float32", "float16"]
_DTYPES = {"float32": np.float32, "float16": np.float16}
_HASH_DTYPE = "S32"


class CacheCorruptionWarning(UserWarning):
    """A cache file could not be read and was moved aside; its rows will be recomputed."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every file system supports fsync on a directory
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@dataclass
class _Rows:
    """Rows read from the cache for one configuration: hashes and arrays, in file order."""

    hashes: list[str] = field(default_factory=list)
    arrays: dict[str, list[np.ndarray]] = field(default_factory=dict)


class FeatureCache:
    """An HDF5 feature store at ``path`` (see the module docstring for the layout and crash safety).

    Parameters
    ----------
    path : str or Path
        The store file, conventionally ``<cache_dir>/features.h5``; the parts folder and the lock file are
        created beside it.

    Examples
    --------
    >>> cache = FeatureCache("cache/features.h5")                                          # doctest: +SKIP
    >>> feats = extract_features(images, backbone, layers=("pooled", "block3"), cache=cache)  # doctest: +SKIP
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if self.path.exists() and self.path.is_dir():
            raise ConfigError(f"{self.path}: feature cache: is a directory; expected an HDF5 file path")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.parts_dir = self.path.with_name(self.path.name + ".parts")
        self.lock_path = self.path.with_name(self.path.name + ".lock")
        self._remove_stale_temporaries()

    # ----------------------------------------------------------------------------------------- keys, locks
    @staticmethod
    def config_key(backbone: ImageBackbone, layers: Sequence[str], dtype: str) -> tuple[str, dict]:
        """Stable key (16 hex digits) and the configuration it hashes."""
        config = {"backbone": backbone.config_dict(), "layers": list(layers), "dtype": dtype}
        return stable_hash(config), config

    @contextlib.contextmanager
    def _lock(self, exclusive: bool) -> Iterator[None]:
        with open(self.lock_path, "a+") as fh:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX if exclusive else fcntl.LOCK_SH)
            try:
                yield
            finally:
                fcntl.flock(fh.fileno(), fcntl.LOCK_UN)

    def _remove_stale_temporaries(self) -> None:
        candidates = list(self.path.parent.glob(f".{self.path.name}.tmp-*"))
        if self.parts_dir.is_dir():
            candidates += list(self.parts_dir.glob("*/.part-*.tmp-*"))
        for tmp in candidates:
            try:
                pid = int(tmp.name.rsplit(".tmp-", 1)[1].split("-")[0])
            except (IndexError, ValueError):
                continue
            if not _pid_alive(pid):
                logger.info("removing %s left by a process that died while writing", tmp)
                tmp.unlink(missing_ok=True)

    def _quarantine(self, path: Path, exc: BaseException) -> None:
        target = path.with_name(f"{path.name}.corrupt-{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}")
        warnings.warn(
            f"{path}: feature cache file is unreadable ({type(exc).__name__}: {exc}); moved it to {target.name} "
            "and its rows will be recomputed", CacheCorruptionWarning, stacklevel=3)
        with contextlib.suppress(FileNotFoundError):
            os.replace(path, target)

    # -------------------------------------------------------------------------------------------- reading
    @staticmethod
    def _read_group(grp: h5py.Group, layers: Sequence[str], source: Path) -> tuple[list[str], dict[str, np.ndarray]]:
        hashes = [h.decode() for h in grp["hashes"][()]]
        arrays = {}
        for layer in layers:
            arr = grp[layer][()]
            if arr.ndim < 2 or arr.shape[0] != len(hashes):
                raise OSError(f"{source}: dataset {layer!r} has shape {arr.shape}, expected ({len(hashes)}, ...)")
            arrays[layer] = arr
        return hashes, arrays

    def _part_files(self, key: str) -> list[Path]:
        folder = self.parts_dir / key
        return sorted(folder.glob("part-*.h5")) if folder.is_dir() else []

    def _read_all(self, key: str, layers: Sequence[str]) -> _Rows:
        rows = _Rows(arrays={layer: [] for layer in layers})

        def add(hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
            rows.hashes.extend(hashes)
            for layer in layers:
                rows.arrays[layer].append(arrays[layer])

        if self.path.exists():
            try:
                with h5py.File(self.path, "r") as f:
                    if key in f:
                        add(*self._read_group(f[key], layers, self.path))
            except (OSError, KeyError, ValueError) as exc:
                self._quarantine(self.path, exc)
        for part in self._part_files(key):
            try:
                with h5py.File(part, "r") as f:
                    add(*self._read_group(f[key], layers, part))
            except FileNotFoundError:  # merged and deleted by another process meanwhile
                continue
            except (OSError, KeyError, ValueError) as exc:
                self._quarantine(part, exc)
        return rows

    def lookup(self, key: str, layers: Sequence[str], hashes: Sequence[str]
               ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """Cached rows for ``hashes``.

        Returns
        -------
        found : bool array of shape (n,)
        arrays : dict of layer → array of shape (n_found, *feature_shape), the rows of the found hashes in input order
        """
        with self._lock(exclusive=False):
            rows = self._read_all(key, layers)
        where: dict[str, int] = {}
        for r, h in enumerate(rows.hashes):
            where.setdefault(h, r)  # first occurrence wins (duplicates after a crash are identical)
        found = np.array([h in where for h in hashes], dtype=bool)
        src = np.array([where[h] for h in hashes if h in where], dtype=np.int64)
        arrays: dict[str, np.ndarray] = {}
        for layer in layers:
            blocks = rows.arrays[layer]
            if not blocks:
                arrays[layer] = np.zeros((0, 0), dtype=np.float32)
                continue
            arrays[layer] = np.concatenate(blocks)[src]
        return found, arrays

    # -------------------------------------------------------------------------------------------- writing
    def write_part(self, key: str, config: dict, hashes: Sequence[str], arrays: dict[str, np.ndarray]) -> Path:
        """Write one finished chunk as its own file (temporary name → fsync → atomic rename).

        Parameters
        ----------
        hashes : sequence of str, length n_rows
        arrays : dict of layer → array of shape (n_rows, *feature_shape)
        """
        folder = self.parts_dir / key
        folder.mkdir(parents=True, exist_ok=True)
        stem = f"part-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        final = folder / f"{stem}.h5"
        tmp = folder / f".{stem}.h5.tmp-{os.getpid()}"
        f = None
        try:
            f = h5py.File(tmp, "w")
            self._write_group(f, key, config, list(hashes), arrays)
            f.flush()
            f.close()
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
            os.replace(tmp, final)
        except BaseException as exc:
            with contextlib.suppress(Exception):
                if f is not None and f.id.valid:
                    f.close()
            tmp.unlink(missing_ok=True)
            if is_disk_full(exc):
                raise DiskFullError(folder, f"features for the feature cache {self.path.name}") from exc
            raise
        _fsync_dir(folder)
        return final

    @staticmethod
    def _write_group(f: h5py.File, key: str, config: dict, hashes: list[str], arrays: dict[str, np.ndarray]) -> None:
        grp = f.create_group(key)
        grp.attrs["config"] = json.dumps(config, sort_keys=True, default=str)
        grp.attrs["layers"] = json.dumps(list(arrays))
        grp.attrs["dtype"] = config.get("dtype", "")
        grp.create_dataset("hashes", data=np.array(hashes, dtype=_HASH_DTYPE))
        for layer, arr in arrays.items():
            # ≤ 1024 rows and ≤ ~4 MB per chunk, so full maps (10⁵ values a row) stay readable row by row
            rows = max(1, min(len(arr), 1024, (4 << 20) // max(arr[0].nbytes, 1))) if len(arr) else 0
            grp.create_dataset(layer, data=arr, chunks=(rows, *arr.shape[1:]) if len(arr) else None)

    def consolidate(self) -> int:
        """Merge finished parts into the store (atomic replace) and delete them. Returns rows merged."""
        if not self.parts_dir.is_dir():
            return 0
        with self._lock(exclusive=True):
            keys = sorted(p.name for p in self.parts_dir.iterdir() if p.is_dir() and self._part_files(p.name))
            if not keys:
                return 0
            merged_parts: list[Path] = []
            n_new = 0
            tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
            old = out = None
            try:
                if self.path.exists():
                    try:
                        old = h5py.File(self.path, "r")
                    except OSError as exc:
                        self._quarantine(self.path, exc)
                out = h5py.File(tmp, "w")
                if old is not None:
                    for name in old:
                        if name not in keys:
                            old.copy(old[name], out, name=name)
                for key in keys:
                    n_new += self._merge_key(out, old, key, merged_parts)
                out.flush()
                out.close()
                if old is not None:
                    old.close()
                with open(tmp, "rb+") as fh:
                    os.fsync(fh.fileno())
                os.replace(tmp, self.path)
                _fsync_dir(self.path.parent)
            except BaseException as exc:
                # Close both files before anything else: HDF5 left holding a half-written file after a failed
                # write (disk full) crashes the interpreter at exit. The parts and the old store stay untouched.
                for handle in (out, old):
                    with contextlib.suppress(Exception):
                        if handle is not None and handle.id.valid:
                            handle.close()
                tmp.unlink(missing_ok=True)
                if is_disk_full(exc):
                    raise DiskFullError(self.path.parent, f"the feature cache {self.path.name}") from exc
                raise
            for part in merged_parts:
                part.unlink(missing_ok=True)
            for key in keys:
                with contextlib.suppress(OSError):
                    (self.parts_dir / key).rmdir()
        return n_new

    def _merge_key(self, out: h5py.File, old: h5py.File | None, key: str, merged: list[Path]) -> int:
        config: dict | None = None
        layers: list[str] | None = None
        hashes: list[str] = []
        blocks: dict[str, list[np.ndarray]] = {}
        seen: set[str] = set()

        def take(grp: h5py.Group, source: Path) -> None:
            nonlocal config, layers
            if layers is None:
                layers = json.loads(grp.attrs["layers"])
                config = json.loads(grp.attrs["config"])
                for layer in layers:
                    blocks[layer] = []
            h, arrays = self._read_group(grp, layers, source)
            keep = [i for i, x in enumerate(h) if x not in seen]
            seen.update(h[i] for i in keep)
            hashes.extend(h[i] for i in keep)
            for layer in layers:
                blocks[layer].append(arrays[layer][keep])

        if old is not None and key in old:
            take(old[key], self.path)
        n_before = len(hashes)
        for part in self._part_files(key):
            try:
                with h5py.File(part, "r") as f:
                    take(f[key], part)
                merged.append(part)
            except (OSError, KeyError, ValueError) as exc:
                self._quarantine(part, exc)
        if layers is None or config is None:
            return 0
        self._write_group(out, key, config, hashes, {layer: np.concatenate(blocks[layer]) for layer in layers})
        return len(hashes) - n_before

    # ------------------------------------------------------------------------------------------- summary
    def info(self) -> list[dict]:
        """One entry per configuration in the consolidated store: key, model id, layers, dtype, rows."""
        out = []
        if not self.path.exists():
            return out
        with self._lock(exclusive=False), h5py.File(self.path, "r") as f:
            for key in f:
                grp = f[key]
                config = json.loads(grp.attrs["config"])
                out.append({"key": key, "model_id": config["backbone"].get("model_id"),
                            "layers": json.loads(grp.attrs["layers"]), "dtype": config.get("dtype"),
                            "n_rows": int(grp["hashes"].shape[0])})
        return out


# ----------------------------------------------------------------------------------------------- extraction
@dataclass
class FeatureResult:
    """Features of a collection and how they were obtained.

    Attributes
    ----------
    features : dict of layer → array of shape (n_images, d) (grids and maps: (n_images, C, H, W)), storage dtype
    n_computed : int
        Distinct images whose features were computed in this call.
    n_cached : int
        Images served from the cache.
    key : str or None
        The cache configuration key (None without a cache).
    """

    features: dict[str, np.ndarray]
    n_computed: int
    n_cached: int
    key: str | None


class _NoBar:
    def update(self, n: int) -> None:
        pass

    def close(self) -> None:
        pass


def _check_layers(backbone: ImageBackbone, layers: Sequence[str]) -> list[str]:
    layers = list(dict.fromkeys(layers))
    if not layers:
        raise ConfigError("features: layers: empty; expected at least 'pooled'")
    validate_layer_specs(layers, backbone.layer_names, backbone.model_id)
    return layers


def compute_features(images: ImageCollection, backbone: ImageBackbone, layers: Sequence[str] = ("pooled",),
                     cache: FeatureCache | None = None, batch_size: int = 32, device: str = "auto",
                     dtype: StorageDtype = "float32", show_progress: bool = True, chunk_size: int = 256,
                     num_workers: int = 2) -> FeatureResult:
    """Like :func:`extract_features`, also reporting how many images were computed and served from the cache."""
    if dtype not in _DTYPES:
        raise ConfigError(f"features: dtype: got {dtype!r}, expected 'float32' or 'float16'")
    if batch_size < 1 or chunk_size < 1:
        raise ConfigError(f"features: batch_size and chunk_size must be ≥ 1, got {batch_size}, {chunk_size}")
    layers = _check_layers(backbone, layers)
    np_dtype = _DTYPES[dtype]
    n = len(images)
    hashes = images.content_hashes()
    key, config = FeatureCache.config_key(backbone, layers, dtype) if cache is not None else (None, {})

    out: dict[str, np.ndarray] | None = None
    have = np.zeros(n, dtype=bool)
    cached: dict[str, np.ndarray] = {}
    if cache is not None and n:
        have, cached = cache.lookup(key, layers, hashes)  # type: ignore[arg-type]
    first_of: dict[str, int] = {}
    for i, h in enumerate(hashes):
        if not have[i]:
            first_of.setdefault(h, i)
    todo = sorted(first_of.values())
    n_cached = int(have.sum())

    if not todo:
        if n == 0:
            return FeatureResult({layer: np.zeros((0, 0), np_dtype) for layer in layers}, 0, 0, key)
        return FeatureResult({layer: cached[layer].astype(np_dtype, copy=False) for layer in layers}, 0, n_cached,
                             key)

    computed: dict[str, dict[str, np.ndarray]] = {}  # layer → hash → row
    run_device = resolve_device(device)
    try:
        orig_device = next(backbone.parameters()).device
    except StopIteration:
        orig_device = torch.device("cpu")
    was_training = backbone.training
    backbone.to(run_device).eval()
    extra = [layer for layer in layers if layer != "pooled"]
    use_bf16 = torch.device(run_device).type == "cuda"
    size = backbone.image_size
    chunk_rows = max(chunk_size, batch_size)
    bar = (progress_bar(total=len(todo), desc=f"features {backbone.model_id}", unit="img") if show_progress
           else _NoBar())

    def load_batch(idx: list[int]) -> torch.Tensor:
        return torch.from_numpy(np.stack([images.load_array(i, size) for i in idx]))

    try:
        with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
            for c0 in range(0, len(todo), chunk_rows):
                chunk = todo[c0 : c0 + chunk_rows]
                batches = [chunk[b : b + batch_size] for b in range(0, len(chunk), batch_size)]
                futures = [pool.submit(load_batch, b) for b in batches[:2]]
                chunk_arrays: dict[str, list[np.ndarray]] = {layer: [] for layer in layers}
                for k in range(len(batches)):
                    raw = futures[k].result()
                    if k + 2 < len(batches):
                        futures.append(pool.submit(load_batch, batches[k + 2]))
                    x = backbone.preprocess(raw.to(run_device))
                    with torch.inference_mode(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_bf16):
                        feats = backbone.features(x, extra)
                    for layer in layers:
                        chunk_arrays[layer].append(feats[layer].float().cpu().numpy().astype(np_dtype))
                    bar.update(len(batches[k]))
                arrays = {layer: np.concatenate(chunk_arrays[layer]) for layer in layers}
                chunk_hashes = [hashes[i] for i in chunk]
                if cache is not None:
                    cache.write_part(key, config, chunk_hashes, arrays)  # type: ignore[arg-type]
                for layer in layers:
                    rows = computed.setdefault(layer, {})
                    for r, h in enumerate(chunk_hashes):
                        rows[h] = arrays[layer][r]
    finally:
        bar.close()
        backbone.to(orig_device).train(was_training)
    if cache is not None:
        cache.consolidate()

    out = {}
    for layer in layers:
        shape = next(iter(computed[layer].values())).shape
        arr = np.empty((n, *shape), dtype=np_dtype)
        if have.any():
            arr[have] = cached[layer]
        for i in np.flatnonzero(~have):
            arr[i] = computed[layer][hashes[i]]
        out[layer] = arr
    return FeatureResult(out, len(todo), n_cached, key)


def extract_features(images: ImageCollection, backbone: ImageBackbone, layers: Sequence[str] = ("pooled",),
                     cache: FeatureCache | None = None, batch_size: int = 32, device: str = "auto",
                     dtype: StorageDtype = "float32", show_progress: bool = True, chunk_size: int = 256,
                     num_workers: int = 2) -> dict[str, np.ndarray]:
    """Features of every image, computed once and cached on disk.

    Parameters
    ----------
    images : ImageCollection
        ``n_images`` images; rows are matched to the cache by content hash (duplicates computed once).
    backbone : ImageBackbone
        Run in eval mode on ``device`` (moved back to its device and mode afterwards).
    layers : sequence of str
        ``"pooled"`` and/or names from ``backbone.layer_names``, optionally with a spatial mode
        (``"block5@grid4"``, ``"block5@map"``, ``"block5@proj512"``; :mod:`llmvem.embed.spatial`).
    cache : FeatureCache, optional
        Without one, everything is computed in memory.
    batch_size : int
        Images per forward pass.
    device : str
        ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"``; on CUDA the forward runs under bf16 autocast.
    dtype : {"float32", "float16"}
        Storage (and returned) dtype.
    show_progress : bool
        A progress bar over the images to compute (images/s and ETA).
    chunk_size : int
        Images per cache chunk; a crash loses at most the chunk in flight.
    num_workers : int
        Threads decoding images ahead of the model.

    Returns
    -------
    dict of layer → array of shape (n_images, d_layer), or (n_images, C, H, W) for ``@grid``/``@map`` specs
    """
    return compute_features(images, backbone, layers=layers, cache=cache, batch_size=batch_size, device=device,
                            dtype=dtype, show_progress=show_progress, chunk_size=chunk_size,
                            num_workers=num_workers).features
