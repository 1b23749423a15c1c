"""Wall time of ``llmvem demo`` from a cold cache, per pipeline stage.

Runs ``llmvem demo`` (the shipped ``demo`` config: virtual brain, scene captions, MiniLM, EfficientNet-Lite0,
ridge + LLM-VEM at λ = 0, 0.1, 0.5, HTML report) in a subprocess with a fresh cache folder, so every stage
(captions, caption embeddings, image features) is computed, then reads the per-stage seconds the pipeline wrote
in ``metrics.json["timing"]`` and prints them with the subprocess's wall time (which adds Python start-up,
imports and model loading).

Usage::

    python bench/bench_demo.py                               # ~70 s idle, up to ~13 min on a loaded box
    python bench/bench_demo.py --set train.stage2.epochs=0   # any `llmvem demo --set` override

Writes ``bench/results/demo.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "demo.json"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="demo config override KEY=VALUE")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folder and cache here (default: temporary)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before the demo is stopped")
    return ap.parse_args(argv)


def demo_command(run_dir: Path, cache_dir: Path, overrides: list[str]) -> list[str]:
    """The ``llmvem demo`` command line (through this interpreter, so the active environment is used)."""
    cmd = [sys.executable, "-c", "from llmvem.cli import console_main; console_main()", "demo", "--out", str(run_dir),
           "--no-progress", "--set", f"cache_dir={cache_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    return cmd


def stage_table(timing: dict[str, Any], wall_s: float) -> list[tuple[str, float]]:
    """(stage, seconds) rows: the pipeline's stages in run order, their total, and start-up + the rest."""
    stages = list(timing["stages"].items())
    total = float(timing["total_s"])
    return [*stages, ("pipeline total (metrics.json)", total),
            ("start-up, imports, report, other", max(0.0, wall_s - total)), ("wall time (subprocess)", wall_s)]


def format_table(rows: list[tuple[str, float]], wall_s: float) -> str:
    width = max(len(r[0]) for r in rows)
    lines = [f"{'stage'.ljust(width)}  {'seconds':>8}  {'share':>6}", f"{'-' * width}  {'-' * 8}  {'-' * 6}"]
    lines += [f"{name.ljust(width)}  {sec:8.1f}  {100 * sec / wall_s:5.1f}%" for name, sec in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    args = parse_args(argv)
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLMVEM_NO_PROGRESS="1")
    with tempfile.TemporaryDirectory(prefix="llmvem_bench_demo_") as tmp:
        base = args.keep or Path(tmp)
        run_dir, cache_dir = base / "run", base / "cache"
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise SystemExit(f"bench_demo: {cache_dir} is not empty; the benchmark needs a cold cache")
        cmd = demo_command(run_dir, cache_dir, args.overrides)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=args.timeout)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
            raise SystemExit(f"bench_demo: `llmvem demo` failed with exit code {proc.returncode}")
        metrics = json.loads((run_dir / "metrics.json").read_text(encoding="utf-8"))
    rows = stage_table(metrics["timing"], wall)
    import torch

    results = {
        "benchmark": "llmvem_demo_wall_time",
        "date": time.strftime("%Y-%m-%d"),
        "command": "python bench/bench_demo.py " + " ".join(shlex.quote(a) for a in (argv if argv is not None
                                                                                        else sys.argv[1:])),
        "demo_command": " ".join(["llmvem", *cmd[3:]]),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
                   f"torch {torch.__version__}",
        "wall_s": wall,
        "stages_s": dict(rows),
        "models": {name: {"mean_r": m["mean_r"], "median_r": m["median_r"]} for name, m in metrics["models"].items()},
        "dataset": metrics["dataset"],
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    print(format_table(rows, wall))
    print("models (test mean r): " + ", ".join(f"{k} {v['mean_r']:.3f}" for k, v in results["models"].items()))
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
