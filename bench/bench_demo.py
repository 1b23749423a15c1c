"""Wall time of ``llmvem demo``, per pipeline stage: cold cache, warm cache on the idle box, and warm cache beside
one busy single-threaded process, in one run.

Runs ``llmvem demo`` (the shipped ``demo`` config: virtual brain, scene captions, MiniLM, EfficientNet-Lite0,
ridge + LLM-VEM at λ = 0 and λ = 0.5, HTML report) in a subprocess: first with a fresh cache folder (every stage
computed: captions, caption embeddings, image features), then twice more on that warm cache — alone, and with a
second process spinning one core (``while True: pass``), the shared-machine case of issue 27. Each run's
per-stage seconds come from ``metrics.json["timing"]``; the table adds the subprocess's wall time (Python
start-up, imports and model loading included) and the busy / idle ratio. ``--compare-threads`` adds busy runs
with the thread settings llmvem chooses between (two threads with OpenMP's spinning waits, two with sleeping
waits, one thread), so the choice is measured on the same box in the same run.

Usage::

    python bench/bench_demo.py                               # cold + warm idle + warm busy, ~4-10 min
    python bench/bench_demo.py --compare-threads             # + 3 busy runs with fixed thread settings
    python bench/bench_demo.py --set train.stage2.epochs=0   # any `llmvem demo --set` override

Writes ``bench/results/demo.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUT = ROOT / "bench" / "results" / "demo.json"

#: Busy runs of ``--compare-threads``: (label, --threads, OMP_WAIT_POLICY).
THREAD_VARIANTS = (("2 threads, spinning waits", 2, "ACTIVE"), ("2 threads, sleeping waits", 2, "PASSIVE"),
                   ("1 thread", 1, "PASSIVE"))


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="demo config override KEY=VALUE")
    ap.add_argument("--keep", type=Path, default=None, help="keep the run folders and cache here (default: temporary)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds before a demo is stopped")
    ap.add_argument("--compare-threads", action="store_true", help="also time the busy case with fixed thread "
                    "settings (" + "; ".join(v[0] for v in THREAD_VARIANTS) + ")")
    ap.add_argument("--no-busy", action="store_true", help="only the cold and the warm idle runs")
    return ap.parse_args(argv)


def demo_command(run_dir: Path, cache_dir: Path, overrides: list[str], threads: int | None = None) -> list[str]:
    """The ``llmvem demo`` command line (through this interpreter, so the active environment is used)."""
    cmd = [sys.executable, "-c", "from llmvem.cli import console_main; console_main()", "demo", "--out", str(run_dir),
           "--no-progress", "--set", f"cache_dir={cache_dir}"]
    for o in overrides:
        cmd += ["--set", o]
    if threads is not None:
        cmd += ["--threads", str(threads)]
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


def format_runs(runs: dict[str, dict[str, Any]]) -> str:
    """One column per run: the stages' seconds, the wall time and the ratio to the warm idle run."""
    names = list(runs)
    stages = list(dict.fromkeys(s for r in runs.values() for s in r["stages_s"]))
    width = max(len(s) for s in [*stages, "ratio to warm idle"])
    col = max(12, *(len(n) for n in names))
    lines = [" " * width + "".join(f"  {n:>{col}}" for n in names)]
    for s in stages:
        lines.append(s.ljust(width) + "".join(f"  {runs[n]['stages_s'].get(s, float('nan')):>{col}.1f}" for n in names))
    idle = runs.get("warm idle", {}).get("wall_s")
    if idle:
        lines.append("ratio to warm idle".ljust(width) + "".join(f"  {runs[n]['wall_s'] / idle:>{col}.2f}" for n in names))
    lines.append("load (1 min) before".ljust(width) + "".join(f"  {runs[n]['load_before'][0]:>{col}.2f}" for n in names))
    return "\n".join(lines)


