"""``llmvem caption``: exit codes, summary, resume after SIGKILL, the API key kept out of every output."""

from __future__ import annotations

import logging
import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest
from child_signals import default_sigint
from fake_openai_server import FakeOpenAIServer, colour_caption
from PIL import Image

from llmvem.captions import CaptionStore
from llmvem.cli import app, main

REPO_ROOT = Path(__file__).resolve().parents[1]
SENTINEL = "sk-SENTINEL-cli-31415926"


def colour_folder(folder: Path, n: int) -> list[tuple[int, int, int]]:
    folder.mkdir(parents=True, exist_ok=True)
    colours = [(10 * (i % 25), 10 * ((3 * i) % 25), 10 * (i // 25 + 1)) for i in range(n)]
    for i, c in enumerate(colours):
        Image.new("RGB", (10, 10), c).save(folder / f"stim{i:03d}.png")
    return colours


def run_cli(args: list[str]) -> int:
    """The exit status the command itself sets (``typer.Exit(code)``), without main()'s error handling."""
    return int(app(args=args, prog_name="llmvem", standalone_mode=False) or 0)


def store_rows(path: Path) -> list[tuple[str, int, str]]:
    con = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        return con.execute("SELECT image_id, caption_index, caption FROM captions ORDER BY image_id").fetchall()
    finally:
        con.close()


def test_openai_backend_summary_and_exit_codes(tmp_path, capsys, monkeypatch, caplog):
    monkeypatch.setenv("OPENAI_API_KEY", SENTINEL)
    caplog.set_level(logging.DEBUG)
    colours = colour_folder(tmp_path / "imgs", 8)
    bad = colours[5]
    store = tmp_path / "c.sqlite"
    with FakeOpenAIServer(fault_plan=lambda n, c: "503" if c == bad or n == 1 else None) as srv:
        args = ["caption", "--images", str(tmp_path / "imgs"), "--store", str(store), "--backend", "openai",
                "--model", "fake-vlm", "--base-url", srv.base_url, "--max-in-flight", "3", "--max-retries", "1",
                "--export", str(tmp_path / "out.csv")]
        assert run_cli(args) == 1  # one image fails for good
        out, err = capsys.readouterr()
        assert "done: 7, skipped (already stored): 0, failed: 1 of 8 images" in out
        assert "failed: stim005: failed after 2 attempts; last error: HTTP 503" in err
        assert "run the same command again" in err
        # the fault is gone: the rerun captions only the failed image
        srv.fault_plan = None
        assert main(args) == 0
        out, err = capsys.readouterr()
        assert "done: 1, skipped (already stored): 7, failed: 0 of 8 images" in out
        assert all(h == f"Bearer {SENTINEL}" for h in srv.auth_headers)
    rows = store_rows(store)
    assert [r[0] for r in rows] == [f"stim{i:03d}" for i in range(8)]
    assert [r[2] for r in rows] == [colour_caption(c) for c in colours]
    # the key reached the server and nothing else: store (+ WAL), export, stdout/stderr, logs
    for f in tmp_path.iterdir():
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes(), f
    assert SENTINEL not in out + err + caplog.text
    with CaptionStore(store, readonly=True) as s:
        assert s.config().runtime["api_key_env"] == "OPENAI_API_KEY"


def test_main_returns_1_when_images_fail(tmp_path, capsys):
    colour_folder(tmp_path / "imgs", 2)
    with FakeOpenAIServer(fault_plan=lambda n, c: "500") as srv:
        rc = main(["caption", "--images", str(tmp_path / "imgs"), "--store", str(tmp_path / "s.sqlite"),
                   "--backend", "openai", "--model", "fake-vlm", "--base-url", srv.base_url, "--max-retries", "0"])
    assert "failed: 2 of 2 images" in capsys.readouterr().out
    assert rc == 1


def test_bad_input_exits_2(tmp_path, capsys):
    colour_folder(tmp_path / "imgs", 2)
    base = ["caption", "--images", str(tmp_path / "imgs"), "--store", str(tmp_path / "s.sqlite")]
    assert main(base + ["--backend", "file"]) == 2
    assert "backend 'file' needs --captions-file" in capsys.readouterr().err
    assert main(base + ["--backend", "nope"]) == 2
    assert "unknown captioning backend 'nope'" in capsys.readouterr().err
    assert main(["caption", "virtual", "--images", str(tmp_path / "imgs"), "--store", "x.sqlite"]) == 2
    assert "either a dataset spec or --images" in capsys.readouterr().err
    bad_csv = tmp_path / "caps.csv"
    bad_csv.write_text("image,caption\nstim000.png,ok\nstim001.png, \n")
    assert main(base + ["--backend", "file", "--captions-file", str(bad_csv)]) == 2
    assert "caps.csv: row 3: empty or whitespace caption for image 'stim001.png'" in capsys.readouterr().err


def test_file_and_labels_backends(tmp_path, capsys):
    colour_folder(tmp_path / "imgs", 3)
    caps = tmp_path / "caps.csv"
    caps.write_text("image,caption\nstim000.png,red\nstim001.png,green\nstim002.png,blue\nstim002.png,navy\n")
    store = tmp_path / "s.sqlite"
    base = ["caption", "--images", str(tmp_path / "imgs"), "--store", str(store)]
    assert main(base + ["--backend", "file", "--captions-file", str(caps)]) == 0
    assert main(base + ["--backend", "labels", "--device", "cpu"]) == 0
    with CaptionStore(store, readonly=True) as s:
        configs = {c.backend: c for c in s.configs()}
        assert set(configs) == {"file", "labels"}
        hashes = [f"{h}" for h in (r[0] for r in s._conn.execute(
            "SELECT DISTINCT image_hash FROM captions ORDER BY image_id"))]
        assert s.get(hashes, configs["file"].config_hash) == [["red"], ["green"], ["blue", "navy"]]
        labels = s.get(hashes, configs["labels"].config_hash)
        assert all(c[0].startswith("A photo that looks like ") for c in labels)


def test_virtual_dataset_backend(tmp_path, capsys):
    store = tmp_path / "v.sqlite"
    assert main(["caption", "virtual:n_train=10,n_test=4", "--store", str(store), "--backend", "dataset"]) == 0
    assert "done: 14, skipped (already stored): 0, failed: 0 of 14 images" in capsys.readouterr().out
    assert len(store_rows(store)) == 14


@pytest.mark.parametrize(("sig", "expected_rc"), [(signal.SIGKILL, -signal.SIGKILL), (signal.SIGINT, 130)],
                         ids=["SIGKILL", "Ctrl-C"])
def test_killed_midway_then_rerun_gives_exactly_one_caption_each(tmp_path, sig, expected_rc):
    n = 40
    colours = colour_folder(tmp_path / "imgs", n)
    store = tmp_path / "kill.sqlite"
    env = {**os.environ, "LLMVEM_NO_PROGRESS": "1", "OPENAI_API_KEY": SENTINEL}
    # app() itself returns the command's exit status (130 after Ctrl-C); see test_main_returns_1_when_images_fail
    code = ("import sys; from llmvem.cli import app; "
            "sys.exit(app(args=sys.argv[1:], prog_name='llmvem', standalone_mode=False) or 0)")
    with FakeOpenAIServer(delay_s=0.1, max_lifetime_s=120) as srv:
        args = [sys.executable, "-c", code, "caption", "--images", str(tmp_path / "imgs"), "--store", str(store),
                "--backend", "openai", "--model", "fake-vlm", "--base-url", srv.base_url, "--max-in-flight", "2",
                "--batch-size", "2"]
        proc = subprocess.Popen(args, cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=default_sigint)  # Ctrl-C works even when pytest ignores SIGINT
        try:
            deadline = time.monotonic() + 60
            rows_at_kill = 0
            while time.monotonic() < deadline and proc.poll() is None:
                if store.exists():
                    try:
                        rows_at_kill = len(store_rows(store))  # a concurrent reader (WAL)
                    except sqlite3.OperationalError:
                        rows_at_kill = 0  # schema not created yet
                if rows_at_kill >= 10:
                    proc.send_signal(sig)
                    break
                time.sleep(0.02)
            proc.wait(timeout=30)
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        assert proc.returncode == expected_rc, proc.stderr.read().decode()[-2000:]
        kept = store_rows(store)
        assert 10 <= len(kept) < n  # killed halfway, nothing lost that was committed
        assert len({r[0] for r in kept}) == len(kept)

        rerun = subprocess.run(args, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=120)
        assert rerun.returncode == 0, rerun.stderr[-2000:]
        done = int(rerun.stdout.split("done: ")[1].split(",")[0])
        skipped = int(rerun.stdout.split("skipped (already stored): ")[1].split(",")[0])
        assert skipped >= len(kept) and done + skipped == n
        assert SENTINEL not in rerun.stdout + rerun.stderr
    rows = store_rows(store)
    assert len(rows) == n  # exactly one caption per image, no duplicates
    assert [r[0] for r in rows] == [f"stim{i:03d}" for i in range(n)]
    assert all(r[1] == 0 for r in rows)
    assert [r[2] for r in rows] == [colour_caption(c) for c in colours]
    for f in tmp_path.iterdir():
        if f.is_file():
            assert SENTINEL.encode() not in f.read_bytes()
