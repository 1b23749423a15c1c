"""Variance partitioning on V4 sessions (issue 25), a thin client of llmvem: image features vs label captions.

For each session the script runs what a user would run::

    llmvem train --config v4_spatial --set data.spec=v4:ROOT:SESSION \\
        --set "evaluate.models=[{name: ridge, kind: ridge, layers: [block8, block10, block12]}]" \\
        --set evaluate.variance_partition=true --set "evaluate.partition_layers=[block8, block10, block12]"

(:func:`llmvem.pipeline.run_experiment`, one ordinary run folder per session under ``--runs-dir``). The captions are
the config's (``captions.backend=labels``: ImageNet class names of each image → MiniLM). The partition
(:mod:`llmvem.evaluate.partition`) fits the pooled EfficientNet-Lite0 features and the caption embeddings as two
bands (banded ridge on both, ridge on each, on train + val) and reports per neuron the unique-image,
unique-language and shared test R², with the corrections it states; the script keeps each session's figures and
their mean over sessions, weighted by neurons.

Usage::

    python bench/bench_partition_v4.py                         # sessions 190925 190927 190928
    python bench/bench_partition_v4.py --sessions 210322 --max-images 120 --out /tmp/p.json

Writes ``bench/results/partition_v4.json`` (``--out``; strict JSON, provenance header) and one ledger line (the test
split is read). Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
DEFAULT_OUT = ROOT / "bench" / "results" / "partition_v4.json"
LEDGER = ROOT / "bench" / "results" / "ledger.csv"
SESSIONS = ["190925", "190927", "190928"]
LAYERS = ["block8", "block10", "block12"]
#: What the user's command sets on top of v4_spatial (the module docstring).
OVERRIDES = [f"evaluate.models=[{{name: ridge, kind: ridge, layers: [{', '.join(LAYERS)}]}}]",
             "evaluate.variance_partition=true", f"evaluate.partition_layers=[{', '.join(LAYERS)}]",
             "evaluate.text_to_brain=false"]
PARTS = ("unique_image_r2", "unique_language_r2", "shared_r2", "joint_r2", "image_r2", "language_r2")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=SESSIONS, help="session ids (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="extra config override KEY=VALUE")
    ap.add_argument("--max-images", type=int, default=None, help="keep only the first N images of each session")
    ap.add_argument("--cache-dir", default=None, help="captions / features cache (default: the config's)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "partition_v4", help="run folders")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=LEDGER, help="test-read ledger (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args(argv)


def session_config(args: argparse.Namespace, session: str):
    from llmvem.config import apply_overrides, load_config

    extra = [f"data.spec=v4:{args.data}:{session}", *OVERRIDES]
    if args.cache_dir:
        extra.append(f"cache_dir={args.cache_dir}")
    return apply_overrides(load_config("v4_spatial"), [*extra, *args.overrides])


def run_session(args: argparse.Namespace, session: str) -> dict[str, Any]:
    """One session through :func:`llmvem.pipeline.run_experiment`; its ``metrics.json``."""
    from llmvem.data.splits import first_images
    from llmvem.inputs import load_config_dataset, prepare_inputs
    from llmvem.pipeline import extraction_config, run_experiment

    config = session_config(args, session)
    inputs = None
    if args.max_images:
        inputs = prepare_inputs(extraction_config(config), show_progress=False,
                                dataset=first_images(load_config_dataset(config), args.max_images))
    return run_experiment(config, args.runs_dir / session, overwrite=True, show_progress=False, report=False,
                          inputs=inputs,
                          on_stage=lambda m: print(f"[bench_partition_v4] {session}: {m}", file=sys.stderr, flush=True))


def pooled(records: dict[str, dict[str, Any]]) -> dict[str, float]:
    """Each part's mean over all neurons of the sessions (session figures weighted by their neurons)."""
    n = sum(r["n_voxels"] for r in records.values())
    return {k: sum(r[k] * r["n_voxels"] for r in records.values()) / n for k in PARTS} | {"n_voxels": n}


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_partition_v4: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(False, args.threads)
    t0 = time.perf_counter()
    records: dict[str, dict[str, Any]] = {}
    for session in args.sessions:
        metrics = run_session(args, session)
        vp = metrics["variance_partition"]
        records[session] = {**vp["per_roi"]["all"], "language_band_weight_mean": vp["language_band_weight_mean"],
                            "ridge_test_mean_r": metrics["models"]["ridge"]["mean_r"]}
    config = session_config(args, args.sessions[0])
    results = {**result_header("partition_v4", "bench/bench_partition_v4.py", argv, config=config),
               "settings": {"sessions": args.sessions, "image_layers": LAYERS, "captions": config.captions.backend,
                            "max_images": args.max_images, "overrides": list(args.overrides),
                            "correction": vp["correction"]},
               "sessions": records, "pooled": pooled(records), "seconds": time.perf_counter() - t0}
    write_results(args.out, results)
    append_ledger(args.ledger, "partition_v4", f"test: variance partition (image {'+'.join(LAYERS)} vs "
                  f"{config.captions.backend} captions) -> {args.out.name}", config=config, sessions=args.sessions)
    print(f"{'session':>8} {'neurons':>7} " + " ".join(f"{k:>18}" for k in PARTS))
    for s, r in [*records.items(), ("pooled", results["pooled"])]:
        print(f"{s:>8} {r['n_voxels']:>7} " + " ".join(f"{r[k]:>18.4f}" for k in PARTS))
    print(f"results: {args.out}  ({results['seconds']:.0f} s)")
    return results


if __name__ == "__main__":
    main()