def run_demo(label: str, base: Path, cache_dir: Path, overrides: list[str], timeout: float, *,
             threads: int | None = None, wait_policy: str | None = None, busy: bool = False) -> dict[str, Any]:
    """One ``llmvem demo`` in a subprocess (with one spinning process beside it when ``busy``)."""
    from llmvem.provenance import read_results
    from llmvem.resources import idle_cpus

    run_dir = base / f"run_{label.replace(' ', '_').replace(',', '')}"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLMVEM_NO_PROGRESS="1")
    for var in ("OMP_NUM_THREADS", "LLMVEM_THREADS", "OMP_WAIT_POLICY"):
        env.pop(var, None)  # the demo chooses, unless this run fixes a setting
    if wait_policy is not None:
        env["OMP_WAIT_POLICY"] = wait_policy
    cmd = demo_command(run_dir, cache_dir, overrides, threads)
    spinner = subprocess.Popen([sys.executable, "-c", "while True: pass"]) if busy else None
    try:
        if spinner is not None:
            time.sleep(1.0)  # let it take its core
        load_before, idle_before = list(os.getloadavg()), idle_cpus()
        print(f"[bench_demo] {label}: llmvem {' '.join(cmd[3:])}", file=sys.stderr, flush=True)
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
        wall = time.perf_counter() - t0
    finally:
        if spinner is not None:
            spinner.kill()
            spinner.wait()
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-4000:])
        raise SystemExit(f"bench_demo: `llmvem demo` ({label}) failed with exit code {proc.returncode}")
    metrics = read_results(run_dir / "metrics.json")
    versions = read_results(run_dir / "versions.json")
    print(f"[bench_demo] {label}: {wall:.1f} s", file=sys.stderr, flush=True)
    return {"demo_command": " ".join(["llmvem", *cmd[3:]]), "busy_process": busy, "omp_wait_policy": wait_policy,
            "wall_s": wall, "stages_s": dict(stage_table(metrics["timing"], wall)),
            "peak_rss_bytes": metrics["timing"].get("process_peak_rss_bytes"),
            "threads": versions.get("threads"), "load_before": load_before, "idle_cpus_before": idle_before,
            "models": {name: {"mean_r": m["mean_r"], "median_r": m["median_r"], "val_mean_r": m.get("val_mean_r")}
                       for name, m in metrics["models"].items()},
            "dataset": metrics["dataset"]}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    from llmvem.provenance import result_header, write_results

    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="llmvem_bench_demo_") as tmp:
        base = args.keep or Path(tmp)
        cache_dir = base / "cache"
        if cache_dir.exists() and any(cache_dir.iterdir()):
            raise SystemExit(f"bench_demo: {cache_dir} is not empty; the first run needs a cold cache")
        runs = {"cold": run_demo("cold", base, cache_dir, args.overrides, args.timeout),
                "warm idle": run_demo("warm idle", base, cache_dir, args.overrides, args.timeout)}
        if not args.no_busy:
            runs["warm busy"] = run_demo("warm busy", base, cache_dir, args.overrides, args.timeout, busy=True)
        if args.compare_threads:
            for label, threads, policy in THREAD_VARIANTS:
                runs[f"busy: {label}"] = run_demo(f"busy {label}", base, cache_dir, args.overrides, args.timeout,
                                                  threads=threads, wait_policy=policy, busy=True)
    idle = runs["warm idle"]["wall_s"]
    results = {**result_header("llmvem_demo_wall_time", "bench/bench_demo.py", argv), "runs": runs,
               "busy_over_idle": {k: r["wall_s"] / idle for k, r in runs.items() if r["busy_process"]},
               # the earlier results' keys, from the cold run (the whole pipeline computed)
               "wall_s": runs["cold"]["wall_s"], "stages_s": runs["cold"]["stages_s"],
               "models": runs["cold"]["models"], "dataset": runs["cold"]["dataset"]}
    write_results(args.out, results)
    print(format_runs(runs))
    print("models (test mean r, cold run): " + ", ".join(f"{k} {v['mean_r']:.3f}" for k, v in runs["cold"]["models"].items()))
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
