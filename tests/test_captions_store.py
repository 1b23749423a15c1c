"""The SQLite caption store and run_captioning: keys, no duplicates, resume, export, concurrent readers."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence

import numpy as np
import pytest

from llmvem.captions import CaptionResult, CaptionStore, read_caption_file, run_captioning
from llmvem.captions.base import Captioner
from llmvem.data.images import ArrayImages
from llmvem.errors import CaptionError, DataValidationError


class MeanColourCaptioner(Captioner):
    """Test double: describes an image by its mean red value; fails on chosen ids; counts calls."""

    backend = "test"

    def __init__(self, fail_ids: Sequence[str] = (), n_captions: int = 1, tag: str = "v1"):
        self.model_id = "mean-colour"
        self.prompt = "say the mean red"
        self.fail_ids = set(fail_ids)
        self.n_captions = n_captions
        self.tag = tag
        self.calls: list[list[str]] = []

    def settings(self):
        return {"n_captions": self.n_captions, "tag": self.tag}

    def runtime(self):
        return {"note": "not hashed"}

    def caption_batch(self, images, ids):
        self.calls.append(list(ids))
        out = []
        for k, (img, image_id) in enumerate(zip(images, ids, strict=True)):
            if image_id in self.fail_ids:
                out.append(CaptionResult(k, image_id, [], error="injected failure"))
                continue
            red = int(np.asarray(img)[..., 0].mean())
            out.append(CaptionResult(k, image_id, [f"red {red} take {j}" for j in range(self.n_captions)]))
        return out


def solid_images(n: int, start: int = 0) -> ArrayImages:
    arr = np.zeros((n, 8, 8, 3), dtype=np.uint8)
    for i in range(n):
        arr[i, ..., 0] = (start + i) * 7 % 256
        arr[i, ..., 1] = (start + i) // 36
    return ArrayImages(arr, ids=[f"im{start + i:03d}" for i in range(n)])


def test_store_roundtrip_order_and_wal(tmp_path):
    cap = MeanColourCaptioner(n_captions=3)
    with CaptionStore(tmp_path / "c.sqlite") as store:
        h = store.register(cap)
        assert h == cap.config_hash and len(h) == 16
        assert store.add(h, [("hashA", "a", ["one", "two", "three"]), ("hashB", "b", ["only"])]) == 2
        assert store.get(["hashB", "hashA", "hashB"], h) == [["only"], ["one", "two", "three"], ["only"]]
        # None resolves to the single configuration
        assert store.get(["hashA"]) == [["one", "two", "three"]]
        assert store.count() == 4 and store.count(h) == 4
        assert store.done_hashes(h) == {"hashA", "hashB"}
        mode = store._conn.execute("PRAGMA journal_mode").fetchone()[0]
        assert mode == "wal"
        # rows carry model id, prompt, settings and a timestamp
        row = sqlite3.connect(tmp_path / "c.sqlite").execute(
            "SELECT image_id, model_id, prompt, settings_json, created_at FROM captions WHERE caption = 'only'"
        ).fetchone()
        assert row[:3] == ("b", "mean-colour", "say the mean red")
        assert json.loads(row[3]) == {"n_captions": 3, "tag": "v1"}
        assert row[4].startswith("20") and row[4].endswith("+00:00")
        rec = store.config()
        assert (rec.backend, rec.n_images, rec.runtime) == ("test", 2, {"note": "not hashed"})


def test_store_rewrite_replaces_never_duplicates(tmp_path):
    cap = MeanColourCaptioner()
    with CaptionStore(tmp_path / "c.sqlite") as store:
        h = store.register(cap)
        store.add(h, [("x", "a", ["first", "second"])])
        store.add(h, [("x", "a", ["again"])])
        assert store.get(["x"], h) == [["again"]]
        assert store.count(h) == 1
        with pytest.raises(ValueError, match="caption 0 is empty"):
            store.add(h, [("y", "b", ["   "])])
        assert store.count(h) == 1  # the failed transaction left nothing behind


def test_store_missing_and_unknown_config_errors(tmp_path):
    cap, other = MeanColourCaptioner(), MeanColourCaptioner(tag="v2")
    assert cap.config_hash != other.config_hash
    with CaptionStore(tmp_path / "c.sqlite") as store:
        h = store.register(cap)
        store.add(h, [("x", "a", ["cap"])])
        with pytest.raises(DataValidationError, match=r"1 of 2 images have no captions .*position 1, hash zz"):
            store.get(["x", "zz"], h)
        assert store.get(["x", "zz"], h, missing="empty") == [["cap"], []]
        with pytest.raises(DataValidationError, match="is not in the store"):
            store.get(["x"], other.config_hash)
        store.register(other)
        with pytest.raises(DataValidationError, match="2 captioner configurations"):
            store.get(["x"])
        assert store.coverage(["x", "zz", "x"]) == {h: 1, other.config_hash: 0}


def test_not_a_store_is_rejected(tmp_path):
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"this is not sqlite at all" * 100)
    with pytest.raises(DataValidationError, match="junk.sqlite: caption store: not a readable SQLite"):
        CaptionStore(junk)
    other = tmp_path / "other.sqlite"
    con = sqlite3.connect(other)
    con.execute("CREATE TABLE t (a)")
    con.commit()
    con.close()
    with pytest.raises(DataValidationError, match=r"tables \['t'\] is not an llmvem caption store"):
        CaptionStore(other)
    with pytest.raises(DataValidationError, match="does not exist"):
        CaptionStore(tmp_path / "absent.sqlite", readonly=True)


def test_export_csv_and_json_read_back(tmp_path):
    cap = MeanColourCaptioner(n_captions=2)
    images = solid_images(4)
    with CaptionStore(tmp_path / "c.sqlite") as store:
        summary = run_captioning(images, cap, store, batch_size=3, show_progress=False)
        assert summary.done == 4
        store.export(tmp_path / "out.csv")
        store.export(tmp_path / "out.json", cap.config_hash)
        with pytest.raises(DataValidationError, match="expected .csv or .json"):
            store.export(tmp_path / "out.xlsx")
    back_csv = read_caption_file(tmp_path / "out.csv")
    back_json = read_caption_file(tmp_path / "out.json")
    expected = {f"im{i:03d}": [f"red {i * 7} take 0", f"red {i * 7} take 1"] for i in range(4)}
    assert back_csv == expected
    assert back_json == expected
    doc = json.loads((tmp_path / "out.json").read_text())
    assert doc["captioners"][0]["config_hash"] == cap.config_hash
    assert doc["captioners"][0]["n_images"] == 4


def test_readonly_reader_while_writer_holds_transaction(tmp_path):
    cap = MeanColourCaptioner()
    path = tmp_path / "c.sqlite"
    writer = CaptionStore(path)
    h = writer.register(cap)
    writer.add(h, [("a", "a", ["committed"])])
    writer._conn.execute("BEGIN IMMEDIATE")
    writer._conn.execute("INSERT INTO captions VALUES ('b', ?, 0, 'uncommitted', 'b', 'm', NULL, '{}', 't')", (h,))
    with CaptionStore(path, readonly=True) as reader:  # WAL: readers are not blocked by the open write
        assert reader.get(["a", "b"], h, missing="empty") == [["committed"], []]
        with pytest.raises(DataValidationError, match="read-only"):
            reader.add(h, [("c", "c", ["x"])])
    writer._conn.execute("ROLLBACK")
    writer.close()


def test_run_captioning_resumes_and_reports_failures(tmp_path):
    images = solid_images(10)
    path = tmp_path / "c.sqlite"
    flaky = MeanColourCaptioner(fail_ids=["im003", "im007"])
    with CaptionStore(path) as store:
        s1 = run_captioning(images, flaky, store, batch_size=4, show_progress=False)
        assert (s1.done, s1.skipped, s1.failed) == (8, 0, 2)
        assert s1.failed_ids == ["im003", "im007"]
        assert s1.errors["im003"] == "injected failure"
        assert [len(c) for c in flaky.calls] == [4, 4, 2]
        # fixed captioner, same identity: only the two failed images are captioned again
        fixed = MeanColourCaptioner()
        s2 = run_captioning(images, fixed, store, batch_size=4, show_progress=False)
        assert (s2.done, s2.skipped, s2.failed) == (2, 8, 0)
        assert fixed.calls == [["im003", "im007"]]
        caps = store.get_for(images, fixed.config_hash)
        assert caps == [[f"red {i * 7} take 0"] for i in range(10)]
        assert store.count() == 10
        # raise_on_failure names the images and keeps finished work
        other = MeanColourCaptioner(fail_ids=["im001"], tag="v3")
        with pytest.raises(CaptionError, match=r"1 image\(s\): im001: injected failure.*9 finished captions"):
            run_captioning(images, other, store, batch_size=5, show_progress=False, raise_on_failure=True)
        assert len(store.done_hashes(other.config_hash)) == 9


def test_identical_images_are_captioned_once(tmp_path):
    arr = np.zeros((3, 4, 4, 3), dtype=np.uint8)
    arr[1] = 50  # images 0 and 2 are identical
    images = ArrayImages(arr, ids=["a", "b", "c"])
    cap = MeanColourCaptioner()
    with CaptionStore(tmp_path / "c.sqlite") as store:
        s = run_captioning(images, cap, store, show_progress=False)
        assert (s.done, s.skipped) == (2, 1)
        assert store.get_for(images) == [["red 0 take 0"], ["red 50 take 0"], ["red 0 take 0"]]
        with pytest.raises(DataValidationError, match=r"first ids: \['z'\]"):
            store.get_for(ArrayImages(np.full((1, 4, 4, 3), 9, np.uint8), ids=["z"]))


def test_config_hash_ignores_runtime_and_key_order():
    a, b = MeanColourCaptioner(), MeanColourCaptioner()
    b.runtime = lambda: {"note": "different"}  # type: ignore[method-assign]
    assert a.config_hash == b.config_hash
    assert MeanColourCaptioner(n_captions=2).config_hash != a.config_hash
