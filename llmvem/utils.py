"""Small shared helpers: seeding, hashing, progress bars, atomic writes."""

from __future__ import annotations

import hashlib
import json
import os
import random
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch (CPU and CUDA) random number generators."""
    random.seed(seed)
    np.random.seed(seed % (2**32))  # noqa: NPY002 - third-party code still reads the legacy global RNG
    try:
        import torch

        torch.manual_seed(seed)
    except ImportError:  # pragma: no cover - torch is a hard dependency
        pass


def stable_hash(obj: Any, length: int = 16) -> str:
    """Hex digest of a JSON-serialisable object, independent of dict key order."""
    payload = json.dumps(obj, sort_keys=True, default=str).encode()
    return hashlib.sha256(payload).hexdigest()[:length]


def sha256_bytes(data: bytes, length: int = 32) -> str:
    """Hex digest (truncated) of raw bytes."""
    return hashlib.sha256(data).hexdigest()[:length]


#: Environment variable that switches llmvem's progress bars: "0" on, "1" off; unset: off (quiet library).
PROGRESS_ENV = "LLMVEM_NO_PROGRESS"


def progress_enabled() -> bool:
    """Whether llmvem draws progress bars: only when turned on (``LLMVEM_NO_PROGRESS=0``, which the ``llmvem``
    command sets unless ``--no-progress``), so library code called from Python is quiet by default."""
    return os.environ.get(PROGRESS_ENV, "1") == "0"


def set_progress(enabled: bool) -> None:
    """Turn every progress bar of llmvem on or off for this process and the processes it starts.

    Also switches the weight-loading bars of transformers and huggingface_hub when they are installed.
    """
    os.environ[PROGRESS_ENV] = "0" if enabled else "1"
    try:
        from huggingface_hub.utils import disable_progress_bars, enable_progress_bars
        from transformers.utils import logging as hf_logging
    except ImportError:  # pragma: no cover - both are dependencies
        return
    (enable_progress_bars if enabled else disable_progress_bars)()
    (hf_logging.enable_progress_bar if enabled else hf_logging.disable_progress_bar)()


def progress(iterable: Iterable[T], desc: str, total: int | None = None, unit: str = "it",
             disable: bool | None = None) -> Iterator[T]:
    """Wrap an iterable in a tqdm progress bar with a description, a rate and an ETA.

    Progress bars go to stderr; ``disable=None`` follows :func:`progress_enabled` (off unless turned on).
    """
    from tqdm.auto import tqdm

    if disable is None:
        disable = not progress_enabled()
    return iter(tqdm(iterable, desc=desc, total=total, unit=unit, disable=disable, dynamic_ncols=True))


def progress_bar(total: int, desc: str, unit: str = "it"):
    """A manual tqdm bar (call ``.update(n)``), drawn only when :func:`progress_enabled`."""
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit, disable=not progress_enabled(), dynamic_ncols=True)


def current_umask() -> int:
    """The process's file-mode creation mask (Linux: read from ``/proc``, which leaves the mask untouched)."""
    try:
        with open("/proc/self/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere: set and restore (the only portable way to read it)
    os.umask(mask)
    return mask


def follow_umask(path: str | Path, folder: bool = False) -> None:
    """Give ``path`` the mode ``open()`` / ``mkdir()`` would have given it (0666 / 0777 less the umask).

    ``tempfile.mkstemp`` and ``mkdtemp`` create 0600 / 0700 entries whatever the umask; a file renamed into place
    from one would stay unreadable to the group and others (a report on a shared cluster, a web server).
    """
    os.chmod(path, (0o777 if folder else 0o666) & ~current_umask())


@contextmanager
def atomic_write(path: str | Path, mode: str = "w", **kwargs: Any):
    """Write to a temporary file beside ``path`` and rename it into place on success.

    A crash while writing leaves the previous file (or none) and never a half-written one. The file gets the
    mode ``open()`` would give it (0666 less the umask), not the temporary file's 0600.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        follow_umask(tmp)
        with open(tmp, mode, **kwargs) as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def npz_memmap(path: str | Path, name: str) -> np.ndarray | None:
    """Array ``name`` of an uncompressed ``.npz`` (``np.savez``) memory-mapped read-only, without reading it;
    None when the member is compressed, missing or an object array."""
    import struct
    import zipfile

    with zipfile.ZipFile(path) as zf:
        try:
            info = zf.getinfo(f"{name}.npy")
        except KeyError:
            return None
        if info.compress_type != zipfile.ZIP_STORED:
            return None
    with open(path, "rb") as fh:
        fh.seek(info.header_offset)
        local = fh.read(30)
        if len(local) < 30 or local[:4] != b"PK\x03\x04":
            return None
        n_name, n_extra = struct.unpack("<HH", local[26:30])
        fh.seek(info.header_offset + 30 + n_name + n_extra)
        version = np.lib.format.read_magic(fh)
        read_header = np.lib.format.read_array_header_1_0 if version == (1, 0) else \
            np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read_header(fh)
        offset = fh.tell()
    if dtype.hasobject:
        return None
    return np.memmap(path, dtype=dtype, mode="r", shape=shape, order="F" if fortran else "C", offset=offset)


def write_json(path: str | Path, obj: Any) -> None:
    """Atomically write ``obj`` as pretty JSON (NaN written as null)."""

    def clean(o: Any) -> Any:
        if isinstance(o, dict):
            return {str(k): clean(v) for k, v in o.items()}
        if isinstance(o, (list, tuple)):
            return [clean(v) for v in o]
        if isinstance(o, (np.floating, float)):
            f = float(o)
            return None if not np.isfinite(f) else f
        if isinstance(o, np.integer):
            return int(o)
        if isinstance(o, np.ndarray):
            return clean(o.tolist())
        if isinstance(o, Path):
            return str(o)
        return o

    with atomic_write(path) as fh:
        json.dump(clean(obj), fh, indent=2)
        fh.write("\n")


def resolve_device(device: str = "auto") -> str:
    """Map ``"auto"`` to ``"cuda"`` when a GPU is visible, else ``"cpu"``."""
    if device != "auto":
        return device
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def prepare_run_folder(out_dir: str | Path, resume: bool, overwrite: bool,
                       outputs: Sequence[str] | None = None) -> Path:
    """Create the run folder ``out_dir``, refusing a non-empty one unless ``resume`` or ``overwrite``.

    ``overwrite`` deletes the names in ``outputs`` inside the folder (everything when ``outputs`` is None), so a
    command never deletes files it did not write.

    Raises
    ------
    RunFolderError
        The folder exists, is not empty, and neither flag was given (or it is a file).
    ConfigError
        Both flags were given.
    """
    import shutil

    from llmvem.errors import ConfigError, RunFolderError

    if resume and overwrite:
        raise ConfigError("resume and overwrite exclude each other: resume continues a run, overwrite restarts it")
    out_dir = Path(out_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise RunFolderError(f"{out_dir}: exists and is not a folder; expected a run folder path")
    if out_dir.is_dir() and any(out_dir.iterdir()):
        if overwrite:
            targets = [out_dir / n for n in outputs] if outputs is not None else list(out_dir.iterdir())
            for p in targets:
                if p.is_dir():
                    shutil.rmtree(p)
                elif p.exists():
                    p.unlink()
        elif not resume:
            raise RunFolderError(
                f"{out_dir}: run folder already exists and is not empty; pass --resume to continue it or "
                "--overwrite to start it again, or choose another folder")
    out_dir.mkdir(parents=True, exist_ok=True)
    return out_dir


#: Floor of feature standard deviations when standardising, as a fraction of their median.
STD_FLOOR = 0.1


def floored_std(std: np.ndarray) -> np.ndarray:
    """Standard deviations safe to divide by when z-scoring features, shape unchanged.

    A feature (almost) silent on the training images but active on a test image (a sparse ReLU unit of a pooled
    embedding) would be blown up by its tiny std (|z| ~ 1e5 was seen with 90 training images). Each std is
    floored at ``STD_FLOOR`` × the median of the positive stds; all ones when every feature is constant.
    """
    std = np.asarray(std, dtype=np.float64)
    positive = std[std > 0]
    if positive.size == 0:
        return np.ones_like(std)
    return np.maximum(std, STD_FLOOR * float(np.median(positive)))


def versions(seed: int, **extra: Any) -> dict[str, Any]:
    """Python, platform, seed and versions of the packages a run depends on (``versions.json``), plus ``extra``
    (e.g. the training device and world size)."""
    import platform
    from importlib.metadata import PackageNotFoundError, version

    out: dict[str, Any] = {"python": platform.python_version(), "platform": platform.platform(), "seed": seed}
    for pkg in ("llmvem", "torch", "timm", "transformers", "sentence-transformers", "safetensors", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = None
    import torch  # the runtime build string (e.g. "2.14.1+cu130"), which package metadata may shorten

    out["torch"] = torch.__version__
    from llmvem.resources import thread_record

    out["threads"] = thread_record()  # how many and why (--threads, LLMVEM_THREADS, the idle CPUs...)
    out.update(extra)
    return out
