"""Speed of the spatial readouts on the V4 sessions: stage 1 on cached maps and stage 2, against the pooled model.

Issue 15's speed criterion, measured in ONE run (one process, the models of a session fitted one after the other,
so the ratios share the machine's load), a client of llmvem: for every V4 session, the shipped ``v4_spatial``
config with ``evaluate.models`` replaced by six LLM-VEM networks at λ = 0, fitted by
:func:`llmvem.pipeline.run_experiment` into one ordinary run folder per session (``--runs-dir``):

* ``pooled`` — the PCA voxel mapping on the config's pooled layers (no spatial readout);
* ``factorized`` — the ``v4_spatial`` config's ``spatial`` model as it declares it (its ``set``: the cached 7×7
  maps of block5 and block8 at 112 px, factorized readout with the ridge start, residual mode, stage-1 patience 3);
* ``gaussian`` — the same with a Gaussian readout and the pooled model's stage-1 patience.

Each is fitted twice: ``_frozen`` (stage 1 only, with early stopping) and ``_finetuned`` with a fixed number of
stage-2 epochs (``--stage2-epochs``, default 1, early stopping off, so that stage-2 time does not depend on it). The
three readouts are fitted in an order rotated by the session's index (the first fit of a process pays for
warm-up). Reported per session and as medians over sessions, each spatial model / pooled:

* ``stage1_fit`` — wall time of the frozen model's fit + prediction (the runner's per-model seconds);
* ``stage1_loop`` — seconds of the stage-1 training loop alone (the model's ``training.json``), and per epoch;
* ``stage2_loop`` — seconds of the stage-2 training loop, and per epoch;
* ``gemm_floor_ms`` — the bare matrix products a factorized readout of these maps must do per training step
  (forward ``x @ Wᵀ`` and the weight gradient ``dyᵀ @ x``, batch ``train.stage1.batch_size``), timed in the same
  process: the part of a spatial step that no implementation on this machine can remove.

No test figure is printed (the runs' metrics.json hold them, unread here): no ledger line.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_spatial_speed.py --threads 1          # 9 sessions
    python bench/bench_spatial_speed.py --sessions 210322 --max-images 200     # code-path check

On a GPU machine (every stage runs on the GPU when one is visible; ``bench/gpu_checks.sh`` does this), which cannot
read ``../shared`` nor load the text encoder, stage the sessions first, here::

    python bench/bench_spatial_speed.py --stage .gpu_data --sessions 190928 210224 210305 210322

``--stage DIR`` copies those sessions' files to ``DIR/v4_cowley2023`` and embeds their captions into
``DIR/cache`` (the cache key holds the encoder and the texts, so the GPU run finds them and never loads the text
encoder); then ``--data DIR/v4_cowley2023 --cache-dir DIR/cache`` there. Image features are not staged (the GPU
extracts them in seconds; the cached file is gigabytes).

Exits 0 with a message when the data folder is absent. Results: ``bench/results/spatial_speed.json`` (``--out``).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
DEFAULT_OUT = ROOT / "bench" / "results" / "spatial_speed.json"
READOUTS = ("factorized", "gaussian")
KINDS = ("pooled", *READOUTS)
#: ``--quick``: short training (a code-path check, not a figure).
QUICK_OVERRIDES = ["train.stage1.epochs=15", "train.stage2.unfreeze_last_n=1"]
#: The model names of one session: (name, readout).
MODELS = [(f"{kind}_{stage}", kind) for stage in ("frozen", "finetuned") for kind in KINDS]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help="session ids (default: every session found)")
    ap.add_argument("--stage2-epochs", type=int, default=1, help="fixed fine-tuning epochs (default 1)")
    ap.add_argument("--max-images", type=int, default=None, help="first N images of each session (for tests)")
    ap.add_argument("--quick", action="store_true", help="short training (code-path check)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_spatial_speed",
                    help="one run folder per session (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="results JSON (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    ap.add_argument("--stage", type=Path, default=None, metavar="DIR",
                    help="copy --sessions' data and caption embeddings to DIR for a machine without ../shared "
                         "(see the module docstring), then exit")
    return ap.parse_args(argv)


def gemm_floor_ms(shapes: dict[str, list[int]], n_units: int, batch: int, repeats: int = 30,
                  device: str = "cpu") -> float:
    """Median milliseconds of the two matrix products per step of a factorized readout on maps ``shapes``
    ({layer: (C, H, W)}): ``x @ Wᵀ`` (B, C·H·W) × (C·H·W, V) and ``dyᵀ @ x`` (V, B) × (B, C·H·W), all layers,
    on ``device`` (a CUDA device is synchronised before each clock reading)."""
    import torch

    gen = torch.Generator().manual_seed(0)
    xs = [torch.randn(batch, c * h * w, generator=gen).to(device) for c, h, w in shapes.values()]
    ws = [torch.randn(n_units, x.shape[1], generator=gen).to(device) for x in xs]
    dy = torch.randn(batch, n_units, generator=gen).to(device)
    sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)
    times = []
    for i in range(repeats + 3):
        sync()
        t = time.perf_counter()
        for x, w in zip(xs, ws, strict=True):
            x @ w.t()
            dy.t() @ x
        sync()
        if i >= 3:
            times.append((time.perf_counter() - t) * 1e3)
    return float(statistics.median(times))


def stage_sessions(args: argparse.Namespace, sessions: list[str], dest: Path) -> dict[str, Any]:
    """Copy ``sessions``' files from ``args.data`` to ``dest/v4_cowley2023`` and embed their captions into
    ``dest/cache``, as the benchmark will ask for them there (same settings and ``--max-images``, the staged data
    folder).

    Returns the staged files (relative to ``dest``) and their total bytes.
    """
    import shutil

    from llmvem.inputs import caption_dataset, embed_captions

    data = dest / "v4_cowley2023"
    files = []
    for session in sessions:  # its image zip and response arrays, wherever the layout puts them
        found = sorted(p.relative_to(args.data) for p in args.data.rglob(f"*_{session}.*")
                       if p.is_file() and p.suffix in (".zip", ".npy"))
        if not found:
            raise FileNotFoundError(f"{args.data}: no files of session {session} (images_{session}.zip, "
                                    f"responses_{session}.npy)")
        for rel in found:
            (data / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(args.data / rel, data / rel)
            files.append(f"v4_cowley2023/{rel.as_posix()}")
    staged = argparse.Namespace(**{**vars(args), "data": data, "cache_dir": str(dest / "cache")})
    for session in sessions:
        config, ds = _session(staged, session)
        if ds.val is None:  # as prepare_inputs does before captioning
            ds = ds.with_validation_split(config.data.val_fraction, config.data.seed)
        embed_captions(config, caption_dataset(config, ds, False)[0], False)
    files += sorted(str(p.relative_to(dest)) for p in (dest / "cache").rglob("*") if p.is_file())
    return {"files": files, "bytes": sum((dest / f).stat().st_size for f in files)}


def speed_entries(config, stage2_epochs: int, turn: int = 0) -> list:
    """The six networks of one session (module docstring), the readouts in an order rotated by ``turn``."""
    from llmvem.config_models import ModelEntry

    # the trained spatial network (not ``spatial_start``, the ridge start alone with no training loop)
    spatial = next(e for e in config.evaluate.models if e.name == "spatial")
    sets = {"pooled": {}, "factorized": dict(spatial.set),
            "gaussian": {k: v for k, v in spatial.set.items() if k != "train.stage1.early_stopping_patience"}
            | {"model.spatial_readout": "gaussian"}}
    stages = {"frozen": {"train.stage2.epochs": 0},
              "finetuned": {"train.stage2.epochs": stage2_epochs, "train.stage2.early_stopping_patience": None}}
    order = KINDS[turn % len(KINDS):] + KINDS[:turn % len(KINDS)]
    return [ModelEntry(name=f"{kind}_{stage}", kind="llmvem", lambda_align=0.0, set={**sets[kind], **over})
            for kind in order for stage, over in stages.items()]


def session_config(args: argparse.Namespace, session: str):
    """``v4_spatial`` for one session (its ``spatial`` model still declared: :func:`speed_entries` reads it)."""
    from llmvem.config import apply_overrides, load_config

    extra = [f"data.spec=v4:{args.data}:{session}", f"cache_dir={args.cache_dir}", "evaluate.bootstrap=0",
             "evaluate.text_to_brain=false", *(QUICK_OVERRIDES if args.quick else [])]
    return apply_overrides(load_config("v4_spatial"), [*extra, *args.overrides])


def _session(args: argparse.Namespace, session: str):
    """A session's config and its dataset, cut to ``--max-images`` when given."""
    from llmvem.data.splits import first_images
    from llmvem.inputs import load_config_dataset

    config = session_config(args, session)
    ds = load_config_dataset(config)
    return config, (first_images(ds, args.max_images) if args.max_images else ds)


