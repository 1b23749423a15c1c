"""Several subjects trained jointly vs separately, on the macaque V4 sessions (each session = one "subject").

Data: macaque V4 spike counts to natural images (Cowley, Stan, Pillow & Smith 2023, cowleygroup/V4_compact_models),
``../shared/data/v4_cowley2023`` relative to the repository (``--data`` to point elsewhere). Each session records
its own neurons to its own images, which is exactly the multi-subject setting of NSD (8 subjects, mostly different
images): the readouts cannot be shared, the image representation can.

Both arms use :func:`llmvem.multisubject.run_multisubject` with the same architecture and settings — the shipped
``v4_spatial`` settings (EfficientNet-Lite0 at the stimuli's 112 px, its pooled layers from the HDF5 feature cache,
its stage-1 training; ``evaluate.models`` unused), a shared linear core of ``multisubject.core_dim`` units, one PCA
voxel readout per session — and differ only in the data the core sees:

* **joint** — one network, the batches of all sessions interleaved;
* **separate** — one network per session, trained on that session alone.

Stage 1 only by default (heads on cached features; ``--set train.stage2.epochs=1`` adds fine-tuning of the shared
backbone's last blocks). λ = 0 by default (``--lambda 0.1`` aligns to the offline ImageNet-label captions). Per
session: mean test r over neurons for both arms (noise-normalised accuracy where raw repeats exist, session
210325), the paired bootstrap of joint − separate over test images, and the mean over sessions. The package writes
``summary.json`` / ``summary.md`` and the run folders in ``--out``; this script writes
``bench/results/multisubject_v4.json`` (``--results``; strict JSON with the provenance header) and one line of
``bench/results/ledger.csv`` (test figures are read).

Usage::

    python bench/bench_multisubject_v4.py                          # all 9 sessions (~15 min on 2 CPU cores)
    python bench/bench_multisubject_v4.py --sessions 210305,210325 # a subset
    python bench/bench_multisubject_v4.py --set multisubject.core_dim=64

Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"

#: On top of the shipped ``v4_spatial`` settings: stage 1 only, the shared core's size.
BENCH_OVERRIDES = ["train.stage2.epochs=0", "multisubject.core_dim=128", "evaluate.text_to_brain=false"]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder")
    ap.add_argument("--sessions", default=None, help="comma-separated session ids (default: all in --data)")
    ap.add_argument("--lambda", dest="lam", type=float, default=0.0, help="alignment weight (label captions)")
    ap.add_argument("--cache-dir", default="/tmp/llmvem_bench_multi_cache", help="feature / caption cache")
    ap.add_argument("--out", type=Path, default=ROOT / "runs" / "bench_multisubject_v4", help="output folder")
    ap.add_argument("--results", type=Path, default=ROOT / "bench" / "results" / "multisubject_v4.json",
                    help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=ROOT / "bench" / "results" / "ledger.csv",
                    help="test-read ledger (default: %(default)s)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="extra config override (repeatable)")
    ap.add_argument("--resume", action="store_true", help="reuse finished trainings in --out")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    return ap.parse_args(argv)


def main(argv: list[str] | None = None) -> dict | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_multisubject_v4: V4 data folder {args.data} is absent; nothing to benchmark (pass --data)")
        return None
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(False, args.threads)
    from llmvem.config import apply_overrides, load_config
    from llmvem.data.v4 import list_v4_sessions
    from llmvem.multisubject import run_multisubject, summary_table

    sessions = args.sessions.split(",") if args.sessions else list_v4_sessions(args.data)
    overrides = [*BENCH_OVERRIDES, f"cache_dir={args.cache_dir}", f"model.lambda_align={args.lam}", *args.overrides]
    cfg = apply_overrides(load_config("v4_spatial"), overrides)
    cfg.evaluate.models = []
    print(f"# joint vs separate training, V4 sessions {', '.join(sessions)}; v4_spatial + {' '.join(overrides)}")
    t0 = time.perf_counter()
    summary = run_multisubject(cfg, [f"v4:{args.data}:{s}" for s in sessions], args.out, separate=True,
                               resume=args.resume, overwrite=not args.resume, show_progress=False,
                               on_stage=lambda msg: print(f"[{time.perf_counter() - t0:6.0f} s] {msg}",
                                                          file=sys.stderr, flush=True))
    wall = time.perf_counter() - t0
    print()
    print(summary_table(summary))
    acc = {n: e for n, e in summary["subjects"].items() if e["joint"].get("mean_accuracy") is not None}
    for name, e in acc.items():
        print(f"{name}: noise-normalised accuracy joint {e['joint']['mean_accuracy']:.1f}% vs separate "
              f"{e['separate']['mean_accuracy']:.1f}%")
    n_better = sum(e["joint"]["mean_r"] > e["separate"]["mean_r"] for e in summary["subjects"].values())
    n_sig = sum(1 for e in summary["subjects"].values()
                if e.get("joint_vs_separate") and e["joint_vs_separate"]["p_value"] < 0.05)
    print(f"joint better in {n_better}/{len(summary['subjects'])} sessions ({n_sig} with p < 0.05, paired bootstrap "
          f"over test images, uncorrected)")
    secs = summary["seconds"]
    print(f"training: joint {secs['joint']:.0f} s, separate {secs['separate']:.0f} s (all sessions); "
          f"wall time {wall:.0f} s including feature extraction")
    results = {**result_header("v4_cowley2023", "bench/bench_multisubject_v4.py", argv, config=cfg, seeds=[cfg.seed]),
               "settings": {"config": "v4_spatial", "overrides": overrides, "sessions": sessions,
                            "out": str(args.out)},
               "summary": summary, "n_joint_better": n_better, "seconds_wall": wall}
    write_results(args.results, results)
    append_ledger(args.ledger, "bench_multisubject_v4", f"test: joint, separate -> {args.results.name}", config=cfg,
                  sessions=sessions)
    print(f"results: {args.results}")
    return results


if __name__ == "__main__":
    main()
