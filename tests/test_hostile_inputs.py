"""The bad-input harness: hostile and clumsy input through the real ``llmvem`` command, one family at a time.

Each case builds a tiny input with one thing wrong (or dangerous) and runs a real command in-process
(``main([...])``). Every case must give: the expected exit code (2 for bad input), exactly ONE line on stderr,
``llmvem: error: ...``, bounded in length, naming the culprit (file, key or flag), no traceback, and nothing left
behind (the temporary folder holds the same files before and after, except what the case allows).

Families: configs, overrides, images, folders (stimuli.csv, links), responses, caption files, stores, output
paths, dataset specs, caption flags, run folders, model files. Cases that need a separate process (memory, exit
status seen by a shell) are in ``test_hostile_limits.py``. Existing cases live in ``test_reliability_cli.py``;
none is repeated here.
"""

from __future__ import annotations

import json
import os
import sqlite3
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import h5py
import numpy as np
import pytest
from test_adapters import make_subject
from test_reliability_cli import dataset_folder, embed_images, write_yaml

from llmvem.cli import main
from llmvem.errors import MAX_MESSAGE

Case = tuple[list[str], list[str]]  # (command line, fragments the error line must contain)
CASES: dict[str, Callable[[Path], Case]] = {}
#: Paths (relative to the case folder) a case may leave behind, e.g. an empty caption store.
ALLOWED: dict[str, set[str]] = {}


def case(name: str, allow: tuple[str, ...] = ()) -> Callable:
    def register(fn: Callable[[Path], Case]) -> Callable[[Path], Case]:
        assert name not in CASES, name
        CASES[name] = fn
        ALLOWED[name] = set(allow)
        return fn
    return register


def train(cfg: Path | str, tmp: Path, *extra: str) -> list[str]:
    return ["train", "--config", str(cfg), "--out", str(tmp / "run"), *extra]


def inspect(target: Path | str) -> list[str]:
    return ["data", "inspect", str(target)]


# ============================================================================================== configs
BOMB = "".join(f"a{k}: &a{k} [{', '.join(['*a' + str(k - 1)] * 9 if k else ['lol'] * 9)}]\n" for k in range(10))


def _cfg(tmp: Path, text: str | bytes, name: str = "cfg.yaml") -> Path:
    path = tmp / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text)
    return path


CONFIG_TEXTS: dict[str, tuple[str | bytes, list[str]]] = {
    "billion laughs as a typed value": (BOMB + "seed: *a9\n", ["cfg.yaml", "aliases", "expand"]),
    "billion laughs under an unknown key": (BOMB + "junk: *a9\n", ["cfg.yaml", "aliases"]),
    "billion laughs inside a section": (BOMB + "model: {lambda_align: *a9}\n", ["cfg.yaml", "aliases"]),
    "recursive alias": ("seed: &a [*a]\n", ["cfg.yaml", "aliases"]),
    "duplicate section": ("model:\n  lambda_align: 0.5\nmodel:\n  readout: pca\n", ["duplicate key 'model'", "line 1"]),
    "duplicate key in a section": ("train:\n  stage1: {lr: 0.1, lr: 0.2}\n", ["duplicate key 'lr'"]),
    "several errors": ("seed: abc\ntrain:\n  stage1: {lr: -1, epochs: x}\nfoo: 1\n", ["cfg.yaml: ", "seed",
                                                                                       "more errors"]),
    "unknown top-level key": ("sed: 3\n", ["sed: unknown key", "seed"]),
    "unknown nested key": ("train:\n  stage1:\n    learning_rate: 0.1\n", ["train.stage1.learning_rate", "lr"]),
    "text for an integer": ("seed: abc\n", ["seed", "valid integer", "'abc'"]),
    "megabyte string value": ("seed: " + "x" * 1_000_000 + "\n", ["cfg.yaml: seed", "xxx...xxx"]),
    "ten-thousand-character key": ("? " + "k" * 10_000 + "\n: 1\n", ["cfg.yaml: kkkk", "chars)"]),
    "a list instead of sections": ("- 1\n- 2\n", ["expected a mapping of sections", "list"]),
    "a scalar instead of sections": ("just text\n", ["expected a mapping of sections", "str"]),
    "binary garbage": (bytes(range(256)) * 4, ["cfg.yaml", "UTF-8"]),
    "python object tag": ("seed: !!python/object/apply:os.system [echo hi]\n", ["cfg.yaml", "invalid YAML",
                                                                               "python/object"]),
    "tab indentation": ("train:\n\tstage1: {}\n", ["cfg.yaml", "invalid YAML", "line 2"]),
    "deeply nested brackets": ("seed: " + "[" * 5000 + "]" * 5000 + "\n", ["cfg.yaml", "nesting"]),
    "negative learning rate": ("train:\n  stage1:\n    lr: -0.1\n", ["train.stage1.lr", "greater than 0"]),
    "validation fraction above one": ("data:\n  val_fraction: 1.5\n", ["data.val_fraction", "less than 1"]),
    "unknown choice": ("model:\n  readout: banana\n", ["model.readout", "'banana'"]),
    "a section given as a list": ("model: [1, 2]\n", ["model", "valid dictionary"]),
    "not-a-number learning rate": ("train:\n  stage1:\n    lr: .nan\n", ["train.stage1.lr"]),
    "merge key of a scalar": ("model:\n  <<: 1\n", ["cfg.yaml", "invalid YAML"]),
    "null key": ("? null\n: 1\n", ["cfg.yaml", "None"]),
}
for _name, (_text, _frags) in CONFIG_TEXTS.items():
    case(f"configs/{_name}")(lambda tmp, t=_text, f=_frags: (train(_cfg(tmp, t), tmp), f))


@case("configs/the config path is a folder")
def _(tmp: Path) -> Case:
    (tmp / "cfgdir").mkdir()
    return train(tmp / "cfgdir", tmp), ["cfgdir", "no such config file"]


@case("configs/missing config file")
def _(tmp: Path) -> Case:
    return train(tmp / "nope.yaml", tmp), ["nope.yaml", "no such config file"]


# ============================================================================================ overrides
OVERRIDES: dict[str, tuple[str, list[str]]] = {
    "no equals sign": ("train.stage1.lr", ["--set 'train.stage1.lr'", "KEY=VALUE"]),
    "unknown section": ("trian.stage1.lr=1", ["trian", "unknown section"]),
    "unknown key": ("model.lamda=1", ["model.lamda", "unknown key", "lambda_align"]),
    "text for an integer": ("train.stage1.epochs=abc", ["train.stage1.epochs", "valid integer"]),
    "negative lambda": ("model.lambda_align=-1", ["model.lambda_align", "greater than or equal to 0"]),
    "megabyte value": ("seed=" + "9x" * 500_000, ["--set 'seed=9x9x", "9x...9x"]),
    "ten-thousand-character key": ("k" * 10_000 + "=1", ["--set 'kkkk", "chars)"]),
    "billion laughs in a flow value": ("seed=[&a [1,1,1,1,1,1,1,1,1], &b [*a,*a,*a,*a,*a,*a,*a,*a,*a], "
                                       "&c [*b,*b,*b,*b,*b,*b,*b,*b,*b], &d [*c,*c,*c,*c,*c,*c,*c,*c,*c], "
                                       "&e [*d,*d,*d,*d,*d,*d,*d,*d,*d], &f [*e,*e,*e,*e,*e,*e,*e,*e,*e], "
                                       "&g [*f,*f,*f,*f,*f,*f,*f,*f,*f], [*g,*g,*g,*g,*g,*g,*g,*g,*g]]",
                                       ["--set 'seed=[&a", "aliases"]),
    "a section set to a number": ("train.stage1=5", ["train.stage1", "valid dictionary"]),
    "empty key": ("=1", ["--set '=1'", "unknown key"]),
    "image size below the minimum": ("data.image_size=4", ["data.image_size", "greater than or equal to 8"]),
    "validation fraction of one": ("data.val_fraction=1", ["data.val_fraction", "less than 1"]),
    "unknown choice": ("backbone.feature_dtype=float8", ["backbone.feature_dtype", "'float8'"]),
    "key below a scalar": ("seed.x=1", ["seed", "unknown section"]),
}
for _name, (_item, _frags) in OVERRIDES.items():
    case(f"overrides/{_name}")(lambda tmp, i=_item, f=_frags: (train("demo", tmp, "--set", i), f))


