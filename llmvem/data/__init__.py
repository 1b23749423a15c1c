"""Datasets: one :class:`EncodingDataset` shape for the virtual brain, Algonauts 2023 / NSD, generic folders, V4.

``load_dataset(spec)`` resolves a dataset spec string:

- ``"virtual"`` or ``"virtual:n_train=200,n_test=50,seed=1"`` — the built-in virtual brain;
- ``"v4:ROOT:SESSION"`` — a V4 recording session in the Cowley et al. (2023) layout;
- a folder with ``training_split/`` — one Algonauts 2023 subject (``subjNN``);
- a folder with ``responses.npy`` or ``responses.h5`` — the generic folder format.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path
from typing import Any

from llmvem.data.dataset import EncodingDataset, Split
from llmvem.data.images import ArrayImages, FileImages, ImageCollection, ZipImages
from llmvem.errors import DataValidationError, quote

__all__ = ["EncodingDataset", "Split", "ImageCollection", "FileImages", "ZipImages", "ArrayImages",
           "check_dataset", "load_dataset", "parse_options"]


def parse_options(text: str) -> dict[str, Any]:
    """Parse ``"a=1,b=0.5,c=x"`` into ``{"a": 1, "b": 0.5, "c": "x"}`` (ints, floats, then strings)."""
    out: dict[str, Any] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        if "=" not in part:
            raise DataValidationError(text, "dataset spec", f"option {quote(part)} is not of the form key=value")
        key, value = (s.strip() for s in part.split("=", 1))
        for cast in (int, float):
            try:
                out[key] = cast(value)
                break
            except ValueError:
                continue
        else:
            out[key] = value
    return out


def _check_options(loader: Callable[..., EncodingDataset], spec: str, options: dict[str, Any]) -> None:
    """Check ``options`` against ``loader``'s signature: unknown names and values of the wrong type
    (``n_train=abc``) are errors naming the option and what it expects, not a TypeError from deep inside."""
    params = inspect.signature(loader).parameters
    for key, value in options.items():
        param = params.get(key)
        if param is None or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            accepted = ", ".join(k for k, p in params.items() if p.default is not p.empty)
            raise DataValidationError(spec, "dataset options", f"unknown option {quote(key)}; this loader takes: "
                                      f"{accepted}")
        default = param.default
        kind = type(default) if isinstance(default, (bool, int, float)) else None
        ok = kind is None or (isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))) \
            or (kind is float and isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            what = {bool: "true or false", int: "an integer", float: "a number"}[kind]
            raise DataValidationError(spec, f"option {key}", f"got {quote(value)}; expected {what} such as {default!r}")


def _call_loader(loader: Callable[..., Any], spec: str, options: dict[str, Any]) -> Any:
    """Call ``loader`` (or its cheap argument check) after :func:`_check_options`, naming the spec in errors."""
    _check_options(loader, spec, options)
    try:
        return loader(**options)
    except TypeError as exc:
        raise DataValidationError(spec, "dataset options", str(exc)) from exc
    except DataValidationError as exc:
        if exc.source != "<in memory>":
            raise
        raise DataValidationError(spec, f"option {exc.field}", exc.problem) from exc  # name what was given


def _resolve(text: str, val_fraction: float, seed: int, load_responses: bool,
             kwargs: dict[str, Any]) -> tuple[Callable[..., EncodingDataset], dict[str, Any], str]:
    """(loader, its keyword arguments, what the spec names): every check of a spec that reads no file."""
    if text == "virtual" or text.startswith("virtual:"):
        from llmvem.data.virtual_brain import make_virtual_brain

        options = {**(parse_options(text.split(":", 1)[1]) if ":" in text else {}), **kwargs}
        return make_virtual_brain, {"seed": seed, **options}, "built-in virtual brain"
    if text.startswith("v4:"):
        from llmvem.data.v4 import load_v4

        try:
            _, root, session = text.split(":", 2)
        except ValueError as exc:
            raise DataValidationError(text, "dataset spec", "expected 'v4:ROOT:SESSION'") from exc
        return load_v4, {"root": root, "session": session, "val_fraction": val_fraction, "seed": seed,
                         **kwargs}, f"V4 session {session} under {root}"
    path = Path(text)
    if not path.exists():
        raise DataValidationError(path, "dataset", "no such file or folder; expected 'virtual', 'v4:ROOT:SESSION',"
                                  " an Algonauts subject folder or a generic dataset folder")
    if (path / "training_split").is_dir():
        from llmvem.data.algonauts import load_algonauts

        return load_algonauts, {"subject_dir": path, "val_fraction": val_fraction, "seed": seed,
                                **({} if load_responses else {"load_responses": False}),
                                **kwargs}, f"Algonauts subject folder {path}"
    if any((path / name).exists() for name in ("responses.npy", "responses.h5", "responses.hdf5")):
        from llmvem.data.folder import load_folder

        return load_folder, {"path": path, "val_fraction": val_fraction, "seed": seed, **kwargs}, \
            f"dataset folder {path}"
    raise DataValidationError(path, "dataset", "not a known layout: expected 'training_split/' (Algonauts 2023)"
                              " or 'responses.npy'/'responses.h5' (generic folder)")


def check_dataset(spec: str | Path, val_fraction: float = 0.0, seed: int = 0, **kwargs: Any) -> str:
    """Check a spec as :func:`load_dataset` would before its first expensive step, reading no image and no
    response file: the layout, the options (names, types) and, for the virtual brain, their values and its size
    (:func:`~llmvem.data.virtual_brain.check_virtual_brain`). ``llmvem config validate`` and ``llmvem train``
    both run it, so they agree.

    Returns
    -------
    str
        What the spec names (``"built-in virtual brain"``, ``"dataset folder PATH"``...).

    Raises
    ------
    DataValidationError
        The errors :func:`load_dataset` gives for the same spec and options.
    """
    text = str(spec)
    loader, options, what = _resolve(text, val_fraction, seed, True, kwargs)
    _check_options(loader, text, options)
    if loader.__name__ == "make_virtual_brain":  # its argument checks, without drawing a scene
        from llmvem.data.virtual_brain import check_virtual_brain

        bound = inspect.signature(loader).bind(**options)
        bound.apply_defaults()
        _call_loader(check_virtual_brain, text, {k: bound.arguments[k]
                                                 for k in inspect.signature(check_virtual_brain).parameters})
    return what


def load_dataset(spec: str | Path, val_fraction: float = 0.0, seed: int = 0, load_responses: bool = True,
                 **kwargs: Any) -> EncodingDataset:
    """Load a dataset from a spec string (see the module docstring).

    Parameters
    ----------
    spec : str or Path
        What to load.
    val_fraction : float
        If > 0 and the dataset has no validation split, carve one from training (seeded by ``seed``).
    load_responses : bool
        False: an Algonauts subject's fMRI files are checked but not kept (shapes only, for ``llmvem data
        inspect``; see :func:`~llmvem.data.algonauts.load_algonauts`); other layouts load as usual.
    **kwargs
        Passed to the loader (e.g. ``n_train`` for the virtual brain).
    """
    text = str(spec)
    loader, options, _ = _resolve(text, val_fraction, seed, load_responses, kwargs)
    ds = _call_loader(loader, text, options)
    if val_fraction > 0 and ds.val is None:
        ds = ds.with_validation_split(val_fraction, seed)
    return ds
