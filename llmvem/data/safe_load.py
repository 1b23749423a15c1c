"""Loading data files without running code from them.

Numeric arrays are read with ``allow_pickle=False`` (``.npy``, ``.npz``) or through h5py (``.h5``/``.hdf5``);
the one pickled file the Algonauts 2023 release ships, ``roi_masks/mapping_<class>.npy`` (a ``dict`` saved with
``np.save``), is read through :class:`RestrictedUnpickler`, which only rebuilds ``dict``/``int``/``str``, NumPy
integer scalars and the 0-d object array that wraps them, and raises :class:`~llmvem.errors.UnsafeFileError`
for anything else *before* calling it. Text files are decoded as strict UTF-8 with an error naming the byte.
Model weights load only from safetensors or ``torch.load(weights_only=True)``; :func:`weights_load_error` turns
what those refuse into one-line user errors.
"""

from __future__ import annotations

import io
import pickle
import struct
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError

from llmvem.errors import DataValidationError, ModelLoadError, UnsafeFileError, quote

try:  # NumPy >= 2
    from numpy._core import multiarray as _multiarray
except ImportError:  # pragma: no cover - NumPy 1.x
    from numpy.core import multiarray as _multiarray  # type: ignore[no-redef]

ARRAY_SUFFIXES = (".npy", ".h5", ".hdf5")


# ----------------------------------------------------------------------------------- restricted unpickling
def _safe_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
    dt = np.dtype(spec)
    if dt.kind not in "Oiu":
        raise pickle.UnpicklingError(f"dtype {dt} is not allowed (only object and integer dtypes)")
    return np.dtype(spec, align, copy)


def _safe_reconstruct(subtype: Any, shape: Any, dtype_code: Any) -> np.ndarray:
    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"array subtype {subtype!r} is not allowed (only numpy.ndarray)")
    return _multiarray._reconstruct(np.ndarray, shape, dtype_code)


def _safe_scalar(dtype: Any, *args: Any) -> Any:
    if not isinstance(dtype, np.dtype) or dtype.kind not in "Oiu":
        raise pickle.UnpicklingError(f"NumPy scalar of dtype {dtype!r} is not allowed (only integers)")
    return _multiarray.scalar(dtype, *args)


_ALLOWED_BUILTINS = {"dict": dict, "int": int, "str": str}
_ALLOWED_NUMPY = {"_reconstruct": _safe_reconstruct, "scalar": _safe_scalar}
_NUMPY_MULTIARRAY = ("numpy._core.multiarray", "numpy.core.multiarray")


def _check_key(key: Any) -> None:
    # Checked before the key is hashed: hashing a small pickle's tuple tower (each level 9 references to the one
    # below) visits every leaf of the expanded tree, seconds for a 400-byte file.
    if not isinstance(key, (int, str, np.integer)):
        raise pickle.UnpicklingError(f"dict key of type {type(key).__name__} is not allowed (only int or str)")


