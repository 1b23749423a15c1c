"""Build a captioner from backend name and options (what the CLI and configuration files use)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from llmvem.captions.base import DEFAULT_PROMPT, Captioner
from llmvem.errors import ConfigError

Backend = Literal["labels", "dataset", "file", "transformers", "openai"]
BACKENDS: tuple[str, ...] = ("labels", "dataset", "file", "transformers", "openai")


def make_captioner(backend: Backend, *, model: str | None = None, prompt: str | None = None,
                   max_new_tokens: int | None = None, base_urls: Sequence[str] = (),
                   api_key_env: str = "OPENAI_API_KEY", max_in_flight: int = 16, captions_file: str | Path | None = None,
                   dataset: Any = None, device: str = "auto", dtype: str = "auto", timeout_s: float = 120.0,
                   max_retries: int = 5, **options: Any) -> Captioner:
    """A captioner of kind ``backend``.

    Parameters
    ----------
    backend : {"labels", "dataset", "file", "transformers", "openai"}
        ``labels``: offline EfficientNet-Lite0 ImageNet labels (weak); ``dataset``: the dataset's own captions;
        ``file``: a caption file (``captions_file``); ``transformers``: a local VLM (``model``); ``openai``: an
        OpenAI-compatible server (``model`` and ``base_urls``).
    model, prompt, max_new_tokens, base_urls, api_key_env, max_in_flight, captions_file, dataset, device, dtype,
    timeout_s, max_retries
        As the respective captioner classes take them; options a backend does not use must be left unset.
    **options
        Passed on to the captioner class (e.g. ``temperature``, ``top_k``).
    """
    prompt = prompt or DEFAULT_PROMPT
    if backend == "labels":
        from llmvem.captions.labels import LabelCaptioner

        return LabelCaptioner(device="cpu" if device == "auto" else device, **options)
    if backend == "dataset":
        from llmvem.captions.existing import DatasetCaptioner

        if dataset is None:
            raise ConfigError("backend 'dataset' needs a dataset (give a dataset spec, not --images)")
        return DatasetCaptioner(dataset, **options)
    if backend == "file":
        from llmvem.captions.existing import CaptionFileCaptioner

        if captions_file is None:
            raise ConfigError("backend 'file' needs --captions-file PATH (CSV/TSV/JSON/JSONL or COCO captions)")
        return CaptionFileCaptioner(captions_file, **options)
    if backend == "transformers":
        from llmvem.captions.vlm import TransformersCaptioner

        if not model:
            raise ConfigError("backend 'transformers' needs --model (a hub id or a local model directory)")
        return TransformersCaptioner(model, prompt=prompt, max_new_tokens=max_new_tokens or 256, device=device,
                                     dtype=dtype, **options)
    if backend == "openai":
        from llmvem.captions.openai_compat import OpenAICaptioner

        if not model:
            raise ConfigError("backend 'openai' needs --model (the name the server serves)")
        return OpenAICaptioner(model, base_urls=list(base_urls) or ["http://localhost:8000/v1"], prompt=prompt,
                               max_tokens=max_new_tokens or 300, api_key_env=api_key_env,
                               max_in_flight=max_in_flight, timeout_s=timeout_s, max_retries=max_retries, **options)
    raise ConfigError(f"unknown captioning backend {backend!r}; expected one of {list(BACKENDS)}")
