"""``<layer>@pca<K>``: principal components of the flattened map, fitted on the training images only.

The PCA itself is checked against scikit-learn and on a planted low-rank case; the spec through
:func:`llmvem.inputs.extract_split_features` is checked as a leakage guard (in the style of tests/test_leakage.py):
replacing the validation and test images by noise must leave the fitted projection, its cache key and the training
rows bit-identical, while another training split is another cache entry.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from test_train_trainer import make_dataset

from llmvem.config import RunConfig, apply_overrides
from llmvem.data.dataset import Split
from llmvem.data.images import ArrayImages
from llmvem.embed.image import load_backbone
from llmvem.embed.spatial import MapPCA, parse_layer_spec
from llmvem.errors import ConfigError
from llmvem.inputs import extract_split_features


def _planted(n: int = 300, shape=(4, 6, 6), rank: int = 3, noise: float = 0.01, seed: int = 0):
    """Maps = rank-``rank`` signal (unit-variance scores on orthonormal axes, scaled 5, 3, 2...) + white noise."""
    rng = np.random.default_rng(seed)
    d = int(np.prod(shape))
    axes, _ = np.linalg.qr(rng.normal(size=(d, rank)))
    scale = np.array([5.0, 3.0, 2.0, 1.5][:rank])
    x = (rng.normal(size=(n, rank)) * scale) @ axes.T + noise * rng.normal(size=(n, d)) + 7.0
    return x.reshape(n, *shape), axes


@pytest.mark.parametrize("k", [3, 40])  # randomized SVD (4K < D) and exact SVD
def test_map_pca_captures_the_planted_variance_and_matches_sklearn(k):
    from sklearn.decomposition import PCA

    maps, axes = _planted()
    pca = MapPCA(k, seed=0).fit(maps)
    assert pca.components_.shape == (k, 144) and pca.mean_.shape == (144,)
    # the first 3 components hold the planted signal: ~all the variance, and they span the planted axes
    assert pca.explained_variance_ratio_[:3].sum() > 0.995
    overlap = np.linalg.norm(pca.components_[:3] @ axes) ** 2  # 3 when the subspaces coincide
    assert overlap == pytest.approx(3.0, abs=1e-3)
    ref = PCA(n_components=k, svd_solver="full").fit(maps.reshape(len(maps), -1))
    np.testing.assert_allclose(pca.explained_variance_ratio_[:3], ref.explained_variance_ratio_[:3], rtol=1e-6)
    z = pca.transform(maps)
    np.testing.assert_allclose(np.abs(z[:, :3]), np.abs(ref.transform(maps.reshape(len(maps), -1))[:, :3]),
                               rtol=1e-4, atol=1e-4)
    assert z.dtype == np.float32 and np.allclose(z.mean(axis=0), 0.0, atol=1e-4)  # centred on the training mean


def test_map_pca_refuses_impossible_sizes():
    maps, _ = _planted(n=10)
    with pytest.raises(ConfigError, match="@pca11"):
        MapPCA(11).fit(maps)
    pca = MapPCA(2).fit(maps)
    with pytest.raises(ConfigError, match="fitted on 144"):
        pca.transform(np.zeros((2, 10)))


def test_pca_spec_parses_and_is_not_computed_image_by_image():
    spec = parse_layer_spec("block8@pca64")
    assert (spec.mode, spec.size, spec.fitted, spec.source, spec.spatial) == ("pca", 64, True, "block8@map", False)
    with pytest.raises(ConfigError, match="needs a size"):
        parse_layer_spec("block8@pca")
    from llmvem.embed.cache import compute_features

    net = load_backbone("timm:test_resnet", pretrained=False, image_size=32)
    images = ArrayImages(np.zeros((2, 16, 16, 3), dtype=np.uint8), ["a", "b"])
    with pytest.raises(ConfigError, match="fitted on training images"):
        compute_features(images, net, layers=["layer2@pca4"], device="cpu", show_progress=False)


def _noise_images(split: Split, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    arr = rng.integers(0, 256, split.images.array.shape, dtype=np.uint8)
    return Split(ArrayImages(arr, split.images.ids), split.responses)


def test_pca_spec_is_fitted_on_training_images_only(tmp_path):
    ds, _ = make_dataset(n_train=24, n_val=6, n_test=6)
    config = apply_overrides(RunConfig(), [f"cache_dir={tmp_path}", "backbone.device=cpu"])
    net = load_backbone("timm:test_resnet", pretrained=False, image_size=32)
    layers = ["layer2@pca5", "pooled"]
    clean = extract_split_features(config, ds, net, layers=layers, show_progress=False)
    assert set(clean["train"]) == {"layer2@pca5", "pooled"}  # the @map source is not returned
    assert clean["test"]["layer2@pca5"].shape == (6, 5)
    # the training rows are centred by the projection fitted on them (not on train + test)
    np.testing.assert_allclose(clean["train"]["layer2@pca5"].mean(axis=0), 0.0, atol=1e-3)
    fitted = sorted((tmp_path / "map_pca").glob("*.npz"))
    assert len(fitted) == 1

    poisoned = replace(ds, splits={**ds.splits, "val": _noise_images(ds.val, 1), "test": _noise_images(ds.test, 2)})
    again = extract_split_features(config, poisoned, net, layers=layers, show_progress=False)
    np.testing.assert_array_equal(again["train"]["layer2@pca5"], clean["train"]["layer2@pca5"])
    assert sorted((tmp_path / "map_pca").glob("*.npz")) == fitted  # same key: test/val are not part of the fit
    assert not np.allclose(again["test"]["layer2@pca5"], clean["test"]["layer2@pca5"])  # the rows do change
    # and the stored projection equals a fresh fit on the training maps alone (no cache involved)
    maps = extract_split_features(config, ds, net, layers=["layer2@map"], show_progress=False)["train"]["layer2@map"]
    np.testing.assert_allclose(MapPCA(5, seed=config.seed).fit(maps).transform(maps), clean["train"]["layer2@pca5"],
                               rtol=1e-4, atol=1e-4)

    other_train = replace(ds, splits={**ds.splits, "train": _noise_images(ds.train, 3)})
    extract_split_features(config, other_train, net, layers=layers, show_progress=False)
    assert len(list((tmp_path / "map_pca").glob("*.npz"))) == 2  # another training split, another fitted entry


def test_cli_embed_pca_is_fitted_on_the_listed_images_only(tmp_path, capsys, monkeypatch):
    import llmvem.data
    from llmvem.cli import main
    from llmvem.embed.cache import compute_features

    spec = "virtual:n_train=16,n_test=6,image_size=48,n_early=4,n_semantic=4"
    ds = llmvem.data.load_dataset(spec)
    listed = list(ds.train.images.ids)
    fit_file = tmp_path / "train.txt"
    fit_file.write_text("# the training images\n" + "\n".join(listed) + "\n\n")
    cache = tmp_path / "f.h5"
    args = ["embed", spec, "--images", "--backbone", "timm:test_resnet", "--random-init", "--layers",
            "pooled,layer2@pca4", "--cache", str(cache), "--device", "cpu", "--pca-fit-on", str(fit_file)]
    assert main([*args, "--pca-out", str(tmp_path / "a.npz")]) == 0
    out = capsys.readouterr().out
    assert "PCA fitted on: 16 of 22 images" in out and "layer2@pca4 4-d" in out
    a = np.load(tmp_path / "a.npz")
    assert a["layer2@pca4"].shape == (22, 4) and a["fit_on"].tolist() == [True] * 16 + [False] * 6
    assert list(a["image_ids"][:16]) == listed
    # the same projection as MapPCA fitted on the listed images' maps alone (the maps the run cached)
    from llmvem.embed.cache import FeatureCache

    net = load_backbone("timm:test_resnet", pretrained=False)
    maps = compute_features(ds.all_images(), net, layers=["pooled", "layer2@map"], cache=FeatureCache(cache), device="cpu",
                            show_progress=False)
    assert maps.n_cached == 22
    maps = maps.features["layer2@map"]
    np.testing.assert_allclose(a["layer2@pca4"], MapPCA(4, seed=0).fit(maps[:16]).transform(maps), rtol=1e-4,
                               atol=1e-4)
    # the other images replaced by noise: the listed rows and the fitted projection do not move
    noise = np.random.default_rng(5).integers(0, 256, (len(ds.test), 48, 48, 3), dtype=np.uint8)
    poisoned = replace(ds, splits={"train": ds.train,
                                   "test": Split(ArrayImages(noise, list(ds.test.images.ids)), ds.test.responses)})
    monkeypatch.setattr(llmvem.data, "load_dataset", lambda *a, **k: poisoned)
    assert main([*args, "--pca-out", str(tmp_path / "b.npz")]) == 0
    b = np.load(tmp_path / "b.npz")
    np.testing.assert_array_equal(b["layer2@pca4"][:16], a["layer2@pca4"][:16])
    assert not np.allclose(b["layer2@pca4"][16:], a["layer2@pca4"][16:])
    assert len(list((tmp_path / "map_pca").glob("*.npz"))) == 1  # one fitted projection, found again
    capsys.readouterr()
    # without --pca-fit-on a @pca layer is refused in one line naming the flag; an unknown name is refused too
    assert main(args[:-2]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--pca-fit-on" in err and "layer2@pca4" in err
    fit_file.write_text("no_such_image\n")
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "--pca-fit-on" in err and "no_such_image" in err
    assert main(["embed", "--help"]) == 0
    assert "--pca-fit-on train_images.txt" in capsys.readouterr().out
