"""A tiny OpenAI-compatible chat-completions server for tests and benchmarks, with injectable faults.

It listens on 127.0.0.1 on a free port, in a background thread, and answers ``POST .../chat/completions`` whose
last user message carries one image as a base64 data URL. The caption it returns describes the image's mean
colour, ``"a flat image of colour (R, G, B)"`` with each channel rounded to a multiple of 10, so a test can
check that every caption belongs to its image.

Faults are chosen per request by ``fault_plan(request_number, colour) -> fault | None`` (request numbers start
at 1; ``colour`` is the rounded mean colour of the image). Faults:

- ``"500"`` / ``"503"``: that status with a JSON error body
- ``"429"``: status 429 with ``Retry-After: <retry_after_s>``
- ``"timeout"``: sleep ``hang_s`` before answering (longer than the client's timeout)
- ``"malformed"``: status 200 with a body that is not JSON
- ``"no_choices"``: status 200, valid JSON without ``choices``
- ``"empty"``: status 200 with an empty caption
- ``"drop"``: close the connection without an answer
- ``"401"`` / ``"404"`` / ``"400"``: that status

The server stops by itself after ``max_requests`` requests or ``max_lifetime_s`` seconds, whichever comes first,
and when its context manager exits. Run it alone (``python tests/fake_openai_server.py --delay 0.2``) to serve a
slow captioner for manual or subprocess tests until it stops by itself; :func:`spawn_server` does that from Python
(the caption benchmarks ``bench/bench_caption_client.py`` and ``bench/bench_caption_workers.py`` call it).
"""

from __future__ import annotations

import argparse
import base64
import io
import json
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
from PIL import Image

FaultPlan = Callable[[int, tuple[int, int, int]], "str | None"]


def colour_caption(colour: tuple[int, int, int]) -> str:
    return f"a flat image of colour ({colour[0]}, {colour[1]}, {colour[2]})"


def rounded_mean_colour(img: Image.Image) -> tuple[int, int, int]:
    mean = np.asarray(img.convert("RGB"), dtype=np.float64).reshape(-1, 3).mean(axis=0)
    return tuple(int(round(v / 10.0) * 10) for v in mean)  # type: ignore[return-value]


