"""Dataset adapters: Algonauts 2023 layout, generic folder, V4 spike sessions, the 92-object RDM set."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import h5py
import numpy as np
import pytest
from conftest import needs_shared
from PIL import Image

from llmvem.data.algonauts import FSAVERAGE_N_VERTICES, load_algonauts
from llmvem.data.folder import holdout_indices, load_folder
from llmvem.data.images import FileImages
from llmvem.data.noise_ceiling import algonauts_noise_ceiling, split_half_noise_ceiling
from llmvem.data.rdm_sets import load_kriegeskorte92
from llmvem.data.safe_load import load_label_mapping
from llmvem.data.v4 import list_v4_sessions, load_v4
from llmvem.errors import DataValidationError, UnsafeFileError


def write_png(path: Path, seed: int, size: int = 8) -> None:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)


# ============================================================================================ Algonauts
N_TRAIN, N_CHALLENGE_TEST = 20, 4
N_VERT = {"lh": 30, "rh": 25}
PRF = {0: "Unknown", 1: "V1v", 2: "V1d", 3: "hV4"}  # hV4 gets no vertex -> left out
FACES = {0: "Unknown", 1: "OFA", 2: "FFA-1"}


def make_subject(root: Path, noise_ceiling: bool = True) -> dict:
    """A tiny Algonauts 2023 subject folder; returns the arrays written, for comparison."""
    rng = np.random.default_rng(0)
    subj = root / "subj01"
    train_dir = subj / "training_split" / "training_images"
    test_dir = subj / "test_split" / "test_images"
    fmri_dir = subj / "training_split" / "training_fmri"
    roi_dir = subj / "roi_masks"
    for d in (train_dir, test_dir, fmri_dir, roi_dir):
        d.mkdir(parents=True)
    names = [f"train-{i + 1:04d}_nsd-{100 + 7 * i:05d}" for i in range(N_TRAIN)]
    for i, n in enumerate(names):
        write_png(train_dir / f"{n}.png", i)
    for i in range(N_CHALLENGE_TEST):
        write_png(test_dir / f"test-{i + 1:04d}_nsd-{900 + i:05d}.png", 100 + i)
    out: dict = {"subj": subj, "names": names, "fmri": {}, "prf": {}, "faces": {}, "fs": {}, "nc": {}}
    for h, n in N_VERT.items():
        fmri = rng.normal(size=(N_TRAIN, n)).astype(np.float32)
        np.save(fmri_dir / f"{h}_training_fmri.npy", fmri)
        prf = rng.integers(0, 3, n)  # labels 0, 1, 2 only
        faces = np.where(rng.random(n) < 0.3, 2, 0)
        faces[0] = 1
        np.save(roi_dir / f"{h}.prf-visualrois_challenge_space.npy", prf.astype(np.float32))  # as released: float
        np.save(roi_dir / f"{h}.floc-faces_challenge_space.npy", faces.astype(np.int32))
        fs_mask = np.zeros(FSAVERAGE_N_VERTICES, dtype=bool)
        fs_mask[np.sort(rng.choice(FSAVERAGE_N_VERTICES, n, replace=False))] = True
        np.save(roi_dir / f"{h}.all-vertices_fsaverage_space.npy", fs_mask.astype(np.float32))
        nc = rng.uniform(0, 80, n)
        if noise_ceiling:
            np.save(subj / f"{h}_noise_ceiling.npy", nc)
        out["fmri"][h], out["prf"][h], out["faces"][h] = fmri, prf, faces
        out["fs"][h], out["nc"][h] = np.flatnonzero(fs_mask), nc
    np.save(roi_dir / "mapping_prf-visualrois.npy", PRF, allow_pickle=True)
    np.save(roi_dir / "mapping_floc-faces.npy", {np.int64(k): v for k, v in FACES.items()}, allow_pickle=True)
    return out


@pytest.fixture
def subject(tmp_path):
    return make_subject(tmp_path)


def test_algonauts_shapes_hemispheres_and_rows(subject):
    ds = load_algonauts(subject["subj"])
    assert ds.name == "algonauts_subj01"
    assert ds.n_voxels == 55
    assert (ds.hemisphere[:30] == "lh").all() and (ds.hemisphere[30:] == "rh").all()
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 16, "val": 2, "test": 2}
    full = np.concatenate([subject["fmri"]["lh"], subject["fmri"]["rh"]], axis=1)
    for split in ds.splits.values():
        rows = [subject["names"].index(i) for i in split.images.ids]
        np.testing.assert_array_equal(split.responses, full[rows])
        assert split.responses.dtype == np.float32
    assert ds.meta["nsd_id"]["train-0003_nsd-00114"] == 114


def test_algonauts_roi_masks_fsaverage_and_noise_ceiling(subject):
    ds = load_algonauts(subject["subj"])
    prf = np.concatenate([subject["prf"]["lh"], subject["prf"]["rh"]])
    faces = np.concatenate([subject["faces"]["lh"], subject["faces"]["rh"]])
    assert list(ds.roi_masks) == ["V1v", "V1d", "OFA", "FFA-1"]  # hV4 has no vertex
    np.testing.assert_array_equal(ds.roi_masks["V1v"], prf == 1)
    np.testing.assert_array_equal(ds.roi_masks["FFA-1"], faces == 2)
    assert ds.roi_masks["OFA"].sum() == 2 and ds.roi_masks["OFA"][[0, 30]].all()  # one vertex in each hemisphere
    assert ds.meta["roi_classes"] == {"prf-visualrois": ["V1v", "V1d"], "floc-faces": ["OFA", "FFA-1"]}
    np.testing.assert_array_equal(ds.fsaverage_index, np.concatenate([subject["fs"]["lh"], subject["fs"]["rh"]]))
    np.testing.assert_allclose(ds.noise_ceiling, np.concatenate([subject["nc"]["lh"], subject["nc"]["rh"]]) / 100)
    assert ds.meta["fsaverage_n_vertices"] == {"lh": FSAVERAGE_N_VERTICES, "rh": FSAVERAGE_N_VERTICES}


def test_algonauts_splits_are_disjoint_seeded_and_keep_challenge_images(subject):
    a = load_algonauts(subject["subj"], seed=3)
    b = load_algonauts(subject["subj"], seed=3)
    c = load_algonauts(subject["subj"], seed=4)
    ids = {s: a.splits[s].images.ids for s in a.splits}
    assert sorted(ids["train"] + ids["val"] + ids["test"]) == subject["names"]
    assert ids == {s: b.splits[s].images.ids for s in b.splits}
    assert ids["test"] != c.test.images.ids or ids["val"] != c.val.images.ids
    challenge = a.meta["challenge_test_images"]
    assert isinstance(challenge, FileImages) and len(challenge) == N_CHALLENGE_TEST
    assert challenge.ids[0] == "test-0001_nsd-00900" and challenge.load(0).size == (8, 8)
    no_val = load_algonauts(subject["subj"], val_fraction=0, test_fraction=0.25)
    assert set(no_val.splits) == {"train", "test"} and len(no_val.test) == 5


def test_algonauts_one_hemisphere(subject):
    ds = load_algonauts(subject["subj"], hemispheres=("rh",))
    assert ds.n_voxels == 25 and set(ds.hemisphere) == {"rh"}
    np.testing.assert_array_equal(ds.roi_masks["V1d"], subject["prf"]["rh"] == 2)
    np.testing.assert_array_equal(ds.fsaverage_index, subject["fs"]["rh"])


def test_algonauts_roi_name_used_by_two_classes_is_prefixed(subject):
    roi_dir = subject["subj"] / "roi_masks"
    for h, n in N_VERT.items():
        np.save(roi_dir / f"{h}.streams_challenge_space.npy", np.r_[np.ones(5), np.zeros(n - 5)])
    np.save(roi_dir / "mapping_streams.npy", {0: "Unknown", 1: "V1v"}, allow_pickle=True)
    ds = load_algonauts(subject["subj"])
    assert ds.meta["roi_classes"]["streams"] == ["streams/V1v"]
    assert ds.roi_masks["streams/V1v"].sum() == 10 and ds.roi_masks["streams/V1v"][[0, 4, 30, 34]].all()
    np.testing.assert_array_equal(ds.roi_masks["V1v"], np.concatenate([subject["prf"][h] for h in N_VERT]) == 1)


def test_algonauts_without_noise_ceiling_and_roi_folder(tmp_path):
    s = make_subject(tmp_path, noise_ceiling=False)
    for p in (s["subj"] / "roi_masks").iterdir():
        p.unlink()
    ds = load_algonauts(s["subj"])
    assert ds.noise_ceiling is None and ds.roi_masks == {} and ds.fsaverage_index is None


def test_algonauts_noise_ceiling_folder_name_and_one_hemisphere_missing(subject):
    subj = subject["subj"]
    (subj / "noise_ceiling").mkdir()
    os.replace(subj / "lh_noise_ceiling.npy", subj / "noise_ceiling" / "lh.npy")
    ds = load_algonauts(subj)
    np.testing.assert_allclose(ds.noise_ceiling[:30], subject["nc"]["lh"] / 100)
    (subj / "rh_noise_ceiling.npy").unlink()
    with pytest.raises(DataValidationError, match=r"noise_ceiling: found for \['lh'\] but not for \['rh'\]"):
        load_algonauts(subj)


def test_algonauts_errors_name_file_and_field(subject):
    subj = subject["subj"]
    fmri = subj / "training_split" / "training_fmri" / "rh_training_fmri.npy"
    np.save(fmri, np.zeros((N_TRAIN - 1, 25), dtype=np.float32))
    with pytest.raises(DataValidationError, match=r"rh_training_fmri\.npy: training fmri: 19 rows but 20"):
        load_algonauts(subj)
    np.save(fmri, subject["fmri"]["rh"])
    np.save(subj / "roi_masks" / "mapping_floc-faces.npy", {0: "Unknown", 1: "OFA"}, allow_pickle=True)
    with pytest.raises(DataValidationError, match=r"floc-faces labels: values \[2\] have no name in mapping_floc"):
        load_algonauts(subj)
    np.save(subj / "roi_masks" / "mapping_floc-faces.npy", FACES, allow_pickle=True)
    (subj / "roi_masks" / "rh.all-vertices_fsaverage_space.npy").unlink()
    with pytest.raises(DataValidationError, match=r"fsaverage mask .* found for \['lh'\] but not for \['rh'\]"):
        load_algonauts(subj)
    (subj / "roi_masks" / "mapping_floc-faces.npy").unlink()
    with pytest.raises(DataValidationError, match=r"roi mapping: label files for \['floc-faces'\] but no mapping"):
        load_algonauts(subj)


class _Touch:
    """Pickles as a call of ``os.system('touch <path>')``: loading the pickle would create the file."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (os.system, (f"touch '{self.path}'",))


