"""The machine's resources as llmvem uses them: CPU threads, memory, and the one line per long stage.

**Threads.** :func:`choose_threads` decides how many threads torch and the BLAS libraries run: ``--threads``,
else ``LLMVEM_THREADS``, else an explicit ``OMP_NUM_THREADS``, else the CPUs this process may use
(:func:`available_cpus`: the affinity mask and the cgroup CPU quota) that are idle when the command starts
(:func:`idle_cpus`, sampled over a quarter second). On a shared machine a thread per core races the other jobs
for the busy cores, and every parallel region then waits for its slowest thread: one busy single-threaded
process beside the demo doubled its wall time with two threads (issue 27). :func:`configure_threads` applies the
choice (environment before torch/NumPy start their thread pools, ``torch.set_num_threads`` and threadpoolctl
after) and sets OpenMP's waiting threads to sleep instead of spin (``OMP_WAIT_POLICY=PASSIVE``) unless the user
set a policy. :func:`thread_record` is what ``versions.json`` records.

**Memory.** :func:`peak_rss` is the process's peak resident memory so far (``VmHWM``); :func:`current_rss` the
resident memory now.

**Stages.** :func:`stage` wraps one long stage: one line when it starts and one when it ends with its wall time
and peak memory, and both figures into the caller's ``timing`` / ``memory`` dicts (``metrics.json["timing"]``).
Lines go to ``say`` when given, else to the ``llmvem.stages`` logger (the CLI prints it to stderr:
:func:`print_stage_lines`). No progress bar is needed to see what runs.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

__all__ = ["THREADS_ENV", "ThreadChoice", "available_cpus", "cgroup_cpu_limit", "choose_threads",
           "configure_threads", "current_rss", "format_bytes", "idle_cpus", "peak_rss", "print_stage_lines",
           "release_free_memory", "release_mapped_pages",
           "stage", "thread_record"]

#: Environment variable that sets the thread count (``--threads`` wins over it).
THREADS_ENV = "LLMVEM_THREADS"

#: Logger of the stage lines (:func:`stage` without ``say``).
STAGE_LOGGER = "llmvem.stages"

_CGROUP_ROOT = Path("/sys/fs/cgroup")
_PROC_STAT = Path("/proc/stat")


# --------------------------------------------------------------------------------------------- threads
def _cgroup_dirs(controller: str) -> list[Path]:
    """This process's cgroup folder and its ancestors for ``controller`` (v1), or the unified hierarchy (v2)."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return []
    out = []
    for line in lines:
        _, names, rel = line.split(":", 2)
        if names == "":  # v2
            base = _CGROUP_ROOT
        elif controller in names.split(","):
            base = _CGROUP_ROOT / names.replace("name=", "")
            if not base.is_dir():
                base = _CGROUP_ROOT / controller
        else:
            continue
        path = base / rel.lstrip("/")
        while True:
            out.append(path)
            if path == base or path.parent == path:
                break
            path = path.parent
    return out


def cgroup_cpu_limit(root: Path | None = None) -> float | None:
    """CPUs allowed by the cgroup CPU quota (``cpu.max`` in v2, ``cpu.cfs_quota_us / cfs_period_us`` in v1; the
    tightest over the cgroup and its ancestors), or None without a quota."""
    dirs = [root] if root is not None else _cgroup_dirs("cpu")
    limits = []
    for d in dirs:
        try:
            if (d / "cpu.max").is_file():
                quota, period = (d / "cpu.max").read_text().split()[:2]
                if quota != "max":
                    limits.append(int(quota) / int(period))
            elif (d / "cpu.cfs_quota_us").is_file():
                quota_us = int((d / "cpu.cfs_quota_us").read_text())
                if quota_us > 0:
                    limits.append(quota_us / int((d / "cpu.cfs_period_us").read_text()))
        except (OSError, ValueError):
            continue
    return min(limits) if limits else None


