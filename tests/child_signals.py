"""Child processes of the tests start with Ctrl-C working, however pytest itself was started.

A signal a process ignores stays ignored across ``fork`` and ``exec``, and Python installs its ``KeyboardInterrupt``
handler only when SIGINT is at its default. A test suite started as a background job, under ``nohup`` or by some
batch schedulers runs with SIGINT ignored; without :func:`default_sigint` its children would ignore the Ctrl-C
the interruption tests send them (they finished normally instead of exiting 130).
"""

from __future__ import annotations

import signal


def default_sigint() -> None:
    """``preexec_fn`` of a child process: SIGINT back to its default before the child's program starts."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
