"""CachedTextEncoder: a second encode of the same texts reads the file and loads no encoder."""

from __future__ import annotations

import numpy as np
import pytest

from llmvem.embed.base import TextEmbeddings, TextEncoder
from llmvem.embed.text import CachedTextEncoder
from llmvem.errors import ConfigError


class CountingEncoder(TextEncoder):
    model_id, dim, max_tokens = "fake", 4, 16

    def __init__(self):
        self.calls = 0

    def encode(self, texts, batch_size=64, show_progress=False):
        self.calls += 1
        emb = np.stack([np.full(4, len(t), np.float32) for t in texts])
        n = len(texts)
        return TextEmbeddings(emb, np.arange(n), np.zeros(n, bool), np.zeros(n, bool), self.model_id)


def test_cached_encodes_load_the_encoder_once(tmp_path):
    loads: list[CountingEncoder] = []

    def load():
        loads.append(CountingEncoder())
        return loads[-1]

    first = CachedTextEncoder(load, "fake", "sentence_mean", 4, tmp_path).encode(["a red circle", "a star"])
    again = CachedTextEncoder(load, "fake", "sentence_mean", 4, tmp_path)
    second = again.encode(["a red circle", "a star"])
    assert len(loads) == 1 and loads[0].calls == 1  # the second encoder read the file, loading nothing
    for f in ("embeddings", "n_tokens", "truncated", "long"):
        np.testing.assert_array_equal(getattr(first, f), getattr(second, f))
    assert second.model_id == "fake"
    again.encode(["a star"])  # other texts: loaded and computed
    assert len(loads) == 2
    with pytest.raises(ConfigError, match="4-d"):
        CachedTextEncoder(load, "fake", "sentence_mean", 8, tmp_path).encode(["new text"])
