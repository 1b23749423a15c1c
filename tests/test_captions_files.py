"""Caption files (CSV, COCO, JSON, JSONL, Flickr8k) and the dataset-captions captioner."""

from __future__ import annotations

import json

import pytest
from conftest import needs_shared

from llmvem.captions import (
    CaptionFileCaptioner,
    CaptionStore,
    DatasetCaptioner,
    read_caption_file,
    run_captioning,
)
from llmvem.data.images import FileImages, list_image_files
from llmvem.errors import CaptionError, DataValidationError


def test_csv_several_captions_per_image_and_whitespace_stripped(tmp_path):
    p = tmp_path / "caps.csv"
    p.write_text('image,caption\nimg1.jpg,"A dog, running."\nimg1.jpg,  a brown dog \nimg2.png,Ein Café\n',
                 encoding="utf-8")
    assert read_caption_file(p) == {"img1.jpg": ["A dog, running.", "a brown dog"], "img2.png": ["Ein Café"]}


def test_tsv_with_custom_columns(tmp_path):
    p = tmp_path / "caps.tsv"
    p.write_text("stim\tdesc\nA\tfirst\nB\tsecond\n", encoding="utf-8")
    with pytest.raises(DataValidationError, match=r"caps.tsv: columns: no image column; expected one named one of"):
        read_caption_file(p)
    assert read_caption_file(p, image_column="stim", caption_column="desc") == {"A": ["first"], "B": ["second"]}


def test_coco_json_keyed_by_id_and_file_name(tmp_path):
    p = tmp_path / "captions_val.json"
    p.write_text(json.dumps({
        "images": [{"id": 42, "file_name": "000000000042.jpg"}, {"id": 7, "file_name": "000000000007.jpg"}],
        "annotations": [{"id": 1, "image_id": 42, "caption": "A cat."}, {"id": 2, "image_id": 42, "caption": "Cat!"},
                        {"id": 3, "image_id": 7, "caption": "A train."}]}))
    table = read_caption_file(p)
    assert table["42"] == ["A cat.", "Cat!"] and table["000000000042.jpg"] == ["A cat.", "Cat!"]
    assert table["7"] == ["A train."]
    cap = CaptionFileCaptioner(p)
    # image ids are file stems: "000000000042" finds the COCO file name
    assert cap.caption([None, None], ["000000000042", "7"]) == [["A cat.", "Cat!"], ["A train."]]


def test_json_mapping_records_and_jsonl(tmp_path):
    m = tmp_path / "m.json"
    m.write_text(json.dumps({"a": "one", "b": ["two", "three"]}))
    assert read_caption_file(m) == {"a": ["one"], "b": ["two", "three"]}
    r = tmp_path / "r.json"
    r.write_text(json.dumps([{"image_id": "a", "caption": "x"}, {"image_id": "a", "captions": ["y", "z"]}]))
    assert read_caption_file(r) == {"a": ["x", "y", "z"]}
    j = tmp_path / "r.jsonl"
    j.write_text('{"file_name": "q.jpg", "text": "hello"}\n\n{"file_name": "q.jpg", "text": "again"}\n')
    assert read_caption_file(j) == {"q.jpg": ["hello", "again"]}


@pytest.mark.parametrize(("name", "content", "pattern"), [
    ("latin1.csv", "image,caption\na,caf\xe9\n".encode("latin-1"),
     r"latin1.csv: encoding: not valid UTF-8 \(byte 0xe9 at offset 19, line 2\)"),
    ("nocap.csv", b"image,label\na,x\n", r"nocap.csv: columns: no caption column; expected one named one of"),
    ("blank.csv", b"image,caption\na,fine\nb,   \n", r"blank.csv: row 3: empty or whitespace caption for image 'b'"),
    ("noid.csv", b"image,caption\n,text\n", r"noid.csv: row 2: empty 'image'"),
    ("empty.csv", b"", r"empty.csv: header: file is empty"),
    ("coco.json", json.dumps({"annotations": [{"image_id": 1, "caption": ""}]}).encode(),
     r"coco.json: annotations\[0\].caption: empty or whitespace caption for image '1'"),
    ("num.json", json.dumps({"a": 3}).encode(), r"num.json: a: caption of 'a' is int; expected a string"),
    ("bad.json", b"{\"a\": ", r"bad.json: line 1: not valid JSON"),
    ("caps.xlsx", b"x", r"caps.xlsx: caption file: suffix '.xlsx'"),
])
def test_caption_file_errors_name_file_and_row(tmp_path, name, content, pattern):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataValidationError, match=pattern):
        read_caption_file(p)


def test_file_captioner_config_follows_file_content(tmp_path):
    p = tmp_path / "c.csv"
    p.write_text("image,caption\na.png,old\n")
    h1 = CaptionFileCaptioner(p).config_hash
    p.write_text("image,caption\na.png,new\n")
    c2 = CaptionFileCaptioner(p)
    assert c2.config_hash != h1
    assert c2.runtime()["path"] == str(p.resolve())
    assert CaptionFileCaptioner(p, max_captions=1).config_hash != c2.config_hash
    with pytest.raises(CaptionError, match=r"1 image\(s\): zz: no caption for image id 'zz' in .*c.csv"):
        c2.caption([None, None], ["a", "zz"])


@pytest.mark.shared_data
def test_flickr8k_captions_file_into_store(tmp_path):
    root = needs_shared("flickr8k_1000")
    files = list_image_files(root / "images")[:30]
    images = FileImages(files)
    cap = CaptionFileCaptioner(root / "captions.csv")
    assert cap.needs_pixels is False
    with CaptionStore(tmp_path / "f.sqlite") as store:
        s = run_captioning(images, cap, store, show_progress=False)
        assert (s.done, s.failed) == (30, 0)
        caps = store.get_for(images)
    assert all(len(c) == 5 for c in caps)  # Flickr8k has 5 human captions per image
    first = files[0].name
    rows = [ln.split(",", 1)[1] for ln in (root / "captions.csv").read_text(encoding="utf-8").splitlines()[1:]
            if ln.startswith(first + ",")]
    assert caps[0] == [r.strip().strip('"') for r in rows]


def test_dataset_captioner_on_virtual_brain(tmp_path):
    from llmvem.data import load_dataset

    ds = load_dataset("virtual:n_train=12,n_test=4")
    cap = DatasetCaptioner(ds)
    images = ds.all_images()
    with CaptionStore(tmp_path / "v.sqlite") as store:
        s = run_captioning(images, cap, store, show_progress=False)
        assert (s.n_images, s.done, s.failed) == (16, 16, 0)
        caps = store.get_for(images)
    assert caps == [ds.captions[i] for i in images.ids]
    assert cap.model_id == f"dataset:{ds.name}"
    ds.captions.clear()
    with pytest.raises(DataValidationError, match="carries no captions"):
        DatasetCaptioner(ds)
