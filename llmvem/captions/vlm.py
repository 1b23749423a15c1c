"""Captions from a local vision-language model through transformers' image-text-to-text classes.

Any model that ``AutoProcessor`` + ``AutoModelForImageTextToText`` load works: LLaVA / LLaVA-NeXT, Qwen2-VL /
Qwen2.5-VL, InstructBLIP, BLIP-2, Idefics, PaliGemma... from a hub id (needs the files in the local hub cache or
a network) or a local directory (``save_pretrained`` output). Batched greedy decoding by default, on CPU or GPU,
bfloat16 on GPUs that support it.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

from llmvem.captions.base import DEFAULT_PROMPT, Captioner, CaptionResult, clean_caption
from llmvem.data.safe_load import WEIGHT_LOAD_ERRORS, weights_load_error
from llmvem.errors import ModelLoadError
from llmvem.utils import resolve_device

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


#: First transformers release whose ``from_pretrained`` takes ``dtype=`` (huggingface/transformers#39782); older
#: releases (pyproject allows >= 4.46) only know ``torch_dtype=``, which newer ones still accept with a warning.
DTYPE_KWARG_SINCE = (4, 56)


def dtype_kwarg(dtype: torch.dtype, transformers_version: str | None = None) -> dict[str, torch.dtype]:
    """``{"dtype": dtype}`` for transformers >= 4.56, ``{"torch_dtype": dtype}`` before (installed version unless
    ``transformers_version`` is given)."""
    if transformers_version is None:
        from importlib.metadata import version

        transformers_version = version("transformers")
    parts = tuple(int(p) for p in re.findall(r"\d+", transformers_version)[:2])
    return {"dtype": dtype} if parts >= DTYPE_KWARG_SINCE else {"torch_dtype": dtype}


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    """``"auto"`` → bfloat16 on a CUDA device that supports it, float16 on older GPUs, float32 on CPU."""
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ValueError(f"dtype {dtype!r}; expected 'auto' or one of {sorted(_DTYPES)}")
        return _DTYPES[dtype]
    if device.startswith("cuda"):
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float32


class TransformersCaptioner(Captioner):
    """A local VLM loaded with ``AutoProcessor`` and ``AutoModelForImageTextToText``.

    Parameters
    ----------
    model : str
        Hub id (``"llava-hf/llava-1.5-7b-hf"``, ``"Qwen/Qwen2-VL-2B-Instruct"``) or a local directory.
    prompt : str
        The instruction. Put into the model's chat template (with one image) when the processor has one,
        otherwise passed as the text prompt (BLIP-2 style).
    max_new_tokens : int
        Generation limit; captions that reach it are flagged ``truncated``.
    do_sample, temperature, top_p, num_beams, repetition_penalty : generation settings
        Greedy decoding (``do_sample=False, num_beams=1``) by default, which is deterministic.
    seed : int
        Seeds torch before every batch when sampling.
    generation_kwargs : dict or None
        Other ``generate`` arguments (recorded and hashed).
    device : str
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"cuda:1"``...
    dtype : str
        ``"auto"`` (bfloat16 on supporting GPUs, float16 on others, float32 on CPU), ``"bfloat16"``,
        ``"float16"`` or ``"float32"``.
    trust_remote_code : bool
        Allow model code from the model repository to run (off by default).
    """

    backend = "transformers"
    default_batch_size = 8

    def __init__(self, model: str, prompt: str = DEFAULT_PROMPT, max_new_tokens: int = 256, do_sample: bool = False,
                 temperature: float = 1.0, top_p: float = 1.0, num_beams: int = 1, repetition_penalty: float = 1.0,
                 seed: int = 0, generation_kwargs: dict[str, Any] | None = None, device: str = "auto",
                 dtype: str = "auto", trust_remote_code: bool = False):
        if max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
        if not prompt or not prompt.strip():
            raise ValueError("prompt must be a non-empty instruction")
        self.model_id = str(model)
        self.prompt = prompt
        self.max_new_tokens = int(max_new_tokens)
        self.do_sample = bool(do_sample)
        self.temperature = float(temperature)
        self.top_p = float(top_p)
        self.num_beams = int(num_beams)
        self.repetition_penalty = float(repetition_penalty)
        self.seed = int(seed)
        self.generation_kwargs = dict(generation_kwargs or {})
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.trust_remote_code = trust_remote_code
        self._load()

    # ------------------------------------------------------------------ setup
    def _load(self) -> None:
        from transformers import AutoModelForImageTextToText, AutoProcessor

        try:
            self.processor = AutoProcessor.from_pretrained(self.model_id, trust_remote_code=self.trust_remote_code)
            self.model = AutoModelForImageTextToText.from_pretrained(
                self.model_id, trust_remote_code=self.trust_remote_code, **dtype_kwarg(self.dtype))
        except WEIGHT_LOAD_ERRORS as exc:  # e.g. a pytorch_model.bin that needs code to unpickle
            raise weights_load_error(self.model_id, exc) from exc
        except (OSError, ValueError, KeyError) as exc:
            raise ModelLoadError(
                f"{self.model_id}: cannot load as an image-text-to-text model with AutoProcessor and "
                f"AutoModelForImageTextToText ({type(exc).__name__}: {exc}). Give a local directory made by "
                "save_pretrained, or a hub id whose files are in the local cache (HF_HUB_OFFLINE=1 forbids "
                "downloads)") from exc
        self.model.to(self.device).eval()
        self.is_encoder_decoder = bool(getattr(self.model.config, "is_encoder_decoder", False))
        tok = getattr(self.processor, "tokenizer", None)
        if tok is not None and not self.is_encoder_decoder:
            tok.padding_side = "left"  # decoder-only batched generation needs the prompts right-aligned
        self._template = getattr(self.processor, "chat_template", None)
        eos = self.model.generation_config.eos_token_id
        self._eos = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])
        self._pad = getattr(tok, "pad_token_id", None) if tok is not None else None
        if self._pad is None:
            self._pad = next(iter(self._eos), None)

    def settings(self) -> dict[str, Any]:
        return {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                "temperature": self.temperature if self.do_sample else None,
                "top_p": self.top_p if self.do_sample else None,
                "seed": self.seed if self.do_sample else None, "num_beams": self.num_beams,
                "repetition_penalty": self.repetition_penalty, "generation_kwargs": self.generation_kwargs}

    def runtime(self) -> dict[str, Any]:
        return {"device": self.device, "dtype": str(self.dtype).removeprefix("torch."),
                "trust_remote_code": self.trust_remote_code}

    def prompt_text(self) -> str:
        """The text the model receives with each image (chat template applied when the processor has one)."""
        if self._template:
            messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.prompt}]}]
            return self.processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.prompt

    # ------------------------------------------------------------- captioning
    @torch.inference_mode()
    def caption_batch(self, images: Sequence[Image.Image | None], ids: Sequence[str]) -> list[CaptionResult]:
        if any(img is None for img in images):
            raise ValueError("TransformersCaptioner needs the images' pixels")
        text = self.prompt_text()
        inputs = self.processor(images=list(images), text=[text] * len(images), return_tensors="pt", padding=True)
        inputs = {k: (v.to(self.device, self.dtype) if torch.is_floating_point(v) else v.to(self.device))
                  if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        gen: dict[str, Any] = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample,
                               "num_beams": self.num_beams, "repetition_penalty": self.repetition_penalty}
        if self.do_sample:
            gen.update(temperature=self.temperature, top_p=self.top_p)
            torch.manual_seed(self.seed)
        if self._pad is not None:
            gen["pad_token_id"] = self._pad
        gen.update(self.generation_kwargs)
        out = self.model.generate(**inputs, **gen)
        prompt_ids = inputs.get("input_ids")
        if (not self.is_encoder_decoder and prompt_ids is not None and out.shape[1] >= prompt_ids.shape[1]
                and torch.equal(out[:, : prompt_ids.shape[1]], prompt_ids)):
            out = out[:, prompt_ids.shape[1]:]
        texts = self.processor.batch_decode(out, skip_special_tokens=True)
        results = []
        for k, (image_id, row, raw) in enumerate(zip(ids, out.tolist(), texts, strict=True)):
            generated = [t for t in row if t != self._pad]
            truncated = len(generated) >= self.max_new_tokens and not (self._eos & set(generated))
            cap = clean_caption(raw)
            if cap:
                results.append(CaptionResult(k, image_id, [cap], truncated=truncated))
            else:
                results.append(CaptionResult(k, image_id, [], error=f"{self.model_id} produced an empty caption"))
        return results

    def close(self) -> None:
        self.model = None
        self.processor = None
        if self.device.startswith("cuda"):
            torch.cuda.empty_cache()
