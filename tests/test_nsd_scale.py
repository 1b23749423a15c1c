"""NSD scale on one machine (issue 27): the latent voxel loss, the ridge start, shapes-only loading, threads,
stage lines, and the peak memory of ``llmvem train`` at a reduced size (in a subprocess)."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import sys

import numpy as np
import pytest
import torch
from conftest import REPO_ROOT

from llmvem import resources
from llmvem.model.network import LLMVEM
from llmvem.model.readout import PCAVoxelReadout


def _bench():
    spec = importlib.util.spec_from_file_location("bench_nsd_scale", REPO_ROOT / "bench" / "bench_nsd_scale.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# ------------------------------------------------------------------------------------ latent voxel loss
@pytest.mark.parametrize("mode", ["voxel", "pca"])
def test_latent_targets_give_the_voxel_loss_and_its_gradient(mode):
    g = torch.Generator().manual_seed(0)
    y = torch.randn(40, 60, generator=g) @ torch.randn(60, 60, generator=g) * 0.3 + 1.0
    ro = PCAVoxelReadout(n_features=5, n_voxels=60, n_components=12, voxel_loss=mode)
    ro.initialize(y)  # 12 of 60 components: the responses are far from the basis' span
    x = torch.randn(40, 5, generator=g)
    targets = ro.latent_targets(y, block_bytes=8 * 60 * 7)  # 7 rows per block
    np.testing.assert_allclose(targets.scores.numpy(), ro.encode(y).numpy(), atol=1e-5)
    rows = torch.tensor([3, 1, 30, 7])
    voxels, latent = ro.forward_latent(x[rows])
    direct = ro.loss(voxels, y[rows], latent)
    grad_direct = torch.autograd.grad(direct, ro.head.weight)[0]
    latent = ro.scores(x[rows])
    through = ro.loss(None, targets[rows], latent)
    grad_through = torch.autograd.grad(through, ro.head.weight)[0]
    assert float(through.detach()) == pytest.approx(float(direct.detach()), rel=1e-5)
    torch.testing.assert_close(grad_through, grad_direct, rtol=1e-4, atol=1e-7)


def test_network_latent_forward_skips_decoding():
    net = LLMVEM({"pooled": 6}, n_voxels=30, n_train=20, alignment=False, standardize_features=False)
    net.initialize(torch.randn(20, 30), torch.randn(20, 6))
    out = net(features={"pooled": torch.randn(4, 6)}, with_voxels="latent")
    assert out.voxels is None and out.latent.shape == (4, net.readout.n_components)


# -------------------------------------------------------------------------------------------- ridge start
def _features_and_responses(n=120, d=10, v=80, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d)).astype(np.float32)
    w = rng.standard_normal((d, v)).astype(np.float32)
    y = x @ w + 0.5 * rng.standard_normal((n, v)).astype(np.float32) + 2.0
    return torch.from_numpy(x), torch.from_numpy(y)


def test_ridge_start_without_core_is_the_ridge_of_the_pca_scores():
    from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

    x, y = _features_and_responses()
    net = LLMVEM({"pooled": 10}, n_voxels=80, n_train=120, n_components=20, alignment=False)
    started = net.initialize(y, x, readout_start="ridge")
    assert set(started) == {"main"} and started["main"]["alpha"] in DEFAULT_ALPHAS
    xs = ((x - net.feature_mean) / net.feature_std).numpy()
    z = net.readout.encode(y).numpy()
    ridge = RidgeCV(cv="loo", local_alpha=False, scoring="neg_mse", progress_bar=False).fit(xs, z)
    net.eval()
    pred = net(features={"pooled": x}).voxels.detach().numpy()
    expected = ridge.predict(xs) @ net.readout.basis.numpy() + net.readout.mean.numpy()
    np.testing.assert_allclose(pred, expected, atol=2e-4)


def test_ridge_start_with_a_linear_core_is_the_reduced_rank_ridge():
    x, y = _features_and_responses(d=10, v=80)
    full = LLMVEM({"pooled": 10}, n_voxels=80, n_train=120, n_components=20, alignment=False)
    full.initialize(y, x, readout_start="ridge")
    wide = LLMVEM({"pooled": 10}, n_voxels=80, n_train=120, n_components=20, alignment=False, core="linear",
                  core_dim=32)
    assert wide.initialize(y, x, readout_start="ridge")["main"]["rank"] == 20
    full.eval()
    wide.eval()
    feats = {"pooled": x[:30]}
    # a core wider than the components: the factorisation is exact, and the spare core units are switched off
    np.testing.assert_allclose(wide(features=feats).voxels.detach().numpy(),
                               full(features=feats).voxels.detach().numpy(), atol=5e-4)
    narrow = LLMVEM({"pooled": 10}, n_voxels=80, n_train=120, n_components=20, alignment=False, core="linear",
                    core_dim=3)
    narrow.initialize(y, x, readout_start="ridge")
    narrow.eval()
    # rank 3: the projection of the ridge's fitted scores on their top 3 principal directions
    z_full = full.readout.scores(full.core_dropout((x - full.feature_mean) / full.feature_std)).detach()
    zc = z_full - z_full.mean(0)
    _, _, vh = torch.linalg.svd(zc, full_matrices=False)
    proj = zc @ vh[:3].t() @ vh[:3] + z_full.mean(0)
    z_narrow = narrow.readout.scores(narrow.core((x - narrow.feature_mean) / narrow.feature_std)).detach()
    np.testing.assert_allclose(z_narrow.numpy(), proj.numpy(), atol=5e-4)


def _linear_fit(tmp_path, name, start, *overrides, **kw):
    """Stage 1 on features with a linear ground truth (``train_encoding_model``, as ``llmvem train`` calls it)."""
    from llmvem.config import RunConfig, apply_overrides
    from llmvem.data.dataset import EncodingDataset, Split
    from llmvem.data.images import ArrayImages
    from llmvem.train.trainer import train_encoding_model

    rng = np.random.default_rng(0)
    x = rng.normal(size=(260, 12)).astype(np.float32)
    y = (x @ rng.normal(size=(12, 30)) + 2.0 * rng.normal(size=(260, 30))).astype(np.float32)
    cut = {"train": slice(0, 160), "val": slice(160, 210), "test": slice(210, None)}
    ids, imgs = [f"x{i}" for i in range(260)], np.zeros((260, 4, 4, 3), np.uint8)
    ds = EncodingDataset("linear", {s: Split(ArrayImages(imgs[c], ids[c]), y[c]) for s, c in cut.items()})
    cfg = apply_overrides(RunConfig(), ["backbone.layers=[pooled]", "model.lambda_align=0", "train.stage2.epochs=0",
                                        "model.core=linear", "model.core_dim=8", "train.stage1.epochs=6",
                                        "train.stage1.batch_size=32", "train.stage1.early_stopping_patience=2",
                                        "train.device=cpu", f"model.readout_init={start}", *overrides])
    return train_encoding_model(cfg, ds, features={s: {"pooled": x[c]} for s, c in cut.items()},
                                out_dir=tmp_path / name, show_progress=False, **kw)


@pytest.mark.usefixtures("one_torch_thread")
def test_auto_start_keeps_the_ridge_start_where_training_does_not_beat_it(tmp_path):
    slow = "train.stage1.lr=1e-7"  # the random start hardly moves: nothing it reaches beats the ridge solution
    auto, random, ridge = (_linear_fit(tmp_path, s, s, slow) for s in ("auto", "random", "ridge"))
    st = auto.stages["stage1"]
    assert st["ridge_start_kept"] and st["best_epoch"] == 0 and "ridge_start_kept" not in random.stages["stage1"]
    # training ran from the random weights exactly as readout_init random does (its own early stopping)
    assert [r["val_mean_r"] for r in auto.curves] == [r["val_mean_r"] for r in random.curves]
    assert st["best_val_mean_r"] > max(r["val_mean_r"] for r in random.curves) + 0.3
    np.testing.assert_allclose(auto.predictions["test"], ridge.predictions["test"], atol=1e-4)  # the ridge start


@pytest.mark.usefixtures("one_torch_thread")
def test_auto_start_trains_from_the_random_weights_where_that_does_better(tmp_path, monkeypatch):
    import llmvem.model.network as network_module
    from llmvem.model.start import ridge_start

    def reversed_start(network, responses, features):  # a start that validation must reject (r < 0)
        record = ridge_start(network, responses, features)
        network.readouts["main"].head.weight.neg_()
        return record

    monkeypatch.setattr(network_module, "ridge_start", reversed_start)
    auto, random = _linear_fit(tmp_path, "auto", "auto"), _linear_fit(tmp_path, "random", "random")
    assert not auto.stages["stage1"]["ridge_start_kept"] and auto.stages["stage1"]["best_epoch"] >= 1
    def steps(curves):  # the curve rows without their timings
        return [{k: v for k, v in r.items() if k not in ("seconds", "images_per_s")} for r in curves]

    assert steps(auto.curves) == steps(random.curves)  # the same training, step for step
    for split in ("val", "test"):
        np.testing.assert_array_equal(auto.predictions[split], random.predictions[split])


@pytest.mark.usefixtures("one_torch_thread")
def test_an_interrupted_auto_start_resumes_to_the_same_choice(tmp_path):
    full = _linear_fit(tmp_path, "full", "auto", "train.stage1.lr=0.003")

    def stop(event, info):
        if event == "epoch_end" and info["epoch"] == 2:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        _linear_fit(tmp_path, "cut", "auto", "train.stage1.lr=0.003", callback=stop)
    resumed = _linear_fit(tmp_path, "cut", "auto", "train.stage1.lr=0.003", resume=True)
    assert [r["val_mean_r"] for r in resumed.curves] == [r["val_mean_r"] for r in full.curves]
    for key in ("best_epoch", "epochs_run", "ridge_start_kept", "best_val_mean_r"):
        assert resumed.stages["stage1"][key] == full.stages["stage1"][key]
    np.testing.assert_array_equal(resumed.predictions["test"], full.predictions["test"])


# -------------------------------------------------------------------------------- shapes-only Algonauts
def test_fake_subject_loads_in_the_challenge_layout_and_inspects_without_responses(tmp_path):
    from llmvem.data import load_dataset

    bench = _bench()
    info = bench.make_fake_subject(tmp_path / "subj01", n_train=60, n_vertices=(200, 240), n_challenge=5)
    assert info["n_rois"] == 31
    full = load_dataset(tmp_path / "subj01", val_fraction=0.1)
    assert full.n_voxels == 440 and len(full.train) + len(full.val) + len(full.test) == 60
    assert len(full.roi_masks) == 31 and len(full.meta["challenge_test_images"]) == 5
    shapes = load_dataset(tmp_path / "subj01", val_fraction=0.1, load_responses=False)
    assert shapes.summary() == full.summary()
    for split in ("train", "val", "test"):
        r = shapes.splits[split].responses
        assert r.shape == full.splits[split].responses.shape and r.strides == (0, 0)  # no memory behind it
    # rows of the files land in the split arrays exactly as slicing the whole matrix would put them
    lh = np.load(tmp_path / "subj01" / "training_split" / "training_fmri" / "lh_training_fmri.npy")
    ids = full.meta["nsd_id"]
    names = sorted(ids)
    row = names.index(full.val.images.ids[2])
    np.testing.assert_array_equal(full.val.responses[2, :200], lh[row])


# ---------------------------------------------------------------------------------------------- threads
def test_cgroup_quota_v2_and_v1(tmp_path):
    v2 = tmp_path / "v2"
    v2.mkdir()
    (v2 / "cpu.max").write_text("150000 100000\n")
    assert resources.cgroup_cpu_limit(v2) == pytest.approx(1.5)
    (v2 / "cpu.max").write_text("max 100000\n")
    assert resources.cgroup_cpu_limit(v2) is None
    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "cpu.cfs_quota_us").write_text("200000\n")
    (v1 / "cpu.cfs_period_us").write_text("100000\n")
    assert resources.cgroup_cpu_limit(v1) == pytest.approx(2.0)
    (v1 / "cpu.cfs_quota_us").write_text("-1\n")
    assert resources.cgroup_cpu_limit(v1) is None


def test_thread_choice_order_and_record(monkeypatch):
    from llmvem.errors import ConfigError

    monkeypatch.setenv("LLMVEM_THREADS", "3")
    monkeypatch.setenv("OMP_NUM_THREADS", "5")
    assert resources.choose_threads(2).threads == 2 and resources.choose_threads(2).source == "--threads"
    assert resources.choose_threads().threads == 3
    monkeypatch.delenv("LLMVEM_THREADS")
    assert (resources.choose_threads().threads, resources.choose_threads().source) == (5, "OMP_NUM_THREADS")
    monkeypatch.delenv("OMP_NUM_THREADS")
    monkeypatch.setattr(resources, "available_cpus", lambda: 4)
    monkeypatch.setattr(resources, "idle_cpus", lambda interval=0.25: 1.2)  # another job keeps ~3 cores busy
    auto = resources.choose_threads()
    assert (auto.threads, auto.source, auto.available_cpus) == (1, "idle CPUs", 4)
    monkeypatch.setenv("LLMVEM_THREADS", "zero")
    with pytest.raises(ConfigError, match="LLMVEM_THREADS"):
        resources.choose_threads()
    before = torch.get_num_threads()
    for env in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS", "OMP_WAIT_POLICY"):
        monkeypatch.delenv(env, raising=False)
    try:
        resources.configure_threads(resources.ThreadChoice(1, "--threads", 4))
        record = resources.thread_record()
        assert (record["threads"], record["torch_threads"], record["source"]) == (1, 1, "--threads")
        assert os.environ["OMP_NUM_THREADS"] == "1" and record["omp_wait_policy"] == "PASSIVE"
        from llmvem.utils import versions

        assert versions(0)["threads"]["threads"] == 1
    finally:
        torch.set_num_threads(before)
        resources._CHOICE = None


def test_available_cpus_respect_affinity_and_quota(monkeypatch):
    monkeypatch.setattr(resources, "_affinity", lambda: {0, 1, 2, 3})
    monkeypatch.setattr(resources, "cgroup_cpu_limit", lambda root=None: 1.5)
    assert resources.available_cpus() == 2
    monkeypatch.setattr(resources, "cgroup_cpu_limit", lambda root=None: None)
    assert resources.available_cpus() == 4


# ----------------------------------------------------------------------------------------------- stages
def test_stage_lines_and_records(caplog):
    timing, memory, said = {}, {}, []
    with resources.stage("image features", "image_features", timing=timing, memory=memory, say=said.append):
        block = np.ones((2048, 2048))  # 32 MB held while the stage runs
        block.sum()
    assert said[0] == "image features …"
    assert said[1].startswith("image features: done in ") and "peak memory" in said[1]
    assert timing["image_features"] >= 0 and memory["image_features"] >= 32 * 2**20
    with caplog.at_level(logging.INFO, logger="llmvem.stages"), pytest.raises(ValueError):
        with resources.stage("ridge"):
            raise ValueError("boom")
    assert any("ridge: failed after" in r.getMessage() for r in caplog.records)


def test_peak_rss_is_at_least_the_current_rss():
    assert resources.peak_rss() >= resources.current_rss() > 0


# ------------------------------------------------------------------------- train's peak memory, reduced
@pytest.mark.slow
def test_train_peak_memory_ratio_at_reduced_size(tmp_path):
    """``llmvem train`` on a fake subject of 600 images × 20,000 vertices (and the same subject with 2,000
    vertices, for the process's fixed memory: Python, torch, the backbone, the text encoder): the memory the
    18,000 extra vertices add is at most a few times their responses (the float64 SVD of the PCA used to add
    ~10×)."""
    bench = _bench()
    peaks, resp = {}, {}
    for name, verts in (("small", (1000, 1000)), ("large", (10000, 10000))):
        subject = tmp_path / name / "subj01"
        info = bench.make_fake_subject(subject, n_train=600, n_vertices=verts, n_challenge=4)
        sets = bench.train_overrides(subject, tmp_path / "cache", "file", [
            "train.stage1.epochs=2", "evaluate.bootstrap=20", "model.pca_components=500"])
        cmd = bench.llmvem_command("train", "--config", "demo", "--out", str(tmp_path / name / "run"),
                                   "--no-progress", "--threads", "1", *[a for s in sets for a in ("--set", s)])
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", LLMVEM_NO_PROGRESS="1")
        res = bench.run_measured(cmd, REPO_ROOT, 900, env)
        assert res["rc"] == 0, res["stderr_tail"]
        assert any("training: done in" in line for line in res["stage_lines"])
        peaks[name], resp[name] = res["peak_rss_bytes"], info["response_bytes"]
        metrics = json.loads((tmp_path / name / "run" / "metrics.json").read_text())
        assert set(metrics["timing"]["peak_rss_bytes"]) >= {"data", "image_features", "ridge", "evaluate"}
    extra = (peaks["large"] - peaks["small"]) / (resp["large"] - resp["small"])
    print(f"peak small {peaks['small'] / 2**30:.2f} GB, large {peaks['large'] / 2**30:.2f} GB, "
          f"{extra:.2f} bytes per extra response byte")
    # measured 1.26 (the child's own VmHWM; wait4's ru_maxrss counted the forking parent's peak and hid this): the
    # responses, the predictions and the ridge's coefficients; the old float64 SVD of the PCA alone added ~10
    assert extra < 3.0, sys.stdout


def test_peak_rss_of_another_process_is_its_own_high_water_mark():
    import subprocess
    import time

    child = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    try:
        time.sleep(0.5)
        own = resources.peak_rss(child.pid)
        assert 0 < own < resources.peak_rss()  # a bare interpreter: far below this test process
    finally:
        child.kill()
        child.wait()
    assert resources.peak_rss(child.pid) == 0  # gone: /proc says nothing


# ------------------------------------------------------------------------- memory between and inside stages
def test_release_free_memory_returns_a_fragmented_heap():
    """Once a freed mid-size array has raised glibc's mmap threshold, freed heap chunks stay resident until
    trimmed: release_free_memory gives them back."""
    big = np.ones(2**21)  # 16 MiB, mmapped; freeing it raises the threshold
    del big
    chunks = [np.ones(2**17) for _ in range(400)]  # 400 MiB from the heap
    kept = chunks[1::2]
    del chunks
    before = resources.current_rss()
    assert resources.release_free_memory()
    after = resources.current_rss()
    assert before - after > 150 * 2**20, (before, after)  # most of the 200 MiB freed
    assert all(float(k[0]) == 1.0 for k in kept)


def test_npz_memmap_reads_an_uncompressed_member_in_place(tmp_path):
    from llmvem.utils import npz_memmap

    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    np.savez(tmp_path / "x.npz", a=a, f=np.asfortranarray(a.astype(np.float64)))
    m = npz_memmap(tmp_path / "x.npz", "a")
    assert isinstance(m, np.memmap) and not m.flags.writeable
    np.testing.assert_array_equal(m, a)
    np.testing.assert_array_equal(npz_memmap(tmp_path / "x.npz", "f"), a)
    assert npz_memmap(tmp_path / "x.npz", "missing") is None
    np.savez_compressed(tmp_path / "z.npz", a=a)
    assert npz_memmap(tmp_path / "z.npz", "a") is None


def test_ridge_reads_its_saved_coefficients_memory_mapped(tmp_path):
    from llmvem.ridge_encoders import RidgeEncoder

    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(60, 8)), rng.normal(size=(60, 30)).astype(np.float32)
    enc = RidgeEncoder(cv=3).fit(x, y)
    before = enc.predict(x[:5])
    assert not enc.map_coefficients(tmp_path)  # nothing saved there yet
    enc.save(tmp_path)
    assert enc.map_coefficients(tmp_path)
    assert isinstance(enc.ridge_.coef_, np.memmap)
    np.testing.assert_array_equal(enc.predict(x[:5]), before)


def test_fit_predict_writes_each_model_as_it_is_fitted_and_holds_its_predictions_mapped(tmp_path):
    """The runner writes a model's predictions and ridge file right after its fit; what it keeps are read-only
    maps of those files, equal to the predictions."""
    from llmvem.data.dataset import EncodingDataset, Split
    from llmvem.data.images import ArrayImages
    from llmvem.experiment import ModelSpec, fit_predict
    from llmvem.inputs import PreparedInputs
    from llmvem.ridge_encoders import RIDGE_FILE, RidgeEncoder

    rng = np.random.default_rng(0)
    splits, feats = {}, {}
    for s, n in {"train": 50, "val": 15, "test": 20}.items():
        a = rng.normal(size=(n, 6)).astype(np.float32)
        splits[s] = Split(ArrayImages(np.zeros((n, 4, 4, 3), np.uint8), [f"{s}{i}" for i in range(n)]),
                          (a @ rng.normal(size=(6, 40)) + rng.normal(size=(n, 40))).astype(np.float32))
        feats[s] = {"A": a}
    inputs = PreparedInputs(EncodingDataset("planted", splits), {s: [["x"]] * len(splits[s].images.ids)
                                                                   for s in splits},
                            {"backend": "file", "model_id": "planted", "config_hash": "x"}, {}, None, feats)
    class Held:  # an estimator whose result keeps its predictions, as the trainer's does
        def get_params(self, deep=True):
            return {}

        def set_params(self, **params):
            return self

        def fit_inputs(self, inputs):
            self.result_ = type("R", (), {})()
            self.result_.predictions = {s: np.full((len(inputs.dataset.splits[s].images.ids), 40), 2.0, np.float32)
                                        for s in ("val", "test")}
            return self

        def predict_inputs(self, inputs):
            return dict(self.result_.predictions)

    models = {"ridge": ModelSpec(RidgeEncoder(layers=["A"], cv=3, device="cpu"), "Ridge", "ridge"),
              "held": ModelSpec(Held(), "Held", "llmvem")}
    preds, fitted = fit_predict(models, inputs, tmp_path / "models")
    for split in ("val", "test"):  # the estimator's own copy is the map as well
        assert fitted["held"].result_.predictions[split] is preds["held"][split]
        assert isinstance(preds["held"][split], np.memmap) and float(preds["held"][split][0, 0]) == 2.0
    folder = tmp_path / "models" / "ridge"
    assert (folder / RIDGE_FILE).is_file()
    for split in ("val", "test"):
        assert isinstance(preds["ridge"][split], np.memmap)
        np.testing.assert_array_equal(preds["ridge"][split], fitted["ridge"].predict(inputs.features[split]))
        np.testing.assert_array_equal(np.load(folder / f"predictions_{split}.npy"), preds["ridge"][split])


def test_validation_loss_in_row_blocks_is_the_mean_squared_error():
    from llmvem.train.engine import _mean_squared_error

    rng = np.random.default_rng(1)
    y, p = rng.normal(size=(150, 7)).astype(np.float32), rng.normal(size=(150, 7)).astype(np.float32)
    assert _mean_squared_error(y, p, rows=64) == pytest.approx(float(np.mean((p.astype(np.float64) - y) ** 2)),
                                                                rel=1e-12)


def test_mapped_predictions_stop_counting_once_read(tmp_path):
    np.save(tmp_path / "p.npy", np.ones((256, 16384), np.float32))  # 16 MiB
    m = np.load(tmp_path / "p.npy", mmap_mode="r")

    def rss_file():
        return resources._status_kib("RssFile") * 1024

    before = rss_file()
    assert float(m.sum()) == 256 * 16384
    read = rss_file()
    assert read - before > 12 * 2**20
    writable = np.load(tmp_path / "p.npy", mmap_mode="r+")  # pages that may not be written back yet: left alone
    assert resources.release_mapped_pages(m[128:], np.ones(3), writable) == 1  # a view reaches its mapping
    assert rss_file() - before < 2 * 2**20
    assert float(m[-1, -1]) == 1.0  # still readable
