"""Captions from an OpenAI-compatible chat-completions server (vLLM, SGLang, Ollama, LM Studio, hosted APIs).

Each image goes as a base64 data URL in one chat-completions request. An async httpx client keeps at most
``max_in_flight`` requests in flight, spread over one or more server URLs (least-loaded first, ties in turn),
and retries a request on 429, 408, 5xx, timeouts, connection errors and malformed or empty answers, with capped
exponential backoff plus jitter (``Retry-After`` is honoured). An image that still fails after the last retry is
reported by id with its last error; captions finished before are kept. Wrong credentials (401/403) or an unknown
model / endpoint (404) stop the run at once with a :class:`~llmvem.errors.CaptionError`.

The API key is read from an environment variable (``OPENAI_API_KEY`` unless told otherwise) when the captioner is
made. Only the variable's *name* is recorded; the key is sent in the ``Authorization`` header and nowhere else,
and it is blanked out of any server message that is logged or raised.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import email.utils
import io
import json
import logging
import os
import queue
import random
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import httpx
from PIL import Image

from llmvem.captions.base import DEFAULT_PROMPT, Captioner, CaptionResult, clean_caption
from llmvem.data.images import ImageCollection
from llmvem.errors import CaptionError, ConfigError

logger = logging.getLogger(__name__)

_LANE = 16  # connections per httpx client (see OpenAICaptioner._run)
RETRY_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 521, 522, 523, 524, 529})
FATAL_STATUS = frozenset({401, 403, 404})


def chat_completions_url(base_url: str) -> str:
    """``http://host:8000/v1`` → ``http://host:8000/v1/chat/completions`` (a full endpoint URL is kept)."""
    url = base_url.strip().rstrip("/")
    if not url.startswith(("http://", "https://")):
        raise ConfigError(f"base URL {base_url!r}: expected http://host:port/v1 or https://...")
    if url.endswith("/chat/completions"):
        return url
    return url + "/chat/completions"


