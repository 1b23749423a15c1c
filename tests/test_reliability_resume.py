"""Crash and resume, end to end, through the real ``llmvem`` command in a subprocess.

Each test interrupts a command at a seeded point (SIGKILL: nothing runs after it; SIGINT: Ctrl-C, which must exit
with code 130 and say how to resume), reruns the *same* command, and checks that the result equals an
uninterrupted run's: identical caption store rows, identical cached feature arrays, identical predictions, curves,
weights and metrics on CPU; nothing duplicated (one caption per image, one cache row per image, one curve row per
epoch) and nothing recomputed that was already saved (the rerun takes exactly the optimizer steps that were
missing).

To stop a process at a known point instead of racing a timer against a run that takes a second, the interrupted
runs go through :data:`PAUSE_CLI`: the real ``llmvem.cli.main`` with two counters (optimizer steps, caption-store
commits) that can pause the process after the N-th event (N seeded at random) so the test can signal it there.
The uninterrupted reference runs and the sweep's Ctrl-C use the plain ``python -m llmvem``.

Unit-level crash tests live elsewhere: ``test_captions_cli.py::test_killed_midway_then_rerun_gives_exactly_one_
caption_each`` (caption store, SIGKILL and SIGINT), ``test_feature_cache.py::test_sigkill_mid_extraction_then_
resume_matches_uninterrupted_run`` (HDF5 feature cache, killed twice), ``test_train_trainer.py::test_interrupted_
and_resumed_run_equals_uninterrupted`` (trainer API) and ``test_train_checkpoint.py`` (crash while saving).
"""

from __future__ import annotations

import csv
import json
import os
import random
import re
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from pathlib import Path

import h5py
import numpy as np
import pytest
import yaml
from child_signals import default_sigint
from safetensors.numpy import load_file

REPO_ROOT = Path(__file__).resolve().parents[1]
RESUME_HINT = ("llmvem: interrupted; finished work is saved. Run the same command again to resume "
               "(add --resume for train, demo and sweep).")

PAUSE_CLI = '''\
"""The llmvem CLI with event counters; LLMVEM_TEST_PAUSE=KIND:N pauses after the N-th event of KIND."""
import os
import sys
import time

import torch

from llmvem.captions.store import CaptionStore
from llmvem.cli import main

kind, _, at = os.environ.get("LLMVEM_TEST_PAUSE", "").partition(":")
counts = {"step": 0, "captions": 0}


def tick(name):
    counts[name] += 1
    if name == kind and counts[name] == int(at):
        print(f"PAUSED after {name} {at}", file=sys.stderr, flush=True)
        time.sleep(600)


def counted(cls, method, name):
    original = getattr(cls, method)

    def wrapper(self, *args, **kwargs):
        out = original(self, *args, **kwargs)
        tick(name)
        return out

    setattr(cls, method, wrapper)


counted(torch.optim.AdamW, "step", "step")  # one call per optimizer step
counted(CaptionStore, "add", "captions")    # one call per committed batch of captions
rc = main(sys.argv[1:])
print(f"optimizer steps: {counts['step']}", file=sys.stderr, flush=True)
sys.exit(rc)
'''

# 60 training images (54 after the validation split) in batches of 16: 4 optimizer steps per epoch, 3 epochs in
# stage 1 and 1 in stage 2 = 16 steps per model. 80 images captioned in batches of 8 = 10 caption-store commits.
STEPS_PER_EPOCH = 4
STEPS_PER_MODEL = 16
CAPTION_COMMITS = 10


def write_config(folder: Path, cache_dir: Path) -> Path:
    """The tiny virtual-brain config (a small random timm backbone keeps stage 2 fast)."""
    cfg = {
        "data": {"spec": "virtual", "n_train": 60, "n_test": 20, "image_size": 48},
        "captions": {"backend": "dataset", "batch_size": 8, "device": "cpu"},
        "text": {"device": "cpu"},
        "backbone": {"name": "timm:test_efficientnet", "pretrained": False, "image_size": 64,
                     "layers": ["pooled"], "batch_size": 16, "device": "cpu"},
        "model": {"lambda_align": 0.1},
        "train": {"device": "cpu", "stage1": {"epochs": 3, "batch_size": 16},
                  "stage2": {"epochs": 1, "unfreeze_last_n": 1, "batch_size": 16}},
        "evaluate": {"bootstrap": 50, "compare_lambdas": [], "ridge_device": "cpu"},
        "cache_dir": str(cache_dir),
    }
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tiny.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return path


