"""Noise ceilings against hand-computed values and simulated data of known reliability."""

from __future__ import annotations

import numpy as np
import pytest

from llmvem.data.noise_ceiling import (
    algonauts_noise_ceiling,
    ncsnr,
    noise_ceiling_from_ncsnr,
    spearman_brown,
    split_half_noise_ceiling,
)
from llmvem.errors import DataValidationError


def simulate(n_images: int, n_repeats: int, n_voxels: int, var_signal: float, var_noise: float,
             seed: int = 0) -> np.ndarray:
    """Single trials (n_images, n_repeats, n_voxels) = signal per image + independent Gaussian noise."""
    rng = np.random.default_rng(seed)
    signal = rng.normal(0.0, np.sqrt(var_signal), size=(n_images, 1, n_voxels))
    noise = rng.normal(0.0, np.sqrt(var_noise), size=(n_images, n_repeats, n_voxels))
    return signal + noise


def reliability(var_signal: float, var_noise: float, n_repeats) -> float:
    """True fraction of the repeat-averaged variance that is signal: σs² / (σs² + σn² · mean(1/n))."""
    return var_signal / (var_signal + var_noise * float(np.mean(1.0 / np.asarray(n_repeats, dtype=float))))


# ------------------------------------------------------------------------------------- Algonauts formula
def test_algonauts_formula_worked_example():
    # ncsnr = 1 and A = B = C (as many test images shown 3, 2 and 1 times): NC = 1 / (1 + (1/3 + 1/2 + 1) / 3)
    expected = 1.0 / (1.0 + (1 / 3 + 1 / 2 + 1) / 3)
    assert expected == pytest.approx(0.620690, abs=1e-6)
    nc = noise_ceiling_from_ncsnr(np.array([1.0]), [3, 3, 2, 2, 1, 1])
    assert nc[0] == pytest.approx(expected, rel=1e-12)


def test_algonauts_formula_other_values():
    nc = noise_ceiling_from_ncsnr(np.array([0.0, 2.0, np.inf, 0.5]), [3] * 10)
    # ncsnr 2 with 3 repeats each: 4 / (4 + 1/3) = 12/13; ncsnr 0.5: 0.25 / (0.25 + 1/3) = 3/7
    np.testing.assert_allclose(nc, [0.0, 12 / 13, 1.0, 3 / 7], rtol=1e-12)


def test_algonauts_formula_rejects_bad_repeat_counts():
    with pytest.raises(DataValidationError, match="n_repeats"):
        noise_ceiling_from_ncsnr(np.array([1.0]), [3, 0])


# ------------------------------------------------------------------------------------------------ ncsnr
def test_ncsnr_hand_computed():
    # one voxel, images [1, 3] and [5, 7]: per-image variance (ddof=1) 2 and 2 -> noise 2;
    # variance of all trials [1, 3, 5, 7] (ddof=1) = 20/3 -> signal 20/3 - 2 = 14/3; ncsnr = sqrt(7/3)
    rep = np.array([[1.0, 3.0], [5.0, 7.0]])[:, :, None]
    assert ncsnr(rep)[0] == pytest.approx(np.sqrt(7 / 3), rel=1e-12)


def test_ncsnr_ignores_nan_padding_and_single_repeat_images():
    rep = np.array([[1.0, 3.0, np.nan], [5.0, 7.0, np.nan], [4.0, np.nan, np.nan]])[:, :, None]
    # noise from the two images with 2 repeats (2); total variance of [1, 3, 5, 7, 4] = 5 -> sqrt(3/2)
    assert ncsnr(rep)[0] == pytest.approx(np.sqrt((5.0 - 2.0) / 2.0), rel=1e-12)


def test_ncsnr_of_zscored_data_matches_nsd_definition():
    # z-scored single trials with noise variance 0.4 -> NSD's sqrt(1 - σ²) / σ = sqrt(0.6 / 0.4) = 1.2247
    rep = simulate(4000, 3, 8, var_signal=0.6, var_noise=0.4, seed=1)
    rep = (rep - rep.mean(axis=(0, 1))) / rep.std(axis=(0, 1))
    snr = ncsnr(rep)
    assert snr.shape == (8,)
    assert snr.mean() == pytest.approx(np.sqrt(0.6 / 0.4), rel=0.02)
    np.testing.assert_allclose(snr, np.sqrt(0.6 / 0.4), rtol=0.05)


