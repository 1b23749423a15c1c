"""An in-memory cache of a frozen backbone trunk's output, so image-mode forwards run only the trainable tail.

Stage 2 fine-tunes the last ``train.stage2.unfreeze_last_n`` block groups of the backbone; the groups before them
(the *trunk*) are frozen and in eval mode, so their output for an image is the same at every epoch, in every model
that starts from the same backbone (the λ = 0 and λ > 0 fits of one experiment), and when a trained model later
predicts or gives its aligned embeddings (:func:`llmvem.explain.text_to_brain.aligned_image_outputs`). With a
backbone that can split its forward (:attr:`~llmvem.embed.base.ImageBackbone.supports_trunk`: EfficientNet-Lite0;
timm and transformers backbones always run whole), :func:`cached_backbone_features` computes the trunk once per
image and runs only the tail on the cached hidden state; the tail's gradients are the ones of the full forward
(nothing before it is trained).

The cache is used only where that is exact: every trunk module in eval mode (no dropout or drop-connect, frozen
BatchNorm statistics), no trunk parameter that requires a gradient while gradients are recorded, not inside
``torch.compile``, and not for augmented training batches (the engine suspends it there,
:func:`trunk_cache_suspended`). Entries are keyed by the image's bytes (a BLAKE2 digest of the uint8 pixels, so an
augmented or different image never matches) and by the trunk's identity: a digest of its weights and buffers, the
split point, the preprocessing (input size, mean, std), the requested in-trunk layers, the memory format, the
device and the autocast dtype. A trunk whose weights change gets a new identity, so a stale entry is never read.

Memory: entries are kept while they fit the byte budget (``DEFAULT_BUDGET_BYTES``, 512 MiB: at 224 px the
EfficientNet-Lite0 trunk before stage 5 is 80 × 14 × 14 float32 ≈ 63 KB per image, so about 8,500 images — the
600 demo images take 38 MB, a 9,841-image NSD subject would fill it and its remaining images run the full forward).
Nothing is evicted; above the budget new images take the full forward (identical results, no saving).

On disk: :func:`llmvem.pipeline.run_experiment` (``llmvem demo``, ``llmvem run``) loads the process-wide cache
from ``<cache_dir>/trunk_cache.h5`` before its models train and writes it back after them when it grew, so a
rerun on a warm cache skips the trunk altogether; the file holds at most the budget and is ignored under another
torch version.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from torch import nn

from llmvem.embed.base import ImageBackbone

__all__ = ["DEFAULT_BUDGET_BYTES", "TRUNK_CACHE_FILE", "TrunkCache", "attach_trunk_cache", "cached_backbone_features", "frozen_trunk_groups",
           "shared_trunk_cache", "trunk_cache_suspended"]

#: Default byte budget of the process-wide cache (:func:`shared_trunk_cache`).
DEFAULT_BUDGET_BYTES = 512 * 2**20
#: Name of the file in the cache folder (``cache_dir``) that :func:`llmvem.pipeline.run_experiment` keeps the
#: process-wide cache in between runs (:meth:`TrunkCache.save` / :meth:`TrunkCache.load`).
TRUNK_CACHE_FILE = "trunk_cache.h5"

_Entry = tuple[torch.Tensor, dict[str, torch.Tensor]]
_FILE_FORMAT = 1  # of TrunkCache.save files; bumped when the trunk code may change outputs


def _is_channels_last(hidden: torch.Tensor) -> bool:
    """Whether one image's map (C, H, W) is laid out channels last (channel stride 1)."""
    return hidden.ndim == 3 and hidden.shape[0] > 1 and hidden.stride(0) == 1


def _context_from_json(text: str) -> tuple:
    """A context tuple from its JSON list (nested lists back to tuples, as :func:`cached_backbone_features` keys)."""
    return tuple(tuple(v) if isinstance(v, list) else v for v in json.loads(text))