def encode_image(img: Image.Image, image_format: str = "jpeg", jpeg_quality: int = 95,
                 max_side: int | None = None) -> str:
    """An RGB image as a ``data:image/...;base64,...`` URL, optionally downscaled so its longer side <= max_side."""
    if max_side is not None and max(img.size) > max_side:
        scale = max_side / max(img.size)
        img = img.resize((max(1, round(img.width * scale)), max(1, round(img.height * scale))),
                         Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    if image_format == "jpeg":
        img.convert("RGB").save(buf, format="JPEG", quality=jpeg_quality)
        mime = "image/jpeg"
    elif image_format == "png":
        img.save(buf, format="PNG")
        mime = "image/png"
    else:
        raise ValueError(f"image_format {image_format!r}; expected 'jpeg' or 'png'")
    return f"data:{mime};base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _retry_after_s(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


class _Retryable(Exception):
    def __init__(self, message: str, retry_after: float | None = None):
        super().__init__(message)
        self.retry_after = retry_after


class _Fatal(Exception):
    pass


@dataclass
class _Job:
    index: int
    image_id: str
    load: Callable[[], Image.Image]


class OpenAICaptioner(Captioner):
    """Captioner that asks one or more OpenAI-compatible servers.

    Parameters
    ----------
    model : str
        The served model name (``vllm serve NAME`` / ``--served-model-name``).
    base_urls : str or sequence of str
        Server URLs up to the API root, e.g. ``http://localhost:8000/v1``. Several URLs (one server per GPU)
        share the load.
    prompt : str
    max_tokens : int
        Generation limit; answers that stop there (``finish_reason == "length"``) are flagged ``truncated``.
    temperature : float
        0 (greedy) by default.
    top_p : float or None
    seed : int or None
        Sent as the request's ``seed`` (servers that support it sample reproducibly).
    extra_body : dict or None
        More request fields (e.g. ``{"top_k": 1}``); recorded and hashed.
    api_key_env : str
        Name of the environment variable holding the API key. Unset → no ``Authorization`` header (fine for
        local servers started without ``--api-key``).
    max_in_flight : int
        Requests in flight at once, over all servers.
    timeout_s : float
        Per-request timeout (the server's generation time included).
    max_retries : int
        Retries per image after the first attempt.
    backoff_base_s, backoff_max_s : float
        Retry ``k`` waits ``d/2 + uniform(0, d/2)`` with ``d = min(backoff_max_s, backoff_base_s * 2**k)``;
        a ``Retry-After`` header replaces ``d`` (capped at ``backoff_max_s``).
    image_format : {"jpeg", "png"}
    jpeg_quality : int
    max_image_side : int or None
        Downscale images whose longer side exceeds this before sending.
    jitter_seed : int
        Seed of the backoff jitter.
    """

    backend = "openai"
    default_batch_size = 32

    def __init__(self, model: str, base_urls: str | Sequence[str] = "http://localhost:8000/v1",
                 prompt: str = DEFAULT_PROMPT, max_tokens: int = 300, temperature: float = 0.0,
                 top_p: float | None = None, seed: int | None = None, extra_body: dict[str, Any] | None = None,
                 api_key_env: str = "OPENAI_API_KEY", max_in_flight: int = 16, timeout_s: float = 120.0,
                 max_retries: int = 5, backoff_base_s: float = 0.5, backoff_max_s: float = 30.0,
                 image_format: str = "jpeg", jpeg_quality: int = 95, max_image_side: int | None = None,
                 jitter_seed: int = 0):
        urls = [base_urls] if isinstance(base_urls, str) else list(base_urls)
        if not urls:
            raise ConfigError("no server URL given; pass --base-url http://host:port/v1")
        if not model:
            raise ConfigError("no model name given; pass --model with the server's model name")
        if max_in_flight < 1 or max_retries < 0 or timeout_s <= 0:
            raise ConfigError(f"max_in_flight={max_in_flight} (>= 1), max_retries={max_retries} (>= 0), "
                              f"timeout_s={timeout_s} (> 0) expected")
        if image_format not in ("jpeg", "png"):
            raise ConfigError(f"image_format {image_format!r}; expected 'jpeg' or 'png'")
        self.model_id = model
        self.prompt = prompt
        self.base_urls = [u.strip().rstrip("/") for u in urls]
        self._endpoints = [chat_completions_url(u) for u in self.base_urls]
        self.max_tokens = int(max_tokens)
        self.temperature = float(temperature)
        self.top_p = top_p
        self.seed = seed
        self.extra_body = dict(extra_body or {})
        self.api_key_env = api_key_env
        self._api_key = _Secret(os.environ.get(api_key_env) or None)
        self.max_in_flight = int(max_in_flight)
        self.timeout_s = float(timeout_s)
        self.max_retries = int(max_retries)
        self.backoff_base_s = float(backoff_base_s)
        self.backoff_max_s = float(backoff_max_s)
        self.image_format = image_format
        self.jpeg_quality = int(jpeg_quality)
        self.max_image_side = max_image_side
        self._rng = random.Random(jitter_seed)
        self._load = dict.fromkeys(self._endpoints, 0)
        self._turn = 0
        self.requests_sent = dict.fromkeys(self._endpoints, 0)
        self._answered: set[str] = set()  # endpoints that answered at least once
        self._refused: set[str] = set()  # endpoints that refused a connection before ever answering

    # ----------------------------------------------------------------- identity
    def settings(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p,
                "seed": self.seed, "extra_body": self.extra_body, "image_format": self.image_format,
                "jpeg_quality": self.jpeg_quality if self.image_format == "jpeg" else None,
                "max_image_side": self.max_image_side}

    def runtime(self) -> dict[str, Any]:
        return {"base_urls": self.base_urls, "api_key_env": self.api_key_env, "max_in_flight": self.max_in_flight,
                "timeout_s": self.timeout_s, "max_retries": self.max_retries}

    def _redact(self, text: str) -> str:
        key = self._api_key.reveal()
        return text.replace(key, "***") if key else text

    def check_servers(self, timeout_s: float = 5.0) -> None:
        """Fail at once, with one line, when no server accepts a TCP connection (wrong URL, server not started).

        Raises
        ------
        CaptionError
            Naming every URL and why it could not be reached. One reachable server is enough.
        """
        import socket
        from urllib.parse import urlsplit

        reasons = []
        for url in self.base_urls:
            parts = urlsplit(url)
            port = parts.port or (443 if parts.scheme == "https" else 80)
            try:
                with socket.create_connection((parts.hostname or "localhost", port), timeout=timeout_s):
                    return
            except OSError as exc:
                reasons.append(f"{url} ({exc.strerror or type(exc).__name__})")
        raise CaptionError(f"cannot connect to {', '.join(reasons)}; is the server running, and is --base-url right?")

    # ---------------------------------------------------------------- requests
    def _body(self, data_url: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model_id,
            "messages": [{"role": "user", "content": [
                {"type": "text", "text": self.prompt},
                {"type": "image_url", "image_url": {"url": data_url}}]}],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
        }
        if self.top_p is not None:
            body["top_p"] = self.top_p
        if self.seed is not None:
            body["seed"] = self.seed
        body.update(self.extra_body)
        return body

    def _pick(self, avoid: str | None) -> str:
        candidates = [e for e in self._endpoints if e != avoid] or self._endpoints
        least = min(self._load[e] for e in candidates)
        tied = [e for e in candidates if self._load[e] == least]
        self._turn += 1
        return tied[self._turn % len(tied)]

    def _backoff(self, attempt: int, retry_after: float | None) -> float:
        if retry_after is not None:
            return min(self.backoff_max_s, retry_after) + self._rng.uniform(0, 0.05 * self.backoff_base_s)
        d = min(self.backoff_max_s, self.backoff_base_s * 2**attempt)
        return d / 2 + self._rng.uniform(0, d / 2)

    async def _request(self, client: httpx.AsyncClient, url: str, body: dict) -> tuple[str, bool]:
        key = self._api_key.reveal()
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        try:
            resp = await client.post(url, json=body, headers=headers)
        except httpx.TimeoutException as exc:
            raise _Retryable(f"timeout after {self.timeout_s:g} s ({type(exc).__name__})") from None
        except httpx.ConnectError as exc:
            if url not in self._answered:
                self._refused.add(url)
                if not self._answered and self._refused >= set(self._endpoints):
                    # every server refused before answering once: a wrong URL or no server; retrying all images
                    # with backoff would only take minutes to say the same
                    raise _Fatal(f"cannot connect to {', '.join(sorted(self._refused))} ({type(exc).__name__}: "
                                 f"{self._redact(str(exc))}); is the server running, and is --base-url right?"
                                 ) from None
            raise _Retryable(f"connection error ({type(exc).__name__}: {self._redact(str(exc))})") from None
        except httpx.RequestError as exc:  # connection reset/dropped, protocol and decoding errors
            raise _Retryable(f"connection error ({type(exc).__name__}: {self._redact(str(exc))})") from None
        self._answered.add(url)
        if resp.status_code in FATAL_STATUS:
            hint = {401: f"the server refused the API key; set ${self.api_key_env}",
                    403: f"the server refused the API key; check ${self.api_key_env}",
                    404: f"no such endpoint or model; check --base-url and --model {self.model_id!r}"}
            raise _Fatal(f"HTTP {resp.status_code} from {url}: {hint[resp.status_code]} "
                         f"({self._redact(resp.text[:300])})")
        if resp.status_code in RETRY_STATUS:
            raise _Retryable(f"HTTP {resp.status_code} from {url} ({self._redact(resp.text[:200])})",
                             _retry_after_s(resp.headers.get("retry-after")))
        if resp.status_code != 200:
            message = f"HTTP {resp.status_code} from {url}: {self._redact(resp.text[:300])}"
            if resp.status_code >= 500:  # e.g. 501 Not Implemented: the server cannot do this at all
                raise _Fatal(message)
            raise _PermanentImageError(message)  # e.g. 400/413: this request is wrong; retrying will not help
        try:
            data = resp.json()
            choice = data["choices"][0]
            content = choice["message"]["content"]
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, IndexError, TypeError) as exc:
            raise _Retryable(f"malformed answer from {url} ({type(exc).__name__}: "
                             f"{self._redact(resp.text[:120])!r})") from None
        if isinstance(content, list):  # some servers answer with content parts
            content = "".join(p.get("text", "") for p in content if isinstance(p, dict))
        if not isinstance(content, str) or not clean_caption(content):
            raise _Retryable(f"empty caption from {url}")
        return clean_caption(content), choice.get("finish_reason") == "length"

    def _load_and_encode(self, job: _Job) -> str:
        return encode_image(job.load(), self.image_format, self.jpeg_quality, self.max_image_side)

    async def _caption_one(self, clients: list[httpx.AsyncClient], job: _Job, slots: asyncio.Queue) -> CaptionResult:
        try:
            data_url = await asyncio.to_thread(self._load_and_encode, job)
        except Exception as exc:  # an unreadable image fails alone, with its reason
            return CaptionResult(job.index, job.image_id, [], error=f"cannot read image ({exc})")
        body = self._body(data_url)
        last_error = ""
        avoid: str | None = None
        for attempt in range(self.max_retries + 1):
            lane = await slots.get()  # a free request slot, and the client (lane) it belongs to
            url = self._pick(avoid)
            self._load[url] += 1
            self.requests_sent[url] += 1
            try:
                text, truncated = await self._request(clients[lane], url, body)
                return CaptionResult(job.index, job.image_id, [text], truncated=truncated)
            except _Retryable as exc:
                last_error, retry_after = str(exc), exc.retry_after
            except _PermanentImageError as exc:
                return CaptionResult(job.index, job.image_id, [], error=str(exc))
            finally:
                self._load[url] -= 1
                slots.put_nowait(lane)
            avoid = url if len(self._endpoints) > 1 else None
            if attempt < self.max_retries:
                wait = self._backoff(attempt, retry_after)
                logger.debug("image %s: %s; retry %d/%d in %.2f s", job.image_id, last_error, attempt + 1,
                             self.max_retries, wait)
                await asyncio.sleep(wait)
        return CaptionResult(job.index, job.image_id, [],
                             error=f"failed after {self.max_retries + 1} attempts; last error: {last_error}")

    async def _run(self, jobs: Iterable[_Job], emit: Callable[[CaptionResult], None]) -> None:
        """Caption ``jobs`` with bounded concurrency, calling ``emit`` with each result as it finishes."""
        # httpcore's connection pool does work proportional to (requests waiting x connections) on every event,
        # which costs 10% of the throughput at 64 connections and 70% at 128. So requests are spread over
        # several clients ("lanes") of at most _LANE connections each; a slot token says which lane to use.
        n_lanes = -(-self.max_in_flight // _LANE)
        slots: asyncio.Queue[int] = asyncio.Queue()
        for k in range(self.max_in_flight):
            slots.put_nowait(k % n_lanes)
        per_lane = -(-self.max_in_flight // n_lanes)
        limits = httpx.Limits(max_connections=per_lane + len(self._endpoints), max_keepalive_connections=per_lane)
        timeout = httpx.Timeout(self.timeout_s, connect=min(self.timeout_s, 10.0))
        # Images loaded and waiting are bounded too, so memory stays flat on a 73k-image job.
        pending = asyncio.Semaphore(2 * self.max_in_flight)
        fatal: list[BaseException] = []
        tasks: set[asyncio.Task] = set()

        def done(task: asyncio.Task) -> None:
            tasks.discard(task)
            pending.release()
            if task.cancelled():
                return
            exc = task.exception()
            if exc is not None:
                fatal.append(exc)
            else:
                emit(task.result())

        async with contextlib.AsyncExitStack() as stack:
            clients = [await stack.enter_async_context(httpx.AsyncClient(timeout=timeout, limits=limits))
                       for _ in range(n_lanes)]
            try:
                for job in jobs:
                    await pending.acquire()
                    if fatal:
                        pending.release()
                        break
                    task = asyncio.create_task(self._caption_one(clients, job, slots))
                    tasks.add(task)
                    task.add_done_callback(done)
                while tasks and not fatal:
                    await asyncio.wait(set(tasks), return_when=asyncio.FIRST_EXCEPTION)
            finally:
                for t in list(tasks):
                    t.cancel()
                if tasks:
                    await asyncio.gather(*tasks, return_exceptions=True)
        if fatal:
            exc = fatal[0]
            if isinstance(exc, _Fatal):
                raise CaptionError(f"{exc}; captions finished before this are kept") from None
            raise exc

    # ------------------------------------------------------------- captioning
    def caption_batch(self, images: Sequence[Image.Image | None], ids: Sequence[str]) -> list[CaptionResult]:
        if any(img is None for img in images):
            raise ValueError("OpenAICaptioner needs the images' pixels")
        jobs = [_Job(k, image_id, (lambda img=img: img)) for k, (img, image_id) in enumerate(zip(images, ids,
                                                                                                 strict=True))]
        results: dict[int, CaptionResult] = {}
        _run_coroutine(lambda: self._run(jobs, lambda r: results.__setitem__(r.index, r)))
        return [results[k] for k in range(len(jobs))]

    def caption_collection(self, images: ImageCollection, indices: Sequence[int],
                           batch_size: int | None = None) -> Iterator[list[CaptionResult]]:
        """Stream results as requests finish (grouped up to ``batch_size`` per yield), never idling between
        batches: a background thread runs the event loop while the caller stores what has arrived."""
        bs = batch_size or self.default_batch_size
        jobs = (_Job(int(i), images.ids[int(i)], (lambda i=int(i): images.load(i))) for i in indices)
        out: queue.Queue = queue.Queue()
        end = object()
        state: dict[str, Any] = {}

        def worker() -> None:
            async def main() -> None:
                state["loop"] = asyncio.get_running_loop()
                state["task"] = asyncio.current_task()
                await self._run(jobs, out.put)

            try:
                asyncio.run(main())
            except asyncio.CancelledError:
                pass
            except BaseException as exc:  # handed to the consuming thread, which raises it
                out.put(_Failure(exc))
            finally:
                out.put(end)

        thread = threading.Thread(target=worker, name="llmvem-openai-captioner", daemon=True)
        thread.start()
        try:
            finished = False
            while not finished:
                try:
                    item = out.get(timeout=0.2)
                except queue.Empty:
                    continue
                group: list[CaptionResult] = []
                failure: _Failure | None = None
                while True:
                    if item is end:
                        finished = True
                        break
                    if isinstance(item, _Failure):
                        failure = item
                    else:
                        group.append(item)
                    if len(group) >= bs:
                        break
                    try:
                        item = out.get_nowait()
                    except queue.Empty:
                        break
                if group:
                    yield group
                if failure is not None:
                    raise failure.exc
        finally:
            loop, task = state.get("loop"), state.get("task")
            if thread.is_alive() and loop is not None and task is not None:
                try:
                    loop.call_soon_threadsafe(task.cancel)
                except RuntimeError:  # loop already closed
                    pass
            thread.join(timeout=10.0)


class _PermanentImageError(Exception):
    """A 4xx answer about this request (e.g. image too large): retrying will not help; the image fails alone."""


@dataclass
class _Failure:
    exc: BaseException


class _Secret:
    """Holds the API key; prints as ``<secret>`` so it cannot reach a repr, a log line or a config dump."""

    __slots__ = ("_value",)

    def __init__(self, value: str | None):
        self._value = value

    def reveal(self) -> str | None:
        return self._value

    def __repr__(self) -> str:
        return "<secret>" if self._value else "<no key>"

    __str__ = __repr__

    def __reduce__(self):
        raise TypeError("the API key is not picklable")


def _run_coroutine(make: Callable[[], Any]) -> Any:
    """``asyncio.run(make())``, in a helper thread when this thread already runs an event loop (Jupyter)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(make())
    box: dict[str, Any] = {}

    def target() -> None:
        try:
            box["value"] = asyncio.run(make())
        except BaseException as exc:  # re-raised in the calling thread
            box["error"] = exc

    t = threading.Thread(target=target, daemon=True)
    t.start()
    t.join()
    if "error" in box:
        raise box["error"]
    return box.get("value")