class Cli:
    """A ``llmvem`` subprocess whose stderr is read line by line while it runs."""

    def __init__(self, args: list[str], cwd: Path, pause: str | None = None, plain: bool = False):
        env = {**os.environ, "LLMVEM_NO_PROGRESS": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
               "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
               # one thread: on a shared 2-core runner OpenMP threads spin against each other (2x slower)
               "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        env.pop("LLMVEM_TEST_PAUSE", None)
        if pause:
            env["LLMVEM_TEST_PAUSE"] = pause
        if plain:
            cmd = [sys.executable, "-m", "llmvem", *args]
        else:
            script = cwd / "pause_cli.py"
            if not script.exists():
                script.write_text(PAUSE_CLI)
            cmd = [sys.executable, str(script), *args]
        self.proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     text=True, preexec_fn=default_sigint)  # Ctrl-C works even under nohup
        self.err_lines: list[str] = []
        self.out_chunks: list[str] = []
        self._new_line = threading.Condition()
        self._readers = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for reader in self._readers:
            reader.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            with self._new_line:
                self.err_lines.append(line.rstrip("\n"))
                self._new_line.notify_all()
        with self._new_line:
            self._new_line.notify_all()

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.out_chunks.append(self.proc.stdout.read())

    def wait_for(self, pattern: str, timeout: float = 240.0) -> None:
        """Block until a stderr line contains ``pattern``; fail if the process ends first."""
        deadline = time.monotonic() + timeout
        with self._new_line:
            while not any(pattern in line for line in self.err_lines):
                if self.proc.poll() is not None and not self._readers[0].is_alive():
                    raise AssertionError(f"process ended (rc {self.proc.returncode}) before {pattern!r}:\n"
                                         + "\n".join(self.err_lines[-30:]))
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out waiting for {pattern!r}")
                self._new_line.wait(timeout=0.5)

    def finish(self, timeout: float = 300.0) -> tuple[int, str, str]:
        try:
            self.proc.wait(timeout=timeout)
        finally:
            if self.proc.poll() is None:
                self.proc.kill()
                self.proc.wait()
        for reader in self._readers:
            reader.join(timeout=30)
        return self.proc.returncode, "".join(self.out_chunks), "\n".join(self.err_lines)

    def interrupt(self, sig: signal.Signals) -> tuple[int, str, str]:
        self.proc.send_signal(sig)
        return self.finish(timeout=120)


def run_to_end(args: list[str], cwd: Path, plain: bool = False) -> tuple[str, str]:
    rc, out, err = Cli(args, cwd, plain=plain).finish()
    assert rc == 0, err[-3000:]
    assert "Traceback" not in err
    return out, err


def steps_taken(stderr: str) -> int:
    return int(re.search(r"optimizer steps: (\d+)", stderr).group(1))  # type: ignore[union-attr]


# ----------------------------------------------------------------------------------------------- comparisons
def caption_rows(store: Path) -> list[tuple]:
    con = sqlite3.connect(f"file:{store}?mode=ro", uri=True)
    try:
        return con.execute("SELECT image_id, image_hash, config_hash, caption_index, caption FROM captions "
                           "ORDER BY image_id, caption_index").fetchall()
    finally:
        con.close()


def cache_rows(cache: Path) -> dict[str, dict[str, dict[str, np.ndarray]]]:
    """group → image hash → layer → feature row, failing on duplicate hashes."""
    out: dict[str, dict[str, dict[str, np.ndarray]]] = {}
    with h5py.File(cache, "r") as fh:
        for key, grp in fh.items():
            hashes = [h.decode() for h in grp["hashes"][()]]
            assert len(set(hashes)) == len(hashes), f"duplicate rows in {cache}:{key}"
            layers = [name for name in grp if name != "hashes"]
            arrays = {layer: grp[layer][()] for layer in layers}
            out[key] = {h: {layer: arrays[layer][i] for layer in layers} for i, h in enumerate(hashes)}
    return out


def assert_same_cache(ref: Path, got: Path, n_images: int) -> None:
    a, b = cache_rows(ref), cache_rows(got)
    assert sorted(a) == sorted(b)
    for key in a:
        assert sorted(a[key]) == sorted(b[key]) and len(a[key]) == n_images
        for h in a[key]:
            for layer, row in a[key][h].items():
                np.testing.assert_array_equal(b[key][h][layer], row)
    parts = got.with_name(got.name + ".parts")
    assert not parts.exists() or not list(parts.rglob("*.h5")), "unmerged cache parts left behind"


def curve_rows(run: Path) -> list[dict[str, str]]:
    with open(run / "curves.csv", newline="") as fh:
        rows = list(csv.DictReader(fh))
    for row in rows:  # wall-clock columns differ between runs
        row.pop("images_per_s")
        row.pop("seconds")
    return rows


