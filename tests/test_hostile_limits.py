"""Hostile input that needs a process of its own: memory bombs, full disks, and captioning workers sharing a store.

- A ~1 KB YAML alias bomb and a ~400-byte pickled tuple tower fail in under 2 s with a peak under 500 MB (measured
  from the child process's own /proc/self/status).
- A disk that fills up while ``caption`` / ``embed`` write: one line naming the folder, exit code 1, no crash
  (``embed`` used to segfault in HDF5), nothing corrupted, and the rerun finishes the job. The full disk is a
  tmpfs the test mounts (root only; otherwise those tests are skipped) that a filler file fills at the worst
  moment; a write wrapper that raises ``ENOSPC`` covers the caption store and ``train`` everywhere.
- Four ``llmvem caption`` processes on one store against the fake server caption every image exactly once between
  them; a worker killed mid-way has its images taken over.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from fake_openai_server import FakeOpenAIServer, colour_caption
from PIL import Image
from test_adapters import make_subject
from test_hostile_inputs import BOMB, _pickled_mapping, _png_header, _tuple_tower
from test_reliability_cli import dataset_folder, embed_images
from test_text_to_brain import run_dir  # noqa: F401  (a fixture: the shared tiny trained run)

from llmvem.captions.store import CaptionStore, worker_id
from llmvem.cli import main

REPO_ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "LLMVEM_NO_PROGRESS": "1", "PYTHONPATH": str(REPO_ROOT)}

# The child runs one command in-process and reports its exit code, the command's wall time and its peak memory
# (Linux: /proc/self/status).
_MEASURE = """
import json, sys, time
from llmvem.cli import main
t0 = time.perf_counter()
rc = main(sys.argv[1:])
dt = time.perf_counter() - t0
# VmHWM: the peak of this process's own memory (ru_maxrss would report the parent's, inherited across exec)
peak_mb = next(int(ln.split()[1]) for ln in open("/proc/self/status") if ln.startswith("VmHWM:")) / 1024
print(json.dumps({"rc": rc, "seconds": dt, "peak_mb": peak_mb}))
"""


def measured(args: list[str], cwd: Path) -> tuple[dict, list[str]]:
    proc = subprocess.run([sys.executable, "-c", _MEASURE, *args], cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), [ln for ln in proc.stderr.splitlines() if ln.strip()]


# ========================================================================================== memory bombs
@pytest.mark.slow
def test_yaml_alias_bomb_fails_in_under_2_s_and_500_mb(tmp_path):
    cfg = tmp_path / "bomb.yaml"
    cfg.write_text(BOMB + "seed: *a9\n")
    assert cfg.stat().st_size < 1500
    result, err = measured(["train", "--config", str(cfg), "--out", str(tmp_path / "run")], tmp_path)
    assert result["rc"] == 2 and len(err) == 1 and "bomb.yaml" in err[0] and "aliases" in err[0], err
    assert result["seconds"] < 2.0 and result["peak_mb"] < 500, result
    assert not (tmp_path / "run").exists()


@pytest.mark.slow
def test_pickled_tuple_tower_mapping_fails_in_under_2_s_and_500_mb(tmp_path):
    subj = make_subject(tmp_path)["subj"]
    mapping = subj / "roi_masks" / "mapping_floc-faces.npy"
    mapping.write_bytes(_pickled_mapping(_tuple_tower(8)))  # 9**8 leaves once expanded; ~0.5 KB on disk
    assert mapping.stat().st_size < 600
    result, err = measured(["data", "inspect", str(subj)], tmp_path)
    assert result["rc"] == 2 and len(err) == 1 and "mapping_floc-faces.npy" in err[0], err
    assert len(err[0]) < 1100
    assert result["seconds"] < 2.0 and result["peak_mb"] < 500, result


@pytest.mark.slow
def test_predict_on_a_decompression_bomb_is_one_line_and_writes_nothing(run_dir, tmp_path, capsys):  # noqa: F811
    folder = tmp_path / "stimuli"
    folder.mkdir()
    Image.new("RGB", (16, 16), (10, 20, 30)).save(folder / "a.png")
    (folder / "b.png").write_bytes(_png_header(30000, 30000))  # 900 MP declared in ~100 bytes
    out = tmp_path / "preds.h5"
    capsys.readouterr()
    assert main(["predict", "--run", str(run_dir), "--images", str(folder), "--out", str(out)]) == 2
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and f"{folder / 'b.png'}: image: declares too many pixels" in err[0], err
    assert not out.exists()


# ============================================================================================ full disks
def _mount_tmpfs(path: Path, size: str) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True)
    return proc.returncode == 0


@pytest.fixture
def small_disk(tmp_path):
    """A 4 MB tmpfs at ``tmp_path/disk`` (skips the test where it cannot be mounted)."""
    disk = tmp_path / "disk"
    if not _mount_tmpfs(disk, "4m"):
        pytest.skip("cannot mount a tmpfs here (needs root); the write-wrapper tests cover the same paths")
    yield disk
    subprocess.run(["umount", "-l", str(disk)], check=False)


# The child fills the disk (a filler file written until ENOSPC) just before the step named in argv[1] writes.
_FILL_THEN_RUN = """
import os, sys
from pathlib import Path
step, filler, args = sys.argv[1], Path(sys.argv[2]), sys.argv[3:]

