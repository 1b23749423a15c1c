"""A caption store on a network file system: SQLite's WAL is safe for processes on one host only, so the store
says so in one line when it is opened for writing on NFS, SMB and the like (llmvem.captions.filesystem)."""

from __future__ import annotations

import logging

import llmvem.captions.store as store_module
from llmvem.captions.filesystem import filesystem_type, network_filesystem
from llmvem.cli import main


def _mountinfo(*mounts: tuple[str, str]) -> str:
    """``/proc/self/mountinfo`` lines for (mount point, type) pairs."""
    return "".join(f"{20 + k} 1 0:{k} / {point.replace(' ', chr(92) + '040')} rw,relatime shared:1 - {kind} "
                   f"src{k} rw\n" for k, (point, kind) in enumerate(mounts))


def test_the_deepest_mount_under_a_path_names_its_file_system(tmp_path):
    shared = tmp_path / "lab share"  # a space: escaped as \040 in mountinfo
    (shared / "local" / "deep").mkdir(parents=True)
    info = _mountinfo(("/", "ext4"), (str(shared), "nfs4"), (str(shared / "local"), "ext4"))
    assert filesystem_type(shared / "captions.sqlite", info) == "nfs4"  # a store not created yet: its folder
    assert network_filesystem(shared / "new" / "dir" / "s.sqlite", info) == "nfs4"
    assert network_filesystem(shared / "local" / "deep" / "s.sqlite", info) is None
    assert network_filesystem(tmp_path / "s.sqlite", info) is None
    assert network_filesystem(shared / "s.sqlite", _mountinfo(("/", "ext4"), (str(shared), "fuse.sshfs"))) == \
        "fuse.sshfs"
    assert network_filesystem(shared / "s.sqlite", _mountinfo(("/", "ext4"), (str(shared), "cifs"))) == "cifs"
    assert network_filesystem(tmp_path, "") is None  # nothing known: no warning


def test_caption_into_a_store_on_nfs_warns_in_one_line_and_still_works(tmp_path, capsys, caplog, monkeypatch):
    monkeypatch.setattr(store_module, "network_filesystem", lambda path: "nfs4")
    store = tmp_path / "s.sqlite"
    with caplog.at_level(logging.WARNING, logger="llmvem.captions.store"):
        rc = main(["caption", "virtual:n_train=4,n_test=2", "--store", str(store), "--backend", "dataset"])
    assert rc == 0
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "\n" not in warnings[0]
    assert warnings[0].startswith(f"{store}: the caption store is on a network file system (nfs4)")
    assert "one machine only" in warnings[0] and "--base-url" in warnings[0]
    caplog.clear()
    monkeypatch.setattr(store_module, "network_filesystem", lambda path: None)
    with caplog.at_level(logging.WARNING, logger="llmvem.captions.store"):
        assert main(["caption", "virtual:n_train=4,n_test=2", "--store", str(store), "--backend", "dataset"]) == 0
    assert not [r for r in caplog.records if r.levelno == logging.WARNING]
    assert "skipped (already stored): 6" in capsys.readouterr().out