class RestrictedUnpickler(pickle._Unpickler):
    """An unpickler that resolves only an allow-list of globals and builds dicts with int or str keys only.

    Allowed: ``builtins.dict``, ``builtins.int``, ``builtins.str``, ``numpy.ndarray`` (plain arrays only),
    ``numpy.dtype`` (object and integer dtypes only) and ``numpy.(_)core.multiarray._reconstruct``/``scalar``
    (wrapped so that they build only those). Every other global — ``os.system``, ``builtins.eval``,
    ``subprocess.Popen``… — raises :class:`pickle.UnpicklingError` when it is looked up, so it is never called.
    It is the pure-Python unpickler (label mappings are a few hundred bytes), whose dict-building opcodes are
    replaced so that a key of any other type is refused before it is hashed.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def _load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        _check_key(key)
        self.stack[-1][key] = value

    def _load_setitems(self) -> None:
        items = self.pop_mark()
        target = self.stack[-1]
        for i in range(0, len(items), 2):
            _check_key(items[i])
            target[items[i]] = items[i + 1]

    def _load_dict(self) -> None:
        items = self.pop_mark()
        for i in range(0, len(items), 2):
            _check_key(items[i])
        self.append({items[i]: items[i + 1] for i in range(0, len(items), 2)})

    dispatch[pickle.SETITEM[0]] = _load_setitem
    dispatch[pickle.SETITEMS[0]] = _load_setitems
    dispatch[pickle.DICT[0]] = _load_dict

    def find_class(self, module: str, name: str) -> Any:
        if module == "builtins" and name in _ALLOWED_BUILTINS:
            return _ALLOWED_BUILTINS[name]
        if module == "numpy" and name == "ndarray":
            return np.ndarray
        if module == "numpy" and name == "dtype":
            return _safe_dtype
        if module in _NUMPY_MULTIARRAY and name in _ALLOWED_NUMPY:
            return _ALLOWED_NUMPY[name]
        raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed")

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def _read_npy_header(fh: io.BufferedIOBase, path: Path) -> tuple[tuple[int, ...], np.dtype]:
    try:
        version = np.lib.format.read_magic(fh)
        if version == (1, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_1_0(fh)
        elif version == (2, 0):
            shape, _fortran, dtype = np.lib.format.read_array_header_2_0(fh)
        else:
            raise ValueError(f"unsupported .npy format version {version}")
    except Exception as exc:  # NumPy parses the header with ast: ValueError, SyntaxError, tokenize.TokenError...
        raise DataValidationError(path, "file", f"not a readable .npy file ({type(exc).__name__}: {exc})") from exc
    return shape, dtype


def load_label_mapping(path: str | Path) -> dict[int, str]:
    """Load an Algonauts ``mapping_<class>.npy`` label dictionary without executing code.

    Parameters
    ----------
    path : str or Path
        A ``.npy`` file holding a 0-d object array that wraps a ``dict`` (what ``np.save(path, {1: "V1v"})``
        writes).

    Returns
    -------
    dict of int to str
        ROI index → ROI name (index 0 is usually ``"Unknown"``).

    Raises
    ------
    UnsafeFileError
        The pickle refers to anything but dict/int/str/NumPy integer scalars (e.g. a function to call).
    DataValidationError
        The file is not a ``.npy`` object array, or the dictionary is not ``{int: str}``.
    """
    path = Path(path)
    try:
        fh = open(path, "rb")
    except OSError as exc:
        raise DataValidationError(path, "mapping", f"cannot open file ({exc})") from exc
    with fh:
        shape, dtype = _read_npy_header(fh, path)
        if dtype != np.dtype(object):
            raise DataValidationError(path, "mapping", f"expected a pickled dict (object array), got dtype {dtype}")
        try:
            obj = RestrictedUnpickler(fh).load()
        except pickle.UnpicklingError as exc:
            raise UnsafeFileError(
                f"{path}: mapping: refused to unpickle ({exc}); a label mapping may only contain a dict of "
                "int -> str") from exc
        except (EOFError, ValueError, TypeError, AttributeError, IndexError, KeyError, struct.error,
                RecursionError) as exc:
            raise DataValidationError(path, "mapping", f"corrupt pickle ({type(exc).__name__}: {exc})") from exc
    if isinstance(obj, np.ndarray):
        if obj.shape != () or obj.dtype != object:
            raise DataValidationError(path, "mapping", f"expected a 0-d object array wrapping a dict, got {obj.shape}")
        obj = obj.item()
    if not isinstance(obj, dict):
        raise DataValidationError(path, "mapping", f"expected a dict of int -> str, got {type(obj).__name__}")
    out: dict[int, str] = {}
    for key, value in obj.items():
        if not isinstance(key, (int, np.integer)) or isinstance(key, bool):
            raise DataValidationError(path, "mapping", f"key {quote(key)} is a {type(key).__name__}; expected int")
        if not isinstance(value, str):
            raise DataValidationError(
                path, "mapping", f"value of key {quote(key)} is a {type(value).__name__}; expected str")
        out[int(key)] = value
    return out


# ------------------------------------------------------------------------------------------ model weights
#: What a loader of model weights may raise on a file it cannot read: ``pickle.UnpicklingError`` when
#: ``torch.load(weights_only=True)`` (used by llmvem, timm, transformers and sentence-transformers alike) refuses a
#: pickle that needs code, and ``SafetensorError`` for a damaged (or disguised) ``.safetensors`` file.
WEIGHT_LOAD_ERRORS: tuple[type[BaseException], ...] = (pickle.UnpicklingError, SafetensorError)


def weights_load_error(source: str | Path, exc: BaseException) -> Exception:
    """The user-facing error for a model file that failed to load with one of :data:`WEIGHT_LOAD_ERRORS`.

    Returns (does not raise) an :class:`~llmvem.errors.UnsafeFileError` for a refused pickle, naming the global
    it would have called, or a :class:`~llmvem.errors.ModelLoadError` for an unreadable safetensors file; the
    message is one line.
    """
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    if isinstance(exc, pickle.UnpicklingError):
        # torch's message is a page long; its "WeightsUnpickler error: Unsupported global: ..." line says why
        why = next((ln for ln in lines if ln.startswith("WeightsUnpickler error")), lines[0] if lines else "")
        why = why.split(" was not an allowed global")[0]  # not torch's advice on how to allow it
        return UnsafeFileError(
            f"{source}: weights: the file holds pickled Python objects and llmvem refuses to execute them ({why}); "
            "use .safetensors files or a plain state dict of tensors")
    return ModelLoadError(f"{source}: weights: not a readable safetensors file ({' '.join(lines)[:300]})")


# ---------------------------------------------------------------------------------------- numeric arrays
def _check_npy(path: Path, field: str) -> None:
    """Refuse a ``.npy`` file that is not one (text, CSV, another format) or whose header promises more data than
    the file holds (a truncated file, or a forged header that would make NumPy allocate terabytes)."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(6)
            if head != b"\x93NUMPY":
                kind = "empty" if not head else (
                    "text" if all(32 <= b < 127 or b in b"\t\r\n" for b in head) else "binary")
                raise DataValidationError(
                    path, field, f"not a .npy file ({kind} content starting {head!r}); save the array with numpy.save")
            fh.seek(0)
            shape, dtype = _read_npy_header(fh, path)
            offset = fh.tell()
    except OSError as exc:
        raise DataValidationError(path, field, f"cannot read file ({exc.strerror or exc})") from exc
    if dtype.hasobject:
        raise DataValidationError(path, field, "holds Python objects (pickle); expected a numeric array")
    needed = int(np.prod(shape, dtype=object)) * dtype.itemsize
    if needed > size - offset:
        raise DataValidationError(path, field, f"the header declares shape {quote(shape)} of {dtype} ({needed} bytes)"
                                  f" but the file holds {size - offset} bytes; the file is truncated or corrupt")