class _Open:
    """Pickles as ``open(path, 'w')``: creates the file without a shell."""

    def __init__(self, path: Path):
        self.path = path

    def __reduce__(self):
        return (open, (str(self.path), "w"))


@pytest.mark.parametrize("payload", [_Touch, _Open])
def test_malicious_mapping_pickle_is_refused_without_running(subject, tmp_path, payload):
    marker = tmp_path / "pwned"
    mapping = subject["subj"] / "roi_masks" / "mapping_floc-faces.npy"
    np.save(mapping, {0: "Unknown", 1: payload(marker)}, allow_pickle=True)
    with pytest.raises(UnsafeFileError, match=r"mapping_floc-faces\.npy: mapping: refused to unpickle \(global"):
        load_algonauts(subject["subj"])
    assert not marker.exists()
    value = np.load(mapping, allow_pickle=True).item()[1]  # plain np.load runs the payload: it is real
    if hasattr(value, "close"):
        value.close()
    assert marker.exists()


def test_label_mapping_reader_checks_types(tmp_path):
    path = tmp_path / "mapping_x.npy"
    np.save(path, {0: "Unknown", np.int32(5): "V1"}, allow_pickle=True)
    assert load_label_mapping(path) == {0: "Unknown", 5: "V1"}
    np.save(path, {1: ["V1"]}, allow_pickle=True)  # a list value needs no global, so it is caught afterwards
    with pytest.raises(DataValidationError, match="value of key 1 is a list; expected str"):
        load_label_mapping(path)
    np.save(path, np.arange(3))
    with pytest.raises(DataValidationError, match="expected a pickled dict"):
        load_label_mapping(path)
    np.save(path, {"V1": 1}, allow_pickle=True)
    with pytest.raises(DataValidationError, match="key 'V1' is a str; expected int"):
        load_label_mapping(path)