@case("overrides/unknown loader option")
def _(tmp: Path) -> Case:
    return train("demo", tmp, "--set", "data.loader_options.bogus=1"), ["unknown option 'bogus'", "n_train"]


@case("overrides/loader option of the wrong type")
def _(tmp: Path) -> Case:
    return train("demo", tmp, "--set", "data.loader_options.n_train=many"), ["data.loader_options.n_train", "'many'", "an integer"]


@case("overrides/virtual brain image size it cannot draw")
def _(tmp: Path) -> Case:
    return train("demo", tmp, "--set", "data.image_size=64"), ["llmvem/configs/demo.yaml (with --set overrides): "
                                                              "config key data.image_size", "multiple of 24"]


@case("overrides/missing dataset")
def _(tmp: Path) -> Case:
    return train("demo", tmp, "--set", f"data.spec={tmp / 'gone'}"), ["gone", "no such file or folder"]


@case("overrides/sweep lambda below zero")
def _(tmp: Path) -> Case:
    return ["sweep", "--lambda", "0,-1", "--out", str(tmp / "sw")], ["--lambda '0,-1'", "-1", ">= 0"]


@case("overrides/sweep lambda that is not a number")
def _(tmp: Path) -> Case:
    return ["sweep", "--lambda", "0,abc", "--out", str(tmp / "sw")], ["--lambda", "'0,abc'"]


@case("overrides/sweep grid without values")
def _(tmp: Path) -> Case:
    return ["sweep", "--grid", "model.feature_dropout=", "--out", str(tmp / "sw")], ["--grid", "no values"]


@case("overrides/sweep grid with an invalid value")
def _(tmp: Path) -> Case:
    return ["sweep", "--grid", "model.feature_dropout=0,2", "--out", str(tmp / "sw")], ["model.feature_dropout",
                                                                                         "less than 1"]


@case("overrides/demo with a duplicate key in a value")
def _(tmp: Path) -> Case:
    return (["demo", "--out", str(tmp / "d"), "--set", "data.loader_options={n_train: 5, n_train: 6}"],
            ["duplicate key 'n_train'"])


