"""``llmvem ablate`` (caption-source ablation) and ``llmvem train-multi`` (several subjects trained jointly)."""

from __future__ import annotations

import time
from pathlib import Path

import typer

from llmvem.cli.app import app, progress_option, threads_option, use_progress, use_threads

_ABLATE_EXAMPLES = """\b
Examples:
  llmvem ablate --config demo --sources dataset,labels,shuffled --out runs/ablation
  llmvem ablate --config my.yaml --sources file:human.csv,openai:llava-7b@http://gpu1:8000/v1,shuffled \\
      --out runs/abl --set model.lambda_align=0.05
"""

_MULTI_EXAMPLES = """\b
Examples:
  llmvem train-multi --config demo --subjects virtual:seed=1,virtual:seed=2 --out runs/multi --separate
  llmvem train-multi --config v4.yaml --subjects v4:data/v4:210322,v4:data/v4:210325 --out runs/v4_multi \\
      --set multisubject.core_dim=128 --set model.lambda_align=0
  llmvem train-multi --config v4_spatial --subjects v4:DATA:190925,v4:DATA:190927 --out runs/v4_core \\
      --set multisubject.core=none --set multisubject.split=dataset \\
      --set 'backbone.spatial_layers=[block5@grid7, block8@grid7]' --set model.spatial_readout=factorized
  (then: llmvem train --config v4_spatial --init-core runs/v4_core --set data.spec=v4:DATA:210322 --out runs/new)
"""


@app.command("ablate", epilog=_ABLATE_EXAMPLES)
def ablate(
    config: str = typer.Option("demo", "--config", help="Config file or shipped config name."),
    sources: str = typer.Option("dataset,labels,shuffled", "--sources",
                                help="Comma-separated caption sources: dataset, labels, shuffled[:SOURCE], file:PATH, "
                                "transformers:MODEL, openai:MODEL@URL."),
    out: Path = typer.Option(Path("runs/ablation"), "--out", help="Run folder (ablation.json, ablation.md, "
                             "metrics.json, report/)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse the finished models in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the ablation's outputs in --out."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Train the same LLM-VEM model with captions from different sources and compare them.

    λ = 0 is trained once; each source at the config's model.lambda_align. Every source is compared with λ = 0
    and with each other by the paired bootstrap over test images. "shuffled" permutes the config's own captions
    across images: the control that keeps the sentences and breaks their link to the image. Writes
    ablation.json, ablation.md, a run folder the report reads, and report/index.html with a
    "Caption-source ablation" section.
    """
    progress = use_progress(progress)
    use_threads(threads)
    from llmvem.ablation import ablation_table, parse_sources, run_ablation
    from llmvem.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(config), set_)
    parsed = parse_sources(sources)  # bad sources fail before anything is computed
    t0 = time.perf_counter()
    result = run_ablation(cfg, parsed, out, resume=resume, overwrite=overwrite, show_progress=progress,
                          on_stage=lambda msg: typer.echo(f"[llmvem] {msg}", err=True))
    typer.echo("")
    typer.echo(ablation_table(result))
    if result.get("warning"):
        typer.echo(f"note: {result['warning']}")
    typer.echo(f"run folder: {out}\nablation:   {out / 'ablation.json'}")
    if "report" in result:
        typer.echo(f"report:     {result['report']}")
    typer.echo(f"wall time:  {time.perf_counter() - t0:.0f} s")


@app.command("train-multi", epilog=_MULTI_EXAMPLES)
def train_multi(
    config: str = typer.Option(..., "--config", help="Config file or shipped config name; data.spec is replaced "
                               "by each subject's spec."),
    subjects: str = typer.Option(..., "--subjects", help="Comma-separated dataset specs, one per subject "
                                 "(virtual:seed=1, v4:ROOT:SESSION, an Algonauts subject folder)."),
    out: Path = typer.Option(..., "--out", help="Output folder (joint/, separate/, subjects/, summary.json)."),
    separate: bool = typer.Option(False, "--separate", help="Also train the same architecture on each subject "
                                  "alone, and compare with joint training (paired bootstrap per subject)."),
    set_: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config value (repeatable)."),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished trainings in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace the outputs in --out."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Train several subjects jointly: shared backbone and core, one voxel readout per subject.

    Each subject is evaluated on its own test split; with --separate each is also trained alone with the same
    architecture and the two are compared. Prints one row per subject and writes summary.json / summary.md.
    """
    progress = use_progress(progress)
    use_threads(threads)
    from llmvem.config import apply_overrides, load_config
    from llmvem.errors import ConfigError
    from llmvem.multisubject import run_multisubject

    cfg = apply_overrides(load_config(config), set_)
    specs = [s.strip() for s in subjects.split(",") if s.strip()]
    if not specs:
        raise ConfigError("--subjects: expected comma-separated dataset specs, e.g. virtual:seed=1,virtual:seed=2")
    t0 = time.perf_counter()
    summary = run_multisubject(cfg, specs, out, separate=separate, resume=resume, overwrite=overwrite,
                               show_progress=progress, on_stage=lambda msg: typer.echo(f"[llmvem] {msg}", err=True))
    typer.echo("")
    header = ["subject", "n_train", "n_voxels", "joint r"] + (["separate r", "Δ joint−sep", "p"] if separate else [])
    rows = []
    for name, e in summary["subjects"].items():
        row = [name, str(e["n_train"]), str(e["n_voxels"]), f"{e['joint']['mean_r']:.4f}"]
        if separate:
            c = e.get("joint_vs_separate")
            row += [f"{e['separate']['mean_r']:.4f}", f"{e['joint']['mean_r'] - e['separate']['mean_r']:+.4f}",
                    "-" if c is None else f"{c['p_value']:.3g}"]
        rows.append(row)
    mean = summary["mean"]
    row = ["mean", "", "", f"{mean['joint']['mean_r']:.4f}"]
    if separate:
        row += [f"{mean['separate']['mean_r']:.4f}", f"{mean['joint']['mean_r'] - mean['separate']['mean_r']:+.4f}",
                ""]
    rows.append(row)
    from llmvem.report.tables import text_table

    typer.echo(text_table(header, rows, n_left=2))
    typer.echo(f"\nsummary: {out / 'summary.json'}\nwall time: {time.perf_counter() - t0:.0f} s")