def fill():
    with open(filler, "wb") as fh:
        try:
            while True:
                fh.write(b"\\0" * 65536)
                fh.flush()
        except OSError:
            pass

if step == "consolidate":
    from llmvem.embed import cache
    real = cache.FeatureCache.consolidate
    def consolidate(self):
        fill()
        return real(self)
    cache.FeatureCache.consolidate = consolidate
elif step == "caption":
    from llmvem.captions import store
    real_add = store.CaptionStore.add
    calls = []
    def add(self, *a, **k):
        calls.append(1)
        if len(calls) == 2:
            fill()
        return real_add(self, *a, **k)
    store.CaptionStore.add = add
from llmvem.cli import main
sys.exit(main(args))
"""


def _fill_then_run(step: str, filler: Path, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _FILL_THEN_RUN, step, str(filler), *args], cwd=cwd, env=ENV,
                          capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_embed_on_a_full_disk_exits_1_with_one_line_and_the_rerun_finishes(small_disk, tmp_path, capsys):
    folder = dataset_folder(tmp_path / "ds")
    args = embed_images(folder, small_disk)  # the feature cache lives on the small disk
    proc = _fill_then_run("consolidate", small_disk / "filler", args, tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.strip() and not ln.startswith(("computing", "["))]
    assert proc.returncode == 1, proc.stderr[-3000:]  # not 139 (segfault) nor a traceback
    assert len(lines) == 1 and lines[0].startswith("llmvem: error: ") and str(small_disk) in lines[0], proc.stderr
    assert "no space left" in lines[0]
    parts = list((small_disk).rglob("part-*.h5"))
    assert parts and not list(small_disk.glob(".features.h5.tmp-*"))  # the parts survive, no half-written store
    (small_disk / "filler").unlink()
    capsys.readouterr()
    assert main(args) == 0  # the rerun reads every image's features back from the surviving part
    assert "images from cache: 8" in capsys.readouterr().out


@pytest.mark.slow
def test_caption_on_a_full_disk_exits_1_with_one_line_and_the_rerun_finishes(small_disk, tmp_path):
    folder = dataset_folder(tmp_path / "ds", n=40, captions=True)
    store = small_disk / "captions.sqlite"
    args = ["caption", str(folder), "--store", str(store), "--backend", "dataset", "--batch-size", "4"]
    proc = _fill_then_run("caption", small_disk / "filler", args, tmp_path)
    lines = [ln for ln in proc.stderr.splitlines() if ln.startswith("llmvem: error: ")]
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert len(lines) == 1 and str(small_disk) in lines[0] and "no space left" in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr
    con = sqlite3.connect(store)
    assert con.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    kept = con.execute("SELECT COUNT(*) FROM captions").fetchone()[0]
    con.close()
    assert kept >= 4  # the first batch is kept
    (small_disk / "filler").unlink()
    assert main(args) == 0
    with CaptionStore(store, readonly=True) as s:
        assert len(s.done_hashes(s.configs()[0].config_hash)) == 40


def test_caption_store_write_hitting_a_full_disk_is_one_line_exit_1(tmp_path, capsys, monkeypatch):
    """The same path without a tmpfs: SQLite's "database or disk is full" raised inside a store transaction."""
    folder = dataset_folder(tmp_path / "ds", n=12, captions=True)
    store = tmp_path / "captions.sqlite"
    real = CaptionStore.add
    calls: list[int] = []

    def add(self, config_hash, items):
        calls.append(1)
        if len(calls) == 2:
            with self._write():
                raise sqlite3.OperationalError("database or disk is full")
        return real(self, config_hash, items)

    monkeypatch.setattr(CaptionStore, "add", add)
    args = ["caption", str(folder), "--store", str(store), "--backend", "dataset", "--batch-size", "4"]
    capsys.readouterr()
    assert main(args) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert err[-1] == (f"llmvem: error: {tmp_path}: no space left on the device while writing captions to "
                       "captions.sqlite; finished work is kept, free some space and run the same command again")
    assert len([ln for ln in err if ln.startswith("llmvem: error")]) == 1
    monkeypatch.setattr(CaptionStore, "add", real)
    assert main(args) == 0
    assert "done: 8, skipped (already stored): 4" in capsys.readouterr().out


