"""The virtual brain: determinism, shapes, descriptions and the ground truth it reports."""

from __future__ import annotations

import numpy as np
import pytest

from llmvem.data import load_dataset
from llmvem.data.noise_ceiling import algonauts_noise_ceiling, split_half_noise_ceiling
from llmvem.data.virtual_brain import CATEGORIES, COLOURS, make_virtual_brain
from llmvem.errors import DataValidationError


@pytest.fixture(scope="module")
def brain():
    return make_virtual_brain(n_train=120, n_test=40, image_size=48, n_early=40, n_semantic=30, seed=3)


def test_shapes_rois_and_hemispheres(brain):
    assert len(brain.train) == 120 and len(brain.test) == 40
    assert brain.train.responses.shape == (120, 70) and brain.train.responses.dtype == np.float32
    assert brain.test.repeats.shape == (40, 3, 70)
    assert brain.roi_masks["early_visual"].sum() == 40 and brain.roi_masks["semantic"].sum() == 30
    per_cat = sum(brain.roi_masks[f"semantic_{c}"].sum() for c in CATEGORIES)
    assert per_cat == 30
    assert set(brain.hemisphere) == {"lh", "rh"} and (brain.hemisphere == "lh").sum() == 35
    assert brain.train.images.load(0).size == (48, 48)


def test_same_seed_same_brain_and_other_seed_differs(brain):
    again = make_virtual_brain(n_train=120, n_test=40, image_size=48, n_early=40, n_semantic=30, seed=3)
    np.testing.assert_array_equal(again.train.responses, brain.train.responses)
    np.testing.assert_array_equal(again.train.images.load_array(5), brain.train.images.load_array(5))
    assert again.train.images.content_hashes() == brain.train.images.content_hashes()
    other = make_virtual_brain(n_train=120, n_test=40, image_size=48, n_early=40, n_semantic=30, seed=4)
    assert not np.allclose(other.train.responses, brain.train.responses)


def test_descriptions_name_the_scene_content(brain):
    scenes = brain.meta["ground_truth"]["scenes"]
    for i, img_id in enumerate(brain.train.images.ids[:30]):
        text = brain.captions[img_id][0]
        for obj in scenes[i].objects:
            assert obj.category in text and obj.colour in text and obj.size in text
        assert text.endswith("background.")


def test_lh_receptive_fields_are_in_the_right_visual_field(brain):
    gt = brain.meta["ground_truth"]
    early = brain.roi_masks["early_visual"]
    x = gt["rf_centre"][:, 0]
    assert (x[brain.hemisphere[early] == "lh"] >= 0.5).all()
    assert (x[brain.hemisphere[early] == "rh"] <= 0.5).all()


def test_semantic_voxels_follow_their_preferred_category(brain):
    gt = brain.meta["ground_truth"]
    content = gt["content"]
    signal = gt["signal"]
    sem = np.flatnonzero(brain.roi_masks["semantic"])
    # The noise-free signal of a semantic voxel correlates best with the count of its preferred category.
    corr = np.array([[np.corrcoef(signal[:, v], content[:, k])[0, 1] for k in range(len(CATEGORIES))] for v in sem])
    assert (corr.argmax(axis=1) == gt["preferred_category"][sem]).mean() > 0.9
    assert content.shape[1] == len(CATEGORIES) + len(COLOURS) + 2 + 5


def test_noise_ceiling_matches_empirical_estimates():
    ds = make_virtual_brain(n_train=20, n_test=600, image_size=24, n_early=30, n_semantic=30, n_repeats=4, seed=1)
    true_nc = ds.noise_ceiling
    # Algonauts 2023 ncsnr formula on the test repeats.
    algo = algonauts_noise_ceiling(ds.test.repeats)
    assert np.abs(algo - true_nc).mean() < 0.04
    # Split-half with Spearman–Brown: reliability of a 4-repeat mean from 2 + 2 halves.
    sh = split_half_noise_ceiling(ds.test.repeats, n_splits=10, seed=0)
    assert np.abs(sh - true_nc).mean() < 0.05
    assert np.corrcoef(sh, true_nc)[0, 1] > 0.9


def test_responses_are_signal_plus_noise_of_reported_size(brain):
    gt = brain.meta["ground_truth"]
    residual = brain.train.repeats - gt["signal"][:120, None, :]
    sd = residual.reshape(-1, 70).std(axis=0)
    np.testing.assert_allclose(sd, gt["noise_sd"], rtol=0.15)


def test_spec_string_and_bad_options():
    ds = load_dataset("virtual:n_train=30,n_test=10,image_size=24,n_early=5,n_semantic=5,seed=2", val_fraction=0.2)
    assert len(ds.train) == 24 and len(ds.val) == 6 and len(ds.test) == 10
    with pytest.raises(DataValidationError, match="image_size"):
        make_virtual_brain(image_size=50)
    with pytest.raises(DataValidationError, match="unknown option .n_pixels"):
        load_dataset("virtual:n_pixels=3")


def test_relational_voxels_are_an_added_population_that_changes_nothing_else():
    from llmvem.data.virtual_brain import RELATIONAL_NAMES

    base = make_virtual_brain(n_train=40, n_test=10, n_early=6, n_semantic=6, seed=5)
    ds = make_virtual_brain(n_train=40, n_test=10, n_early=6, n_semantic=6, seed=5, n_relational=8)
    assert ds.n_voxels == 20 and int(ds.roi_masks["relational"].sum()) == 8
    assert not (ds.roi_masks["relational"] & (ds.roi_masks["semantic"] | ds.roi_masks["early_visual"])).any()
    for s in ("train", "test"):  # the other voxels, their hemispheres and ceilings are untouched
        np.testing.assert_array_equal(ds.splits[s].responses[:, :12], base.splits[s].responses)
    np.testing.assert_array_equal(ds.hemisphere[:12], base.hemisphere)
    np.testing.assert_array_equal(ds.noise_ceiling[:12], base.noise_ceiling)
    gt = ds.meta["ground_truth"]
    assert gt["relational"].shape == (50, len(RELATIONAL_NAMES)) == (50, 17)
    # the noise-free signal of a relational voxel is its weights applied to the relational vector (z-scored)
    raw = gt["relational"] @ gt["relational_weights"].T
    z = (raw - raw.mean(0)) / raw.std(0)
    np.testing.assert_allclose(gt["signal"][:, 12:], z, atol=1e-5)
    assert ((gt["relational_weights"] == 1.0).sum(axis=1) == 2).all()


def test_relational_vector_reads_the_scene():
    from llmvem.data.virtual_brain import Scene, SceneObject

    scene = Scene([SceneObject("circle", "red", "small", 0.1, 0.9), SceneObject("circle", "blue", "large", 0.5, 0.5)],
                  "plain", "green", 0.0, 4.0)
    v = scene.relational_vector()
    assert v[0] == 2 and v[1] == 1 and v[2] == 0 and v[3] == 0 and v[4] == 1 and v[5] == 1 and v[6] == 1
    assert v[7:].sum() == 0  # one category only: no pair
    assert "lower left" in scene.description() and "centre" in scene.description()
