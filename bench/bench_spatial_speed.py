"""Speed of the spatial readouts on the V4 sessions: stage 1 on cached maps and stage 2, against the pooled model.

Issue 15's speed criterion, measured in ONE run (one process, the models of a session fitted one after the other,
so the ratios share the machine's load): for every V4 session, four LLM-VEM models at λ = 0 with
``bench_v4``'s settings and readout layers (the ridge baseline's validation choice):

* ``pooled`` — today's model: PCA voxel mapping on globally pooled layers;
* ``factorized`` / ``gaussian`` — the same plus a spatial readout residual (``bench_v4.SPATIAL_LAYERS``: cached
  7×7 maps of block5 and block8 at the stimuli's 112 px); the factorized one as ``bench_v4`` fits it (ridge
  start, stage-1 patience ``bench_v4.SPATIAL_STAGE1_PATIENCE``), the Gaussian one with the pooled model's patience.

Each is fitted twice: frozen (stage 1 only, ``bench_v4``'s stage-1 settings with early stopping) and fine-tuned
with a fixed number of stage-2 epochs (``--stage2-epochs``, default 1, so that stage-2 time does not depend on
early stopping). Reported per session and as medians over sessions, each spatial model / pooled:

* ``stage1_fit`` — wall time of the frozen model's fit + prediction (what a user waits for per session);
* ``stage1_loop`` — seconds of the stage-1 training loop alone (no validation, no setup), and per epoch;
* ``stage2_loop`` — seconds of the stage-2 training loop, and per epoch;
* ``gemm_floor_ms`` — the bare matrix products a factorized readout of these maps must do per training step
  (forward ``x @ Wᵀ`` and the weight gradient ``dyᵀ @ x``, batch ``train.stage1.batch_size``), timed in the same
  process: the part of a spatial step that no implementation on this machine can remove.

Usage::

    OMP_NUM_THREADS=1 python bench/bench_spatial_speed.py --threads 1          # 9 sessions, ~13-35 min
    python bench/bench_spatial_speed.py --sessions 210322 --max-images 200     # code-path check

On a GPU machine (every stage runs on the GPU when one is visible; ``bench/gpu_checks.sh`` does this), which cannot
read ``../shared`` nor load the text encoder, stage the sessions first, here::

    python bench/bench_spatial_speed.py --stage .gpu_data --sessions 190928 210224 210305 210322

``--stage DIR`` copies those sessions' files to ``DIR/v4_cowley2023`` and embeds their captions into
``DIR/cache`` (the cache key holds the encoder and the texts, so the GPU run finds them and never loads the text
encoder); then ``--data DIR/v4_cowley2023 --cache-dir DIR/cache`` there. Image features are not staged (the GPU
extracts them in seconds; the cached file is gigabytes).

Exits 0 with a message when the data folder is absent. Results: ``bench/results/spatial_speed.json``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT))

import bench_v4  # noqa: E402  (bench/ is on the path)

DEFAULT_OUT = ROOT / "bench" / "results" / "spatial_speed.json"
READOUTS = ("factorized", "gaussian")
#: (name in this benchmark, bench_v4 model, spatial readout or None)
MODELS = [(f"{kind}_{stage}", f"lambda0_{'spatial_' if kind != 'pooled' else ''}{stage}", kind)
          for stage in ("frozen", "finetuned") for kind in ("pooled", *READOUTS)]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", type=Path, default=bench_v4.DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--sessions", nargs="+", default=None, help="session ids (default: every session found)")
    ap.add_argument("--stage2-epochs", type=int, default=1, help="fixed fine-tuning epochs (default 1)")
    ap.add_argument("--max-images", type=int, default=None, help="first N images of each session (for tests)")
    ap.add_argument("--quick", action="store_true", help="bench_v4's short training (code-path check)")
    ap.add_argument("--cache-dir", default="~/.cache/llmvem", help="captions / features cache (default: %(default)s)")
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


def _v4_args(args: argparse.Namespace) -> argparse.Namespace:
    """bench_v4's arguments for this run (its settings, the fixed stage-2 epochs)."""
    v4 = bench_v4.parse_args(["--data", str(args.data), "--stage2-epochs", str(args.stage2_epochs),
                              "--cache-dir", args.cache_dir] + (["--quick"] if args.quick else []))
    return v4


def _session(args: argparse.Namespace, session: str):
    """A session's config (bench_v4's settings) and its dataset, cut to ``--max-images`` when given."""
    from llmvem.inputs import load_config_dataset

    config = bench_v4.session_config(_v4_args(args), session)
    ds = load_config_dataset(config)
    return config, (bench_v4.truncate_dataset(ds, args.max_images) if args.max_images else ds)


