"""Throughput of the OpenAI-compatible caption client against a local server with a fixed delay per request.

A fake chat-completions server (``tests/fake_openai_server.py``) runs in its own process on 127.0.0.1 and takes
exactly ``d`` seconds per request. With ``C`` requests in flight the best possible throughput is ``C / d``
requests per second; the client should come within 10% of it for C = 1 … 64, which shows that concurrency, not
the client, bounds caption speed against a real vLLM server.

Each C sends ``waves × C`` requests (small random 64×64 JPEG images) through
``OpenAICaptioner.caption_collection`` (the path ``llmvem caption --backend openai`` takes). Two rates are shown:
*end-to-end* (all requests over the time from the call to the last answer, which includes starting the client and
opening C connections to the threaded fake server: ~0.1-0.3 s once per job) and *steady state* (the answers after
the first C, over the time between the C-th and the last answer: what a long captioning job sees). The 10% target
applies to the steady state. Every request goes to the loopback address, bounded in count, and the server stops by
itself. Writes ``bench/results/caption_client.json`` (``--out``; strict JSON with the provenance header).

Usage::

    python bench/bench_caption_client.py                    # C = 1, 2, 4, ..., 64 at d = 1 s (~50 s)
    python bench/bench_caption_client.py --delay 0.25 --concurrency 8 --concurrency 128
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "caption_client.json"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fake server lives with the tests that also use it

from fake_openai_server import spawn_server  # noqa: E402

from llmvem.captions.openai_compat import OpenAICaptioner  # noqa: E402
from llmvem.data.images import ArrayImages  # noqa: E402
from llmvem.provenance import result_header, write_results  # noqa: E402


def measure(url: str, concurrency: int, n_requests: int, images: ArrayImages) -> tuple[float, float]:
    """(end-to-end, steady-state) requests per second."""
    cap = OpenAICaptioner("fake-vlm", url, max_in_flight=concurrency, timeout_s=60.0, max_retries=0)
    results, stamps = [], []
    t0 = time.perf_counter()
    for group in cap.caption_collection(images, range(n_requests), batch_size=64):
        now = time.perf_counter() - t0
        results.extend(group)
        stamps.extend([now] * len(group))
    failed = [r for r in results if not r.ok]
    if len(results) != n_requests or failed:
        raise RuntimeError(f"C={concurrency}: {len(failed)} failed requests, e.g. {failed[:1]}")
    end_to_end = n_requests / stamps[-1]
    steady = (n_requests - concurrency) / (stamps[-1] - stamps[concurrency - 1])
    return end_to_end, steady


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--delay", type=float, default=1.0, help="seconds the server takes per request (d)")
    ap.add_argument("--concurrency", type=int, action="append", help="requests in flight (C); repeatable")
    ap.add_argument("--waves", type=int, default=6, help="requests per C = waves x C (at least 2)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    args = ap.parse_args(argv)
    if args.waves < 2:
        ap.error("--waves must be at least 2")
    levels = args.concurrency or [1, 2, 4, 8, 16, 32, 64]
    n_max = max(levels) * args.waves
    rng = np.random.default_rng(0)
    images = ArrayImages(rng.integers(0, 256, size=(n_max, 64, 64, 3), dtype=np.uint8))
    total = sum(c * args.waves for c in levels)
    lifetime = sum(args.waves * args.delay + 5 for _ in levels) + 30
    server, url = spawn_server(args.delay, lifetime, total + 10)
    rows = []
    try:
        for c in levels:
            end_to_end, steady = measure(url, c, c * args.waves, images)
            expected = c / args.delay
            rows.append((c, args.delay, c * args.waves, expected, steady, steady / expected, end_to_end,
                         end_to_end / expected))
    finally:
        server.terminate()
        server.wait(timeout=10)
    load = os.getloadavg()[0]
    print(f"OpenAI-compatible caption client vs. a local server taking d = {args.delay} s per request "
          f"({args.waves} waves of C requests per row; {os.cpu_count()} CPUs, load average {load:.1f} at the end)\n")
    print("| C (in flight) | d (s) | requests | expected C/d (req/s) | measured, steady (req/s) | ratio "
          "| end-to-end (req/s) | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|")
    for c, d, n, exp, steady, ratio, e2e, e2e_ratio in rows:
        print(f"| {c} | {d:g} | {n} | {exp:.1f} | {steady:.1f} | {ratio:.3f} | {e2e:.1f} | {e2e_ratio:.3f} |")
    worst = min(r[5] for r in rows)
    print(f"\nworst steady-state ratio {worst:.3f} ({'within' if worst >= 0.9 else 'NOT within'} 10% of C/d); "
          f"worst end-to-end ratio {min(r[7] for r in rows):.3f}")
    keys = ("concurrency", "delay_s", "requests", "expected_rps", "steady_rps", "steady_ratio", "end_to_end_rps",
            "end_to_end_ratio")
    results = {**result_header("caption_client", "bench/bench_caption_client.py", argv, seeds=[0]),
               "settings": {"delay_s": args.delay, "waves": args.waves, "load_average_end": load},
               "rows": [dict(zip(keys, r, strict=True)) for r in rows], "worst_steady_ratio": worst}
    write_results(args.out, results)
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
