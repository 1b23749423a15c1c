"""Captioning: captioners (local VLM, OpenAI-compatible server, image labels, caption files, dataset captions)
and the crash-safe SQLite caption store.

Typical use::

    from llmvem.captions import CaptionStore, make_captioner, run_captioning

    captioner = make_captioner("openai", model="Qwen/Qwen2.5-VL-7B-Instruct",
                               base_urls=["http://localhost:8000/v1"], max_in_flight=64)
    with CaptionStore("captions.sqlite") as store:
        summary = run_captioning(images, captioner, store)
        captions = store.get(images.content_hashes(), captioner.config_hash)   # list of lists of str

Heavy backends (transformers, torch) are imported only when their captioner is made.
"""

from llmvem.captions.base import DEFAULT_PROMPT, Captioner, CaptionResult
from llmvem.captions.existing import CaptionFileCaptioner, DatasetCaptioner, read_caption_file
from llmvem.captions.factory import BACKENDS, make_captioner
from llmvem.captions.run import CaptionSummary, run_captioning
from llmvem.captions.store import CaptionerRecord, CaptionStore

__all__ = [
    "BACKENDS",
    "DEFAULT_PROMPT",
    "CaptionFileCaptioner",
    "CaptionResult",
    "CaptionStore",
    "CaptionSummary",
    "Captioner",
    "CaptionerRecord",
    "DatasetCaptioner",
    "LabelCaptioner",
    "OpenAICaptioner",
    "TransformersCaptioner",
    "make_captioner",
    "read_caption_file",
    "run_captioning",
]


def __getattr__(name: str):
    # Lazy: importing llmvem.captions must not import torch/transformers/httpx machinery.
    if name == "LabelCaptioner":
        from llmvem.captions import labels

        return getattr(labels, name)
    if name == "TransformersCaptioner":
        from llmvem.captions.vlm import TransformersCaptioner

        return TransformersCaptioner
    if name == "OpenAICaptioner":
        from llmvem.captions.openai_compat import OpenAICaptioner

        return OpenAICaptioner
    raise AttributeError(f"module 'llmvem.captions' has no attribute {name!r}")