def run_session(args: argparse.Namespace, session: str, work: Path, turn: int = 0) -> dict[str, Any]:
    """The models (frozen and fine-tuned) of one session: seconds, epochs and ratios to ``pooled``.

    The three readouts are fitted in an order rotated by ``turn`` (the session's index), so that across sessions
    each comes first equally often: the first fit of a process pays for warm-up (allocations, library set-up).
    """
    from llmvem.inputs import prepare_inputs

    config, ds = _session(args, session)
    layer_sets = bench_v4.QUICK_RIDGE_LAYER_SETS if args.quick else bench_v4.RIDGE_LAYER_SETS
    prep = config.model_copy(deep=True)
    spatial_models = ["lambda0_spatial_frozen", "lambda0_spatial_finetuned"]
    prep.backbone.layers = bench_v4.extraction_layers(spatial_models, (), bench_v4.SPATIAL_LAYERS)
    inputs = prepare_inputs(prep, dataset=ds)
    # the readout layers: the ridge baseline's validation choice (as bench_v4), chosen once for the three readouts
    layers, _, _ = bench_v4.select_ridge_layers(config, inputs, layer_sets)
    config = config.model_copy(deep=True)
    config.backbone.layers = list(layers)
    models: dict[str, dict[str, Any]] = {}
    kinds = ("pooled", *READOUTS)
    order = kinds[turn % len(kinds):] + kinds[:turn % len(kinds)]
    for readout in order:
        names = ["lambda0_frozen", "lambda0_finetuned"] if readout == "pooled" else spatial_models
        out = work / session / readout
        _, info = bench_v4.fit_models(config, inputs, 0.0, out, layer_sets, False, names, "config",
                                      spatial_layers=bench_v4.SPATIAL_LAYERS,
                                      spatial_readout="factorized" if readout == "pooled" else readout)
        for name, v4_name, kind in MODELS:
            if kind != readout:
                continue
            stages = json.loads((out / v4_name / "training.json").read_text(encoding="utf-8"))["stages"]
            rec: dict[str, Any] = {"fit_s": float(info["seconds"][v4_name])}
            for st, summary in stages.items():
                epochs = int(summary["epochs_run"])
                rec[st] = {"loop_s": float(summary["train_seconds"]), "epochs": epochs,
                           "loop_s_per_epoch": float(summary["train_seconds"]) / max(epochs, 1)}
            models[name] = rec
    shapes = {k: [int(n) for n in inputs.features["train"][k].shape[1:]] for k in bench_v4.SPATIAL_LAYERS}
    batch = config.train.stage1.batch_size
    return {"n_neurons": ds.n_voxels, "n_train": len(ds.train), "llmvem_layers": list(layers),
            "map_shapes": shapes, "order": list(order),
            "models": models, "ratios": ratios(models),
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
    bench_v4.offline_runtime(False, args.threads)
    from llmvem.data.v4 import list_v4_sessions

    sessions = args.sessions or list_v4_sessions(args.data)
    if args.stage is not None:
        staged = stage_sessions(args, sessions, args.stage)
        print(f"staged {len(sessions)} sessions in {args.stage}: {len(staged['files'])} files, "
              f"{staged['bytes'] / 2**20:.1f} MiB")
        return staged
    t0 = time.perf_counter()
    records: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="llmvem_bench_speed_") as tmp:
        for i, session in enumerate(sessions):
            print(f"[bench_spatial_speed] session {session} ...", file=sys.stderr, flush=True)
            records[session] = run_session(args, session, Path(tmp), i)
            r = records[session]["ratios"]
            print(f"[bench_spatial_speed] {session}: " + ", ".join(
                f"{k} s1 fit {v['stage1_fit']:.2f}× loop {v['stage1_loop']:.2f}× s2 {v.get('stage2_loop', 0):.2f}×"
                for k, v in r.items()), file=sys.stderr, flush=True)
    results = {**bench_v4.result_header("v4_cowley2023", "bench_spatial_speed.py", argv),
               "settings": {"stage2_epochs": args.stage2_epochs, "max_images": args.max_images, "quick": args.quick,
                            "spatial_layers": list(bench_v4.SPATIAL_LAYERS), "threads": args.threads},
               "sessions": records, "medians": medians(records), "seconds_total": time.perf_counter() - t0}
    bench_v4.write_results(args.out, results)
    print(format_table(results))
    print(f"results: {args.out}  ({results['seconds_total'] / 60:.1f} min)")
    return results


if __name__ == "__main__":
    main()