def test_train_hitting_a_full_disk_is_one_line_exit_1_naming_the_run_folder(tmp_path, capsys, monkeypatch):
    from safetensors import SafetensorError

    import llmvem.inputs
    import llmvem.train

    def no_space(*args, **kwargs):
        raise SafetensorError('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
                              'space left on device" })')

    import llmvem.experiment

    # the run folder's writer (checkpoints, predictions) fails as safetensors does on a full disk
    monkeypatch.setattr(llmvem.experiment, "run_models", no_space)
    out = tmp_path / "run"
    capsys.readouterr()
    assert main(["train", "--config", "demo", "--out", str(out)]) == 1
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(err) == 1 and err[0].startswith(f"llmvem: error: {out}: no space left on the device while writing "
                                               "the run folder"), err


def test_an_os_error_naming_a_path_is_one_line_exit_2(tmp_path, capsys, monkeypatch):
    import llmvem.cli.data as data_cli

    def denied(*args, **kwargs):
        raise PermissionError(13, "Permission denied", str(tmp_path / "locked"))

    monkeypatch.setattr("llmvem.data.load_dataset", denied)
    capsys.readouterr()
    assert data_cli is not None and main(["data", "inspect", "virtual"]) == 2
    err = capsys.readouterr().err
    assert err == f"llmvem: error: {tmp_path / 'locked'}: Permission denied; choose a path you can write to\n"


