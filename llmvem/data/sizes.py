"""Caps on the data llmvem generates itself — the virtual brain (``data.spec: virtual``) and the virtual scenes of
an alignment stream (``align_data.spec: virtual-scenes:n=N``) — checked before anything is drawn, by
``llmvem config validate`` and ``llmvem train`` alike.

- At most :data:`MAX_GENERATED_IMAGES` images per generated dataset or stream.
- What they hold in memory (3 bytes a pixel, 8 bytes per value kept per image, twice for the working copies)
  must fit the memory available when the check runs (Linux: ``MemAvailable``, within the cgroup's limit).

Without these, ``virtual-scenes:n=10000000`` ran for a minute and a half into a MemoryError.
"""

from __future__ import annotations

from pathlib import Path

from llmvem.errors import DataValidationError

__all__ = ["MAX_GENERATED_IMAGES", "available_memory", "check_generated_size", "generated_bytes"]

#: Most images of one generated dataset or stream (the virtual brain's n_train + n_test, virtual-scenes n).
MAX_GENERATED_IMAGES = 1_000_000


def _read_int(path: Path) -> int | None:
    try:
        text = path.read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def available_memory() -> int | None:
    """Bytes of memory this process can still take, or None when the system does not say (not Linux)."""
    found: list[int] = []
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                found.append(int(line.split()[1]) * 1024)
    except (OSError, ValueError, IndexError):
        pass
    for limit, usage in (("memory.max", "memory.current"),  # cgroup v2, then v1
                         ("memory/memory.limit_in_bytes", "memory/memory.usage_in_bytes")):
        cap, used = _read_int(Path("/sys/fs/cgroup") / limit), _read_int(Path("/sys/fs/cgroup") / usage)
        if cap is not None and used is not None and cap < 2**60:
            found.append(max(0, cap - used))
            break
    return min(found) if found else None


def generated_bytes(n_images: int, image_size: int, values_per_image: int = 0) -> int:
    """Memory of ``n_images`` generated RGB images of side ``image_size`` and their per-image values."""
    return 2 * n_images * (3 * image_size * image_size + 8 * values_per_image)


def check_generated_size(n_images: int, image_size: int, source: str | None, field: str,
                         values_per_image: int = 0) -> None:
    """Refuse a generated dataset or stream over :data:`MAX_GENERATED_IMAGES` images or over the memory available.

    Raises
    ------
    DataValidationError
        Naming ``source`` (the spec) and ``field`` (the option), the size asked for and the bound.
    """
    if n_images > MAX_GENERATED_IMAGES:
        raise DataValidationError(source, field, f"{n_images} images; expected at most {MAX_GENERATED_IMAGES} "
                                  "generated images (llmvem.data.sizes.MAX_GENERATED_IMAGES)")
    need, free = generated_bytes(n_images, image_size, values_per_image), available_memory()
    if free is not None and need > free:
        raise DataValidationError(source, field, f"{n_images} images of {image_size}x{image_size} pixels need about "
                                  f"{need / 2**30:.1f} GiB, more than the {free / 2**30:.1f} GiB of memory available "
                                  "now; expected fewer images (or a smaller data.image_size)")