def _affinity() -> set[int]:
    try:
        return set(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        return set(range(os.cpu_count() or 1))


def available_cpus() -> int:
    """CPUs this process may use: the affinity mask, capped by the cgroup quota (rounded up, at least 1)."""
    n = len(_affinity())
    quota = cgroup_cpu_limit()
    if quota is not None:
        n = min(n, max(1, math.ceil(quota - 1e-9)))
    return max(1, n)


def _cpu_times(cpus: set[int]) -> tuple[float, float] | None:
    """(busy, total) jiffies summed over ``cpus`` from ``/proc/stat``, or None where unreadable."""
    try:
        lines = _PROC_STAT.read_text().splitlines()
    except OSError:
        return None
    busy = total = 0.0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        values = [float(f) for f in fields[:8]]
        idle = values[3] + (values[4] if len(values) > 4 else 0.0)  # idle + iowait
        total += sum(values)
        busy += sum(values) - idle
    return (busy, total) if total > 0 else None


def idle_cpus(interval: float = 0.25) -> float | None:
    """How many of this process's CPUs were idle over the next ``interval`` seconds (from ``/proc/stat``; this
    process sleeps meanwhile, so what is busy is other jobs' work), or None where ``/proc/stat`` is unreadable."""
    cpus = _affinity()
    first = _cpu_times(cpus)
    if first is None:
        return None
    time.sleep(interval)
    second = _cpu_times(cpus)
    if second is None or second[1] <= first[1]:
        return None
    busy_fraction = (second[0] - first[0]) / (second[1] - first[1])
    return max(0.0, len(cpus) * (1.0 - busy_fraction))


@dataclass
class ThreadChoice:
    """The thread count llmvem runs with and why.

    Attributes
    ----------
    threads : int
    source : str
        ``"--threads"``, ``"LLMVEM_THREADS"``, ``"OMP_NUM_THREADS"`` or ``"idle CPUs"``.
    available_cpus : int
        Affinity mask ∩ cgroup quota.
    idle_cpus : float or None
        Idle CPUs measured at the start (only when the count was chosen from them).
    omp_wait_policy : str or None
        OpenMP's policy for waiting threads as set in the environment.
    """

    threads: int
    source: str
    available_cpus: int
    idle_cpus: float | None = None
    omp_wait_policy: str | None = None


_CHOICE: ThreadChoice | None = None


def _positive_int(text: str, where: str) -> int:
    from llmvem.errors import ConfigError

    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise ConfigError(f"{where} = {text!r}: expected a positive number of threads, such as 1 or 2")
    return value


def choose_threads(requested: int | None = None) -> ThreadChoice:
    """The thread count: ``requested`` (``--threads``), else ``LLMVEM_THREADS``, else ``OMP_NUM_THREADS``, else
    the available CPUs that are idle now (rounded, at least 1). Explicit counts may exceed the available CPUs
    (the user's call); the automatic one never does."""
    avail = available_cpus()
    if requested is not None:
        return ThreadChoice(_positive_int(str(requested), "--threads"), "--threads", avail)
    for env in (THREADS_ENV, "OMP_NUM_THREADS"):
        if os.environ.get(env, "").strip():
            return ThreadChoice(_positive_int(os.environ[env].strip(), env), env, avail)
    idle = idle_cpus() if avail > 1 else None
    n = avail if idle is None else min(avail, max(1, int(math.floor(idle + 0.5))))
    return ThreadChoice(n, "idle CPUs", avail, idle)


def configure_threads(choice: ThreadChoice) -> ThreadChoice:
    """Run torch, OpenMP and the BLAS libraries with ``choice.threads`` threads; waiting OpenMP threads sleep
    (``OMP_WAIT_POLICY=PASSIVE``) unless the environment sets a policy. Returns the recorded choice."""
    global _CHOICE
    n = str(choice.threads)
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[env] = n  # read when the libraries start their pools (before torch / NumPy are imported)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if "torch" in sys.modules:
        import torch

        torch.set_num_threads(choice.threads)
    if "numpy" in sys.modules:  # pools already started: resize them
        try:
            from threadpoolctl import threadpool_limits

            threadpool_limits(limits=choice.threads)
        except ImportError:  # pragma: no cover - threadpoolctl comes with scikit-learn
            pass
    choice.omp_wait_policy = os.environ.get("OMP_WAIT_POLICY")
    _CHOICE = choice
    return choice


def thread_record() -> dict[str, Any]:
    """What ``versions.json`` records about threads: the choice (when llmvem made one) and torch's count."""
    out: dict[str, Any] = asdict(_CHOICE) if _CHOICE is not None else {
        "source": "not configured (library defaults)", "available_cpus": available_cpus(),
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY")}
    if "torch" in sys.modules:
        import torch

        out["torch_threads"] = torch.get_num_threads()
    return out


# ---------------------------------------------------------------------------------------------- memory
def _status_kib(field: str, pid: int | str = "self") -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def peak_rss(pid: int | None = None) -> int:
    """Peak resident memory of this process so far, in bytes (``VmHWM``; ``ru_maxrss`` where there is no /proc).

    With ``pid``, that process's own ``VmHWM`` (0 where /proc does not say): unlike a child's ``ru_maxrss``, it does
    not count the peak of the parent the child was forked from.
    """
    if pid is not None:
        return (_status_kib("VmHWM", pid) or 0) * 1024
    kib = _status_kib("VmHWM")
    if kib is None:
        import resource

        scale = 1 if sys.platform == "darwin" else 1024
        return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss) * scale
    return kib * 1024


def current_rss() -> int:
    """Resident memory of this process now, in bytes (0 where unknown)."""
    kib = _status_kib("VmRSS")
    return 0 if kib is None else kib * 1024


def format_bytes(n: float) -> str:
    """``1.56 GB`` (GiB, two decimals) or ``312 MB``."""
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.0f} MB"