class TrunkCache:
    """Trunk outputs of single images, by (trunk identity, image digest), within a byte budget.

    Parameters
    ----------
    max_bytes : int
        Budget for the stored tensors; 0 turns the cache off (every forward runs whole).

    Attributes
    ----------
    hits, misses : int
        Images whose trunk output was read from the cache / computed.
    stored_bytes : int
    refused : int
        Images not stored because the budget was full.
    """

    def __init__(self, max_bytes: int = DEFAULT_BUDGET_BYTES):
        self.max_bytes = int(max_bytes)
        self._entries: dict[tuple, _Entry] = {}
        self.hits = self.misses = self.stored_bytes = self.refused = 0
        self.added = 0  # entries stored since the last save or load (what save would add to the file)

    def __len__(self) -> int:
        return len(self._entries)

    def __deepcopy__(self, memo: dict) -> TrunkCache:  # a process-wide resource: copies of a network share it
        return self

    @property
    def full(self) -> bool:
        """Whether an image was refused for lack of room (then forwards without hits run whole)."""
        return self.refused > 0

    def clear(self) -> None:
        """Drop every entry and reset the counters."""
        self._entries.clear()
        self.hits = self.misses = self.stored_bytes = self.refused = self.added = 0

    def get(self, key: tuple) -> _Entry | None:
        return self._entries.get(key)

    def put(self, key: tuple, hidden: torch.Tensor, taps: Mapping[str, torch.Tensor]) -> bool:
        """Store one image's trunk output (copied, detached); False when it does not fit the budget."""
        size = hidden.numel() * hidden.element_size() + sum(t.numel() * t.element_size() for t in taps.values())
        if self.stored_bytes + size > self.max_bytes:
            self.refused += 1
            return False
        self._entries[key] = (hidden.detach().clone(), {k: v.detach().clone() for k, v in taps.items()})
        self.stored_bytes += size
        self.added += 1
        return True

    # ------------------------------------------------------------------------------------- on disk
    def save(self, path: str | Path) -> int:
        """Write the CPU entries to the HDF5 file ``path`` (replaced atomically); returns the entries written.

        One group per trunk context (identity, layers, layout, dtype), with the image digests (n, 16) uint8, the
        hidden states (n, C, H, W) and each in-trunk layer (n, ...). The file records the format version and the
        torch version; :meth:`load` ignores a file written under others (kernels, and so last bits, may differ).
        """
        import h5py
        import numpy as np

        path = Path(path)
        groups: dict[tuple, list[tuple[bytes, _Entry]]] = {}
        for key, entry in self._entries.items():
            context, digest = key[:-1], key[-1]
            if context[3] != "cpu":
                continue
            groups.setdefault((*context, _is_channels_last(entry[0])), []).append((digest, entry))
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        written = 0
        try:
            with h5py.File(tmp, "w") as f:
                f.attrs["format"] = _FILE_FORMAT
                f.attrs["torch"] = str(torch.__version__)
                for i, (gkey, rows) in enumerate(groups.items()):
                    grp = f.create_group(f"context{i}")
                    grp.attrs["context"] = json.dumps(list(gkey[:-1]))
                    grp.attrs["channels_last"] = bool(gkey[-1])
                    grp.create_dataset("digests", data=np.frombuffer(b"".join(d for d, _ in rows), dtype=np.uint8)
                                       .reshape(len(rows), -1))
                    grp.create_dataset("hidden", data=torch.stack([e[0] for _, e in rows]).contiguous().numpy())
                    for name in rows[0][1][1]:
                        grp.create_dataset(f"taps/{name}", data=torch.stack([e[1][name] for _, e in rows]).numpy())
                    written += len(rows)
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        self.added = 0
        return written

    def load(self, path: str | Path) -> int:
        """Add the entries of a file written by :meth:`save` (within the budget); returns the entries added. A
        missing file, or one of another format or torch version, adds nothing; an unreadable one is warned about
        and ignored (it is rewritten by the next :meth:`save`)."""
        import h5py

        path = Path(path)
        if not path.is_file() or self.max_bytes <= 0:
            return 0
        added = 0
        try:
            with h5py.File(path, "r") as f:
                if f.attrs.get("format") != _FILE_FORMAT or f.attrs.get("torch") != str(torch.__version__):
                    return 0
                for grp in f.values():
                    context = _context_from_json(grp.attrs["context"])
                    digests = grp["digests"][()]
                    hidden = torch.from_numpy(grp["hidden"][()])
                    if grp.attrs["channels_last"]:
                        hidden = hidden.contiguous(memory_format=torch.channels_last)
                    taps = {name: torch.from_numpy(ds[()]) for name, ds in grp.get("taps", {}).items()}
                    for i in range(len(digests)):
                        key = (*context, bytes(digests[i]))
                        if key in self._entries:
                            continue
                        if not self.put(key, hidden[i], {k: v[i] for k, v in taps.items()}):
                            return added
                        added += 1
        except (OSError, KeyError, ValueError, TypeError) as exc:
            warnings.warn(f"{path}: unreadable trunk cache ({type(exc).__name__}: {exc}); ignoring it, it is "
                          "rewritten after this run", stacklevel=2)
        finally:
            self.added -= added  # entries from the file need no saving
        return added

    def stats(self) -> dict[str, Any]:
        """Counters and size, for logs and benchmarks."""
        return {"entries": len(self), "hits": self.hits, "misses": self.misses, "stored_bytes": self.stored_bytes,
                "refused": self.refused, "max_bytes": self.max_bytes}