# =============================================================================================== images
def _png_header(width: int, height: int) -> bytes:
    """A PNG that declares ``width`` x ``height`` pixels and holds one compressed row (a decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * (1 + 3 * min(width, 1000)))
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bmp_header(width: int, height: int) -> bytes:
    return (b"BM" + struct.pack("<IHHI", 54, 0, 0, 54) + struct.pack("<IiiHHIIiiII", 40, width, height, 1, 24, 0,
                                                                        0, 2835, 2835, 0, 0))


BAD_IMAGES: dict[str, tuple[str, Callable[[], bytes], list[str]]] = {
    "decompression bomb (PIL's own limit)": ("im03.png", lambda: _png_header(30000, 30000),
                                             ["im03.png", "too many pixels"]),
    "decompression bomb (llmvem's cap)": ("im03.png", lambda: _png_header(12000, 12000),
                                          ["im03.png", "12000x12000 pixels", "LLMVEM_MAX_IMAGE_PIXELS"]),
    "bitmap declaring a huge size": ("im03.bmp", lambda: _bmp_header(40000, 40000), ["im03.bmp", "pixels"]),
    "random bytes": ("im03.png", lambda: np.random.default_rng(0).bytes(300), ["im03.png", "cannot decode"]),
    "text named .jpg": ("im03.jpg", lambda: b"hello, I am not a picture\n", ["im03.jpg", "cannot decode"]),
    "PNG signature only": ("im03.png", lambda: b"\x89PNG\r\n\x1a\n", ["im03.png", "cannot decode"]),
    "whitespace only": ("im03.png", lambda: b"   \n\n  ", ["im03.png", "cannot decode"]),
    "PNG with a broken checksum": ("im03.png", lambda: _png_header(4, 4)[:29] + b"\0\0\0\0" + _png_header(4, 4)[33:],
                                   ["im03.png", "cannot decode"]),
    "HTML page named .webp": ("im03.webp", lambda: b"<html><body>404 not found</body></html>",
                              ["im03.webp", "cannot decode"]),
    "truncated after the header": ("im03.png", lambda: _png_header(16, 16)[:40], ["im03.png", "cannot decode"]),
}


def _bad_image_folder(tmp: Path, name: str, data: bytes) -> Path:
    folder = dataset_folder(tmp / "ds")
    (folder / "images" / "im03.png").unlink()
    (folder / "images" / name).write_bytes(data)
    return folder


for _name, (_file, _make, _frags) in BAD_IMAGES.items():
    case(f"images/{_name}")(lambda tmp, n=_file, m=_make, f=_frags: (
        embed_images(_bad_image_folder(tmp, n, m()), tmp), f))


@case("images/pixel cap set very low")
def _(tmp: Path) -> Case:
    os.environ["LLMVEM_MAX_IMAGE_PIXELS"] = "100"  # removed by the test after the run
    return embed_images(dataset_folder(tmp / "ds"), tmp), ["im00.png", "16x16 pixels", "cap of 100"]


@case("images/pixel cap that is not a number")
def _(tmp: Path) -> Case:
    os.environ["LLMVEM_MAX_IMAGE_PIXELS"] = "lots"
    return embed_images(dataset_folder(tmp / "ds"), tmp), ["LLMVEM_MAX_IMAGE_PIXELS", "'lots'"]


# ============================================================================ folders: stimuli.csv, links
def _csv_folder(tmp: Path, body: str | bytes) -> Path:
    folder = dataset_folder(tmp / "ds")
    path = folder / "stimuli.csv"
    path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return folder


def _outside_png(tmp: Path) -> Path:
    (tmp / "elsewhere").mkdir(exist_ok=True)
    target = tmp / "elsewhere" / "outside.png"
    target.write_bytes((tmp / "ds" / "images" / "im00.png").read_bytes())
    return target


def _rows(n: int = 8, skip: int | None = None) -> str:
    return "".join(f"im{i:02d}.png\n" for i in range(n) if i != skip)


@case("folders/stimuli.csv names an absolute path")
def _(tmp: Path) -> Case:
    folder = _csv_folder(tmp, "image\n" + _rows())
    target = _outside_png(tmp)
    (folder / "stimuli.csv").write_text("image\n" + _rows(skip=7) + f"{target}\n")
    return inspect(folder), ["stimuli.csv", "line 9", "leaves the images folder"]


@case("folders/stimuli.csv climbs out with ..")
def _(tmp: Path) -> Case:
    folder = _csv_folder(tmp, "image\n" + _rows())
    _outside_png(tmp)
    (folder / "stimuli.csv").write_text("image\n" + _rows(skip=7) + "../../elsewhere/outside.png\n")
    return inspect(folder), ["stimuli.csv", "line 9", "leaves the images folder"]


@case("folders/a symlink out of images/")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    target = _outside_png(tmp)
    (folder / "images" / "im07.png").unlink()
    (folder / "images" / "im07.png").symlink_to(target)
    return inspect(folder), ["im07.png", "outside", "allow_symlinks"]


@case("folders/stimuli.csv names a symlink out of images/")
def _(tmp: Path) -> Case:
    folder = _csv_folder(tmp, "image\n" + _rows())
    target = _outside_png(tmp)
    (folder / "images" / "im07.png").unlink()
    (folder / "images" / "im07.png").symlink_to(target)
    return inspect(folder), ["stimuli.csv", "line 9", "outside"]


@case("folders/stimuli.csv with NUL bytes")
def _(tmp: Path) -> Case:
    return inspect(_csv_folder(tmp, "image\nim00.png\x00\n" + _rows()[9:])), ["stimuli.csv", "line 2", "\\x00"]


@case("folders/stimuli.csv with a field over the CSV limit")
def _(tmp: Path) -> Case:
    return inspect(_csv_folder(tmp, "image,caption\n" + "im00.png,\"" + "w " * 100_000 + "\"\n")), [
        "stimuli.csv: line", "not valid CSV", "field limit"]


@case("folders/captioning a stimuli.csv caption that starts with a NUL")
def _(tmp: Path) -> Case:
    folder = _csv_folder(tmp, "image,caption\n" + "".join(f"im{i:02d}.png,picture {i}\n" for i in range(8)))
    (folder / "stimuli.csv").write_text("image,caption\nim00.png,\x00picture\n" +
                                        "".join(f"im{i:02d}.png,picture {i}\n" for i in range(1, 8)))
    return (["caption", str(folder), "--store", str(tmp / "store.sqlite"), "--backend", "dataset"],
            ["stimuli.csv", "caption (line 2)", "U+0000"])  # refused before the store exists: none is left


@case("folders/stimuli.csv with a megabyte image name")
def _(tmp: Path) -> Case:
    return inspect(_csv_folder(tmp, "image\n" + "n" * 100_000 + ".png\n")), ["stimuli.csv", "line 2", "nnn...nnn"]


@case("folders/stimuli.csv with an unknown split")
def _(tmp: Path) -> Case:
    body = "image,split\n" + "".join(f"im{i:02d}.png,{'holdout' if i == 5 else 'train'}\n" for i in range(8))
    return inspect(_csv_folder(tmp, body)), ["stimuli.csv", "split (line 7)", "'holdout'"]


@case("folders/stimuli.csv with a header only")
def _(tmp: Path) -> Case:
    return inspect(_csv_folder(tmp, "image\n")), ["stimuli.csv", "no rows"]


@case("folders/stimuli.csv without an image column")
def _(tmp: Path) -> Case:
    return inspect(_csv_folder(tmp, "file\n" + _rows())), ["stimuli.csv", "no 'image' column"]


@case("folders/stimuli.csv puts one image in two splits")
def _(tmp: Path) -> Case:
    body = "image,split\n" + "".join(f"im{i:02d}.png,{'test' if i < 2 else 'train'}\n" for i in range(8))
    return inspect(_csv_folder(tmp, body + "im05.png,test\n")), ["stimuli.csv", "split (line 10)", "'im05'"]


@case("folders/images is a file")
def _(tmp: Path) -> Case:
    folder = tmp / "ds"
    folder.mkdir()
    (folder / "images").write_text("not a folder")
    np.save(folder / "responses.npy", np.zeros((2, 2), np.float32))
    return inspect(folder), ["ds", "no images/ folder"]


@case("folders/no image files")
def _(tmp: Path) -> Case:
    folder = tmp / "ds"
    (folder / "images").mkdir(parents=True)
    np.save(folder / "responses.npy", np.zeros((2, 2), np.float32))
    return inspect(folder), ["images", "no image files"]


# ============================================================================================ responses
def _responses(tmp: Path, write: Callable[[Path], None], name: str = "responses.npy") -> Path:
    folder = dataset_folder(tmp / "ds")
    (folder / "responses.npy").unlink()
    write(folder / name)
    return folder


RESPONSES: dict[str, tuple[str, Callable[[Path], None], list[str]]] = {
    "CSV text saved as .npy": ("responses.npy", lambda p: p.write_text("0.1,0.2\n0.3,0.4\n"),
                               ["responses.npy", "not a .npy file", "text"]),
    "pickled objects": ("responses.npy", lambda p: np.save(p, np.array([{"a": 1}] * 8, dtype=object)),
                        ["responses.npy", "pickle"]),
    "one-dimensional": ("responses.npy", lambda p: np.save(p, np.zeros(8, np.float32)), ["responses.npy", "2-D"]),
    "three-dimensional": ("responses.npy", lambda p: np.save(p, np.zeros((8, 2, 2), np.float32)),
                          ["responses.npy", "2-D"]),
    "strings": ("responses.npy", lambda p: np.save(p, np.full((8, 2), "a")), ["responses.npy", "expected numbers"]),
    "complex numbers": ("responses.npy", lambda p: np.save(p, np.zeros((8, 2), np.complex64)),
                        ["responses.npy", "expected numbers"]),
    "truncated data": ("responses.npy", lambda p: p.write_bytes(_npy_bytes(np.zeros((8, 5), np.float32))[:200]),
                       ["responses.npy", "(160 bytes)", "holds 72 bytes"]),
    "header claiming a trillion rows": ("responses.npy", lambda p: p.write_bytes(_npy_header((10**12, 5)) + b"\0" * 64),
                                        ["responses.npy", "(1000000000000, 5)", "truncated"]),
    "garbled header": ("responses.npy", lambda p: p.write_bytes(b"\x93NUMPY\x01\x00\x10\x00{'descr': <f4 !!\n"),
                       ["responses.npy", "not a readable .npy"]),
    "empty file": ("responses.npy", lambda p: p.write_bytes(b""), ["responses.npy", "empty"]),
    "HDF5 without the dataset": ("responses.h5", lambda p: _h5(p, "other"), ["responses.h5", "no dataset"]),
    "HDF5 with a group": ("responses.h5", lambda p: _h5(p, "responses", group=True), ["responses.h5", "group"]),
    "text saved as .h5": ("responses.h5", lambda p: p.write_text("hello"), ["responses.h5", "not a readable HDF5"]),
    "fewer rows than images": ("responses.npy", lambda p: np.save(p, np.zeros((5, 3), np.float32)),
                               ["responses.npy", "5 rows but 8 images"]),
}


def _npy_header(shape: tuple[int, ...]) -> bytes:
    import io

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue()


def _npy_bytes(arr: np.ndarray) -> bytes:
    import io

    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


def _h5(path: Path, name: str, group: bool = False) -> None:
    with h5py.File(path, "w") as f:
        if group:
            f.create_group(name)
        else:
            f[name] = np.zeros((8, 2), np.float32)


for _name, (_file, _write, _frags) in RESPONSES.items():
    case(f"responses/{_name}")(lambda tmp, n=_file, w=_write, f=_frags: (inspect(_responses(tmp, w, n)), f))


@case("responses/both .npy and .h5")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    _h5(folder / "responses.h5", "responses")
    return inspect(folder), ["ds", "keep only one"]


@case("responses/noise ceiling of the wrong length")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    np.save(folder / "noise_ceiling.npy", np.full(3, 0.5))
    return inspect(folder), ["noise_ceiling.npy", "shape (3,)", "(5,)"]


@case("responses/rois.npz that is not a zip")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    (folder / "rois.npz").write_text("V1,V2\n")
    return inspect(folder), ["rois.npz", "not a readable .npz"]


@case("responses/ROI mask of fractions")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    np.savez(folder / "rois.npz", V1=np.full(5, 0.5))
    return inspect(folder), ["rois.npz", "rois['V1']", "boolean"]


@case("responses/unknown hemisphere label")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    np.save(folder / "hemisphere.npy", np.array(["lh", "rh", "xx", "lh", "rh"]))
    return inspect(folder), ["hemisphere.npy", "'xx'"]


@case("responses/repeats of the wrong shape")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds")
    np.save(folder / "repeats.npy", np.zeros((8, 3, 4), np.float32))
    return inspect(folder), ["repeats.npy", "n_voxels=5"]


def _mapping(tmp: Path, write: Callable[[Path], None]) -> Path:
    subj = make_subject(tmp / "alg")["subj"]
    write(subj / "roi_masks" / "mapping_floc-faces.npy")
    return subj


def _tuple_tower(levels: int) -> tuple:
    t: tuple = (1,)
    for _ in range(levels):
        t = (t,) * 9
    return t


MAPPINGS: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "label mapping keyed by a nested tuple": (
        lambda p: p.write_bytes(_pickled_mapping(_tuple_tower(8))), ["mapping_floc-faces.npy", "key of type tuple"]),
    "label mapping that is CSV text": (lambda p: p.write_text("0,Unknown\n1,FFA\n"),
                                       ["mapping_floc-faces.npy", "not a readable .npy"]),
    "label mapping with a number for a name": (
        lambda p: np.save(p, np.array({0: "Unknown", 1: 7}, dtype=object), allow_pickle=True),
        ["mapping_floc-faces.npy", "value of key 1", "expected str"]),
    "label mapping that is a list": (lambda p: np.save(p, np.array(["a", "b"], dtype=object), allow_pickle=True),
                                     ["mapping_floc-faces.npy", "0-d object array"]),
}


def _pickled_mapping(key: object) -> bytes:
    """``np.save`` bytes of ``{key: "x"}`` written without building (and hashing) the dict in this process."""
    import io
    import pickle

    class Unhashed:  # pickles as an empty dict filled with SETITEM, like a real dict
        def __reduce__(self):
            return (dict, (), None, None, iter([(key, "x")]))

    body = pickle.dumps(Unhashed(), protocol=3)
    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "|O", "fortran_order": False, "shape": ()})
    return buf.getvalue() + body


for _name, (_write, _frags) in MAPPINGS.items():
    case(f"responses/{_name}")(lambda tmp, w=_write, f=_frags: (inspect(_mapping(tmp, w)), f))


# ======================================================================================== caption files
def _caption_file(tmp: Path, name: str, body: str | bytes | None) -> Case:
    folder = dataset_folder(tmp / "ds")
    path = tmp / name
    if body is None:
        path.mkdir()
    else:
        path.write_bytes(body if isinstance(body, bytes) else body.encode())
    return (["caption", str(folder), "--store", str(tmp / "c.sqlite"), "--backend", "file", "--captions-file",
             str(path)], [name])


CAPTION_FILES: dict[str, tuple[str, str | bytes | None, list[str]]] = {
    "invalid JSON": ("caps.json", "{\"im00\": [\"a\",", ["not valid JSON"]),
    "JSON list of numbers": ("caps.json", "[1, 2, 3]", []),
    "JSON nested a hundred thousand deep": ("caps.json", "[" * 100_000 + "]" * 100_000, ["nested too deeply"]),
    "CSV without an id column": ("caps.csv", "text\nhello\n", []),
    "CSV with an empty caption": ("caps.csv", "image_id,caption\nim00,\n", ["im00"]),
    "JSON with an empty caption list": ("caps.json", "{\"im00\": []}", ["empty list"]),
    "CSV field over the limit": ("caps.csv", "image_id,caption\nim00,\"" + "w " * 100_000 + "\"\n",
                                 ["not valid CSV", "field limit"]),
    "JSONL with a broken line": ("caps.jsonl", "{\"image_id\": \"im00\", \"caption\": \"a\"}\n{oops\n", ["line 2"]),
    "COCO file without annotations": ("caps.json", json.dumps({"images": [{"id": 1, "file_name": "im00.png"}]}),
                                      []),
    "unknown suffix": ("caps.txt", "im00 a cat\n", [".txt"]),
    "a folder": ("caps.csv", None, []),
    "JSON caption that is a number": ("caps.json", "{\"im00\": 5}", ["im00"]),
    "binary garbage": ("caps.csv", bytes(range(256)), ["UTF-8"]),
    # one rule for every format (llmvem.data.text): no control characters, at most the CSV field limit
    "JSON caption starting with a NUL": ("caps.json", json.dumps({"im00": "\x00a cat"}), ["im00", "U+0000"]),
    "JSONL caption with an escape sequence": ("caps.jsonl", json.dumps({"image_id": "im00", "caption": "\x1b[31mred"}),
                                              ["lines[0].caption", "U+001B"]),
    "CSV caption with a bell": ("caps.csv", "image_id,caption\nim00,a cat\x07\n", ["row 2", "U+0007"]),
    "JSON caption of a megabyte": ("caps.json", json.dumps({"im00": "w" * 1_000_000}), ["1000000 characters",
                                                                                      "at most 131072"]),
    "JSON caption one past the CSV field limit": ("caps.json", json.dumps({"im00": "w" * 131_073}),
                                                  ["131073 characters", "the CSV field limit"]),
}
for _name, (_file, _body, _frags) in CAPTION_FILES.items():
    case(f"caption files/{_name}")(lambda tmp, n=_file, b=_body, f=_frags: (
        _caption_file(tmp, n, b)[0], [n, *f]))


# =============================================================================================== stores
def _text_from_store(tmp: Path, make: Callable[[Path], None], *extra: str) -> list[str]:
    folder = dataset_folder(tmp / "ds")
    store = tmp / "store.sqlite"
    make(store)
    return ["embed", str(folder), "--text", "--captions", str(store), "--text-out", str(tmp / "t.npz"), *extra]


def _sqlite(path: Path, sql: str) -> None:
    con = sqlite3.connect(path)
    con.executescript(sql)
    con.close()


STORES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "a text file": (lambda p: p.write_text("image,caption\n"), ["store.sqlite", "not a readable SQLite"]),
    "an empty file": (lambda p: p.write_bytes(b""), ["store.sqlite", "empty file"]),
    "a store of another schema": (lambda p: _sqlite(p, "CREATE TABLE meta (key TEXT, value TEXT);"
                                                       "INSERT INTO meta VALUES ('schema', 'other-tool');"),
                                  ["store.sqlite", "meta.schema", "'other-tool'"]),
    "a store of a future version": (lambda p: _sqlite(p, "CREATE TABLE meta (key TEXT, value TEXT);"
                                                         "INSERT INTO meta VALUES ('schema', 'llmvem-caption-store'),"
                                                         " ('version', '99');"),
                                    ["store.sqlite", "meta.version", "'99'"]),
    "a folder": (lambda p: p.mkdir(), ["store.sqlite"]),
    "a truncated SQLite file": (lambda p: p.write_bytes(b"SQLite format 3\x00" + b"\x10\x00" + b"\x00" * 30),
                                ["store.sqlite"]),
}
for _name, (_make, _frags) in STORES.items():
    case(f"stores/{_name}")(lambda tmp, m=_make, f=_frags: (_text_from_store(tmp, m), f))


@case("stores/a store without captions")
def _(tmp: Path) -> Case:
    def make(p: Path) -> None:
        from llmvem.captions import CaptionStore
        CaptionStore(p).close()
    return _text_from_store(tmp, make), ["store.sqlite", "no captions yet"]


@case("stores/an unknown caption config")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds", captions=True)
    assert main(["caption", str(folder), "--store", str(tmp / "store.sqlite"), "--backend", "dataset"]) == 0
    return (["embed", str(folder), "--text", "--captions", str(tmp / "store.sqlite"), "--caption-config", "feedbeef",
             "--text-out", str(tmp / "t.npz")], ["store.sqlite", "'feedbeef' is not in the store"])


@case("stores/caption into a folder")
def _(tmp: Path) -> Case:
    (tmp / "s.sqlite").mkdir()
    folder = dataset_folder(tmp / "ds", captions=True)
    return ["caption", str(folder), "--store", str(tmp / "s.sqlite"), "--backend", "dataset"], ["--store", "folder"]


@case("stores/caption into a store below a file")
def _(tmp: Path) -> Case:
    (tmp / "plain").write_text("x")
    folder = dataset_folder(tmp / "ds", captions=True)
    return (["caption", str(folder), "--store", str(tmp / "plain" / "s.sqlite"), "--backend", "dataset"],
            ["--store", "plain is a file"])


@case("stores/caption into a text file")
def _(tmp: Path) -> Case:
    (tmp / "s.sqlite").write_text("hello")
    folder = dataset_folder(tmp / "ds", captions=True)
    return (["caption", str(folder), "--store", str(tmp / "s.sqlite"), "--backend", "dataset"],
            ["s.sqlite", "not a readable SQLite"])


# ========================================================================================= output paths
@case("output paths/embed --text-out is a folder")
def _(tmp: Path) -> Case:
    (tmp / "outdir").mkdir()
    return ["embed", "virtual:n_train=4,n_test=2", "--text", "--text-out", str(tmp / "outdir")], ["--text-out",
                                                                                                   "is a folder"]


@case("output paths/embed --text-out below a file")
def _(tmp: Path) -> Case:
    (tmp / "plain").write_text("x")
    return (["embed", "virtual:n_train=4,n_test=2", "--text", "--text-out", str(tmp / "plain" / "t.npz")],
            ["--text-out", "is a file"])


@case("output paths/embed --text-out with the wrong suffix")
def _(tmp: Path) -> Case:
    return ["embed", "virtual:n_train=4,n_test=2", "--text", "--text-out", str(tmp / "t.csv")], ["--text-out",
                                                                                                  ".npz"]


@case("output paths/embed --cache is a folder")
def _(tmp: Path) -> Case:
    (tmp / "cachedir").mkdir()
    return (["embed", "virtual:n_train=4,n_test=2", "--images", "--cache", str(tmp / "cachedir")],
            ["--cache", "is a folder"])


@case("output paths/predict --out is a folder")
def _(tmp: Path) -> Case:
    (tmp / "outdir").mkdir()
    return (["predict", "--run", str(tmp / "run"), "--text", "a cat", "--out", str(tmp / "outdir")],
            ["--out", "is a folder"])


@case("output paths/predict an empty text")
def _(tmp: Path) -> Case:
    return ["predict", "--run", str(tmp / "run"), "--text", ""], ["--text", "empty"]


@case("output paths/predict --text-file with a NUL")
def _(tmp: Path) -> Case:
    (tmp / "texts.txt").write_text("a cat\na d\x00og\n")
    return (["predict", "--run", str(tmp / "run"), "--text-file", str(tmp / "texts.txt"), "--out",
             str(tmp / "p.h5")], ["texts.txt", "line 2", "U+0000"])


@case("output paths/predict --text with a control character")
def _(tmp: Path) -> Case:
    return ["predict", "--run", str(tmp / "run"), "--text", "a cat\x07"], ["--text: text 1", "U+0007"]


@case("output paths/predict a blank text")
def _(tmp: Path) -> Case:
    return ["predict", "--run", str(tmp / "run"), "--text", "a cat", "--text", "   "], ["--text", "text 2"]


@case("output paths/train --out in /proc")
def _(tmp: Path) -> Case:
    return ["train", "--config", "demo", "--out", "/proc/llmvem-run"], ["/proc/llmvem-run"]


@case("output paths/train --out below a file")
def _(tmp: Path) -> Case:
    (tmp / "plain").write_text("x")
    return ["train", "--config", "demo", "--out", str(tmp / "plain" / "run")], ["plain"]


@case("output paths/train --out is a file")
def _(tmp: Path) -> Case:
    (tmp / "plain").write_text("x")
    return ["train", "--config", "demo", "--out", str(tmp / "plain")], ["plain"]


@case("output paths/caption --export is a folder")
def _(tmp: Path) -> Case:
    (tmp / "exp.csv").mkdir()
    return (["caption", "virtual:n_train=4,n_test=2", "--store", str(tmp / "s.sqlite"), "--backend", "dataset",
             "--export", str(tmp / "exp.csv")], ["--export", "is a folder"])


@case("output paths/caption --export with the wrong suffix")
def _(tmp: Path) -> Case:
    return (["caption", "virtual:n_train=4,n_test=2", "--store", str(tmp / "s.sqlite"), "--backend", "dataset",
             "--export", str(tmp / "exp.txt")], ["--export", ".csv or .json"])


@case("output paths/cache_dir is a file")
def _(tmp: Path) -> Case:
    (tmp / "plain").write_text("x")
    cfg = write_yaml(tmp / "cfg.yaml", {"cache_dir": str(tmp / "plain"),
                                        "data": {"spec": "virtual", "n_train": 6, "n_test": 3, "image_size": 24}})
    return train(cfg, tmp), ["plain"]


# ========================================================================================= dataset specs
SPECS: dict[str, tuple[str, list[str]]] = {
    "virtual option that is not a number": ("virtual:n_train=abc", ["virtual:n_train=abc", "option n_train",
                                                                    "'abc'", "an integer"]),
    "unknown virtual option": ("virtual:bogus=1", ["unknown option 'bogus'", "n_train"]),
    "virtual option without a value": ("virtual:n_train", ["'n_train'", "key=value"]),
    "virtual seed with a fraction": ("virtual:seed=1.5", ["option seed", "1.5"]),
    "v4 without a session": ("v4:", ["v4:", "v4:ROOT:SESSION"]),
    "v4 root that does not exist": ("v4:/nonexistent/v4root:s1", ["/nonexistent/v4root"]),
    "ten-thousand-character spec": ("d" * 10_000, ["dddd", "chars)"]),
}
for _name, (_spec, _frags) in SPECS.items():
    case(f"dataset specs/{_name}")(lambda tmp, s=_spec, f=_frags: (inspect(s), f))


@case("dataset specs/a file")
def _(tmp: Path) -> Case:
    (tmp / "plain.txt").write_text("x")
    return inspect(tmp / "plain.txt"), ["plain.txt", "not a known layout"]


@case("dataset specs/an empty folder")
def _(tmp: Path) -> Case:
    (tmp / "empty").mkdir()
    return inspect(tmp / "empty"), ["empty", "not a known layout"]


# ========================================================================================= caption flags
def _caption(tmp: Path, *extra: str) -> list[str]:
    return ["caption", "virtual:n_train=4,n_test=2", "--store", str(tmp / "s.sqlite"), *extra]


@case("caption flags/unknown backend")
def _(tmp: Path) -> Case:
    return _caption(tmp, "--backend", "magic"), ["magic"]


@case("caption flags/batch size zero")
def _(tmp: Path) -> Case:
    return _caption(tmp, "--backend", "dataset", "--batch-size", "0"), ["--batch-size 0"]


@case("caption flags/no requests in flight")
def _(tmp: Path) -> Case:
    return _caption(tmp, "--backend", "openai", "--model", "m", "--max-in-flight", "0"), ["max_in_flight=0"]


@case("caption flags/openai without a model")
def _(tmp: Path) -> Case:
    return _caption(tmp, "--backend", "openai"), ["--model"]


@case("caption flags/file backend without a file")
def _(tmp: Path) -> Case:
    return _caption(tmp, "--backend", "file"), ["--captions-file"]


@case("caption flags/dataset and --images together")
def _(tmp: Path) -> Case:
    (tmp / "imgs").mkdir()
    return _caption(tmp, "--backend", "dataset", "--images", str(tmp / "imgs")), ["either a dataset spec or --images"]


@case("caption flags/--images of an empty folder")
def _(tmp: Path) -> Case:
    (tmp / "imgs").mkdir()
    return ["caption", "--images", str(tmp / "imgs"), "--store", str(tmp / "s.sqlite")], ["imgs", "no image files"]


@case("caption flags/--images that does not exist")
def _(tmp: Path) -> Case:
    return ["caption", "--images", str(tmp / "imgs"), "--store", str(tmp / "s.sqlite")], ["imgs", "directory"]


@case("caption flags/connection refused")
def _(tmp: Path) -> Case:
    import socket

    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return (_caption(tmp, "--backend", "openai", "--model", "m", "--base-url", f"http://127.0.0.1:{port}/v1"),
            [f"127.0.0.1:{port}", "cannot connect", "--base-url"])


# =========================================================================================== run folders
@case("run folders/predict from a missing run")
def _(tmp: Path) -> Case:
    return ["predict", "--run", str(tmp / "nope"), "--text", "a cat"], ["nope"]


@case("run folders/predict from an empty folder")
def _(tmp: Path) -> Case:
    (tmp / "run").mkdir()
    return ["predict", "--run", str(tmp / "run"), "--text", "a cat"], ["run"]


@case("run folders/report of a missing run")
def _(tmp: Path) -> Case:
    return ["report", str(tmp / "nope"), "--out", str(tmp / "rep")], ["nope"]


@case("run folders/report of a folder without metrics")
def _(tmp: Path) -> Case:
    (tmp / "run").mkdir()
    return ["report", str(tmp / "run"), "--out", str(tmp / "rep")], ["run", "metrics.json"]


@case("run folders/report with broken metrics.json")
def _(tmp: Path) -> Case:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.json").write_text("{\"models\": ")
    return ["report", str(tmp / "run"), "--out", str(tmp / "rep")], ["metrics.json"]


@case("run folders/report with metrics.json that is a list")
def _(tmp: Path) -> Case:
    (tmp / "run").mkdir()
    (tmp / "run" / "metrics.json").write_text("[1, 2]")
    return ["report", str(tmp / "run"), "--out", str(tmp / "rep")], ["metrics.json"]


@case("run folders/describe with an empty vocabulary")
def _(tmp: Path) -> Case:
    (tmp / "vocab.txt").write_text("# nothing\n\n")
    return ["describe", "--run", str(tmp / "nope"), "--vocabulary", str(tmp / "vocab.txt")], ["nope"]


# ================================================== one validation path: what `config validate` and `train` check
HUGE_CACHE = "/tmp/" + "c" * 1_000_000
TRAIN_CHECKS: dict[str, tuple[str, list[str]]] = {
    "a seed of 2**70": (f"seed={2**70}", ["seed", "less than 9223372036854775808"]),
    "a seed of true": ("seed=true", ["--set 'seed=true'", "valid integer"]),
    "a negative seed": ("data.seed=-1", ["data.seed", "greater than or equal to 0"]),
    "an infinite lambda": ("model.lambda_align=.inf", ["model.lambda_align", "finite number"]),
    "ten million virtual scenes": ("align_data.spec=virtual-scenes:n=10000000",
                                   ["virtual-scenes:n=10000000", "10000000 images", "at most 1000000"]),
    "two million virtual-brain images": ("data.n_train=2000000", ["virtual", "n_train + n_test", "at most 1000000"]),
    "a dataset spec climbing to /etc": ("data.spec=../../../../../../../../etc", ["etc", "not a known layout"]),
    "a dataset spec that is a regular file": ("data.spec=/etc/hostname", ["/etc/hostname", "not a known layout"]),
    "a dataset spec of ~": ("data.spec=~", ["~: dataset", "no such file or folder"]),
    "a megabyte cache_dir": (f"cache_dir={HUGE_CACHE}", ["cache_dir", "ccc...ccc", "File name too long"]),
}
for _name, (_item, _frags) in TRAIN_CHECKS.items():
    case(f"train checks/{_name}")(lambda tmp, i=_item, f=_frags: (train("demo", tmp, "--set", i), f))


@case("train checks/a model folder without config.yaml")
def _(tmp: Path) -> Case:
    (tmp / "run" / "models" / "llmvem_lambda0.1").mkdir(parents=True)
    (tmp / "run" / "models" / "llmvem_lambda0.1" / "model.safetensors").write_bytes(b"x")
    return (["predict", "--run", str(tmp / "run"), "--text", "a cat"],
            ["llmvem_lambda0.1/config.yaml", "missing", "copied incompletely"])


# ============================================================= untrusted run folders (copied from someone else)
def _report(run: Path, tmp: Path) -> list[str]:
    return ["report", str(run), "--out", str(tmp / "rep")]


def _tiny_run(tmp: Path, metrics: dict | str | None = None) -> Path:
    """A run folder holding only ``metrics.json`` (what ``llmvem report`` needs at least)."""
    run = tmp / "run"
    run.mkdir()
    body = metrics if metrics is not None else {"models": {"m": {"mean_r": 0.1}}}
    (run / "metrics.json").write_text(body if isinstance(body, str) else json.dumps(body))
    return run


def _subject_run(tmp: Path) -> tuple[Path, Path]:
    """An Algonauts subject folder and a run folder for it with challenge predictions (fake_runs)."""
    from fake_runs import make_subject_run

    subj = make_subject(tmp / "alg")["subj"]
    return make_subject_run(tmp / "runs", subj), subj


def _export(run: Path, subj: Path, tmp: Path, *extra: str) -> list[str]:
    return ["export", str(run), "--subject-dir", str(subj), "--out", str(tmp / "sub"), *extra]


def _rename_model(run: Path, old: str, new: str) -> None:
    """Give model ``old`` the name ``new`` in metrics.json and voxel_metrics.npz (as a tampered copy would)."""
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["models"][new] = metrics["models"].pop(old)
    (run / "metrics.json").write_text(json.dumps(metrics))
    with np.load(run / "voxel_metrics.npz") as z:
        arrays = {k.replace(f"__{old}", f"__{new}") if k.endswith(f"__{old}") else k: z[k] for k in z.files}
    np.savez(run / "voxel_metrics.npz", **arrays)


RUN_NAMES: dict[str, tuple[str, list[str]]] = {
    "a model name that climbs out of --out": ("../../../esc", ["metrics.json", "models.'../../../esc'",
                                                               "one path component"]),
    "an absolute model name": ("/tmp/llmvem-esc", ["metrics.json", "'/tmp/llmvem-esc'", "cannot be a file name"]),
    "a model name of two dots": ("..", ["metrics.json", "models.'..'", "cannot be a file name"]),
    "a model name with a newline": ("ridge\nx", ["metrics.json", "'ridge\\nx'", "control characters"]),
    "a model name of 10,000 characters": ("m" * 10_000, ["metrics.json", "cannot be a file name", "mmm...mmm"]),
}
for _name, (_model, _frags) in RUN_NAMES.items():
    def _make(tmp: Path, m: str = _model) -> list[str]:
        run, subj = _subject_run(tmp)
        _rename_model(run, "llmvem_lambda0", m)
        return _export(run, subj, tmp, "--model", "ridge")
    case(f"run folders/export with {_name}")(lambda tmp, mk=_make, f=_frags: (mk(tmp), f))


@case("run folders/report with an ROI name holding a slash")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp, {"models": {"m": {"mean_r": 0.1, "per_roi": {"V1/../../x": {"mean_r": 0.2}}}}})
    return _report(run, tmp), ["metrics.json", "per_roi.'V1/../../x'", "cannot be a file name"]


@case("run folders/report with an r of Infinity")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp, '{"models": {"m": {"mean_r": Infinity}}}')
    return _report(run, tmp), ["metrics.json", "models.m.mean_r", "inf", "finite number in [-1, 1]"]


@case("run folders/report with an r of 1e308")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp, '{"models": {"m": {"mean_r": 0.1, "val_mean_r": 1e308}}}')
    return _report(run, tmp), ["metrics.json", "models.m.val_mean_r", "1e+308", "[-1, 1]"]


@case("run folders/report with a p-value above one")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp, {"models": {"a": {"mean_r": 0.1}, "b": {"mean_r": 0.2}},
                          "comparisons": [{"a": "a", "b": "b", "diff": 0.1, "ci_low": 0, "ci_high": 0.2,
                                           "p_value": 7}]})
    return _report(run, tmp), ["metrics.json", "comparisons[0].p_value", "[0, 1]"]


@case("run folders/report with metrics.json nested 100,000 deep")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp, '{"models": {"m": {"mean_r": 0.1}}, "timing": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return _report(run, tmp), ["metrics.json", "nesting", "deeper than 32 levels"]


@case("run folders/report with a 100 MB metrics.json")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp)
    with open(run / "metrics.json", "r+b") as fh:
        fh.truncate(100 * 2**20)  # sparse: costs no disk, and is refused before it is read
    return _report(run, tmp), ["metrics.json", "104857600 bytes", "at most 67108864"]


@case("run folders/report with a voxel r of Infinity")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp)
    np.savez(run / "voxel_metrics.npz", r__m=np.array([0.1, np.inf, 0.2]))
    return _report(run, tmp), ["voxel_metrics.npz", "r__m", "voxel 1 is inf"]


@case("run folders/report with an extra section of unknown kind")
def _(tmp: Path) -> Case:
    run = _tiny_run(tmp)
    (run / "extra_sections").mkdir()
    (run / "extra_sections" / "x.json").write_text(json.dumps({"title": "t", "blocks": [{"kind": "html",
                                                                                          "text": "<b>"}]}))
    return _report(run, tmp), ["x.json", "blocks[0]", "'html'", "paragraph"]


@case("run folders/export of pickled challenge predictions")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    pred = run / "models" / "llmvem_lambda0" / "predictions_challenge_test.npy"
    np.save(pred, np.array([{"x": 1}] * 3, dtype=object), allow_pickle=True)
    return _export(run, subj, tmp), ["predictions_challenge_test.npy", "Python objects (pickle)"]


@case("run folders/report of pickled test predictions")
def _(tmp: Path) -> Case:
    run, _ = _subject_run(tmp)
    np.save(run / "models" / "ridge" / "predictions_test.npy", np.array([[{"x": 1}]], dtype=object),
            allow_pickle=True)
    return _report(run, tmp), ["predictions_test.npy", "Python objects (pickle)"]


# ================================================================================ export: nothing half-made
@case("export/a negative --n-boot")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    return _export(run, subj, tmp, "--n-boot", "-1"), ["--n-boot -1", "positive number"]


@case("export/a folder where rh_pred_test.npy goes")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    (tmp / "sub" / "subj01" / "rh_pred_test.npy").mkdir(parents=True)  # made before the run: not "left behind"
    return _export(run, subj, tmp), ["sub/subj01/rh_pred_test.npy", "is a folder"]


@case("export/--out is a file")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    (tmp / "sub").write_text("x")
    return _export(run, subj, tmp), ["sub", "is not a folder"]


@case("export/fewer --subject-dir than runs")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    return ["export", str(run), str(run), "--subject-dir", str(subj), "--out", str(tmp / "sub")], [
        "--subject-dir given 1 times for 2 runs"]


@case("export/an unknown --model")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    return _export(run, subj, tmp, "--model", "nope"), ["metrics.json", "no model 'nope'"]


@case("export/a run folder without challenge ids")
def _(tmp: Path) -> Case:
    run, subj = _subject_run(tmp)
    (run / "challenge_test_ids.json").unlink()
    return _export(run, subj, tmp), ["challenge_test_ids.json", "missing"]


# =========================================================================================== model files
def _model(tmp: Path, *extra: str) -> list[str]:
    return embed_images(dataset_folder(tmp / "ds"), tmp, *extra)


@case("model files/weights that are text")
def _(tmp: Path) -> Case:
    (tmp / "w.safetensors").write_text("not weights")
    return _model(tmp, "--weights", str(tmp / "w.safetensors")), ["w.safetensors"]


@case("model files/weights that are a folder")
def _(tmp: Path) -> Case:
    (tmp / "w.safetensors").mkdir()
    return _model(tmp, "--weights", str(tmp / "w.safetensors")), ["w.safetensors"]


@case("model files/missing Hugging Face folder")
def _(tmp: Path) -> Case:
    args = _model(tmp)
    args[args.index("--backbone") + 1] = f"hf:{tmp / 'no_model'}"
    return args, ["no_model"]


@case("model files/unknown timm model")
def _(tmp: Path) -> Case:
    args = _model(tmp)
    args[args.index("--backbone") + 1] = "timm:no_such_net_xyz"
    return args, ["no_such_net_xyz"]


@case("model files/unknown backbone kind")
def _(tmp: Path) -> Case:
    args = _model(tmp)
    args[args.index("--backbone") + 1] = "resnet9000"
    return args, ["resnet9000"]


@case("model files/unknown layer")
def _(tmp: Path) -> Case:
    return _model(tmp, "--layers", "pooled,block99"), ["block99"]


@case("model files/unknown feature dtype")
def _(tmp: Path) -> Case:
    return _model(tmp, "--dtype", "float8"), ["float8"]


@case("model files/missing CLIP text encoder")
def _(tmp: Path) -> Case:
    folder = dataset_folder(tmp / "ds", captions=True)
    return (["embed", str(folder), "--text", "--text-encoder", f"clip:{tmp / 'no_clip'}", "--text-out",
             str(tmp / "t.npz")], ["no_clip"])


# ================================================================================================ runner
#: Not output: the feature cache's (empty) lock file, and the index files SQLite leaves beside a WAL-mode store
#: that a read-only connection opened.
_INFRASTRUCTURE = {"case/features.h5.lock", "case/store.sqlite-wal", "case/store.sqlite-shm"}


def _tree(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def test_the_harness_has_at_least_100_cases():
    assert len(CASES) >= 100
    families = {name.split("/")[0] for name in CASES}
    assert families >= {"configs", "overrides", "images", "folders", "responses", "caption files", "stores",
                        "output paths", "dataset specs", "caption flags", "run folders", "model files"}


@pytest.mark.parametrize("name", list(CASES))
def test_bad_input_gives_one_bounded_line_naming_the_culprit_and_leaves_nothing(name, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("LLMVEM_NO_PROGRESS", "1")
    monkeypatch.delenv("LLMVEM_MAX_IMAGE_PIXELS", raising=False)
    work = tmp_path / "case"
    work.mkdir()
    try:
        args, fragments = CASES[name](work)
        before = _tree(tmp_path)
        capsys.readouterr()
        rc = main(args)
        err = capsys.readouterr().err
    finally:
        os.environ.pop("LLMVEM_MAX_IMAGE_PIXELS", None)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == 2, err[-3000:]
    assert len(lines) == 1 and lines[0].startswith("llmvem: error: "), err[-3000:]
    assert len(lines[0]) <= len("llmvem: error: ") + MAX_MESSAGE + 50
    for fragment in fragments:
        assert fragment in lines[0], f"{fragment!r} not in {lines[0]!r}"
    allowed = {f"case/{p}" for p in ALLOWED[name]} | _INFRASTRUCTURE
    left = _tree(tmp_path) - before - allowed
    assert not left, f"left behind: {sorted(left)}"


# ====================================================================== cases that succeed and stay safe
SCRIPT = "<script>alert('run folder')</script>"


def test_html_from_a_run_folder_reaches_the_report_escaped(tmp_path, capsys):
    """A copied run folder's sections are data: no tag or attribute of theirs reaches index.html."""
    run = _tiny_run(tmp_path, {"models": {"m<img src=x onerror=alert(0)>": {"mean_r": 0.1, "label": SCRIPT}}})
    (run / "extra_sections").mkdir()
    (run / "extra_sections" / "a.json").write_text(json.dumps({"title": f"A {SCRIPT}", "blocks": [
        {"kind": "paragraph", "text": f"text {SCRIPT}"}, {"kind": "note", "text": "<img src=x onerror=alert(1)>"},
        {"kind": "table", "header": [SCRIPT, "r"], "rows": [["<b onclick=alert(2)>V1</b>", 0.5]]}]}))
    # written by an older llmvem as HTML: only its text is kept
    (run / "extra_sections" / "b.json").write_text(json.dumps({"title": "Old", "html": (
        f"<p onclick='alert(3)'>kept text</p>{SCRIPT}<iframe src='http://evil'></iframe>"
        "<table><tr><th>ROI</th></tr><tr><td><a href='javascript:alert(4)'>V2</a></td></tr></table>")}))
    assert main(["report", str(run), "--out", str(tmp_path / "rep")]) == 0, capsys.readouterr().err
    page = (tmp_path / "rep" / "index.html").read_text(encoding="utf-8")
    from html.parser import HTMLParser

    class Tags(HTMLParser):  # what a browser would build: the elements and attributes of the page
        def __init__(self) -> None:
            super().__init__()
            self.tags: set[str] = set()
            self.attrs: list[tuple[str, str]] = []

        def handle_starttag(self, tag, attrs):
            self.tags.add(tag)
            self.attrs += [(k, v or "") for k, v in attrs]

    found = Tags()
    found.feed(page)
    assert not found.tags & {"script", "iframe", "object", "embed"}, found.tags
    assert not [k for k, _ in found.attrs if k.startswith("on")]
    assert not [v for _, v in found.attrs if "javascript:" in v.lower() or "evil" in v]
    assert "text &lt;script&gt;alert(&#x27;run folder&#x27;)&lt;/script&gt;" in page
    assert "kept text" in page and ">V2</td>" in page and "alert(3)" not in page


