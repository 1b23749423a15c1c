"""Checkpoints that never need unpickling: tensors in safetensors files, everything else in JSON.

A checkpoint is a folder ``checkpoints/<name>/`` holding

* ``model.safetensors`` — network weights (the frozen backbone is left out in stage 1; it is rebuilt from its
  own weights on resume);
* ``optimizer.safetensors`` + ``optimizer.json`` — AdamW moment tensors / parameter groups and scalars;
* ``rng_rank<R>.safetensors`` + ``rng_rank<R>.json`` — torch (CPU, CUDA), NumPy and Python generator states of
  each process;
* ``state.json`` — stage, epoch, step, best validation score, early-stopping counter, config hash.

``checkpoints/latest.json`` names the newest complete checkpoint; it is replaced atomically after every file of
the new checkpoint is written, so a crash while saving leaves the previous checkpoint usable. The best weights
of each stage live in ``checkpoints/best_stage<S>.safetensors``.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from llmvem.errors import CheckpointError
from llmvem.train.distributed import DistInfo, barrier
from llmvem.utils import atomic_write, follow_umask, write_json

__all__ = [
    "CheckpointManager",
    "capture_rng_state",
    "load_weights",
    "optimizer_state_from_safe",
    "optimizer_state_to_safe",
    "restore_rng_state",
    "save_weights",
]


def _safe_tensors(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CPU, contiguous tensors that share no memory (safetensors refuses shared ones): a tensor that already owns
    its whole storage alone is written as it is, the others are copied (a 0.3 GB PCA basis is not duplicated at
    every checkpoint)."""
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for k, v in state.items():
        t = v.detach().to("cpu").contiguous()
        storage = t.untyped_storage()
        if storage.data_ptr() in seen or storage.nbytes() != t.numel() * t.element_size() or t.storage_offset():
            t = t.clone()
        seen.add(t.untyped_storage().data_ptr())
        out[k] = t
    return out


def save_weights(path: str | Path, state: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> None:
    """Write tensors to a safetensors file atomically (temporary file, then rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    save_file(_safe_tensors(state), str(tmp), metadata=metadata or {})
    follow_umask(tmp)  # readable as open() would make it, whatever the writer's default
    tmp.replace(path)


def load_weights(path: str | Path, device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Read a safetensors file (no code execution). Raises :class:`CheckpointError` naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: checkpoint file is missing")
    try:
        return load_file(str(path), device=str(device))
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a readable safetensors file ({exc})") from exc


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{path}: cannot read checkpoint metadata ({exc})") from exc


# -------------------------------------------------------------------------------------------- optimizer
def optimizer_state_to_safe(state_dict: dict[str, Any]) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split ``optimizer.state_dict()`` into tensors (``state.<param>.<name>``) and a JSON-able rest."""
    tensors: dict[str, torch.Tensor] = {}
    scalars: dict[str, dict[str, Any]] = {}
    for pid, st in state_dict["state"].items():
        for name, value in st.items():
            if torch.is_tensor(value):
                tensors[f"state.{pid}.{name}"] = value
            else:
                scalars.setdefault(str(pid), {})[name] = value
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in state_dict["param_groups"]]
    return tensors, {"param_groups": groups, "scalars": scalars}