def test_ncsnr_edge_cases():
    rep = simulate(50, 4, 3, 1.0, 1.0)
    rep[:, :, 1] = 0.0  # constant voxel: nothing to explain
    rep[:, 1:, 2] = np.nan  # voxel seen once per image: noise unknown
    snr = ncsnr(rep)
    assert snr[0] > 0 and snr[1] == 0.0 and np.isnan(snr[2])
    assert algonauts_noise_ceiling(rep[:, :, :2])[1] == 0.0
    with pytest.raises(DataValidationError, match="two or more repeats"):
        ncsnr(rep[:, :1, :])


def test_algonauts_noise_ceiling_matches_known_reliability_with_unequal_repeats():
    # a third of the images shown 3, 2 and 1 times (NaN padding), σs² = 0.3, σn² = 1
    rep = simulate(3000, 3, 10, var_signal=0.3, var_noise=1.0, seed=2)
    n_rep = np.repeat([3, 2, 1], 1000)
    for k in (1, 2):
        rep[n_rep <= k, k, :] = np.nan
    nc = algonauts_noise_ceiling(rep)
    expected = reliability(0.3, 1.0, n_rep)  # 0.3 / (0.3 + 0.6111) = 0.3293
    assert expected == pytest.approx(0.32927, abs=1e-4)
    assert nc.mean() == pytest.approx(expected, abs=0.02)
    assert np.all(np.abs(nc - expected) < 0.06)


# ----------------------------------------------------------------------------------------- split half
def test_spearman_brown_values():
    np.testing.assert_allclose(spearman_brown(np.array([0.5, 0.0, 1.0])), [2 / 3, 0.0, 1.0])
    assert spearman_brown(0.25, factor=3.0) == pytest.approx(0.75 / 1.5)


@pytest.mark.parametrize("n_repeats", [8, 7])
def test_split_half_matches_known_reliability(n_repeats):
    # σs² = 1, σn² = 4: reliability of the mean of 8 repeats 1/1.5 = 0.667, of 7 repeats 1/(1 + 4/7) = 0.636
    rep = simulate(800, n_repeats, 30, var_signal=1.0, var_noise=4.0, seed=3)
    nc = split_half_noise_ceiling(rep, n_splits=10, seed=0)
    expected = reliability(1.0, 4.0, [n_repeats])
    assert nc.shape == (30,)
    assert nc.mean() == pytest.approx(expected, abs=0.02)
    assert np.all(np.abs(nc - expected) < 0.1)


def test_split_half_with_nan_padding_agrees_with_algonauts_formula():
    rep = simulate(900, 10, 12, var_signal=0.5, var_noise=2.0, seed=4)
    n_rep = np.tile([6, 7, 8, 9, 10], 180)
    for i, n in enumerate(n_rep):
        rep[i, n:, :] = np.nan
    expected = reliability(0.5, 2.0, n_rep)  # 0.5 / (0.5 + 2 * mean(1/n)) = 0.6922
    split = split_half_noise_ceiling(rep, n_splits=10, seed=0)
    formula = algonauts_noise_ceiling(rep)
    assert split.mean() == pytest.approx(expected, abs=0.02)
    assert formula.mean() == pytest.approx(expected, abs=0.02)


def test_split_half_is_deterministic_and_clipped():
    rep = simulate(400, 4, 20, var_signal=0.0, var_noise=1.0, seed=5)  # pure noise: ceiling near 0, never < 0
    a = split_half_noise_ceiling(rep, n_splits=5, seed=7)
    np.testing.assert_array_equal(a, split_half_noise_ceiling(rep, n_splits=5, seed=7))
    assert (a >= 0).all() and (a == 0).any() and np.median(a) < 0.1 and a.max() < 0.3
    with pytest.raises(DataValidationError, match="fewer than 3 images"):
        split_half_noise_ceiling(rep[:2])