def test_written_files_follow_the_umask(tmp_path, capsys):
    """Under umask 022 every file export and report write is 0644 and every folder 0755 (mkstemp's 0600 and
    mkdtemp's 0700 would hide a submission or a report from the group); checkpoints and JSON too."""
    from llmvem.train.checkpoint import save_weights
    from llmvem.utils import write_json

    old = os.umask(0o022)
    try:
        run, subj = _subject_run(tmp_path)
        assert main(_export(run, subj, tmp_path, "--n-boot", "20")) == 0, capsys.readouterr().err
        assert main(_report(run, tmp_path)) == 0, capsys.readouterr().err
        import torch

        save_weights(tmp_path / "ckpt" / "model.safetensors", {"w": torch.zeros(2)})
        write_json(tmp_path / "ckpt" / "latest.json", {"epoch": 1})
    finally:
        os.umask(old)
    written = [*(tmp_path / "sub").rglob("*"), *(tmp_path / "rep").rglob("*"), *(tmp_path / "ckpt").rglob("*")]
    modes = {p: p.stat().st_mode & 0o777 for p in written}
    assert (tmp_path / "sub" / "results.csv") in modes and (tmp_path / "rep" / "index.html") in modes
    assert oct((tmp_path / "sub").stat().st_mode & 0o777) == oct(0o755)
    wrong = {str(p): oct(m) for p, m in modes.items() if m != (0o755 if p.is_dir() else 0o644)}
    assert not wrong


