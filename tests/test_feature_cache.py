"""Feature cache: computed once, identical on rerun without recomputation, and surviving crashes."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import torch
from torch import nn

from llmvem.data.images import ArrayImages
from llmvem.embed.cache import CacheCorruptionWarning, FeatureCache, compute_features, extract_features
from llmvem.errors import ConfigError

REPO = Path(__file__).resolve().parents[1]

# The backbone is defined as source so the crash test's subprocess builds exactly the same one.
BACKBONE_SOURCE = '''
import time
import torch
from torch import nn
from llmvem.embed.base import ImageBackbone


class TinyConvBackbone(ImageBackbone):
    """Deterministic 2-stage conv net; counts forward calls; optionally sleeps per batch."""

    def __init__(self, width=8, delay_s=0.0):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.stage1 = nn.Conv2d(3, width, 3, stride=2)
        self.stage2 = nn.Conv2d(width, 2 * width, 3, stride=2)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
        self.model_id, self.feature_dim, self.image_size = f"tiny_conv_{width}", 2 * width, 16
        self.mean, self.std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
        self.layer_names = ["stage1"]
        self.delay_s, self.calls, self.images_seen = delay_s, 0, 0

    def features(self, x, layers=()):
        self.calls += 1
        self.images_seen += x.shape[0]
        if self.delay_s:
            time.sleep(self.delay_s)
        h1 = torch.relu(self.stage1(x))
        out = {"pooled": torch.relu(self.stage2(h1)).mean(dim=(2, 3))}
        if "stage1" in layers:
            out["stage1"] = h1.mean(dim=(2, 3))
        return out

    def blocks(self):
        return [self.stage1, self.stage2]
'''
_ns: dict = {}
exec(compile(BACKBONE_SOURCE, "tiny_conv_backbone", "exec"), _ns)
TinyConvBackbone = _ns["TinyConvBackbone"]


def _images(n: int, seed: int = 0) -> ArrayImages:
    return ArrayImages(np.random.default_rng(seed).integers(0, 256, (n, 16, 16, 3), dtype=np.uint8))


def test_rerun_reads_identical_arrays_without_calling_the_backbone(tmp_path):
    images = _images(40)
    cache = FeatureCache(tmp_path / "features.h5")
    first = compute_features(images, TinyConvBackbone(), ["pooled", "stage1"], cache=cache, batch_size=8,
                             chunk_size=16, device="cpu", show_progress=False)
    assert first.n_computed == 40 and first.n_cached == 0
    assert first.features["pooled"].shape == (40, 16) and first.features["stage1"].shape == (40, 8)

    spy = TinyConvBackbone()
    again = compute_features(images, spy, ["pooled", "stage1"], cache=FeatureCache(tmp_path / "features.h5"),
                             batch_size=8, device="cpu", show_progress=False)
    assert spy.calls == 0 and again.n_computed == 0 and again.n_cached == 40
    for layer in ("pooled", "stage1"):
        assert again.features[layer].dtype == np.float32
        np.testing.assert_array_equal(again.features[layer], first.features[layer])
    # The uncached computation gives the same numbers.
    plain = extract_features(images, TinyConvBackbone(), ["pooled"], cache=None, device="cpu", show_progress=False)
    np.testing.assert_allclose(plain["pooled"], first.features["pooled"], rtol=1e-5, atol=1e-6)
    # Parts were merged into the store and removed.
    info = cache.info()
    assert [(i["n_rows"], i["layers"], i["dtype"]) for i in info] == [(40, ["pooled", "stage1"], "float32")]
    assert not list((tmp_path / "features.h5.parts").rglob("*.h5"))


def test_rows_are_matched_by_content_not_position(tmp_path):
    images = _images(12)
    cache = FeatureCache(tmp_path / "f.h5")
    full = extract_features(images, TinyConvBackbone(), cache=cache, device="cpu", show_progress=False)["pooled"]
    # Reordered, repeated and partly new images: only the 3 new ones are computed, once each.
    new = _images(3, seed=99)
    mixed = ArrayImages(np.concatenate([images.array[[5, 2, 5]], new.array, new.array[[0]]]))
    spy = TinyConvBackbone()
    res = compute_features(mixed, spy, cache=cache, batch_size=2, device="cpu", show_progress=False)
    assert res.n_computed == 3 and res.n_cached == 3 and spy.images_seen == 3
    np.testing.assert_array_equal(res.features["pooled"][:3], full[[5, 2, 5]])
    np.testing.assert_array_equal(res.features["pooled"][6], res.features["pooled"][3])


def test_config_changes_make_new_groups_and_float16_storage(tmp_path):
    images = _images(10)
    cache = FeatureCache(tmp_path / "f.h5")
    f32 = extract_features(images, TinyConvBackbone(), cache=cache, device="cpu", show_progress=False)["pooled"]
    spy = TinyConvBackbone()
    f16 = extract_features(images, spy, cache=cache, dtype="float16", device="cpu", show_progress=False)["pooled"]
    assert spy.images_seen == 10 and f16.dtype == np.float16
    np.testing.assert_allclose(f16.astype(np.float32), f32, rtol=2e-3, atol=1e-3)
    wider = TinyConvBackbone(width=4)
    extract_features(images, wider, cache=cache, device="cpu", show_progress=False)
    assert wider.images_seen == 10
    assert sorted((i["model_id"], i["dtype"]) for i in cache.info()) == [
        ("tiny_conv_4", "float32"), ("tiny_conv_8", "float16"), ("tiny_conv_8", "float32")]
    spy16 = TinyConvBackbone()
    again = extract_features(images, spy16, cache=cache, dtype="float16", device="cpu", show_progress=False)
    assert spy16.calls == 0
    np.testing.assert_array_equal(again["pooled"], f16)
    with h5py.File(tmp_path / "f.h5", "r") as f:
        assert sorted(f[k]["pooled"].dtype.name for k in f) == ["float16", "float32", "float32"]


def test_bad_options_raise_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="unknown"):
        extract_features(_images(2), TinyConvBackbone(), ["block9"], device="cpu", show_progress=False)
    with pytest.raises(ConfigError, match="dtype"):
        extract_features(_images(2), TinyConvBackbone(), dtype="int8", device="cpu")  # type: ignore[arg-type]
    (tmp_path / "dir.h5").mkdir()
    with pytest.raises(ConfigError, match="directory"):
        FeatureCache(tmp_path / "dir.h5")


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_corrupt_store_and_parts_are_discarded_and_recomputed(tmp_path):
    images = _images(20)
    path = tmp_path / "f.h5"
    reference = extract_features(images, TinyConvBackbone(), cache=FeatureCache(path), chunk_size=8, device="cpu",
                                 show_progress=False)["pooled"]
    # A torn store (first 300 bytes only), a torn finished part, and the temporary file of a dead writer.
    path.write_bytes(path.read_bytes()[:300])
    key = FeatureCache.config_key(TinyConvBackbone(), ["pooled"], "float32")[0]
    parts = tmp_path / "f.h5.parts" / key
    parts.mkdir(parents=True)
    (parts / "part-00000000000000000001-1-deadbeef.h5").write_bytes(b"\x89HDF\r\n\x1a\n" + b"\0" * 100)
    stale = parts / f".part-2.h5.tmp-{_dead_pid()}"
    stale.write_bytes(b"half written")
    cache = FeatureCache(path)
    assert not stale.exists()  # temporaries of dead processes are removed on open
    spy = TinyConvBackbone()
    with pytest.warns(CacheCorruptionWarning, match="unreadable"):
        again = extract_features(images, spy, cache=cache, chunk_size=8, device="cpu", show_progress=False)
    assert spy.images_seen == 20
    np.testing.assert_array_equal(again["pooled"], reference)
    assert len(list(tmp_path.glob("f.h5.corrupt-*"))) == 1 and len(list(parts.glob("*.corrupt-*"))) == 1
    spy2 = TinyConvBackbone()
    extract_features(images, spy2, cache=FeatureCache(path), device="cpu", show_progress=False)
    assert spy2.calls == 0


CRASH_SCRIPT = '''
import sys
import numpy as np
from llmvem.data.images import ArrayImages
from llmvem.embed.cache import FeatureCache, extract_features
{backbone}
images = ArrayImages(np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
print("started", flush=True)
extract_features(images, TinyConvBackbone(delay_s=0.1), ["pooled", "stage1"], cache=FeatureCache(sys.argv[1]),
                 batch_size=4, chunk_size=8, device="cpu", show_progress=False)
print("finished", flush=True)
'''


def _rows_done(path: Path) -> int:
    n = 0
    for part in path.with_name(path.name + ".parts").rglob("part-*.h5"):
        with h5py.File(part, "r") as f:
            n += sum(f[k]["hashes"].shape[0] for k in f)
    return n


def _run_and_kill(script: Path, path: Path, new_parts: int, extra_delay_s: float) -> None:
    """Run the extraction script and SIGKILL it once ``new_parts`` more chunks are on disk (+ a delay)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "LLMVEM_NO_PROGRESS": "1"}
    parts = path.with_name(path.name + ".parts")
    before = len(list(parts.rglob("part-*.h5")))
    proc = subprocess.Popen([sys.executable, str(script), str(path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 60
    try:
        while time.monotonic() < deadline and len(list(parts.rglob("part-*.h5"))) < before + new_parts:
            assert proc.poll() is None, proc.stderr.read().decode() if proc.stderr else ""
            time.sleep(0.01)
        time.sleep(extra_delay_s)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.kill()
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == -signal.SIGKILL and b"finished" not in out, err.decode()


def test_sigkill_mid_extraction_then_resume_matches_uninterrupted_run(tmp_path):
    script = tmp_path / "extract.py"
    script.write_text(CRASH_SCRIPT.format(backbone=textwrap.dedent(BACKBONE_SOURCE)))
    path = tmp_path / "killed" / "features.h5"
    # 8 chunks of 8 images, 0.2 s each. Kill twice: once while chunk 3 is in flight, then (after resuming) at an
    # offset that lands within a chunk's computation or its write.
    _run_and_kill(script, path, new_parts=2, extra_delay_s=0.1)
    first = _rows_done(path)
    assert first >= 16 and first % 8 == 0 and not path.exists()  # whole chunks only, never consolidated
    _run_and_kill(script, path, new_parts=2, extra_delay_s=0.17)
    done = _rows_done(path)
    assert first + 16 <= done < 64 and done % 8 == 0 and not path.exists()

    images = ArrayImages(np.random.default_rng(0).integers(0, 256, (64, 16, 16, 3), dtype=np.uint8))
    spy = TinyConvBackbone()
    resumed = compute_features(images, spy, ["pooled", "stage1"], cache=FeatureCache(path), batch_size=4,
                               chunk_size=8, device="cpu", show_progress=False)
    assert resumed.n_cached == done and resumed.n_computed == 64 - done and spy.images_seen == 64 - done
    clean = extract_features(images, TinyConvBackbone(), ["pooled", "stage1"],
                             cache=FeatureCache(tmp_path / "clean" / "features.h5"), batch_size=4, chunk_size=8,
                             device="cpu", show_progress=False)
    for layer in ("pooled", "stage1"):
        np.testing.assert_array_equal(resumed.features[layer], clean[layer])
    assert FeatureCache(path).info()[0]["n_rows"] == 64
    assert not list(path.parent.glob(".*tmp*")) and not list(path.parent.glob("*.corrupt-*"))


def test_cli_embed_images_then_rerun_uses_cache(tmp_path, capsys):
    from llmvem.cli import main

    spec = "virtual:n_train=12,n_test=4,image_size=48,n_early=10,n_semantic=10"
    args = ["embed", spec, "--images", "--backbone", "timm:test_resnet", "--random-init", "--layers",
            "pooled,layer2", "--cache", str(tmp_path / "f.h5"), "--device", "cpu", "--batch-size", "8"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "images computed: 16" in out and "images from cache: 0" in out and "layer2 48-d" in out
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "images computed: 0" in out and "images from cache: 16" in out
    assert main(["embed", spec, "--images", "--layers", "nope", "--backbone", "timm:test_resnet",
                 "--random-init", "--cache", str(tmp_path / "f.h5")]) == 2
    assert "nope" in capsys.readouterr().err


def test_backbone_returns_to_its_device_and_mode(tmp_path):
    net = TinyConvBackbone().train()
    extract_features(_images(4), net, device="cpu", show_progress=False)
    assert net.training and next(net.parameters()).device == torch.device("cpu")
    assert isinstance(net.blocks()[0], nn.Conv2d)
