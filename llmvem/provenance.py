"""Where a result came from: the header of every benchmark results file, strict JSON, and the test-read ledger.

A results file must say how it was made — date, git commit, command, config hash, machine and seeds — and be
strict JSON (no NaN or Infinity, which ``json.loads`` of other languages refuses). Benchmarks that print
**test** figures append one line to the ledger (``bench/results/ledger.csv``), so the number of times a test
split was read is on record.

Examples
--------
>>> from llmvem.provenance import result_header, write_results
>>> results = {**result_header("v4", "bench/bench_v4.py", ["--quick"], seeds=[0, 1, 2]), "rows": {}}  # doctest: +SKIP
>>> write_results("bench/results/v4.json", results)                                                    # doctest: +SKIP
"""

from __future__ import annotations

import csv
import json
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = ["LEDGER_FIELDS", "append_ledger", "bench_runtime", "config_hash", "finite", "git_commit", "machine", "read_results",
           "result_header", "write_results"]

#: Columns of the test-read ledger.
LEDGER_FIELDS = ("date", "commit", "benchmark", "config_hash", "sessions", "read")


def git_commit(repo: str | Path | None = None) -> str | None:
    """The commit of the working tree (``abc123…``, with ``+dirty`` when files differ from it); None outside git."""
    cwd = Path(repo) if repo is not None else Path(__file__).resolve().parents[1]
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10)
        if head.returncode != 0:
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=cwd,
                               capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def machine() -> str:
    """One line describing the machine: architecture, CPUs, OS, Python, torch, its threads and the GPU if any."""
    import torch

    gpu = f", GPU {torch.cuda.get_device_name()}" if torch.cuda.is_available() else ""
    return (f"{platform.machine()} {os.cpu_count()} CPUs, {platform.system()} {platform.release()}, "
            f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} threads{gpu}")


def config_hash(config: Any) -> str | None:
    """A short stable hash of a :class:`~llmvem.config.RunConfig` (or any JSON-able value); None for None."""
    if config is None:
        return None
    from llmvem.utils import stable_hash

    data = config.model_dump(mode="json") if hasattr(config, "model_dump") else config
    return stable_hash(data, 12)


def result_header(benchmark: str, script: str, argv: Sequence[str] | None = None, *, config: Any = None,
                  seeds: Sequence[int] | None = None) -> dict[str, Any]:
    """The first keys of a results file: ``benchmark``, ``date``, ``commit``, ``command`` (as run, quoted),
    ``config_hash``, ``machine`` and ``seeds``.

    Parameters
    ----------
    benchmark : str
        Name of the benchmark (``"v4_cowley2023"``).
    script : str
        Path of the script relative to the repository (``"bench/bench_v4.py"``).
    argv : sequence of str, optional
        Its arguments (default ``sys.argv[1:]``).
    config : RunConfig, optional
        The configuration whose hash is recorded.
    seeds : sequence of int, optional
    """
    args = list(sys.argv[1:] if argv is None else argv)
    return {"benchmark": benchmark, "date": time.strftime("%Y-%m-%d"), "commit": git_commit(),
            "command": " ".join(["python", script, *(shlex.quote(a) for a in args)]),
            "config_hash": config_hash(config), "machine": machine(),
            "seeds": None if seeds is None else [int(s) for s in seeds]}


def finite(obj: Any) -> Any:
    """``obj`` with NumPy scalars and arrays made plain and NaN/Inf replaced by None (strict JSON)."""
    if isinstance(obj, dict):
        return {str(k): finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return finite(obj.tolist())
    if isinstance(obj, np.generic):
        obj = obj.item()
    if isinstance(obj, Path):
        return str(obj)
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    return obj


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"non-standard JSON constant {name}; expected strict JSON (null for a missing number)")


def read_results(path: str | Path) -> Any:
    """A results file parsed as strict JSON: NaN, Infinity and -Infinity are refused (``ValueError``)."""
    return json.loads(Path(path).read_text(encoding="utf-8"), parse_constant=_refuse_constant)


def write_results(path: str | Path, results: Any) -> Path:
    """Write ``results`` as strict JSON (NaN → null), indented, lists of numbers kept on one line; atomically."""
    from llmvem.utils import atomic_write

    text = json.dumps(finite(results), indent=1, allow_nan=False, ensure_ascii=False)
    text = re.sub(r"\[\s*((?:-?[\d.eE+-]+|null)(?:,\s*(?:-?[\d.eE+-]+|null))*)\s*\]",
                  lambda m: "[" + ", ".join(x.strip() for x in m.group(1).split(",")) + "]", text)
    path = Path(path)
    with atomic_write(path, "w", encoding="utf-8") as fh:
        fh.write(text + "\n")
    return path


def append_ledger(ledger: str | Path, benchmark: str, read: str, *, config: Any = None,
                  sessions: Sequence[str] = (), commit: str | None = None) -> Path:
    """Append one line to the test-read ledger (a CSV with :data:`LEDGER_FIELDS`; header written when new).

    Parameters
    ----------
    ledger : path
        ``bench/results/ledger.csv``.
    benchmark : str
    read : str
        What was read, e.g. ``"test: spatial, ridge_maps, banded (3 seeds)"``.
    config : RunConfig or JSON-able, optional
        Hashed into ``config_hash``.
    sessions : sequence of str
        Sessions or datasets whose test split was read (joined with spaces).
    commit : str, optional
        Default: :func:`git_commit`.
    """
    path = Path(ledger)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.is_file() or path.stat().st_size == 0
    row = {"date": time.strftime("%Y-%m-%d"), "commit": commit or git_commit() or "",
           "benchmark": benchmark, "config_hash": config_hash(config) or "", "sessions": " ".join(sessions),
           "read": read}
    with open(path, "a", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=LEDGER_FIELDS, lineterminator="\n")  # one line ending in git
        if new:
            writer.writeheader()
        writer.writerow(row)
    return path


def bench_runtime(progress: bool = False, threads: int | None = None) -> None:
    """The runtime of a benchmark script: hub access off (nothing downloads), progress bars only when asked, and
    ``threads`` torch CPU threads when given."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    if not progress:
        os.environ["LLMVEM_NO_PROGRESS"] = "1"
    if threads:
        import torch

        torch.set_num_threads(int(threads))