class FakeOpenAIServer:
    """Context manager running the fake server; ``.base_url`` is ``http://127.0.0.1:PORT/v1``.

    Parameters
    ----------
    delay_s : float
        Time each successful request takes (simulated generation).
    fault_plan : callable or None
        ``(request_number, colour) -> fault name or None``.
    retry_after_s : float
        Value of the ``Retry-After`` header of ``"429"`` faults.
    hang_s : float
        How long a ``"timeout"`` fault sleeps.
    max_requests : int
        The server shuts down after this many requests.
    max_lifetime_s : float
        ... or after this long.
    model : str
        The only model name it accepts (others get 404).
    """

    def __init__(self, delay_s: float = 0.0, fault_plan: FaultPlan | None = None, retry_after_s: float = 0.05,
                 hang_s: float = 2.0, max_requests: int = 10_000, max_lifetime_s: float = 120.0,
                 model: str = "fake-vlm"):
        self.delay_s = delay_s
        self.fault_plan = fault_plan
        self.retry_after_s = retry_after_s
        self.hang_s = hang_s
        self.max_requests = max_requests
        self.max_lifetime_s = max_lifetime_s
        self.model = model
        self.lock = threading.Lock()
        self.n_requests = 0
        self.faults: list[tuple[int, str]] = []
        self.auth_headers: list[str | None] = []
        self.bodies: list[dict] = []
        self.in_flight = 0
        self.max_seen_in_flight = 0
        self._stopping = threading.Event()
        self._httpd: ThreadingHTTPServer | None = None
        self._threads: list[threading.Thread] = []

    # ------------------------------------------------------------ lifecycle
    def start(self) -> FakeOpenAIServer:
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            # Headers and body go out in two writes; without TCP_NODELAY, Nagle's algorithm and the client's
            # delayed ACK add ~40 ms to every answer (real servers such as uvicorn set it too).
            disable_nagle_algorithm = True

            def log_message(self, fmt: str, *args: object) -> None:  # keep test output clean
                pass

            def _send(self, status: int, body: bytes, headers: dict[str, str] | None = None) -> None:
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self) -> None:  # noqa: N802 - http.server naming
                length = int(self.headers.get("Content-Length") or 0)
                raw = self.rfile.read(length)
                with server.lock:
                    server.n_requests += 1
                    number = server.n_requests
                    server.auth_headers.append(self.headers.get("Authorization"))
                    server.in_flight += 1
                    server.max_seen_in_flight = max(server.max_seen_in_flight, server.in_flight)
                try:
                    self._handle(number, raw)
                except (BrokenPipeError, ConnectionResetError):
                    pass  # the client gave up (timeout fault)
                finally:
                    with server.lock:
                        server.in_flight -= 1
                    if number >= server.max_requests:
                        server.stop_soon()

            def _handle(self, number: int, raw: bytes) -> None:
                if not self.path.rstrip("/").endswith("/chat/completions"):
                    self._send(404, b'{"error": "not found"}')
                    return
                body = json.loads(raw)
                with server.lock:
                    server.bodies.append({k: v for k, v in body.items() if k != "messages"})
                if body.get("model") != server.model:
                    self._send(404, json.dumps({"error": f"model {body.get('model')!r} not found"}).encode())
                    return
                url = next(part["image_url"]["url"] for part in body["messages"][-1]["content"]
                           if part.get("type") == "image_url")
                img = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
                colour = rounded_mean_colour(img)
                fault = server.fault_plan(number, colour) if server.fault_plan else None
                if fault:
                    with server.lock:
                        server.faults.append((number, fault))
                    if self._fault(fault):
                        return
                if server.delay_s:
                    time.sleep(server.delay_s)
                answer = {"id": f"chatcmpl-{number}", "object": "chat.completion", "model": server.model,
                          "choices": [{"index": 0, "finish_reason": "stop",
                                       "message": {"role": "assistant", "content": colour_caption(colour)}}]}
                self._send(200, json.dumps(answer).encode())

            def _fault(self, fault: str) -> bool:
                if fault in ("500", "503", "400", "401", "404"):
                    self._send(int(fault), json.dumps({"error": f"injected {fault}"}).encode())
                elif fault == "429":
                    self._send(429, b'{"error": "rate limited"}', {"Retry-After": f"{server.retry_after_s:g}"})
                elif fault == "timeout":
                    server._stopping.wait(server.hang_s)
                    self._send(500, b'{"error": "too late"}')
                elif fault == "malformed":
                    self._send(200, b'{"choices": [{"message": {"content": "cut off')
                elif fault == "no_choices":
                    self._send(200, b'{"object": "chat.completion"}')
                elif fault == "empty":
                    self._send(200, json.dumps({"choices": [{"message": {"content": "  "}}]}).encode())
                elif fault == "drop":
                    self.close_connection = True
                    self.connection.close()
                else:
                    return False
                return True

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 512  # many clients connecting at once must not hit a tiny listen backlog

        self._httpd = Server(("127.0.0.1", 0), Handler)
        serve = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
        serve.start()
        watchdog = threading.Thread(target=self._watchdog, daemon=True)
        watchdog.start()
        self._threads = [serve, watchdog]
        return self

    def _watchdog(self) -> None:
        self._stopping.wait(self.max_lifetime_s)
        self.stop_soon()

    def stop_soon(self) -> None:
        """Ask the server to stop (from any thread, including a handler)."""
        self._stopping.set()
        if self._httpd is not None:
            threading.Thread(target=self._httpd.shutdown, daemon=True).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    @property
    def port(self) -> int:
        assert self._httpd is not None
        return self._httpd.server_address[1]

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> FakeOpenAIServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def spawn_server(delay: float, lifetime: float, max_requests: int) -> tuple[subprocess.Popen, str]:
    """Run this server in its own process (``python tests/fake_openai_server.py``): (the process, its base URL).

    The process stops by itself after ``lifetime`` seconds or ``max_requests`` requests; kill it sooner when done.
    Raises RuntimeError when it does not print a loopback URL.
    """
    proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--delay", str(delay), "--lifetime",
                             str(lifetime), "--max-requests", str(max_requests)], stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    url = proc.stdout.readline().strip()
    if not url.startswith("http://127.0.0.1:"):
        proc.kill()
        proc.wait()
        raise RuntimeError(f"fake server did not start (printed {url!r})")
    return proc, url


def main() -> None:  # pragma: no cover - used by subprocess tests and by hand
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=0.1)
    ap.add_argument("--lifetime", type=float, default=120.0)
    ap.add_argument("--max-requests", type=int, default=10_000)
    ap.add_argument("--model", default="fake-vlm")
    args = ap.parse_args()
    srv = FakeOpenAIServer(delay_s=args.delay, max_lifetime_s=args.lifetime, max_requests=args.max_requests,
                           model=args.model).start()
    print(srv.base_url, flush=True)
    srv._stopping.wait(args.lifetime + 1)
    srv.stop()


if __name__ == "__main__":  # pragma: no cover
    main()
