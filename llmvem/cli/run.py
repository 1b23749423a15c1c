"""``llmvem demo`` and ``llmvem sweep``: whole experiments from captions to the report."""

from __future__ import annotations

import itertools
import time
from pathlib import Path

import typer

from llmvem.cli.app import app, new_output_folder, progress_option, threads_option, use_progress, use_threads


def _parse_floats(text: str, what: str) -> list[float]:
    from llmvem.errors import ConfigError

    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError as exc:
        raise ConfigError(f"{what}: expected comma-separated numbers such as 0,0.01,0.1, got {text!r}") from exc


def _print_summary(metrics: dict) -> None:
    from llmvem.evaluate.selection import choose_model, selection_line
    from llmvem.report.tables import fmt_number, text_table

    def val_cell(m: dict) -> str:
        return fmt_number(m.get("val_mean_r")) + (" (in fit)" if m.get("val_in_fit") else "")

    rows = [[m.get("label", name), val_cell(m), fmt_number(m["mean_r"]), fmt_number(m["median_r"]),
             fmt_number(m.get("mean_accuracy"), 1), fmt_number(m.get("median_accuracy"), 1)]
            for name, m in metrics["models"].items()]
    typer.echo(text_table(["model", "val mean r", "test mean r", "test median r", "test mean acc %",
                           "test median acc %"], rows))
    for c in metrics.get("comparisons", []):
        typer.echo(f"test: {c['b']} vs {c['a']}: Δ mean r = {fmt_number(c['diff'], 4, True)} "
                   f"[95% CI {fmt_number(c['ci_low'], 4, True)}, {fmt_number(c['ci_high'], 4, True)}], "
                   f"p = {c['p_value']:.3g}, "
                   f"{100 * c['fraction_improved']:.0f}% of voxels improved")
    if any(m.get("val_in_fit") for m in metrics["models"].values()):
        typer.echo("(in fit): the model was fitted on train + val, so its val r is in-sample and not a selection "
                   "criterion")
    sel = choose_model(metrics["models"])
    typer.echo(selection_line(sel))
    typer.echo(f"selection: {sel.reason()}")


def _print_sweep_selection(points: dict[str, dict]) -> None:
    """All (sweep point, λ) models with validation and **test** mean r, then the one validation chose."""
    from llmvem.evaluate.selection import choose_model, selection_line
    from llmvem.report.tables import fmt_number, text_table

    flat = {f"{point}/{name}": {**m, "point": point} for point, metrics in points.items()
            for name, m in metrics["models"].items()}
    rows = [[m["point"], m.get("label", key), fmt_number(m.get("val_mean_r")) + (" (in fit)" if m.get("val_in_fit")
                                                                                  else ""),
             fmt_number(m["mean_r"])] for key, m in flat.items()]
    typer.echo("\n== all sweep points (test mean r shown for every model; selection uses val mean r only) ==")
    typer.echo(text_table(["sweep point", "model", "val mean r", "test mean r"], rows, n_left=2))
    sel = choose_model(flat)
    typer.echo(selection_line(sel, setting=None if sel.model is None else flat[sel.model]["point"]))
    typer.echo(f"selection: {sel.reason()}")