_LIBC: Any = None


def release_free_memory() -> bool:
    """Hand the allocator's free pages back to the system (glibc ``malloc_trim(0)``): arrays freed by a finished
    stage otherwise stay in the heap as resident memory the next stage cannot shrink. Returns whether it ran
    (False off glibc). Cheap (it only walks the free lists) and never changes a computed value."""
    global _LIBC
    if _LIBC is None:
        try:
            import ctypes

            lib = ctypes.CDLL("libc.so.6")
            _LIBC = lib if hasattr(lib, "malloc_trim") else False
        except OSError:  # pragma: no cover - not glibc
            _LIBC = False
    if not _LIBC:
        return False  # pragma: no cover - not glibc
    _LIBC.malloc_trim(0)
    return True


def _mapping_of(array: Any) -> Any:
    """The :class:`mmap.mmap` at the end of ``array``'s ``base`` chain (a memory-mapped array or a view of
    one), or None."""
    import mmap

    base = array
    while base is not None and not isinstance(base, mmap.mmap):
        base = getattr(base, "base", None)
    return base


def release_mapped_pages(*arrays: Any) -> int:
    """Unmap the resident pages of read-only memory-mapped arrays (``np.load(..., mmap_mode="r")``, or views of
    them) once they have been read: the file stays mapped and pages come back on the next read, but they stop
    counting as this process's memory. Writable mappings (whose pages may not be written back yet) and other
    arrays are ignored. Returns how many mappings were released."""
    import mmap

    done = 0
    for a in arrays:
        m = _mapping_of(a)
        flags = getattr(a, "flags", None)
        if m is None or flags is None or flags.writeable or not hasattr(m, "madvise"):
            continue
        try:
            m.madvise(mmap.MADV_DONTNEED)
            done += 1
        except (OSError, ValueError):  # pragma: no cover - a closed mapping or a platform without madvise
            pass
    return done


class _PeakSampler:
    """The largest resident memory seen while a stage runs: the process peak when the stage raised it (exact),
    else the largest of samples taken every ``interval`` seconds by a daemon thread."""

    def __init__(self, interval: float = 0.05):
        self.interval, self.start_peak, self.sampled = interval, peak_rss(), current_rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="llmvem-rss", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.sampled = max(self.sampled, current_rss())

    def stop(self) -> int:
        self._stop.set()
        self._thread.join()
        end_peak = peak_rss()
        return end_peak if end_peak > self.start_peak else max(self.sampled, current_rss())


class _StderrHandler(logging.Handler):
    """Writes ``[llmvem] <message>`` to whatever ``sys.stderr`` is at the time (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(f"[llmvem] {record.getMessage()}\n")
            sys.stderr.flush()
        except (OSError, ValueError):  # pragma: no cover - a closed stream
            pass


def print_stage_lines() -> None:
    """Print the ``llmvem.stages`` lines to stderr as ``[llmvem] …`` (what the CLI does); once per process."""
    logger = logging.getLogger(STAGE_LOGGER)
    if any(isinstance(h, _StderrHandler) for h in logger.handlers):
        return
    logger.addHandler(_StderrHandler())
    logger.setLevel(logging.INFO)
    logger.propagate = False


@contextmanager
def stage(label: str, key: str | None = None, *, timing: MutableMapping[str, float] | None = None,
          memory: MutableMapping[str, int] | None = None, say: Callable[[str], None] | None = None
          ) -> Iterator[None]:
    """One long stage: ``"<label> …"`` when it starts, ``"<label>: done in 12.3 s, peak memory 1.20 GB"`` when
    it ends (``"failed after"`` when it raises), and ``timing[key]`` (seconds) / ``memory[key]`` (peak resident
    bytes while it ran) recorded.

    Parameters
    ----------
    label : str
        What the user reads (``"image features"``).
    key : str, optional
        Name in ``timing`` / ``memory`` (default ``label``).
    timing, memory : dict, optional
    say : callable(str), optional
        Where the lines go (default: the ``llmvem.stages`` logger at INFO).
    """
    out = say or logging.getLogger(STAGE_LOGGER).info
    key = key or label
    out(f"{label} …")
    sampler = _PeakSampler()
    t0 = time.perf_counter()
    ok = False
    try:
        yield
        ok = True
    finally:
        seconds = time.perf_counter() - t0
        peak = sampler.stop()
        release_free_memory()  # what the stage freed goes back before the next one starts
        if timing is not None:
            timing[key] = seconds
        if memory is not None:
            memory[key] = peak
        out(f"{label}: {'done in' if ok else 'failed after'} {seconds:.1f} s, peak memory {format_bytes(peak)}")
