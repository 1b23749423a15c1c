"""Shared fixtures. Nothing here downloads: hub access is switched off for the whole test session."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("LLMVEM_NO_PROGRESS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("LLMVEM_SHARED_DATA", REPO_ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    """Path of ../shared/data; tests that use it are skipped when it is absent."""
    if not SHARED_DATA.is_dir():
        pytest.skip(f"external data folder {SHARED_DATA} is absent")
    return SHARED_DATA


def needs_shared(*parts: str) -> Path:
    """Path below ../shared/data, or skip the calling test when it is absent."""
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"external data {path} is absent")
    return path


@pytest.fixture
def one_torch_thread():
    """Tiny networks: one torch thread is faster than several on a shared 2-core machine (restored after)."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