# ========================================================================================= work sharing
def _colour_images(folder: Path, n: int) -> list[tuple[int, int, int]]:
    folder.mkdir(parents=True)
    colours = [(i % 26 * 10, i // 26 * 10, 120) for i in range(n)]  # distinct: no two images share a hash
    for i, c in enumerate(colours):
        Image.new("RGB", (8, 8), c).save(folder / f"stim{i:03d}.png")
    return colours


def _caption_worker(images: Path, store: Path, url: str, *extra: str) -> subprocess.Popen:
    args = [sys.executable, "-m", "llmvem", "caption", "--images", str(images), "--store", str(store),
            "--backend", "openai", "--model", "fake-vlm", "--base-url", url, "--max-in-flight", "4",
            "--batch-size", "4", *extra]
    return subprocess.Popen(args, cwd=REPO_ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _rows(store: Path) -> list[tuple[str, int, str]]:
    con = sqlite3.connect(store)
    try:
        return con.execute("SELECT image_id, caption_index, caption FROM captions ORDER BY image_id").fetchall()
    finally:
        con.close()


def _done(stdout: str) -> int:
    return int(stdout.split("done: ")[1].split(",")[0])


@pytest.mark.slow
def test_four_workers_on_one_store_caption_every_image_exactly_once(tmp_path):
    n = 96
    colours = _colour_images(tmp_path / "imgs", n)
    store = tmp_path / "shared.sqlite"
    CaptionStore(store).close()  # created up front, as a user would share one store path
    with FakeOpenAIServer(delay_s=0.05, max_lifetime_s=300) as srv:
        workers = [_caption_worker(tmp_path / "imgs", store, srv.base_url) for _ in range(4)]
        outs = [w.communicate(timeout=300) for w in workers]
        n_requests = srv.n_requests
    for w, (_out, err) in zip(workers, outs, strict=True):
        assert w.returncode == 0, err[-3000:]
    done = [_done(out) for out, _ in outs]
    assert sum(done) == n and n_requests == n  # disjoint: no image was sent twice
    assert sum(d > 0 for d in done) >= 2  # the work was shared
    rows = _rows(store)
    assert [r[0] for r in rows] == [f"stim{i:03d}" for i in range(n)]
    assert [r[2] for r in rows] == [colour_caption(c) for c in colours]
    con = sqlite3.connect(store)
    assert con.execute("SELECT COUNT(*) FROM claims").fetchone()[0] == 0  # every worker released its claims
    con.close()


@pytest.mark.slow
def test_a_killed_workers_images_are_taken_over(tmp_path):
    n = 60
    _colour_images(tmp_path / "imgs", n)
    store = tmp_path / "shared.sqlite"
    CaptionStore(store).close()
    with FakeOpenAIServer(delay_s=0.1, max_lifetime_s=300) as srv:
        victim = _caption_worker(tmp_path / "imgs", store, srv.base_url)
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and len(_rows(store)) < 8:
            time.sleep(0.05)
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
        con = sqlite3.connect(store)
        orphaned = con.execute("SELECT COUNT(*) FROM claims").fetchone()[0]
        con.close()
        assert orphaned > 0  # the dead worker still holds claims
        survivor = _caption_worker(tmp_path / "imgs", store, srv.base_url)
        out, err = survivor.communicate(timeout=300)
    assert survivor.returncode == 0, err[-3000:]
    rows = _rows(store)
    assert len(rows) == n and len({r[0] for r in rows}) == n
    assert 0 < _done(out) < n  # the survivor captioned what the victim left, including its claimed images
    assert "left to other workers" not in out


def test_claims_are_disjoint_expire_and_are_taken_over(tmp_path):
    with CaptionStore(tmp_path / "s.sqlite") as store:
        from llmvem.captions.store import CaptionerRecord
        from llmvem.utils import stable_hash

        ident = {"backend": "file", "model_id": "m", "prompt": None, "settings": {}}
        config = store.register(CaptionerRecord(config_hash=stable_hash(ident), **ident))
        wanted = [f"h{i:02d}" for i in range(10)]
        a = store.claim(config, wanted, 4, lease_s=0.3, worker="hostA:1")
        b = store.claim(config, wanted, 4, lease_s=60, worker="hostB:1")
        assert a == wanted[:4] and b == wanted[4:8]
        store.add(config, [("h00", "i0", ["a cat"])])
        assert store.claimed_by_others(config, worker="hostB:1") == 4
        time.sleep(0.4)  # A's lease runs out; h00 is captioned, h01-h03 are free again
        c = store.claim(config, wanted, 10, worker="hostC:1")
        assert c == ["h01", "h02", "h03", "h08", "h09"]
        # a dead process on this host loses its claims at once, whatever its lease
        host = worker_id().rsplit(":", 1)[0]
        dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True).stdout.strip()
        store.release_claims(worker="hostB:1")
        assert store.claim(config, wanted, 2, lease_s=600, worker=f"{host}:{dead}") == ["h04", "h05"]
        assert store.claim(config, wanted, 10, worker="hostD:1") == ["h04", "h05", "h06", "h07"]
        store.renew_claims(lease_s=600, worker="hostD:1")
        store.release_claims(worker="hostD:1")
        assert store.claimed_by_others(config, worker="hostD:1") == 5  # C's claims


def test_summary_counts_what_this_worker_did(tmp_path, capsys):
    """Images another live worker holds are neither captioned nor counted as done by this one."""
    folder = dataset_folder(tmp_path / "ds", n=10, captions=True)
    store_path = tmp_path / "s.sqlite"
    args = ["caption", str(folder), "--store", str(store_path), "--backend", "dataset"]
    from llmvem.captions import make_captioner
    from llmvem.data import load_dataset

    ds = load_dataset(folder)
    captioner = make_captioner("dataset", dataset=ds)
    hashes = ds.all_images().content_hashes()
    with CaptionStore(store_path) as store:
        config = store.register(captioner)
        assert len(store.claim(config, hashes[:3], 3, lease_s=600, worker="elsewhere:7")) == 3
    capsys.readouterr()
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "done: 7, skipped (already stored): 0, failed: 0, left to other workers: 3 of 10 images" in out
    with CaptionStore(store_path) as store:
        store.release_claims(worker="elsewhere:7")
    assert main(args) == 0
    assert "done: 3, skipped (already stored): 7, failed: 0 of 10 images" in capsys.readouterr().out
    assert np.array_equal(np.sort(np.unique(hashes)), np.sort(np.unique(hashes)))


@pytest.mark.slow
def test_caption_workers_benchmark_runs_and_checks_every_image_once(tmp_path):
    out = tmp_path / "workers.json"  # never bench/results/
    proc = subprocess.run([sys.executable, str(REPO_ROOT / "bench" / "bench_caption_workers.py"), "--images", "24",
                           "--delay", "0.05", "--workers", "1", "--workers", "2", "--out", str(out)], cwd=tmp_path,
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert [sum(r["done"]) for r in json.loads(out.read_text(encoding="utf-8"))["runs"]] == [24, 24]
    rows = [ln for ln in proc.stdout.splitlines() if ln.startswith("| 1 |") or ln.startswith("| 2 |")]
    assert len(rows) == 2
    for row in rows:
        per_worker = row.rstrip(" |").split("|")[-1]
        assert sum(int(x) for x in per_worker.split(",")) == 24