def assert_same_training(ref: Path, got: Path) -> None:
    for split in ("val", "test"):
        np.testing.assert_array_equal(np.load(got / f"predictions_{split}.npy"),
                                      np.load(ref / f"predictions_{split}.npy"))
    a, b = (json.loads((d / "training.json").read_text()) for d in (ref, got))
    assert b["metrics"] == a["metrics"]
    for stage, st in a["stages"].items():
        for key in ("epochs_run", "best_epoch", "best_val_mean_r", "steps", "early_stopped"):
            assert b["stages"][stage][key] == st[key], (stage, key)
    rows = curve_rows(got)
    assert rows == curve_rows(ref)
    assert len({(r["stage"], r["epoch"]) for r in rows}) == len(rows)  # no epoch recorded twice
    wa, wb = load_file(str(ref / "model.safetensors")), load_file(str(got / "model.safetensors"))
    assert sorted(wa) == sorted(wb)
    for k in wa:
        np.testing.assert_array_equal(wb[k], wa[k])
    assert (got / "checkpoints" / "latest.json").is_file()
    assert not list(got.rglob("*.tmp")) and not list(got.rglob(".*.tmp"))


def checkpointed_steps(run: Path) -> int:
    """Optimizer steps covered by the newest complete checkpoint of a trainer run folder (0 without one)."""
    pointer = run / "checkpoints" / "latest.json"
    if not pointer.is_file():
        return 0
    state = json.loads((run / "checkpoints" / json.loads(pointer.read_text())["dir"] / "state.json").read_text())
    earlier = sum(int(s.get("steps", 0)) for name, s in state["stages"].items() if name != f"stage{state['stage']}")
    return earlier + int(state["step"])


