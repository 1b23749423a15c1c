"""Which start of stage 1 holds from 500 V4 images to an NSD-size subject: ``model.readout_init`` random, ridge
and auto, chosen on validation (issue 27), a thin client of ``llmvem train``.

Each (start, session) is one ordinary ``llmvem train`` run (the shipped ``demo`` config with a linear core, stage 2
off, label captions, 112 px; ``COMMON``), in ``--work``/START_SESSION (``llmvem report`` opens it). The table is the
validation mean r of the λ > 0 model at its best epoch, and whether that epoch is the ridge start (best epoch 0).
``auto`` validates the ridge start, then trains from the random weights exactly as ``random`` does and keeps the
better on validation, so its row is the larger of the other two per session (a check of the engine, not a gain
of its own). The NSD-size figures come from ``bench/results/nsd_recipe_val.json`` (``bench_nsd_scale.py``).

Usage::

    python bench/bench_readout_start.py                       # 9 V4 sessions x 3 starts, 2 runs at a time
    python bench/bench_readout_start.py --sessions 190925 --starts random auto

Writes ``bench/results/v4_readout_start.json`` (``--out``) and appends one line to ``bench/results/ledger.csv``:
``llmvem train`` prints the test r of every run, and so reads the test split, although nothing here uses it.
Runs already finished in ``--work`` are read back. Exits 0 with a message when the data are absent.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
SESSIONS = ["190925", "190927", "190928", "190929", "210224", "210305", "210322", "210325", "210621"]
STARTS = ["random", "ridge", "auto"]
MODEL = "llmvem_lambda0.5"
COMMON = ["--config", "demo", "--no-progress", "--threads", "1", "--set", "backbone.image_size=112",
          "--set", "train.stage2.epochs=0", "--set", "model.core=linear", "--set", "captions.backend=labels",
          "--set", "evaluate.variance_partition=false", "--set", "evaluate.text_to_brain=false",
          "--set", "evaluate.baselines=[]"]


def command(start: str, session: str, out: Path, cache: Path) -> list[str]:
    """The ``llmvem train`` command of one run."""
    return [str(Path(sys.executable).with_name("llmvem")), "train", *COMMON, "--set",
            f"data.spec=v4:{DATA}:{session}", "--set", f"cache_dir={cache}", "--set", f"model.readout_init={start}",
            "--out", str(out)]


def run_one(start: str, session: str, work: Path, cache: Path) -> dict:
    """Train (unless finished) and read back validation r, best epoch and stage-1 seconds."""
    from llmvem.report.untrusted import read_run_json

    out = work / f"{start}_{session}"
    if not (out / "metrics.json").is_file():
        log = work / f"{start}_{session}.log"
        with open(log, "w") as fh:
            subprocess.run(command(start, session, out, cache), check=True, stdout=fh, stderr=subprocess.STDOUT,
                           env={**os.environ, "OMP_NUM_THREADS": "1"})
    metrics = read_run_json(out / "metrics.json")
    stage1 = read_run_json(out / "models" / MODEL / "training.json")["stages"]["stage1"]
    return {"start": start, "session": session, "val_mean_r": metrics["models"][MODEL]["val_mean_r"],
            "best_epoch": stage1["best_epoch"], "epochs_run": stage1["epochs_run"],
            "ridge_start_kept": bool(stage1.get("ridge_start_kept", False)),
            "fit_s": metrics["timing"]["stages"][MODEL], "command": " ".join(command(start, session, out, cache))}


def main(argv: list[str] | None = None) -> dict | None:
    from llmvem.provenance import append_ledger, result_header, write_results

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sessions", nargs="+", default=SESSIONS)
    ap.add_argument("--starts", nargs="+", default=STARTS, choices=STARTS)
    ap.add_argument("--work", type=Path, default=Path("runs/bench_readout_start"), help="run folders")
    ap.add_argument("--cache", type=Path, default=None, help="feature cache (default: WORK/cache)")
    ap.add_argument("--jobs", type=int, default=2, help="runs at a time (1 thread each)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "v4_readout_start.json")
    ap.add_argument("--ledger", type=Path, default=ROOT / "bench" / "results" / "ledger.csv")
    args = ap.parse_args(argv)
    if not DATA.is_dir():
        print(f"V4 data not found at {DATA}: nothing to do")
        return None
    args.work.mkdir(parents=True, exist_ok=True)
    cache = args.cache or args.work / "cache"
    # the first run of each session fills the feature cache: the others wait for it
    first = [(args.starts[0], s) for s in args.sessions]
    rest = [(a, s) for a in args.starts[1:] for s in args.sessions]
    with ThreadPoolExecutor(args.jobs) as pool:
        rows = list(pool.map(lambda job: run_one(*job, args.work, cache), first))
        rows += list(pool.map(lambda job: run_one(*job, args.work, cache), rest))
    table = {a: {r["session"]: r for r in rows if r["start"] == a} for a in args.starts}
    print(f"{'session':<9}" + "".join(f"{a:>16}" for a in args.starts))
    for s in args.sessions:
        cells = [f"{table[a][s]['val_mean_r']:.4f}" + ("*" if table[a][s]["ridge_start_kept"] else " ")
                 for a in args.starts]
        print(f"{s:<9}" + "".join(f"{c:>16}" for c in cells))
    means = {a: float(np.mean([table[a][s]["val_mean_r"] for s in args.sessions])) for a in args.starts}
    print(f"{'mean':<9}" + "".join(f"{means[a]:>15.4f} " for a in args.starts))
    print("validation mean r of the λ > 0 model; * = best epoch 0, the ridge start")
    results = {**result_header("v4_readout_start", "bench/bench_readout_start.py", argv, seeds=[0]),
               "chosen_on": "validation mean r (best epoch); the test r printed by llmvem train is not read here",
               "mean_val_r": means, "rows": rows}
    write_results(args.out, results)
    append_ledger(args.ledger, "bench_readout_start", "test printed by llmvem train for every run (not used): "
                  f"readout_init {', '.join(args.starts)} chosen on validation -> {args.out.name}",
                  sessions=args.sessions)
    print(f"results: {args.out}")
    return results


if __name__ == "__main__":
    main()
