"""Dry run of a configuration: resolve data, models, caches and devices without loading a model or an image.

:func:`check_config` is the one validation path of a configuration: ``llmvem config validate FILE`` prints what
it returns, and ``llmvem train`` runs it before its first expensive step, so the two give the same answer for
every config. Value bounds (finite numbers, seeds in [0, 2**63)) are the typed config's (:mod:`llmvem.config`);
here the dataset spec is resolved as the loader resolves it, without reading an image or a response
(:func:`llmvem.inputs.check_config_dataset`: layout, loader options, the virtual brain's values and size), the
alignment stream is checked with its size cap (:func:`llmvem.train.stream.check_align_data`), and model
references, caches and devices are resolved. A problem raises at once with one line naming the field.
"""

from __future__ import annotations

import os
from pathlib import Path

from llmvem.config import RunConfig
from llmvem.errors import ConfigError, quote

_DEVICE_FIELDS = ("captions.device", "text.device", "backbone.device", "train.device", "evaluate.ridge_device")


def _get(config: RunConfig, dotted: str) -> object:
    node: object = config
    for part in dotted.split("."):
        node = getattr(node, part)
    return node


def check_device(field: str, device: str) -> str:
    """What ``device`` resolves to here; ConfigError when it names a GPU this machine does not have."""
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ConfigError(f"{field}: {device!r} but CUDA is not available on this machine (torch "
                              f"{torch.__version__}); use 'auto' or 'cpu'")
        index = device.partition(":")[2]
        if index and (not index.isdigit() or int(index) >= torch.cuda.device_count()):
            raise ConfigError(f"{field}: {device!r} but this machine has {torch.cuda.device_count()} CUDA "
                              "device(s); expected cuda or cuda:N with N below that")
        return device
    if device == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"{field}: 'mps' but MPS is not available; use 'auto' or 'cpu'")
    if device not in ("cpu", "mps"):
        raise ConfigError(f"{field}: {device!r}; expected auto, cpu, cuda, cuda:N or mps")
    return device


def _local_or_hub(field: str, ref: str) -> str:
    """A model reference: an existing local path, or a hub id (not contacted here)."""
    path = Path(ref).expanduser()
    if path.exists():
        return f"local {path}"
    if ref.startswith((".", "/", "~")) or os.sep in ref.strip("/").replace("/", "", 1):
        raise ConfigError(f"{field}: {ref!r} looks like a path but does not exist; expected a local folder or a "
                          "hub id (org/name)")
    return f"hub id {ref} (downloaded on first use unless cached)"


def _data(config: RunConfig) -> str:
    from llmvem.inputs import check_config_dataset

    what = check_config_dataset(config)  # what train's loader checks before reading anything
    d = config.data
    if what == "built-in virtual brain":
        return f"{what} ({d.n_train} train / {d.n_test} test images, {d.image_size} px)"
    if what.startswith("Algonauts"):
        from llmvem.export import read_subject_layout

        layout = read_subject_layout(d.spec)
        return (f"Algonauts subject {layout.name}: {layout.n_vertices['lh']} lh + {layout.n_vertices['rh']} rh "
                f"vertices, {len(layout.test_ids)} challenge test images")
    return what


def _captions(config: RunConfig) -> str:
    c = config.captions
    if c.backend == "transformers":
        if not c.model:
            raise ConfigError("captions.model: missing; the transformers backend needs a VLM folder or hub id")
        return f"transformers VLM {_local_or_hub('captions.model', c.model)}"
    if c.backend == "openai":
        if not c.base_urls or not c.model:
            raise ConfigError("captions.base_urls / captions.model: the openai backend needs both (server URL up "
                              "to /v1 and the served model name)")
        return f"openai {c.model} at {', '.join(c.base_urls)} (not contacted by validate)"
    if c.backend == "file":
        if not c.captions_file or not Path(c.captions_file).expanduser().is_file():
            raise ConfigError(f"captions.captions_file: {c.captions_file!r} is not a file; the file backend needs one")
        return f"caption file {c.captions_file}"
    return c.backend


def _text_encoder(config: RunConfig) -> str:
    enc = config.text.encoder
    if enc == "minilm":
        return "minilm (bundled, offline)"
    kind, _, ref = enc.partition(":")
    if kind not in ("st", "clip") or not ref:
        raise ConfigError(f"text.encoder: {enc!r}; expected minilm, st:<path-or-id> or clip:<path-or-id>")
    return f"{kind} {_local_or_hub('text.encoder', ref)}"