def load_array(path: str | Path, field: str, dataset: str | None = None, ndim: int | None = None,
               mmap: bool = False) -> np.ndarray:
    """Load a numeric array from ``.npy`` (never unpickling) or an HDF5 dataset.

    Parameters
    ----------
    path : str or Path
        ``.npy``, ``.h5`` or ``.hdf5`` file.
    field : str
        What the array is (``"responses"``), used in error messages.
    dataset : str, optional
        HDF5 dataset name (default: ``field``).
    ndim : int, optional
        Required number of dimensions.
    mmap : bool
        Memory-map ``.npy`` files read-only instead of reading them into memory.

    Returns
    -------
    array
        Numeric (bool, integer or float) array.
    """
    path = Path(path)
    if not path.is_file():
        raise DataValidationError(path, field, "file not found")
    suffix = path.suffix.lower()
    if suffix == ".npy":
        _check_npy(path, field)
        try:
            arr = np.load(path, allow_pickle=False, mmap_mode="r" if mmap else None)
        except (ValueError, SyntaxError, TypeError, EOFError, MemoryError) as exc:
            if "allow_pickle" in str(exc) or "pickle" in str(exc).lower():
                raise DataValidationError(
                    path, field, "holds Python objects (pickle); expected a numeric array") from exc
            raise DataValidationError(path, field, f"not a readable .npy file ({type(exc).__name__}: {exc})") from exc
        except OSError as exc:
            raise DataValidationError(path, field, f"not a readable .npy file ({exc})") from exc
    elif suffix in (".h5", ".hdf5"):
        import h5py

        key = dataset or field
        try:
            with h5py.File(path, "r") as fh:
                if key not in fh:
                    raise DataValidationError(path, field, f"no dataset {key!r}; found {sorted(fh.keys())}")
                node = fh[key]
                if not isinstance(node, h5py.Dataset):
                    raise DataValidationError(path, field, f"{key!r} is a group; expected a dataset")
                arr = node[()]
        except OSError as exc:
            raise DataValidationError(path, field, f"not a readable HDF5 file ({exc})") from exc
    else:
        raise DataValidationError(path, field, f"unsupported file type {suffix!r}; expected one of {ARRAY_SUFFIXES}")
    arr = np.asarray(arr) if not isinstance(arr, np.memmap) else arr
    if arr.dtype.kind not in "biuf":
        raise DataValidationError(path, field, f"expected numbers, got dtype {arr.dtype}")
    if ndim is not None and arr.ndim != ndim:
        raise DataValidationError(path, field, f"expected a {ndim}-D array, got shape {arr.shape}")
    return arr


