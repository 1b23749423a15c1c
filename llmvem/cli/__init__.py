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
from llmvem.errors import MAX_QUOTE, DiskFullError, LLMVEMError, is_disk_full, one_line, shorten

__all__ = ["app", "main"]

_INTERRUPTED = ("llmvem: interrupted; finished work is saved. Run the same command again to resume "
                "(add --resume for train, demo and sweep).")


def _fail(message: object, code: int) -> int:
    print(f"llmvem: error: {one_line(message)}", file=sys.stderr)
    return code


def _os_error_message(exc: OSError) -> str:
    """``PATH: what is wrong`` for an OSError about a path the user gave (a folder where a file belongs, ...)."""
    what = exc.strerror or type(exc).__name__
    hint = {IsADirectoryError: "; expected a file path, not a folder",
            NotADirectoryError: "; a part of the path is a file where a folder is expected",
            PermissionError: "; choose a path you can write to"}.get(type(exc), "")
    # each path bounded, so the OS's reason ("File name too long") survives a 20 MB path
    paths = " -> ".join(shorten(str(p), 2 * MAX_QUOTE) for p in (exc.filename, exc.filename2) if p)
    return f"{paths or 'path'}: {what}{hint}"


def main(argv: list[str] | None = None) -> int:
    """Entry point of the console script. Returns the exit code (0 ok, 1 failures, 2 bad input, 130 Ctrl-C).

    Every error the user or the machine causes is printed as ONE bounded line, ``llmvem: error: ...``:
    :class:`~llmvem.errors.LLMVEMError` and unusable paths (``OSError`` naming a file) exit 2; a full disk exits
    1 (an environment error: free space and rerun). Anything else is a bug and keeps its traceback.
    """
    try:
        # With standalone_mode=False typer returns the exit code of typer.Exit / Ctrl-C instead of exiting.
        rc = app(args=argv, prog_name="llmvem", standalone_mode=False)
    except LLMVEMError as exc:
        return _fail(exc, 2)
    except DiskFullError as exc:
        return _fail(exc, 1)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        print(_INTERRUPTED, file=sys.stderr)
        return 130
    except TyperException as exc:  # usage errors: unknown command or option, bad value
        message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
        return _fail(message, 2)
    except Exception as exc:
        if is_disk_full(exc):
            where = getattr(exc, "filename", None) or "the output folder"
            return _fail(f"{where}: no space left on the device ({type(exc).__name__}); finished work is kept, free "
                         "some space and run the same command again", 1)
        if isinstance(exc, OSError) and exc.filename:
            return _fail(_os_error_message(exc), 2)
        raise
    if rc == 130:
        print(_INTERRUPTED, file=sys.stderr)
    return rc if isinstance(rc, int) else 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


def console_main() -> None:
    """``llmvem`` console script."""
    sys.exit(main())