def _backbone(config: RunConfig) -> str:
    b = config.backbone
    if b.weights and not Path(b.weights).expanduser().is_file():
        raise ConfigError(f"backbone.weights: {b.weights} is not a file")
    core = ""
    if b.init_core:
        from llmvem.train.core_init import core_weights_path

        core = f", fine-tuned core from {core_weights_path(b.init_core)}"
    if b.name == "efficientnet_lite0":
        return "efficientnet_lite0 (bundled, offline)" + core
    kind, _, ref = b.name.partition(":")
    if kind == "timm" and ref:
        return f"timm {ref}" + (f" with weights {b.weights}" if b.weights else
                                (" (pretrained weights from the hub)" if b.pretrained else " (random init)")) + core
    if kind == "hf" and ref:
        return f"transformers {_local_or_hub('backbone.name', ref)}" + core
    raise ConfigError(f"backbone.name: {b.name!r}; expected efficientnet_lite0, timm:<name> or hf:<path-or-id>")


def _caches(config: RunConfig) -> str:
    cache = Path(config.cache_dir).expanduser()
    probe = cache
    try:
        while not probe.exists() and probe != probe.parent:
            probe = probe.parent
    except OSError as exc:  # e.g. a name longer than the file system allows: say so, the path shortened
        raise ConfigError(f"cache_dir: {quote(str(cache))}: {exc.strerror or exc}; expected a folder path") from exc
    if not probe.is_dir():  # the cache itself, or a folder on its way, is a file: train could not create it
        raise ConfigError(f"cache_dir: {quote(str(cache))}: {probe} is a file; expected a folder path")
    if not os.access(probe, os.W_OK):
        raise ConfigError(f"cache_dir: {cache} cannot be created or written ({probe} is not writable)")
    store = Path(config.captions.store).expanduser() if config.captions.store else cache / "captions.sqlite"
    return (f"{cache} ({'exists' if cache.is_dir() else 'will be created'}); caption store {store} "
            f"({'exists' if store.is_file() else 'new'})")


def config_source(config: str, overrides: list[str] | tuple[str, ...] = ()) -> str:
    """How errors name a config given on the command line: its file (a shipped name as its package path), and
    whether ``--set`` overrides changed it."""
    from llmvem.config import SHIPPED_CONFIGS

    path = Path(config)
    label = str(path) if path.is_file() else f"llmvem/configs/{config}.yaml" if (
        SHIPPED_CONFIGS / f"{config}.yaml").is_file() else config
    return label + (" (with --set overrides)" if overrides else "")


def check_config(config: RunConfig, source: str | None = None) -> list[tuple[str, str]]:
    """Resolve a configuration without heavy work: the checks ``llmvem train`` runs before its first expensive
    step (it calls this function), so ``config validate`` and ``train`` agree.

    Parameters
    ----------
    config : RunConfig
    source : str, optional
        Where the config came from (its file, with ``--set`` overrides), named in the errors.

    Returns
    -------
    list of (what, resolved) pairs
        One line each for the data, captioner, text encoder, backbone, caches, the alignment stream's captioned
        images (``align_data.spec``, when set) and every device field.

    Raises
    ------
    ConfigError
        A path that does not exist, a malformed model name, or a device this machine lacks (one line, naming the
        field).
    DataValidationError
        A dataset spec, loader option or ``align_data.spec`` that training would refuse (the message training
        gives: :func:`llmvem.inputs.check_config_dataset`, :func:`llmvem.train.stream.check_align_data`).
    """
    from llmvem.errors import DataValidationError
    from llmvem.train.stream import check_align_data

    try:
        data = _data(config)
    except DataValidationError as exc:
        if source is None or not exc.source.startswith("config key"):
            raise
        raise DataValidationError(f"{source}: {exc.source}", exc.field, exc.problem) from exc
    lines = [("data", data), ("captions", _captions(config)), ("text encoder", _text_encoder(config)),
             ("backbone", _backbone(config)), ("cache", _caches(config))]
    align = check_align_data(config)
    if align is not None:
        lines.append(("align data", align))
    for field in _DEVICE_FIELDS:
        device = str(_get(config, field))
        lines.append((field, f"{device} -> {check_device(field, device)}"))
    return lines