# ======================================================================================= generic folder
def make_folder(root: Path, n: int = 10, n_vox: int = 6, seed: int = 0) -> np.ndarray:
    (root / "images").mkdir(parents=True)
    for i in range(n):
        write_png(root / "images" / f"img{i:02d}.png", i)
    responses = np.random.default_rng(seed).normal(size=(n, n_vox))
    np.save(root / "responses.npy", responses)
    return responses


def test_folder_sorted_images_seeded_test_split(tmp_path):
    responses = make_folder(tmp_path, n=10)
    ds = load_folder(tmp_path, test_fraction=0.2, val_fraction=0.25, seed=1)
    assert {k: len(v) for k, v in ds.splits.items()} == {"train": 6, "val": 2, "test": 2}
    _, test_idx = holdout_indices(10, 0.2, 1, tmp_path)
    assert ds.test.images.ids == [f"img{i:02d}" for i in test_idx]
    for split in ds.splits.values():
        rows = [int(i[3:]) for i in split.images.ids]
        np.testing.assert_allclose(split.responses, responses[rows].astype(np.float32))
    assert ds.name == tmp_path.name and ds.noise_ceiling is None and ds.captions == {}
    again = load_folder(tmp_path, test_fraction=0.2, val_fraction=0.25, seed=1)
    assert again.test.images.ids == ds.test.images.ids and again.val.images.ids == ds.val.images.ids


