"""Quick V4 check of spatial features on one session: ridge on globally pooled vs grid-pooled EfficientNet-Lite0
blocks, a client of llmvem.

A direction check (not the 9-session benchmark of ``bench/bench_v4.py``): one session of the V4 data (Cowley et al.
2023, ``../shared/data/v4_cowley2023``) through :func:`llmvem.pipeline.run_experiment` with the shipped
``v4_spatial`` settings (EfficientNet-Lite0 at the stimuli's 112 px, the project's ridge) and ``evaluate.models``
replaced by one ridge per feature family, each a ``kind: ridge`` entry with ``layer_sets`` (the layer set chosen
on validation from train-only fits, then refitted on train + val):

* ``ridge_pooled`` — each block averaged over space;
* ``ridge_grid<G>`` — each block's map adaptive-average pooled to a G×G grid (``block8@grid4``,
  :mod:`llmvem.embed.spatial`), flattened; compared with ``ridge_pooled`` by the runner's paired bootstrap over
  test images (``compare_to``).

Candidates of each family: blocks 5, 8, 10, 12, 15 alone and block8 + block12. The run folder (``--runs-dir``)
is an ordinary one (``llmvem report`` opens it). Test figures are read: one ledger line per run.

Usage::

    python bench/bench_spatial_v4.py                       # session 210322
    python bench/bench_spatial_v4.py --session 190925 --grids 2 4 7

Writes ``bench/results/spatial_v4.json`` (``--out``). Exits 0 with a message when the data folder is absent.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "v4_cowley2023"
BLOCKS = ("block5", "block8", "block10", "block12", "block15")
PAIR = ("block8", "block12")


def layer_sets(mode: str) -> list[list[str]]:
    """Candidate layer sets of one family: every block alone and the pair, with ``mode`` (``""`` = pooled,
    ``"@grid4"`` ...) appended to each block name."""
    return [[b + mode] for b in BLOCKS] + [[b + mode for b in PAIR]]


def family_config(args: argparse.Namespace):
    """``v4_spatial`` for the session, its models replaced by the ridge families."""
    from llmvem.config import apply_overrides, load_config
    from llmvem.config_models import ModelEntry

    extra = [f"data.spec=v4:{args.data}:{args.session}", f"evaluate.bootstrap={args.n_boot}"]
    if args.cache_dir:
        extra.append(f"cache_dir={args.cache_dir}")
    cfg = apply_overrides(load_config("v4_spatial"), [*extra, *args.overrides])
    cfg.evaluate.models = [ModelEntry(name="ridge_pooled", kind="ridge", label="ridge, pooled blocks",
                                      layer_sets=layer_sets(""))]
    cfg.evaluate.models += [ModelEntry(name=f"ridge_grid{g}", kind="ridge", label=f"ridge, {g}×{g} grids",
                                       layer_sets=layer_sets(f"@grid{g}"), compare_to=["ridge_pooled"])
                            for g in args.grids]
    return cfg


def format_table(res: dict[str, Any]) -> str:
    lines = [f"V4 session {res['session']} ({res['n_neurons']} neurons; train/val/test "
             f"{res['n_images']['train']}/{res['n_images']['val']}/{res['n_images']['test']} images), "
             "EfficientNet-Lite0 at 112 px, ridge; layers chosen on validation (train-only fits)",
             "| features | chosen layers | dim | val r (train-only fit) | test mean r | test median r | "
             "Δ mean r vs ridge_pooled [95% CI] |", "|---|---|---|---|---|---|---|"]
    for name, f in res["families"].items():
        cmp = f.get("vs_pooled")
        delta = f"{cmp['diff']:+.3f} [{cmp['ci_low']:+.3f}, {cmp['ci_high']:+.3f}]" if cmp else "-"
        lines.append(f"| {name} | {' + '.join(f['layers'])} | {f['dim']} | {f['val_r']['+'.join(f['layers'])]:.3f} | "
                     f"{f['test_mean_r']:.3f} | {f['test_median_r']:.3f} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any] | None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="V4 data folder (default: %(default)s)")
    ap.add_argument("--session", default="210322", help="session id (default: %(default)s)")
    ap.add_argument("--grids", type=int, nargs="+", default=[2, 4], help="grid sides G (default: 2 4)")
    ap.add_argument("--set", dest="overrides", action="append", default=[], help="config override KEY=VALUE")
    ap.add_argument("--max-images", type=int, default=None, help="about N images in all (smoke tests)")
    ap.add_argument("--n-boot", type=int, default=1000, help="bootstrap resamples (default: %(default)s)")
    ap.add_argument("--cache-dir", default=None, help="captions / features cache (default: the config's)")
    ap.add_argument("--runs-dir", type=Path, default=ROOT / "runs" / "bench_spatial_v4",
                    help="run folder parent (default: %(default)s)")
    ap.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "spatial_v4.json",
                    help="results JSON (default: %(default)s)")
    ap.add_argument("--ledger", type=Path, default=ROOT / "bench" / "results" / "ledger.csv",
                    help="test-read ledger (default: %(default)s)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    args = ap.parse_args(argv)
    if not args.data.is_dir():
        print(f"bench_spatial_v4: data folder {args.data} is absent; nothing to benchmark (use --data)")
        return None
    from llmvem.provenance import append_ledger, bench_runtime, result_header, write_results

    bench_runtime(False, args.threads)
    from llmvem.data.splits import first_images
    from llmvem.inputs import load_config_dataset, prepare_inputs
    from llmvem.pipeline import extraction_config, run_experiment

    cfg = family_config(args)
    ds = load_config_dataset(cfg)
    inputs = prepare_inputs(extraction_config(cfg), show_progress=False,
                            dataset=first_images(ds, args.max_images) if args.max_images else ds)
    run = args.runs_dir / args.session
    metrics = run_experiment(cfg, run, overwrite=True, show_progress=False, report=False, inputs=inputs,
                             on_stage=lambda m: print(f"[bench_spatial_v4] {m}", file=sys.stderr, flush=True))
    ds = metrics["dataset"]
    cmp = {c["b"]: c for c in metrics["comparisons"] if c["a"] == "ridge_pooled"}
    families = {}
    for name, m in metrics["models"].items():
        d = m["details"]  # the runner's record of the choice on validation (llmvem.composite.ChooseOnValidation)
        layers = d["chosen"].split("+")
        dim = sum(int(np.prod(inputs.features["train"][k].shape[1:])) for k in layers)
        families[name] = {"layers": layers, "dim": dim, "val_r": d["val_mean_r"], "test_mean_r": m["mean_r"],
                          "test_median_r": m["median_r"]}
        if name in cmp:
            families[name]["vs_pooled"] = {k: cmp[name][k] for k in ("diff", "ci_low", "ci_high", "p_value",
                                                                      "fraction_improved")}
    res = {**result_header("v4_cowley2023", "bench/bench_spatial_v4.py", argv, config=cfg, seeds=[cfg.seed]),
           "session": args.session, "run": str(run), "n_neurons": ds["n_voxels"],
           "n_images": {s: ds[f"n_{s}"] for s in ("train", "val", "test")}, "families": families,
           "seconds_total": metrics["timing"]["total_s"]}
    write_results(args.out, res)
    append_ledger(args.ledger, "bench_spatial_v4", f"test: {', '.join(families)} -> {args.out.name}", config=cfg,
                  sessions=[args.session])
    print(format_table(res))
    print(f"results: {args.out}  (run folder {run})")
    return res


if __name__ == "__main__":
    main()