_SHARED: TrunkCache | None = None


def shared_trunk_cache(budget_bytes: int | None = None) -> TrunkCache:
    """The process-wide cache: the trainer and the model loader give it to every network, so the fits of one
    experiment and the explanations after them share the trunk outputs.

    ``budget_bytes`` (``train.trunk_cache_mib``), when given, becomes its budget: the config of the run at hand
    decides. Entries already stored stay (nothing is evicted); above a lowered budget new images are refused."""
    global _SHARED
    if _SHARED is None:
        _SHARED = TrunkCache()
    if budget_bytes is not None:
        _SHARED.max_bytes = max(int(budget_bytes), 0)
    return _SHARED


def frozen_trunk_groups(backbone: ImageBackbone | None, unfreeze_last_n: int) -> int:
    """Leading block groups that stage 2 leaves frozen (``len(blocks()) - unfreeze_last_n``), or 0 when the
    backbone cannot split its forward or nothing stays frozen."""
    if backbone is None or not backbone.supports_trunk:
        return 0
    return max(len(backbone.blocks()) - max(int(unfreeze_last_n), 0), 0)


@contextmanager
def trunk_cache_suspended(network: nn.Module) -> Iterator[None]:
    """Forwards of ``network`` (an :class:`~llmvem.model.LLMVEM`) inside the block run the backbone whole
    (augmented training images would only fill the cache)."""
    saved = getattr(network, "trunk_cache", None)
    network.trunk_cache = None
    try:
        yield
    finally:
        network.trunk_cache = saved


def _trunk_modules(backbone: ImageBackbone, n_groups: int) -> list[nn.Module]:
    return list(backbone.blocks()[:n_groups])


def _exact(backbone: ImageBackbone, n_groups: int) -> bool:
    """Whether the trunk's output is a pure function of the image (eval mode, nothing trained through it)."""
    if not backbone.supports_trunk or not 1 <= n_groups <= len(backbone.blocks()):
        return False
    if torch.compiler.is_compiling():
        return False
    trunk = _trunk_modules(backbone, n_groups)
    owned = {id(m) for m in backbone.modules()}  # a group may be a view outside the module tree (its own flag)
    if any(m.training for g in trunk for m in g.modules() if id(m) in owned):
        return False
    return not (torch.is_grad_enabled() and any(p.requires_grad for g in trunk for p in g.parameters()))


def _trunk_identity(backbone: ImageBackbone, n_groups: int) -> str:
    """Digest of what the trunk computes: class, preprocessing, split point, weights and buffers (memoised on the
    backbone while no trunk tensor is replaced or modified in place)."""
    tensors = [t for g in _trunk_modules(backbone, n_groups) for t in (*g.parameters(), *g.buffers())]
    stamp = (n_groups, tuple((id(t), t.data_ptr(), t._version) for t in tensors))
    memo = backbone.__dict__.setdefault("_trunk_identity", {})
    if memo.get(n_groups, (None, ""))[0] != stamp:
        h = hashlib.blake2b(digest_size=16)
        h.update(repr((type(backbone).__qualname__, backbone.model_id, backbone.image_size, tuple(backbone.mean),
                       tuple(backbone.std), n_groups)).encode())
        for t in tensors:
            d = t.detach().to("cpu").contiguous()
            h.update(repr((str(d.dtype), tuple(d.shape))).encode())
            h.update(d.view(-1).view(torch.uint8).numpy().tobytes() if d.numel() else b"")
        memo[n_groups] = (stamp, h.hexdigest())
    return memo[n_groups][1]


