"""``llmvem report`` command."""

from __future__ import annotations

from pathlib import Path

import typer

from llmvem.cli.app import app, progress_option, use_progress


@app.command("report")
def report(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run folders (each with metrics.json); several are compared "
                                      "side by side."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Report folder (default: FIRST_RUN/report)."),
    title: str | None = typer.Option(None, "--title", help="Page title."),
    progress: bool | None = progress_option(),
) -> None:
    """Write an HTML report (index.html + PNG figures) of one or more run folders and print its path.

    Example: llmvem report runs/demo runs/sweep --out reports/compare
    """
    from llmvem.report import write_report

    use_progress(progress)

    index = write_report(runs, out_dir=out, title=title)
    typer.echo(str(index))


@app.command("compare")
def compare(
    runs: list[Path] = typer.Argument(..., metavar="RUN", help="Run folders, one per session or subject, each with "
                                      "test_responses.npy and both models' predictions."),
    model_a: str = typer.Option(..., "--a", help="Reference model (models/<name>/)."),
    model_b: str = typer.Option(..., "--b", help="Challenger model; b − a is reported."),
    n_boot: int = typer.Option(1000, "--n-boot", min=1, help="Bootstrap resamples of the pooled interval."),
    ensembles: bool = typer.Option(False, "--ensembles", help="Compare seed ensembles by their averaged "
                                   "predictions instead of one network per seed."),
    progress: bool | None = progress_option(),
) -> None:
    """Model B against model A over several runs: per-session Δ mean test r, Wilcoxon and sign tests over
    sessions, and a bootstrap of Δ over all neurons that resamples test images (within each session) and seeds.

    Example: llmvem compare runs/v4_190925 runs/v4_210322 --a ridge_inputs --b spatial
    """
    from llmvem.evaluate.pooled import compare_runs
    from llmvem.report.tables import fmt_number, text_table

    use_progress(progress)
    res = compare_runs(runs, model_a, model_b, n_boot=n_boot, members=not ensembles)
    rows = [[name, fmt_number(s["a_mean_r"]), fmt_number(s["b_mean_r"]), fmt_number(s["diff"], 4, True),
             str(s["n_seeds"])] for name, s in res["sessions"].items()]
    typer.echo(text_table(["run", f"{model_a} mean r", f"{model_b} mean r", "Δ", "seeds"], rows))
    t, p = res["over_sessions"], res["pooled"]
    w = "n/a" if t["wilcoxon_p"] is None else f"{t['wilcoxon_p']:.3g}"
    s = "n/a" if t["sign_test_p"] is None else f"{t['sign_test_p']:.3g}"
    typer.echo(f"{model_b} − {model_a}: Δ mean r over {p['n_voxels']} neurons = {fmt_number(p['delta_mean_r'], 4, True)} "
               f"[95% CI {fmt_number(p['ci'][0], 4, True)}, {fmt_number(p['ci'][1], 4, True)}] (test images × "
               f"{p['n_seeds']} seed{'s' if p['n_seeds'] > 1 else ''}), p = {p['p']:.3g}; sessions better "
               f"{t['n_improved']}/{t['n_sessions']}, Wilcoxon p = {w}, sign test p = {s}")