def check_finite(array: np.ndarray, source: str | Path, field: str, row_ids: list[str] | None = None,
                 allow_nan: bool = False) -> None:
    """Raise :class:`DataValidationError` naming the first non-finite entry of ``array``.

    Parameters
    ----------
    array : array of shape (n_rows, ...)
    source, field : where the array came from, for the message.
    row_ids : list of str, optional
        Names of the rows (image ids) so the message can say which image is bad.
    allow_nan : bool
        Accept NaN (padding of repeats) but not ±Inf.
    """
    arr = np.asarray(array)
    if arr.dtype.kind != "f":
        return
    bad = np.isinf(arr) if allow_nan else ~np.isfinite(arr)
    if not bad.any():
        return
    first = tuple(int(i) for i in np.argwhere(bad)[0])
    kind = "NaN" if np.isnan(arr[first]) else "Inf"
    row = f"image {row_ids[first[0]]!r}" if row_ids is not None else f"row {first[0]}"
    expected = "finite numbers or NaN padding" if allow_nan else "finite numbers"
    raise DataValidationError(
        source, field, f"{int(bad.sum())} non-finite values ({kind} at {row}, index {first}); expected {expected}")


# ---------------------------------------------------------------------------------------------- text files
def read_utf8_text(path: str | Path, field: str) -> str:
    """Read a text file as strict UTF-8 (a leading byte-order mark is dropped).

    Raises :class:`DataValidationError` naming the file, the byte offset and the fix when it is not UTF-8.
    """
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DataValidationError(path, field, f"cannot read file ({exc})") from exc
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataValidationError(
            path, field, f"not valid UTF-8 (byte 0x{data[exc.start]:02x} at offset {exc.start}); save the file "
            "as UTF-8") from exc


def check_nonempty_files(paths: list[Path], field: str = "image") -> None:
    """Raise :class:`DataValidationError` for the first zero-byte file (cheap: one ``stat`` per file)."""
    for p in paths:
        if p.stat().st_size == 0:
            raise DataValidationError(p, field, "file is empty (0 bytes); expected an encoded image")