def _image_digests(images: torch.Tensor) -> list[bytes]:
    arr = images.detach().to("cpu").contiguous().numpy()
    return [hashlib.blake2b(arr[i].data, digest_size=16).digest() for i in range(len(arr))]


def cached_backbone_features(backbone: ImageBackbone, images: torch.Tensor, layers: Sequence[str], n_groups: int,
                             cache: TrunkCache | None, channels_last: bool = False
                             ) -> dict[str, torch.Tensor] | None:
    """``backbone(preprocess(images), layers)`` with the first ``n_groups`` block groups read from ``cache``.

    Parameters
    ----------
    backbone : ImageBackbone
    images : tensor of shape (B, H, W, 3) or (B, 3, H, W)
        The images as :meth:`~llmvem.embed.base.ImageBackbone.preprocess` takes them (uint8).
    layers : sequence of str
        Layer specs, as for the full forward.
    n_groups : int
        The frozen trunk's block groups.
    cache : TrunkCache or None
    channels_last : bool
        Preprocessed batches in channels-last memory format (as the caller's full forward would use).

    Returns
    -------
    dict of layer to tensor, or None
        The layer dict of the full forward; None when the cache cannot be used exactly (see the module notes) or
        is full and holds none of these images: the caller then runs the full forward.
    """
    if cache is None or cache.max_bytes <= 0 or n_groups <= 0 or not _exact(backbone, n_groups):
        return None
    layers = list(layers)
    taps_wanted = tuple(s for s in layers if s != "pooled" and backbone.layer_group(s) < n_groups)
    device = images.device
    amp = torch.get_autocast_dtype(device.type) if torch.is_autocast_enabled(device.type) else None
    context = (_trunk_identity(backbone, n_groups), taps_wanted, channels_last, str(device), str(amp),
               tuple(images.shape[1:]), str(images.dtype))
    keys = [(*context, d) for d in _image_digests(images)]
    found = [cache.get(k) for k in keys]
    miss = [i for i, e in enumerate(found) if e is None]
    if len(miss) == len(keys) and cache.full:
        cache.misses += len(miss)
        return None
    cache.hits += len(keys) - len(miss)
    cache.misses += len(miss)
    if miss:
        x = backbone.preprocess(images[torch.tensor(miss, device=device)] if len(miss) < len(keys) else images)
        if channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        with torch.no_grad():
            hidden, taps = backbone.trunk(x, n_groups, taps_wanted)
        for j, i in enumerate(miss):
            row = (hidden[j], {k: v[j] for k, v in taps.items()})
            found[i] = row
            cache.put(keys[i], *row)
    entries: list[_Entry] = found  # type: ignore[assignment]
    h = torch.stack([e[0] for e in entries])
    if _is_channels_last(entries[0][0]):
        # the trunk gave channels-last maps (the convolutions follow their weights' layout): so does the cache,
        # since the tail's kernels, and so its last bits, depend on the layout
        h = h.contiguous(memory_format=torch.channels_last)
    out = {k: torch.stack([e[1][k] for e in entries]) for k in taps_wanted}
    out.update(backbone.tail(h, n_groups, layers))
    return out


def attach_trunk_cache(network: nn.Module, unfreeze_last_n: int, budget_bytes: int = DEFAULT_BUDGET_BYTES) -> None:
    """Let ``network`` (an :class:`~llmvem.model.LLMVEM`) reuse its backbone's frozen trunk: the groups before
    the last ``unfreeze_last_n`` (``train.stage2.unfreeze_last_n``), from the process-wide
    :func:`shared_trunk_cache` with the budget ``budget_bytes`` (``train.trunk_cache_mib``; 0 turns the cache
    off: the backbone runs whole). A backbone without :attr:`~llmvem.embed.base.ImageBackbone.supports_trunk`
    keeps running whole."""
    network.trunk_cache = shared_trunk_cache(budget_bytes) if budget_bytes > 0 else None
    network.trunk_groups = 0 if budget_bytes <= 0 else \
        frozen_trunk_groups(getattr(network, "backbone", None), unfreeze_last_n)