def test_folder_csv_order_splits_and_captions(tmp_path):
    responses = make_folder(tmp_path, n=4)
    (tmp_path / "stimuli.csv").write_text(
        "image,split,caption,notes\n"
        "img03.png,train,a red square,x\n"
        "img01.png,test,\"a dog, running\",\n"
        "img03.png,train,  another caption  ,\n"
        "img00,train,a cat,\n"  # name without extension
        "img02.png,val,a tree,\n", encoding="utf-8")
    ds = load_folder(tmp_path)
    assert ds.train.images.ids == ["img03", "img00"] and ds.test.images.ids == ["img01"]
    assert ds.val.images.ids == ["img02"]
    # rows follow the CSV: row 0 = img03, row 1 = img01, row 2 = img00, row 3 = img02
    np.testing.assert_allclose(ds.train.responses, responses[[0, 2]].astype(np.float32))
    np.testing.assert_allclose(ds.test.responses, responses[[1]].astype(np.float32))
    assert ds.captions["img03"] == ["a red square", "another caption"]
    assert ds.captions_for("test") == [["a dog, running"]]


def test_folder_h5_repeats_rois_hemisphere_noise_ceiling(tmp_path):
    make_folder(tmp_path, n=12, n_vox=5)
    (tmp_path / "responses.npy").unlink()
    rng = np.random.default_rng(2)
    repeats = rng.normal(size=(12, 3, 5)) + rng.normal(size=(12, 1, 5))
    repeats[::4, 2] = np.nan
    with h5py.File(tmp_path / "responses.h5", "w") as fh:
        fh["responses"] = np.nanmean(repeats, axis=1)
        fh["repeats"] = repeats
    np.savez(tmp_path / "rois.npz", V1=np.array([1, 1, 0, 0, 0]), V4=np.array([0, 0, 1, 1, 1], dtype=bool))
    np.save(tmp_path / "hemisphere.npy", np.array(["lh", "lh", "rh", "rh", "rh"]))
    ds = load_folder(tmp_path, test_fraction=0.5, val_fraction=0)
    assert ds.test.repeats.shape == (6, 3, 5) and ds.train.repeats.shape == (6, 3, 5)
    np.testing.assert_allclose(ds.noise_ceiling, algonauts_noise_ceiling(ds.test.repeats))
    assert 0 < ds.noise_ceiling.mean() < 1
    np.testing.assert_array_equal(ds.roi_masks["V1"], [True, True, False, False, False])
    assert list(ds.hemisphere) == ["lh", "lh", "rh", "rh", "rh"]
    np.save(tmp_path / "noise_ceiling.npy", np.full(5, 0.25))  # an explicit ceiling wins over the repeats
    np.testing.assert_allclose(load_folder(tmp_path, val_fraction=0).noise_ceiling, 0.25)


# ================================================================================================== V4
def make_v4(root: Path, session: str = "001", n_neurons: int = 3, n_images: int = 30) -> dict:
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "responses_repeat_averaged").mkdir(exist_ok=True)
    (root / "responses_raw").mkdir(exist_ok=True)
    with zipfile.ZipFile(root / "images" / f"images_{session}.zip", "w") as zf:
        for i in range(n_images):
            arr = np.full((6, 6, 3), i * 8, dtype=np.uint8)
            buf = Path(root / "tmp.jpg")
            Image.fromarray(arr).save(buf)
            zf.write(buf, f"image{i + 1:04d}.jpg")
            buf.unlink()
    rng = np.random.default_rng(1)
    raw = rng.poisson(5.0, size=(n_neurons, n_images, 6)).astype(float) + rng.poisson(3.0, (n_neurons, n_images, 1))
    raw[:, ::3, 4:] = np.nan
    np.save(root / "responses_raw" / f"responses_{session}.npy", raw)
    avg = np.nanmean(raw, axis=2)
    np.save(root / "responses_repeat_averaged" / f"responses_{session}.npy", avg)
    return {"raw": raw, "avg": avg}


