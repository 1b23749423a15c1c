"""Caption throughput of N ``llmvem caption`` processes sharing one store, each against its own server.

N fake chat-completions servers (``tests/fake_openai_server.py``, each in its own process on 127.0.0.1) take
exactly ``d`` seconds per request. N worker processes run the real command line
``llmvem caption --images DIR --store ONE.sqlite --backend openai --base-url URL_k --max-in-flight C`` at the same
time; they claim disjoint images from the shared store (leases in its ``claims`` table), so with N servers the
job should take ~1/N of the time. The ideal rate is ``N × C / d`` images per second.

Two rates are shown: *wall* (images over the time from starting the processes to the last exit, which includes
Python start-up and imports, ~2-5 s per process on a loaded 2-core machine) and *captioning* (images over the span
between the first and the last stored caption, plus one request time ``d``: what a 73k-image job sees). The
speed-up target (≥ 0.9 × N at N = 4) applies to the captioning rate. Every run checks that each image was
captioned exactly once and that the servers received exactly one request per image. Writes
``bench/results/caption_workers.json`` (``--out``; strict JSON with the provenance header).

Usage::

    python bench/bench_caption_workers.py                       # N = 1, 2, 4; 480 images; d = 0.25 s; C = 4
    python bench/bench_caption_workers.py --images 960 --workers 1 --workers 8
"""

from __future__ import annotations

import argparse
import os
import sqlite3
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "caption_workers.json"
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))  # the fake server lives with the tests that also use it

from fake_openai_server import spawn_server  # noqa: E402

from llmvem.provenance import result_header, write_results  # noqa: E402


def make_images(folder: Path, n: int) -> None:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):  # random pixels: every image has its own content hash
        Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"im{i:05d}.png")


def run(n_workers: int, images: Path, n_images: int, delay: float, in_flight: int, work: Path) -> dict:
    store = work / f"captions_{n_workers}.sqlite"
    servers = [spawn_server(delay, lifetime=600, max_requests=10 * n_images) for _ in range(n_workers)]
    env = {**os.environ, "LLMVEM_NO_PROGRESS": "1", "PYTHONPATH": str(ROOT)}
    try:
        t0 = time.perf_counter()
        procs = [subprocess.Popen(
            [sys.executable, "-m", "llmvem", "caption", "--images", str(images), "--store", str(store), "--backend",
             "openai", "--model", "fake-vlm", "--base-url", url, "--max-in-flight", str(in_flight), "--batch-size",
             str(in_flight)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _, url in servers]
        outs = [p.communicate(timeout=1800) for p in procs]
        wall = time.perf_counter() - t0
    finally:
        for proc, _ in servers:
            proc.kill()
            proc.wait()
    for p, (_, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise RuntimeError(f"worker failed ({p.returncode}): {err[-2000:]}")
    done = [int(out.split("done: ")[1].split(",")[0]) for out, _ in outs]
    con = sqlite3.connect(store)
    rows = con.execute("SELECT image_id, created_at FROM captions").fetchall()
    con.close()
    ids = [r[0] for r in rows]
    if len(ids) != n_images or len(set(ids)) != n_images or sum(done) != n_images:
        raise RuntimeError(f"{n_workers} workers: {len(ids)} rows, {len(set(ids))} images, done {done}")
    stamps = sorted(datetime.fromisoformat(r[1]).timestamp() for r in rows)
    span = stamps[-1] - stamps[0] + delay
    return {"workers": n_workers, "wall_s": wall, "wall_rate": n_images / wall, "span_s": span,
            "rate": n_images / span, "done": done}


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--delay", type=float, default=0.25, help="seconds per request (fixed server latency)")
    parser.add_argument("--in-flight", type=int, default=4, help="requests in flight per worker")
    parser.add_argument("--workers", type=int, action="append", help="worker counts (default 1, 2, 4)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    args = parser.parse_args(argv)
    counts = args.workers or [1, 2, 4]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        make_images(work / "images", args.images)
        results = [run(n, work / "images", args.images, args.delay, args.in_flight, work) for n in counts]
    base = results[0]["rate"] / counts[0]
    print(f"{args.images} images, d = {args.delay:g} s per request, C = {args.in_flight} in flight per worker "
          f"(ideal {args.in_flight / args.delay:.1f} images/s per worker); Python {sys.version.split()[0]}, "
          f"{os.cpu_count()} CPUs")
    print("| workers | wall s | wall images/s | captioning s | captioning images/s | speed-up | × N | images per "
          "worker |")
    print("|---:|---:|---:|---:|---:|---:|---:|---|")
    for r in results:
        r["speedup"] = r["rate"] / base
        print(f"| {r['workers']} | {r['wall_s']:.1f} | {r['wall_rate']:.1f} | {r['span_s']:.1f} | {r['rate']:.1f} | "
              f"{r['speedup']:.2f} | {r['speedup'] / r['workers']:.2f} | {', '.join(map(str, r['done']))} |")
    out = {**result_header("caption_workers", "bench/bench_caption_workers.py", argv, seeds=[0]),
           "settings": {"images": args.images, "delay_s": args.delay, "in_flight": args.in_flight},
           "runs": results}
    write_results(args.out, out)
    print(f"results: {args.out}")
    return out


if __name__ == "__main__":
    main()