def run_session(args: argparse.Namespace, session: str, turn: int = 0) -> dict[str, Any]:
    """The six networks of one session in one run folder: seconds, epochs and ratios to ``pooled``."""
    from llmvem.inputs import prepare_inputs
    from llmvem.pipeline import extraction_config, run_experiment
    from llmvem.train.load import read_training_summary

    config, ds = _session(args, session)
    entries = speed_entries(config, args.stage2_epochs, turn)
    maps = list(next(e for e in entries if e.name == "factorized_frozen").set["backbone.spatial_layers"])
    config.evaluate.models = entries
    inputs = prepare_inputs(extraction_config(config), show_progress=False, dataset=ds)
    run = args.runs_dir / session
    metrics = run_experiment(config, run, overwrite=True, show_progress=False, report=False, inputs=inputs,
                             on_stage=lambda m: print(f"[bench_spatial_speed] {session}: {m}", file=sys.stderr,
                                                      flush=True))
    models: dict[str, dict[str, Any]] = {}
    for name, _ in MODELS:
        rec: dict[str, Any] = {"fit_s": float(metrics["timing"]["stages"][name])}
        for st, summary in read_training_summary(run / "models" / name)["stages"].items():
            epochs = int(summary["epochs_run"])
            rec[st] = {"loop_s": float(summary["train_seconds"]), "epochs": epochs,
                       "loop_s_per_epoch": float(summary["train_seconds"]) / max(epochs, 1)}
        models[name] = rec
    shapes = {k: [int(n) for n in inputs.features["train"][k].shape[1:]] for k in maps}
    batch = config.train.stage1.batch_size
    return {"run": str(run), "n_neurons": ds.n_voxels, "n_train": len(ds.train),
            "llmvem_layers": list(config.backbone.layers), "map_shapes": shapes,
            "order": [e.name.rsplit("_", 1)[0] for e in entries][::2], "models": models, "ratios": ratios(models),
            "gemm_floor_ms": gemm_floor_ms(shapes, ds.n_voxels, batch, device=_torch_device(config.train.device)),
            "stage1_steps_per_epoch": -(-len(ds.train) // batch)}


def _torch_device(name: str) -> str:
    """The device ``train.device`` resolves to (``"auto"``: CUDA when visible)."""
    import torch

    return ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name


def ratios(models: dict[str, dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Each spatial readout / pooled: stage-1 fit wall time, stage-1 loop (total, per epoch), stage-2 loop."""
    out = {}
    for kind in READOUTS:
        f, p = models[f"{kind}_frozen"], models["pooled_frozen"]
        ft, pt = models[f"{kind}_finetuned"], models["pooled_finetuned"]
        r = {"stage1_fit": f["fit_s"] / p["fit_s"],
             "stage1_loop": f["stage1"]["loop_s"] / p["stage1"]["loop_s"],
             "stage1_loop_per_epoch": f["stage1"]["loop_s_per_epoch"] / p["stage1"]["loop_s_per_epoch"]}
        if "stage2" in ft and "stage2" in pt:
            r["stage2_loop"] = ft["stage2"]["loop_s"] / pt["stage2"]["loop_s"]
            r["stage2_loop_per_epoch"] = ft["stage2"]["loop_s_per_epoch"] / pt["stage2"]["loop_s_per_epoch"]
        out[kind] = r
    return out


def medians(sessions: dict[str, dict[str, Any]]) -> dict[str, dict[str, dict[str, float]]]:
    """Median, min and max over sessions of every ratio."""
    out: dict[str, dict[str, dict[str, float]]] = {}
    for kind in READOUTS:
        keys = sorted({k for s in sessions.values() for k in s["ratios"][kind]})
        out[kind] = {}
        for k in keys:
            vals = [s["ratios"][kind][k] for s in sessions.values() if k in s["ratios"][kind]]
            out[kind][k] = {"median": statistics.median(vals), "min": min(vals), "max": max(vals)}
    return out


def format_table(results: dict[str, Any]) -> str:
    rows = ["| session | pooled s1 loop s (epochs) | factorized s1 loop s (epochs) | gaussian s1 loop s (epochs) | "
            "s1 fit s pooled / fact / gauss | s2 loop s pooled / fact / gauss | GEMM floor ms/step |",
            "|---|---|---|---|---|---|---|"]
    for sid, s in results["sessions"].items():
        m = s["models"]
        s1 = [f"{m[f'{k}_frozen']['stage1']['loop_s']:.1f} ({m[f'{k}_frozen']['stage1']['epochs']})"
              for k in ("pooled", *READOUTS)]
        fit = " / ".join(f"{m[f'{k}_frozen']['fit_s']:.1f}" for k in ("pooled", *READOUTS))
        s2 = " / ".join(f"{m[f'{k}_finetuned'].get('stage2', {}).get('loop_s', float('nan')):.1f}"
                        for k in ("pooled", *READOUTS))
        rows.append(f"| {sid} | {' | '.join(s1)} | {fit} | {s2} | {s['gemm_floor_ms']:.2f} |")
    rows += ["", "| spatial / pooled (median over sessions [min, max]) | " + " | ".join(READOUTS) + " |",
             "|---|" + "---|" * len(READOUTS)]
    med = results["medians"]
    for k in med[READOUTS[0]]:
        rows.append(f"| {k} | " + " | ".join(f"{med[r][k]['median']:.2f}× [{med[r][k]['min']:.2f}, "
                                             f"{med[r][k]['max']:.2f}]" for r in READOUTS) + " |")
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    args = parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_spatial_speed: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    from llmvem.provenance import bench_runtime, result_header, write_results

    bench_runtime(False, args.threads)
    from llmvem.data.v4 import list_v4_sessions

    sessions = args.sessions or list_v4_sessions(args.data)
    if args.stage is not None:
        staged = stage_sessions(args, sessions, args.stage)
        print(f"staged {len(sessions)} sessions in {args.stage}: {len(staged['files'])} files, "
              f"{staged['bytes'] / 2**20:.1f} MiB")
        return staged
    t0 = time.perf_counter()
    records: dict[str, Any] = {}
    for i, session in enumerate(sessions):
        print(f"[bench_spatial_speed] session {session} ...", file=sys.stderr, flush=True)
        records[session] = run_session(args, session, i)
        r = records[session]["ratios"]
        print(f"[bench_spatial_speed] {session}: " + ", ".join(
            f"{k} s1 fit {v['stage1_fit']:.2f}× loop {v['stage1_loop']:.2f}× s2 {v.get('stage2_loop', 0):.2f}×"
            for k, v in r.items()), file=sys.stderr, flush=True)
    config = session_config(args, sessions[0])
    results = {**result_header("v4_cowley2023", "bench/bench_spatial_speed.py", argv, config=config,
                               seeds=[config.seed]),
               "settings": {"config": "v4_spatial", "stage2_epochs": args.stage2_epochs, "max_images": args.max_images,
                            "quick": args.quick, "overrides": list(args.overrides), "threads": args.threads,
                            "models": [e.model_dump(mode="json") for e in speed_entries(config, args.stage2_epochs)]},
               "sessions": records, "medians": medians(records), "seconds_total": time.perf_counter() - t0}
    write_results(args.out, results)
    print(format_table(results))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
