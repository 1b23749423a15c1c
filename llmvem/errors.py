"""Exceptions raised by llmvem.

Every error a user can cause (bad file, bad config, bad flag) is an :class:`LLMVEMError`. The CLI turns it
into one line on stderr and exit code 2. Messages name the file, the field and what was expected.
"""

from __future__ import annotations

from pathlib import Path


class LLMVEMError(Exception):
    """Base class of user-facing errors (exit code 2 in the CLI)."""


class DataValidationError(LLMVEMError, ValueError):
    """A dataset file has the wrong shape, type or content."""

    def __init__(self, source: str | Path | None, field: str, problem: str):
        self.source = str(source) if source is not None else "<in memory>"
        self.field = field
        self.problem = problem
        super().__init__(f"{self.source}: {field}: {problem}")


class ConfigError(LLMVEMError, ValueError):
    """A configuration file or option is invalid."""


class CaptionError(LLMVEMError, RuntimeError):
    """Captioning failed for some images (after retries)."""


class CheckpointError(LLMVEMError, RuntimeError):
    """A checkpoint is missing, unsafe, or belongs to another configuration."""


class UnsafeFileError(LLMVEMError, RuntimeError):
    """A file would need code execution (pickle) to load, and llmvem refuses it."""


class RunFolderError(LLMVEMError, FileExistsError):
    """A run folder exists and neither resume nor overwrite was asked for."""


class ModelLoadError(LLMVEMError, OSError):
    """A model directory or hub id could not be loaded."""
