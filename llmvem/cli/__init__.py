"""The ``llmvem`` command. Thin: parses arguments, calls the stages, turns user errors into exit code 2."""

from __future__ import annotations

import sys

import typer
from typer.exceptions import TyperException

# Command modules register their commands on ``app`` when imported.
from llmvem.cli import ablate as _ablate  # noqa: F401
from llmvem.cli import caption as _caption  # noqa: F401
from llmvem.cli import config_cmd as _config_cmd  # noqa: F401
from llmvem.cli import data as _data  # noqa: F401
from llmvem.cli import embed as _embed  # noqa: F401
from llmvem.cli import export as _export  # noqa: F401
from llmvem.cli import predict as _predict  # noqa: F401
from llmvem.cli import report as _report  # noqa: F401
from llmvem.cli import run as _run  # noqa: F401
from llmvem.cli import train as _train  # noqa: F401
from llmvem.cli.app import app
from llmvem.errors import LLMVEMError

__all__ = ["app", "main"]

_INTERRUPTED = ("llmvem: interrupted; finished work is saved. Run the same command again to resume "
                "(add --resume for train, demo and sweep).")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the exit code (0 ok, 1 failures, 2 bad input, 130 Ctrl-C)."""
    try:
        # With standalone_mode=False typer returns the exit code of typer.Exit / Ctrl-C instead of exiting.
        rc = app(args=argv, prog_name="llmvem", standalone_mode=False)
    except LLMVEMError as exc:
        print(f"llmvem: error: {exc}", file=sys.stderr)
        return 2
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print(_INTERRUPTED, file=sys.stderr)
        return 130
    except TyperException as exc:  # usage errors: unknown command or option, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        print(f"llmvem: error: {message}", file=sys.stderr)
        return 2
    if rc == 130:
        print(_INTERRUPTED, file=sys.stderr)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def console_main() -> None:
    """``llmvem`` console script."""
    sys.exit(main())
