"""The captioner interface: a batch of images in, captions out, plus what produced them.

Every captioner says which model made its captions (``model_id``), with which prompt, and with which
generation settings. Those three and the backend name form the captioner's *identity*
(:meth:`Captioner.identity`); its hash (:attr:`Captioner.config_hash`) keys the caption store, so captions from
two settings never mix and a rerun with the same settings skips what is done. Options that do not change the
text (server URLs, requests in flight, device, batch size, the *name* of the environment variable holding an API
key) are recorded separately (:meth:`Captioner.runtime`) and not hashed. Secrets are in neither.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

from PIL import Image

from llmvem.data.images import ImageCollection
from llmvem.errors import CaptionError
from llmvem.utils import stable_hash

#: Default instruction for VLM captioners, in the spirit of the detailed-description prompt MiniGPT-4 used to
#: caption images for LLM-VEM (Ma et al. 2024): a long, literal description rather than a one-line caption.
DEFAULT_PROMPT = (
    "Describe this image in detail. Give as many details as possible. Say everything you see."
)


@dataclass
class CaptionResult:
    """Captions of one image, or why it has none.

    Attributes
    ----------
    index : int
        Position of the image in the collection (or batch) it came from.
    image_id : str
    captions : list of str
        One or more non-empty captions; empty when ``error`` is set.
    error : str or None
        Why captioning this image failed (after any retries).
    truncated : bool
        Whether generation stopped at the token limit (the caption is cut off mid-sentence).
    """

    index: int
    image_id: str
    captions: list[str]
    error: str | None = None
    truncated: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and len(self.captions) > 0


class Captioner:
    """Base class of captioners.

    Subclasses set ``backend`` (class attribute), ``model_id`` and ``prompt``, implement
    :meth:`caption_batch` and :meth:`settings`, and may override :meth:`runtime` and
    :meth:`caption_collection` (the HTTP captioner streams results as they arrive).

    Attributes
    ----------
    backend : str
        ``"transformers"``, ``"openai"``, ``"labels"``, ``"file"`` or ``"dataset"``.
    model_id : str
        The model (hub id, local directory, served model name, or caption source) that writes the captions.
    prompt : str or None
        The instruction given to the model (``None`` for captioners without one).
    needs_pixels : bool
        Whether :meth:`caption_batch` looks at the images; captioners that look captions up by image id
        set it to ``False`` so images are not decoded for nothing.
    default_batch_size : int
        Images per :meth:`caption_batch` call (and per store transaction) when the caller does not say.
    """

    backend: ClassVar[str] = "base"
    needs_pixels: ClassVar[bool] = True
    default_batch_size: ClassVar[int] = 8
    model_id: str
    prompt: str | None = None

    # ----------------------------------------------------------------- identity
    def settings(self) -> dict[str, Any]:
        """Generation settings that change the captions (JSON-serialisable, no secrets)."""
        raise NotImplementedError

    def runtime(self) -> dict[str, Any]:
        """Options recorded beside the captions that do not change them (not hashed, no secrets)."""
        return {}

    def identity(self) -> dict[str, Any]:
        """What determines the captions: backend, model id, prompt and settings."""
        return {"backend": self.backend, "model_id": self.model_id, "prompt": self.prompt,
                "settings": self.settings()}

    @property
    def config_hash(self) -> str:
        """16 hex digits identifying :meth:`identity` (dict key order does not matter)."""
        return stable_hash(self.identity())

    # ---------------------------------------------------------------- captioning
    def caption_batch(self, images: Sequence[Image.Image | None], ids: Sequence[str]) -> list[CaptionResult]:
        """Caption a batch of images.

        Parameters
        ----------
        images : sequence of PIL RGB images, length n
            ``None`` entries are allowed when ``needs_pixels`` is False.
        ids : sequence of str, length n
            Image ids (used as keys by look-up captioners and in error messages).

        Returns
        -------
        list of CaptionResult, length n, in input order (``index`` is the position in the batch).
        """
        raise NotImplementedError

    def caption(self, images: Sequence[Image.Image], ids: Sequence[str] | None = None) -> list[list[str]]:
        """Captions of ``images`` (one list per image); raise :class:`CaptionError` if any image failed."""
        ids = list(ids) if ids is not None else [f"image{i}" for i in range(len(images))]
        if len(ids) != len(images):
            raise ValueError(f"{len(images)} images but {len(ids)} ids")
        results = self.caption_batch(list(images), ids)
        failed = [r for r in results if not r.ok]
        if failed:
            raise CaptionError(describe_failures(failed))
        return [r.captions for r in results]

    def caption_collection(self, images: ImageCollection, indices: Sequence[int],
                           batch_size: int | None = None) -> Iterator[list[CaptionResult]]:
        """Caption ``images[indices]``, yielding results in groups of at most ``batch_size`` as they finish.

        ``CaptionResult.index`` is the index into ``images``. The default loads one batch at a time and calls
        :meth:`caption_batch`; streaming backends override it. Callers store each yielded group before asking
        for the next, so an interruption loses at most the group in flight.
        """
        bs = batch_size or self.default_batch_size
        if bs < 1:
            raise ValueError(f"batch_size must be >= 1, got {bs}")
        idx = [int(i) for i in indices]
        for start in range(0, len(idx), bs):
            chunk = idx[start : start + bs]
            ids = [images.ids[i] for i in chunk]
            pixels: list[Image.Image | None] = (
                [images.load(i) for i in chunk] if self.needs_pixels else [None] * len(chunk))
            results = self.caption_batch(pixels, ids)
            for r, i in zip(results, chunk, strict=True):
                r.index = i
            yield results

    def close(self) -> None:
        """Release models, connections and threads (the captioner can not be used afterwards)."""

    def __enter__(self) -> Captioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(model_id={self.model_id!r}, config_hash={self.config_hash!r})"


def clean_caption(text: str) -> str:
    """Strip surrounding whitespace and collapse runs of blank lines (the text is otherwise kept as written)."""
    lines = [ln.rstrip() for ln in str(text).strip().splitlines()]
    out: list[str] = []
    for ln in lines:
        if ln == "" and out and out[-1] == "":
            continue
        out.append(ln)
    return "\n".join(out).strip()


def describe_failures(failed: Sequence[CaptionResult], limit: int = 10) -> str:
    """One message naming the images that failed and why (the first ``limit`` of them)."""
    head = "; ".join(f"{r.image_id}: {r.error or 'no caption'}" for r in failed[:limit])
    more = f" (and {len(failed) - limit} more)" if len(failed) > limit else ""
    return f"captioning failed for {len(failed)} image(s): {head}{more}"
