"""``llmvem config …`` commands."""

from __future__ import annotations

import typer

from llmvem.cli.app import app, progress_option, use_progress

config_app = typer.Typer(help="Check configurations.\n\nExample: llmvem config validate my_run.yaml",
                         no_args_is_help=True)
app.add_typer(config_app, name="config")


@config_app.command("validate")
def validate(
    config: str = typer.Argument(..., help="YAML config file, or a shipped config name (demo, algonauts_eva02)."),
    overrides: list[str] = typer.Option([], "--set", metavar="KEY=VALUE", help="Override a config value, e.g. "
                                        "train.device=cpu (repeatable; values are YAML)."),
    progress: bool | None = progress_option(),
) -> None:
    """Dry run: parse the config, resolve data, models, caches and devices without loading anything heavy.

    Runs exactly the checks `llmvem train` runs before its first expensive step, so the answer is train's.
    Prints one line per item; a problem (missing folder, device: cuda without CUDA, malformed model name) is one
    line on stderr and exit code 2.

    Example: llmvem config validate algonauts_eva02 --set data.spec=data/algonauts_2023/subj01
    """
    from llmvem.config import apply_overrides, load_config
    from llmvem.config_check import check_config, config_source

    use_progress(progress)
    cfg = apply_overrides(load_config(config), overrides)
    for what, resolved in check_config(cfg, config_source(config, overrides)):  # exactly what train checks
        typer.echo(f"{what:>22}: {resolved}")
    typer.echo(f"{'config':>22}: ok")