#: ``--set`` overrides of the demo config and whether training may start with them.
AGREEMENT: list[tuple[list[str], bool]] = [
    ([], True),
    (["data.spec=virtual:n_train=200,n_test=50"], True),
    (["data.spec=../../../../../../../../etc"], False),
    (["data.spec=/etc/hostname"], False),
    (["data.spec=~"], False),
    (["data.spec=virtual:bogus=1"], False),
    (["data.image_size=64"], False),
    (["data.image_size=48"], True),
    (["data.n_train=2000000"], False),
    (["data.loader_options.n_repeats=0"], False),
    (["model.lambda_align=.inf"], False),
    (["model.lambda_align=1e300"], True),
    (["train.stage1.lr=.nan"], False),
    ([f"seed={2**70}"], False),
    ([f"seed={2**63 - 1}"], True),
    (["seed=true"], False),
    (["captions.shuffle_seed=-3"], False),
    (["align_data.spec=virtual-scenes:n=10000000"], False),
    (["align_data.spec=virtual-scenes:n=10000000", "align_data.max_images=50"], True),
    (["align_data.spec=virtual-scenes:n=50"], True),
    (["align_data.spec=virtual-scenes:n=abc"], False),
    ([f"cache_dir=/tmp/{'c' * 5000}"], False),
    (["backbone.weights=/nonexistent/w.safetensors"], False),
    (["captions.backend=file"], False),
    (["text.encoder=st:./no/such/model"], False),
]


