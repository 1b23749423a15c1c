"""The shared typer application; command modules attach their commands to it."""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import typer

app = typer.Typer(
    name="llmvem",
    help="LLM-aligned visual encoding models: caption stimuli, embed, train, evaluate and report.\n\n"
    "Example: llmvem demo --out runs/demo",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)
data_app = typer.Typer(help="Inspect and validate datasets.\n\nExample: llmvem data inspect virtual", no_args_is_help=True)
app.add_typer(data_app, name="data")


def check_output_file(path: Path | None, flag: str, suffixes: tuple[str, ...] = ()) -> None:
    """Refuse an output file path that cannot be written, before any work is done.

    Raises :class:`~llmvem.errors.OutputPathError` (exit 2, one line naming ``flag`` and the path) for a folder
    where a file belongs, a parent that is a file, an unwritable folder, or a wrong suffix.
    """
    import os

    from llmvem.errors import OutputPathError, quote

    if path is None:
        return
    if path.is_dir():
        raise OutputPathError(f"{flag} {quote(str(path))}: is a folder; expected a file path such as "
                              f"{path / ('out' + (suffixes[0] if suffixes else ''))}")
    if suffixes and path.suffix.lower() not in suffixes:
        raise OutputPathError(f"{flag} {quote(str(path))}: suffix {path.suffix!r}; expected {' or '.join(suffixes)}")
    parent = path.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{flag} {quote(str(path))}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{flag} {quote(str(path))}: folder {parent} is not writable")


#: Files a run folder may hold and still count as "nothing done yet" (written before the first real output).
_SETUP_FILES = {"config.yaml", "versions.json", "run.json"}


@contextmanager
def new_output_folder(path: Path) -> Iterator[None]:
    """Remove ``path`` again when this command created it and then failed on bad input before any real output.

    Only a folder that did not exist before, and that holds nothing but empty folders and set-up files
    (``config.yaml``…), is removed, and only for user errors (:class:`~llmvem.errors.LLMVEMError`, unusable
    paths): an interrupted or crashed run keeps its checkpoints for ``--resume``, so the corrected rerun of a
    refused command is not itself refused ("folder exists").
    """
    import shutil

    from llmvem.errors import LLMVEMError

    existed = path.exists()
    try:
        yield
    except (LLMVEMError, OSError, ValueError):
        if not existed and path.is_dir():
            files = [p for p in path.rglob("*") if not p.is_dir()]
            if all(p.name in _SETUP_FILES for p in files):
                shutil.rmtree(path, ignore_errors=True)
        raise

def progress_option() -> Any:
    """The one ``--progress/--no-progress`` option every command takes (default: on, off when
    ``LLMVEM_NO_PROGRESS=1``)."""
    return typer.Option(None, "--progress/--no-progress",
                        help="Show progress bars (default on; off when LLMVEM_NO_PROGRESS=1).")


def threads_option() -> Any:
    """The ``--threads`` option of the commands that compute (default: ``LLMVEM_THREADS``, else the idle CPUs this
    process may use; see :mod:`llmvem.resources`)."""
    return typer.Option(None, "--threads", min=1, help="CPU threads for torch and BLAS (default: LLMVEM_THREADS, "
                        "else OMP_NUM_THREADS, else the idle CPUs of the affinity mask and cgroup quota).")


def use_threads(threads: int | None) -> int:
    """Choose and apply the thread count of a computing command (before torch is imported when possible) and
    print the stage lines (``[llmvem] <stage>: done in …``) to stderr. Returns the thread count."""
    from llmvem.resources import choose_threads, configure_threads, print_stage_lines

    print_stage_lines()
    return configure_threads(choose_threads(threads)).threads


def other_captions_option() -> Any:
    """The ``--other-captions`` option of ``caption``/``embed``/``train --config`` (see
    :func:`llmvem.inputs.caption_dataset`)."""
    return typer.Option("stop", "--other-captions", help="When the caption store holds captions of the same model "
                        "under another prompt/token limit: stop (say so and exit 2), accept (use them) or recaption.")


def use_progress(flag: bool | None) -> bool:
    """Apply a command's ``--progress/--no-progress`` to every bar (llmvem's and the weight-loading bars of
    transformers) and return whether bars are on."""
    import sys

    from llmvem.utils import PROGRESS_ENV, set_progress

    enabled = flag if flag is not None else os.environ.get("LLMVEM_NO_PROGRESS", "") != "1"
    if "transformers" in sys.modules or "huggingface_hub" in sys.modules:
        set_progress(enabled)
    else:  # importing transformers takes seconds; it reads the switch from the environment when it is imported,
        # so a command that fails on bad input stays fast
        os.environ[PROGRESS_ENV] = "0" if enabled else "1"
        if not enabled:
            os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
    return enabled


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"llmvem {version('llmvem')}")
        except PackageNotFoundError:  # pragma: no cover - running from a source tree without install
            typer.echo("llmvem (not installed)")
        raise typer.Exit(0)


@app.callback()
def _main(
    show_version: bool = typer.Option(False, "--version", callback=_version, is_eager=True,
                                      help="Print the llmvem version and exit."),
) -> None:
    """LLM-aligned visual encoding models: caption stimuli, embed, train, evaluate and report.

    Example: llmvem demo --out runs/demo
    """