def test_v4_fake_session(tmp_path):
    data = make_v4(tmp_path, "001")
    make_v4(tmp_path, "002", n_images=12)
    (tmp_path / "images" / "images_003.zip").write_bytes(b"")  # no responses: not a session
    assert list_v4_sessions(tmp_path) == ["001", "002"]
    ds = load_v4(tmp_path, "001", val_fraction=0.2, seed=0)
    assert ds.name == "v4_001" and ds.n_voxels == 3
    assert ds.test.images.ids == ["image0006", "image0012", "image0018", "image0024", "image0030"]
    assert len(ds.train) == 20 and len(ds.val) == 5
    np.testing.assert_allclose(ds.test.responses, data["avg"][:, 5::6].T.astype(np.float32))
    np.testing.assert_array_equal(ds.test.repeats, data["raw"][:, 5::6].transpose(1, 2, 0).astype(np.float32))
    np.testing.assert_allclose(ds.noise_ceiling, split_half_noise_ceiling(ds.test.repeats, seed=0))
    assert ds.test.images.load_array(0)[0, 0, 0] == pytest.approx(5 * 8, abs=3)  # image0006 = 6th image
    other = load_v4(tmp_path, "001", test_every=5, val_fraction=0)
    assert len(other.test) == 6 and other.test.images.ids[0] == "image0005"


def test_v4_without_raw_and_errors(tmp_path):
    data = make_v4(tmp_path, "001")
    raw_path = tmp_path / "responses_raw" / "responses_001.npy"
    bad = data["raw"].copy()
    bad[0, 3, 0] += 10
    np.save(raw_path, bad)
    with pytest.raises(DataValidationError, match=r"responses_001\.npy: responses_raw: averaged over repeats it diff"):
        load_v4(tmp_path, "001")
    raw_path.unlink()
    ds = load_v4(tmp_path, "001")
    assert ds.noise_ceiling is None and ds.test.repeats is None
    with pytest.raises(DataValidationError, match=r"images_999\.zip: session 999: file not found; sessions here: \['001'\]"):
        load_v4(tmp_path, "999")
    np.save(tmp_path / "responses_repeat_averaged" / "responses_001.npy", data["avg"][:, :-1])
    with pytest.raises(DataValidationError, match=r"responses: shape \(n_neurons, n_images\) = \(3, 29\) but images_001"):
        load_v4(tmp_path, "001")


@pytest.mark.shared_data
def test_v4_real_session_210325():
    root = needs_shared("v4_cowley2023")
    assert "210325" in list_v4_sessions(root)
    ds = load_v4(root, "210325")
    assert ds.n_voxels == 50
    assert len(ds.train) + len(ds.val) + len(ds.test) == 640
    assert len(ds.test) == 106 and len(ds.val) == 53
    assert ds.test.repeats.shape == (106, 10, 50)
    np.testing.assert_allclose(np.nanmean(ds.test.repeats, axis=1), ds.test.responses, atol=1e-5)
    nc = ds.noise_ceiling
    assert nc.shape == (50,) and (nc > 0).all() and (nc < 1).all()
    assert 0.6 < np.median(nc) < 0.85  # measured 0.75: spike counts of 6-10 repeats are fairly reliable
    assert ds.train.images.load(0).size == (112, 112)


# ========================================================================================= RDM sets
@pytest.mark.shared_data
def test_kriegeskorte92_real():
    rdms = load_kriegeskorte92(needs_shared("kriegeskorte92"))
    assert len(rdms.images) == 92 and rdms.images.array.shape == (92, 175, 175, 3)
    assert rdms.images.ids[0] == "obj01"
    assert rdms.human_it.shape == (4, 2, 92, 92) and rdms.human_it_subjects == ["BE", "KO", "SN", "TI"]
    assert rdms.human_it_per_subject.shape == (4, 92, 92)
    for rdm in [*rdms.human_it.reshape(-1, 92, 92), rdms.monkey_it, rdms.human_it_mean]:
        np.testing.assert_allclose(rdm, rdm.T, atol=1e-6)
        assert np.abs(np.diag(rdm)).max() < 1e-6
    assert rdms.categories["animate"].sum() == 48 and rdms.categories["face"].sum() == 24
    assert not (rdms.categories["animate"] & rdms.categories["inanim"]).any()
    assert (rdms.category_names == "human face").sum() == 12
    iu = np.triu_indices(92, 1)
    from scipy.stats import spearmanr

    # human and monkey IT share their category structure (Kriegeskorte et al. 2008): measured rho = 0.44
    assert spearmanr(rdms.human_it_mean[iu], rdms.monkey_it[iu])[0] > 0.35
    assert spearmanr(rdms.model_rdms["monkeyIT"][iu], rdms.monkey_it[iu])[0] > 0.999