def optimizer_state_from_safe(tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`optimizer_state_to_safe`."""
    state: dict[int, dict[str, Any]] = {}
    for key, value in tensors.items():
        _, pid, name = key.split(".", 2)
        state.setdefault(int(pid), {})[name] = value
    for pid, extra in meta.get("scalars", {}).items():
        state.setdefault(int(pid), {}).update(extra)
    groups = []
    for g in meta["param_groups"]:
        g = dict(g)
        if "betas" in g and isinstance(g["betas"], list):
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    return {"state": state, "param_groups": groups}


# -------------------------------------------------------------------------------------------------- RNG
def capture_rng_state(device: torch.device | None = None) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Generator states of torch (CPU and, if used, CUDA), NumPy and Python, as tensors + JSON."""
    tensors = {"torch_cpu": torch.get_rng_state()}
    if device is not None and device.type == "cuda":
        tensors["torch_cuda"] = torch.cuda.get_rng_state(device)
    np_state = np.random.get_state()  # noqa: NPY002 - the legacy global state is what third-party code draws from
    tensors["numpy_keys"] = torch.from_numpy(np.asarray(np_state[1], dtype=np.int64))
    py_version, py_internal, py_gauss = random.getstate()
    meta = {"numpy": {"name": np_state[0], "pos": int(np_state[2]), "has_gauss": int(np_state[3]),
                      "cached_gaussian": float(np_state[4])},
            "python": {"version": py_version, "internal": list(py_internal), "gauss_next": py_gauss}}
    return tensors, meta


def restore_rng_state(tensors: dict[str, torch.Tensor], meta: dict[str, Any], device: torch.device | None = None) -> None:
    """Inverse of :func:`capture_rng_state`."""
    torch.set_rng_state(tensors["torch_cpu"].to(torch.uint8))
    if device is not None and device.type == "cuda" and "torch_cuda" in tensors:
        torch.cuda.set_rng_state(tensors["torch_cuda"].to(torch.uint8), device)
    n = meta["numpy"]
    keys = tensors["numpy_keys"].numpy().astype(np.uint32)
    np.random.set_state((n["name"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))  # noqa: NPY002
    p = meta["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))


# --------------------------------------------------------------------------------------------- manager
class CheckpointManager:
    """Writes and reads the checkpoints of one run folder (see module docstring).

    Parameters
    ----------
    folder : Path
        ``<run>/checkpoints``.
    info : DistInfo
        Every process calls :meth:`save`; rank 0 writes the shared files, each rank its RNG state.
    config_hash : str
        Hash of the configuration that trains; a checkpoint written under another hash is refused.
    """

    def __init__(self, folder: str | Path, info: DistInfo, config_hash: str):
        self.folder = Path(folder)
        self.info = info
        self.config_hash = config_hash

    @property
    def pointer(self) -> Path:
        return self.folder / "latest.json"

    def latest(self) -> Path | None:
        """Folder of the newest complete checkpoint, or None."""
        if not self.pointer.is_file():
            return None
        name = _read_json(self.pointer).get("dir")
        path = self.folder / str(name)
        if not (path / "state.json").is_file():
            raise CheckpointError(f"{self.pointer}: points at {path}, which is not a complete checkpoint")
        return path

    def save(self, name: str, model_state: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer | None,
             trainer_state: dict[str, Any]) -> Path:
        """Write checkpoint ``name`` (collective: every process must call it) and make it the latest."""
        path = self.folder / name
        if self.info.is_main:
            if path.exists():
                shutil.rmtree(path)
            path.mkdir(parents=True)
        barrier(self.info)
        rng_t, rng_m = capture_rng_state(self.info.device)
        save_weights(path / f"rng_rank{self.info.rank}.safetensors", rng_t)
        write_json(path / f"rng_rank{self.info.rank}.json", rng_m)
        if self.info.is_main:
            save_weights(path / "model.safetensors", model_state, {"config_hash": self.config_hash})
            if optimizer is not None:
                opt_t, opt_m = optimizer_state_to_safe(optimizer.state_dict())
                if opt_t:  # an optimizer that has not stepped yet has no tensors
                    save_weights(path / "optimizer.safetensors", opt_t)
                write_json(path / "optimizer.json", opt_m)
        barrier(self.info)
        if self.info.is_main:
            write_json(path / "state.json", {**trainer_state, "config_hash": self.config_hash,
                                             "world_size": self.info.world_size})
            with atomic_write(self.pointer) as fh:
                json.dump({"dir": name}, fh)
            for old in self.folder.iterdir():
                if old.is_dir() and old.name != name:
                    shutil.rmtree(old)
        barrier(self.info)
        return path

    def load(self, path: Path, device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, Any] | None,
                                                              dict[str, Any]]:
        """Read checkpoint ``path``: (model state, optimizer state dict or None, trainer state).

        Restores this process's RNG state as a side effect. Raises :class:`CheckpointError` when the checkpoint
        was written under another configuration hash.
        """
        state = _read_json(path / "state.json")
        if state.get("config_hash") != self.config_hash:
            raise CheckpointError(
                f"{path}: checkpoint was written by configuration {state.get('config_hash')!r}, but this run's "
                f"configuration is {self.config_hash!r}; start a new run folder or pass overwrite")
        model_state = load_weights(path / "model.safetensors", device)
        opt_state = None
        if (path / "optimizer.json").is_file():
            opt_file = path / "optimizer.safetensors"
            opt_state = optimizer_state_from_safe(load_weights(opt_file, device) if opt_file.is_file() else {},
                                                  _read_json(path / "optimizer.json"))
        rng_file = path / f"rng_rank{self.info.rank}.safetensors"
        if rng_file.is_file() and state.get("world_size", 1) == self.info.world_size:
            restore_rng_state(load_weights(rng_file), _read_json(path / f"rng_rank{self.info.rank}.json"),
                              self.info.device)
        return model_state, opt_state, state

    def best_path(self, stage: int, key: str | None = None) -> Path:
        """File of the best weights of ``stage`` (of data key ``key`` with per-key selection)."""
        return self.folder / (f"best_stage{stage}.safetensors" if key is None
                              else f"best_stage{stage}_key_{key}.safetensors")

    def save_best(self, stage: int, model_state: dict[str, torch.Tensor], key: str | None = None) -> None:
        """Write the best weights of ``stage`` (of data key ``key``) (rank 0 only)."""
        if self.info.is_main:
            save_weights(self.best_path(stage, key), model_state, {"config_hash": self.config_hash})