def test_config_validate_gives_the_answer_train_gives(tmp_path, capsys, monkeypatch):
    """``config validate`` and ``train`` run one validation path: on every row both accept, or both refuse with
    the same line; ``train`` refuses before its first expensive step (nothing written to --out)."""
    import llmvem.cli.train as train_cli

    started: list[str] = []  # train's first expensive step, replaced: the table is about what happens before it
    monkeypatch.setattr(train_cli, "_train_experiment", lambda cfg, out, *a: started.append(str(out)))
    monkeypatch.chdir(tmp_path)
    for k, (overrides, ok) in enumerate(AGREEMENT):
        sets = [x for item in overrides for x in ("--set", item)]
        capsys.readouterr()
        rc_validate = main(["config", "validate", "demo", *sets])
        err_validate = capsys.readouterr().err.strip()
        rc_train = main(["train", "--config", "demo", "--out", str(tmp_path / f"run{k}"), *sets])
        err_train = capsys.readouterr().err.strip()
        assert (rc_validate, rc_train) == ((0, 0) if ok else (2, 2)), (overrides, err_validate, err_train)
        assert err_validate == err_train, overrides
        assert bool(started and started[-1].endswith(f"run{k}")) == ok, overrides
        assert not (tmp_path / f"run{k}").exists(), overrides