@app.command("demo")
def demo(
    out: Path = typer.Option(None, "--out", help="Run folder (default: runs/demo-<date>-<time>)."),
    config: str = typer.Option("demo", "--config", help="Config file or shipped config name."),
    set_: list[str] = typer.Option([], "--set", help="Override a config key, e.g. --set train.stage1.epochs=5."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Run the whole pipeline offline on CPU on the built-in virtual brain.

    Scene captions → MiniLM caption embeddings → EfficientNet-Lite0 features → ridge baseline, LLM-VEM with
    λ = 0 and with λ > 0 → evaluation with paired statistics → HTML report. Prints a summary table (validation
    and test mean r of every model), which λ the validation split chose and its test mean r, and the report
    path; writes metrics.json in the run folder.

    Example: llmvem demo --out runs/demo
    """
    progress = use_progress(progress)
    use_threads(threads)
    from llmvem.config import apply_overrides, load_config

    cfg = apply_overrides(load_config(config), set_)  # bad input fails here, before torch is imported
    from llmvem.pipeline import run_experiment

    if out is None:
        out = Path("runs") / time.strftime("demo-%Y%m%d-%H%M%S")
    t0 = time.perf_counter()
    with new_output_folder(out):
        metrics = run_experiment(cfg, out, resume=resume, overwrite=overwrite, show_progress=progress,
                                 on_stage=lambda msg: typer.echo(f"[llmvem] {msg}", err=True))
    typer.echo("")
    _print_summary(metrics)
    typer.echo(f"\nrun folder: {out}\nmetrics:    {out / 'metrics.json'}")
    if "report" in metrics:
        typer.echo(f"report:     {metrics['report']}")
    typer.echo(f"wall time:  {time.perf_counter() - t0:.0f} s")


@app.command("sweep")
def sweep(
    config: str = typer.Option("demo", "--config", help="Config file or shipped config name."),
    lambdas: str = typer.Option("0,0.01,0.1,1", "--lambda", help="Comma-separated λ values to train."),
    grid: list[str] = typer.Option([], "--grid", help="Sweep another key over values: KEY=V1,V2 (repeatable)."),
    set_: list[str] = typer.Option([], "--set", help="Fixed override KEY=VALUE (repeatable)."),
    out: Path = typer.Option(Path("runs/sweep"), "--out", help="Sweep folder; one run folder per grid point."),
    resume: bool = typer.Option(False, "--resume", help="Reuse finished models in --out."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing --out folder."),
    progress: bool | None = progress_option(),
    threads: int | None = threads_option(),
) -> None:
    """Train LLM-VEM over λ values (and other config keys), reusing cached captions and features.

    Each grid point is a run folder under --out with its own metrics.json; one report compares them all. The
    last table lists every (grid point, λ) with its validation and test mean r; the setting and λ are chosen
    on validation only, and the test mean r of that choice is what the final line reports.

    Example: llmvem sweep --config demo --lambda 0,0.01,0.1,1 --grid model.feature_dropout=0,0.2 --out runs/sweep
    """
    progress = use_progress(progress)
    use_threads(threads)
    from llmvem.config import apply_overrides, load_config
    from llmvem.errors import ConfigError, quote

    base = apply_overrides(load_config(config), set_)
    lam_values = _parse_floats(lambdas, "--lambda")
    if not lam_values:
        raise ConfigError(f"--lambda {quote(lambdas)}: expected at least one value, e.g. 0,0.1")
    for lam in lam_values:  # every grid point is checked before the sweep folder is made
        try:
            apply_overrides(base, [f"model.lambda_align={lam}"])
        except ConfigError:
            raise ConfigError(f"--lambda {quote(lambdas)}: {lam:g} is not a valid lambda_align; expected numbers "
                              ">= 0") from None
    axes: list[tuple[str, list[str]]] = []
    for item in grid:
        if "=" not in item:
            raise ConfigError(f"--grid {quote(item)}: expected KEY=V1,V2")
        key, values = item.split("=", 1)
        axes.append((key, [v for v in values.split(",") if v]))
        if not axes[-1][1]:
            raise ConfigError(f"--grid {quote(item)}: no values; expected KEY=V1,V2")
    from llmvem.errors import ConfigError, quote
    for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in axes]):
        apply_overrides(base, [f"{k}={v}" for k, v in combo])
    from llmvem.experiment import EXPERIMENT_OUTPUTS
    from llmvem.inputs import prepare_inputs
    from llmvem.pipeline import run_experiment
    from llmvem.utils import prepare_run_folder

    with new_output_folder(out):
        prepare_run_folder(out, resume, overwrite, outputs=EXPERIMENT_OUTPUTS)
        # Inputs (captions, caption embeddings, features) depend only on data/captions/text/backbone; prepare them
        # once unless the grid changes one of those sections (they are cached on disk either way).
        touches_inputs = any(k.split(".")[0] in ("data", "captions", "text", "backbone", "cache_dir") for k, _ in axes)
        shared = None if touches_inputs else prepare_inputs(base, show_progress=progress)
        run_dirs = []
        points: dict[str, dict] = {}
        for combo in itertools.product(*[[(k, v) for v in vals] for k, vals in axes]):
            cfg = apply_overrides(base, [f"{k}={v}" for k, v in combo])
            name = "_".join(f"{k.split('.')[-1]}{v}" for k, v in combo) or "base"
            run_dir = out / name
            typer.echo(f"[llmvem] sweep point {name}: lambda = {lam_values}", err=True)
            metrics = run_experiment(cfg, run_dir, lambdas=lam_values, resume=resume, show_progress=progress,
                                     report=False, inputs=shared,
                                     on_stage=lambda msg: typer.echo(f"[llmvem]   {msg}", err=True))
            run_dirs.append(run_dir)
            points[name] = metrics
            typer.echo(f"\n== {name} ==")
            _print_summary(metrics)
        _print_sweep_selection(points)
    from llmvem.report import write_report

    report = write_report(run_dirs, out / "report")
    typer.echo(f"\nreport: {report}")
