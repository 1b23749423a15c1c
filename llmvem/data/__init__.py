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
           "load_dataset", "parse_options"]


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


def _call_loader(loader: Callable[..., EncodingDataset], spec: str, options: dict[str, Any]) -> EncodingDataset:
    """Call ``loader`` after checking ``options`` against its signature: unknown names and values of the wrong
    type (``n_train=abc``) are errors naming the option and what it expects, not a TypeError from deep inside."""
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
    try:
        return loader(**options)
    except TypeError as exc:
        raise DataValidationError(spec, "dataset options", str(exc)) from exc
    except DataValidationError as exc:
        if exc.source != "<in memory>":
            raise
        raise DataValidationError(spec, f"option {exc.field}", exc.problem) from exc  # name what was given


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
    if text == "virtual" or text.startswith("virtual:"):
        from llmvem.data.virtual_brain import make_virtual_brain

        options = {**(parse_options(text.split(":", 1)[1]) if ":" in text else {}), **kwargs}
        ds = _call_loader(make_virtual_brain, text, {"seed": seed, **options})
    elif text.startswith("v4:"):
        from llmvem.data.v4 import load_v4

        try:
            _, root, session = text.split(":", 2)
        except ValueError as exc:
            raise DataValidationError(text, "dataset spec", "expected 'v4:ROOT:SESSION'") from exc
        ds = _call_loader(load_v4, text, {"root": root, "session": session, "val_fraction": val_fraction,
                                          "seed": seed, **kwargs})
    else:
        path = Path(text)
        if not path.exists():
            raise DataValidationError(path, "dataset", "no such file or folder; expected 'virtual', 'v4:ROOT:SESSION',"
                                      " an Algonauts subject folder or a generic dataset folder")
        if (path / "training_split").is_dir():
            from llmvem.data.algonauts import load_algonauts

            ds = _call_loader(load_algonauts, text, {"subject_dir": path, "val_fraction": val_fraction, "seed": seed,
                                                     **({} if load_responses else {"load_responses": False}),
                                                     **kwargs})
        elif any((path / name).exists() for name in ("responses.npy", "responses.h5", "responses.hdf5")):
            from llmvem.data.folder import load_folder

            ds = _call_loader(load_folder, text, {"path": path, "val_fraction": val_fraction, "seed": seed, **kwargs})
        else:
            raise DataValidationError(path, "dataset", "not a known layout: expected 'training_split/' (Algonauts 2023)"
                                      " or 'responses.npy'/'responses.h5' (generic folder)")
    if val_fraction > 0 and ds.val is None:
        ds = ds.with_validation_split(val_fraction, seed)
    return ds