# ----------------------------------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """An uninterrupted ``llmvem sweep --lambda 0,0.1`` (plain command) with its own cache.

    Its ``llmvem_lambda0.1`` model is also the reference of ``llmvem train`` with the same config: the sweep gives
    each λ a private copy of the backbone, so the model equals the one the train command makes.
    """
    folder = tmp_path_factory.mktemp("reference")
    cfg = write_config(folder, folder / "cache")
    run_to_end(["sweep", "--config", str(cfg), "--lambda", "0,0.1", "--out", str(folder / "sweep"), "--resume",
                "--no-progress"], folder, plain=True)
    return folder


@pytest.mark.slow
def test_train_killed_while_captioning_then_ctrl_c_mid_epoch_resumes_to_the_uninterrupted_result(tmp_path,
                                                                                                    reference):
    rng = random.Random(8)
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path, cache)
    run = tmp_path / "run"
    args = ["train", "--config", str(cfg), "--out", str(run), "--resume", "--no-progress"]
    out = run / "models" / "llmvem_lambda0.1"  # train writes a complete run folder; the trainer's is under models/

    # 1. SIGKILL in the middle of captioning (inside the pipeline's input preparation)
    commit = rng.randrange(2, CAPTION_COMMITS)
    cli = Cli(args, tmp_path, pause=f"captions:{commit}")
    cli.wait_for("PAUSED")
    rc, _, err = cli.interrupt(signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    assert len(caption_rows(cache / "captions.sqlite")) == 8 * commit  # every committed batch kept
    assert not (out / "training.json").exists()

    # 2. Ctrl-C in the middle of an epoch (the rerun first finishes the captions and the features): exit code
    #    130 and one line saying how to resume, no traceback
    step = rng.randrange(STEPS_PER_EPOCH + 1, STEPS_PER_MODEL - 1)  # after the first checkpoint
    cli = Cli(args, tmp_path, pause=f"step:{step}")
    cli.wait_for("PAUSED")
    rc, _, err = cli.interrupt(signal.SIGINT)
    assert rc == 130, err
    assert err.strip().splitlines()[-2:] == [RESUME_HINT, f"optimizer steps: {step}"]
    assert "Traceback" not in err
    assert not (out / "training.json").exists()
    saved = checkpointed_steps(out)
    assert STEPS_PER_EPOCH <= saved <= step and saved % STEPS_PER_EPOCH == 0  # whole epochs only

    # 3. the same command again: finishes, taking exactly the steps no checkpoint had covered
    rc, stdout, err = Cli(args, tmp_path).finish()
    assert rc == 0, err[-3000:]
    assert steps_taken(err) == STEPS_PER_MODEL - saved
    assert f"run folder: {run}" in stdout and (run / "metrics.json").is_file()

    assert_same_training(reference / "sweep" / "base" / "models" / "llmvem_lambda0.1", out)
    rows = caption_rows(cache / "captions.sqlite")
    assert rows == caption_rows(reference / "cache" / "captions.sqlite")
    assert len(rows) == 80  # one caption per image, none twice
    assert_same_cache(reference / "cache" / "features.h5", cache / "features.h5", n_images=80)


@pytest.mark.slow
def test_sweep_killed_mid_epoch_then_ctrl_c_then_rerun_equals_the_uninterrupted_sweep(tmp_path, reference):
    rng = random.Random(13)
    ref = reference / "sweep"
    cache = tmp_path / "cache"
    cfg = write_config(tmp_path, cache)
    out = tmp_path / "sweep"
    args = ["sweep", "--config", str(cfg), "--lambda", "0,0.1", "--out", str(out), "--resume", "--no-progress"]
    models = out / "base" / "models"

    # 1. SIGKILL mid-epoch while the second model (λ = 0.1) trains; the first one is finished
    step = STEPS_PER_MODEL + rng.randrange(2, STEPS_PER_MODEL - 1)
    cli = Cli(args, tmp_path, pause=f"step:{step}")
    cli.wait_for("PAUSED")
    rc, _, err = cli.interrupt(signal.SIGKILL)
    assert rc == -signal.SIGKILL, err
    assert (models / "llmvem_lambda0" / "training.json").is_file()
    assert not (out / "base" / "metrics.json").exists()
    assert checkpointed_steps(models / "llmvem_lambda0.1") <= step - STEPS_PER_MODEL

    # 2. Ctrl-C on the plain command, a seeded delay after the second model starts resuming
    cli = Cli(args, tmp_path, plain=True)
    cli.wait_for("fitting LLM-VEM λ=0.1")
    time.sleep(rng.uniform(0.0, 0.3))
    rc, _, err = cli.interrupt(signal.SIGINT)
    assert rc == 130, err[-3000:]
    assert err.strip().splitlines()[-1] == RESUME_HINT
    assert "Traceback" not in err
    saved = checkpointed_steps(models / "llmvem_lambda0.1")

    # 3. the same command again: the finished λ = 0 model is reused, λ = 0.1 continues from its checkpoint
    rc, stdout, err = Cli(args, tmp_path).finish()
    assert rc == 0, err[-3000:]
    assert steps_taken(err) == STEPS_PER_MODEL - saved
    assert "== base ==" in stdout and (out / "report" / "index.html").is_file()

    a, b = (json.loads((d / "base" / "metrics.json").read_text()) for d in (ref, out))
    for key in ("dataset", "models", "comparisons"):
        assert b[key] == a[key], key
    assert {k: v for k, v in b["captions"].items() if k != "store"} == \
        {k: v for k, v in a["captions"].items() if k != "store"}
    assert (out / "base" / "lambda_curve.json").read_text() == (ref / "base" / "lambda_curve.json").read_text()
    with np.load(ref / "base" / "voxel_metrics.npz") as va, np.load(out / "base" / "voxel_metrics.npz") as vb:
        assert sorted(va.files) == sorted(vb.files)
        for k in va.files:
            np.testing.assert_array_equal(vb[k], va[k])
    for name in ("ridge", "llmvem_lambda0", "llmvem_lambda0.1"):
        np.testing.assert_array_equal(np.load(models / name / "predictions_test.npy"),
                                      np.load(ref / "base" / "models" / name / "predictions_test.npy"))
    for name in ("llmvem_lambda0", "llmvem_lambda0.1"):
        assert_same_training(ref / "base" / "models" / name, models / name)
    assert caption_rows(cache / "captions.sqlite") == caption_rows(reference / "cache" / "captions.sqlite")
    assert_same_cache(reference / "cache" / "features.h5", cache / "features.h5", n_images=80)


def test_caption_ctrl_c_prints_the_resume_hint_and_the_rerun_completes_the_store(tmp_path):
    spec = "virtual:n_train=30,n_test=10,image_size=48"
    ref_store, store = tmp_path / "ref.sqlite", tmp_path / "cut.sqlite"
    base = ["caption", spec, "--backend", "dataset", "--batch-size", "4"]
    run_to_end([*base, "--store", str(ref_store)], tmp_path)
    commit = random.Random(3).randrange(2, 9)
    cli = Cli([*base, "--store", str(store)], tmp_path, pause=f"captions:{commit}")
    cli.wait_for("PAUSED")
    rc, out, err = cli.interrupt(signal.SIGINT)
    assert rc == 130, err
    assert RESUME_HINT in err.splitlines() and "Traceback" not in err
    assert "done:" not in out
    assert len(caption_rows(store)) == 4 * commit
    out, _ = run_to_end([*base, "--store", str(store)], tmp_path)
    assert f"done: {40 - 4 * commit}, skipped (already stored): {4 * commit}, failed: 0 of 40 images" in out
    rows = caption_rows(store)
    assert rows == caption_rows(ref_store) and len(rows) == 40
