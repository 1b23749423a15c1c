"""Property-based checks (hypothesis) of the metrics, RDMs and noise ceilings."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays

from llmvem.data.noise_ceiling import noise_ceiling_from_ncsnr
from llmvem.evaluate.metrics import noise_normalized_accuracy, pearson_r
from llmvem.evaluate.rsa import rdm

SETTINGS = settings(max_examples=40, deadline=None)

finite = st.floats(min_value=-1e3, max_value=1e3, allow_nan=False, allow_infinity=False)


@st.composite
def paired_columns(draw):
    n = draw(st.integers(min_value=3, max_value=25))
    v = draw(st.integers(min_value=1, max_value=4))
    y = draw(arrays(np.float64, (n, v), elements=finite))
    p = draw(arrays(np.float64, (n, v), elements=finite))
    # keep away from near-constant columns (relative to their magnitude), where r is dominated by rounding
    for a in (y, p):
        assume(np.all(a.std(0) > 1e-3 * (1.0 + np.abs(a).max(0))))
    return y, p


@SETTINGS
@given(paired_columns(), st.floats(-50, 50), st.floats(0.01, 100), st.floats(-50, 50), st.floats(0.01, 100))
def test_pearson_invariant_to_shift_and_positive_scale(yp, shift_y, scale_y, shift_p, scale_p):
    y, p = yp
    r = pearson_r(y, p)
    assert np.all(np.abs(r) <= 1.0)
    np.testing.assert_allclose(pearson_r(y * scale_y + shift_y, p * scale_p + shift_p), r, atol=1e-8)
    np.testing.assert_allclose(pearson_r(p, y), r, atol=1e-12)  # symmetric


@SETTINGS
@given(paired_columns(), st.floats(-100, -0.01), st.floats(-50, 50))
def test_pearson_flips_sign_for_negative_scale(yp, neg_scale, shift):
    y, p = yp
    np.testing.assert_allclose(pearson_r(y, p * neg_scale + shift), -pearson_r(y, p), atol=1e-8)
    np.testing.assert_allclose(pearson_r(y * neg_scale, p), -pearson_r(y, p), atol=1e-8)


@SETTINGS
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=st.floats(-1, 1)),
    arrays(np.float64, n, elements=st.floats(0, 1)))))
def test_noise_normalized_accuracy_bounds(r_nc):
    r, nc = r_nc
    acc = noise_normalized_accuracy(r, nc)
    assert acc.shape == r.shape
    assert np.all((acc >= 0) & (acc <= 100))
    assert np.all(acc[r <= 0] == 0)
    # monotone in r for a fixed ceiling
    order = np.argsort(r)
    same_nc = noise_normalized_accuracy(r[order], np.full(r.size, 0.5))
    assert np.all(np.diff(same_nc) >= 0)


@SETTINGS
@given(st.integers(2, 8).flatmap(lambda n: arrays(np.float64, (n, 6), elements=finite)))
def test_rdm_symmetric_zero_diagonal_in_range(patterns):
    assume(np.all(patterns.std(axis=1) > 1e-3))
    d = rdm(patterns)
    assert d.shape == (patterns.shape[0],) * 2
    np.testing.assert_array_equal(d, d.T)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    assert np.all((d >= 0) & (d <= 2))


@SETTINGS
@given(arrays(np.float64, st.integers(1, 20), elements=st.floats(0, 50)),
       st.lists(st.integers(1, 10), min_size=1, max_size=12))
def test_noise_ceiling_from_ncsnr_in_unit_interval_and_monotone(snr, repeats):
    nc = noise_ceiling_from_ncsnr(snr, repeats)
    assert np.all((nc >= 0) & (nc <= 1))
    order = np.argsort(snr, kind="stable")
    assert np.all(np.diff(nc[order]) >= 0)
    # more repeats per image (less noise in the average) never lowers the ceiling
    more = noise_ceiling_from_ncsnr(snr, [k + 1 for k in repeats])
    assert np.all(more >= nc - 1e-15)


# ------------------------------------------------------------------------------------ PCA of the voxel readout
@st.composite
def response_matrices(draw):
    n = draw(st.integers(min_value=2, max_value=12))
    v = draw(st.integers(min_value=1, max_value=10))
    return draw(arrays(np.float64, (n, v), elements=st.floats(-100, 100, allow_subnormal=False)))


@SETTINGS
@given(response_matrices(), st.floats(-50, 50))
def test_pca_round_trip_orthonormal_basis_and_explained_variance(y, shift):
    import torch

    from llmvem.model.readout import fit_pca

    n, v = y.shape
    k = min(n, v)
    mean, basis, var = (t.double().numpy() for t in fit_pca(torch.from_numpy(y), k))
    scale = 1.0 + np.abs(y).max()
    assert mean.shape == (v,) and basis.shape == (k, v) and var.shape == (k,)
    np.testing.assert_allclose(basis @ basis.T, np.eye(k), atol=1e-5)
    scores = (y - mean) @ basis.T
    np.testing.assert_allclose(scores @ basis + mean, y, atol=1e-5 * scale)  # all components: exact round trip
    assert np.all(var >= 0) and np.all(np.diff(var) <= 1e-5 * scale**2)  # sorted by explained variance
    np.testing.assert_allclose(scores.var(axis=0, ddof=1) if n > 1 else 0, var, atol=1e-4 * scale**2, rtol=1e-5)
    # sign convention: the largest absolute loading of every component is positive (where it is unique)
    top2 = np.sort(np.abs(basis), axis=1)[:, -2:] if v > 1 else np.c_[np.zeros(k), np.abs(basis)]
    clear = top2[:, 1] - top2[:, 0] > 1e-4
    assert np.all(basis[np.arange(k), np.abs(basis).argmax(axis=1)][clear] > 0)
    # keeping j components leaves exactly the variance of the others unexplained (Eckart–Young)
    for j in range(1, k + 1):
        resid = (y - mean) - ((y - mean) @ basis[:j].T) @ basis[:j]
        np.testing.assert_allclose((resid**2).sum() / max(n - 1, 1), var[j:].sum(), atol=1e-4 * scale**2,
                                   rtol=1e-4)
    # a shift of every response moves the mean only
    mean2, basis2, var2 = (t.double().numpy() for t in fit_pca(torch.from_numpy(y + shift), k))
    np.testing.assert_allclose(mean2, mean + shift, atol=1e-5 * (scale + abs(shift)))
    np.testing.assert_allclose(var2, var, atol=1e-4 * (scale + abs(shift)) ** 2, rtol=1e-4)


# ------------------------------------------------------------------------------ noise ceilings from repeats
@st.composite
def repeat_arrays(draw):
    """(n_images, n_repeats, n_voxels) single trials, NaN-padded where an image had fewer repeats."""
    n_img = draw(st.integers(3, 10))
    n_rep = draw(st.integers(2, 4))
    n_vox = draw(st.integers(1, 5))
    # values on a 0.01 grid: an affine change of units must not wipe out differences below the rounding
    rep = draw(arrays(np.float64, (n_img, n_rep, n_vox), elements=st.integers(-1000, 1000).map(lambda k: k / 100)))
    counts = draw(arrays(np.int64, n_img, elements=st.integers(1, n_rep)))
    counts[:3] = np.maximum(counts[:3], 2)  # at least 3 images with two repeats (needed by the split halves)
    rep[np.arange(n_rep)[None, :] >= counts[:, None]] = np.nan
    return rep


@SETTINGS
@given(repeat_arrays(), st.floats(0.1, 10), st.floats(-5, 5))
def test_noise_ceilings_from_random_repeats_are_fractions_and_unit_free(rep, scale, shift):
    from llmvem.data.noise_ceiling import algonauts_noise_ceiling, ncsnr, split_half_noise_ceiling

    snr = ncsnr(rep)
    nc = algonauts_noise_ceiling(rep)
    assert snr.shape == nc.shape == (rep.shape[2],)
    assert np.all(snr >= 0)  # never NaN here: every voxel has images with two repeats
    assert np.all((nc >= 0) & (nc <= 1))
    sh = split_half_noise_ceiling(rep, n_splits=3, seed=1)
    assert np.all((sh >= 0) & (sh <= 1))
    # the ceiling does not depend on the units of the responses (gain and baseline of each voxel), nor their sign
    gain = np.linspace(scale, 2 * scale, rep.shape[2])
    np.testing.assert_allclose(algonauts_noise_ceiling(rep * gain + shift), nc, atol=1e-6)
    np.testing.assert_allclose(algonauts_noise_ceiling(-rep), nc, atol=1e-6)


@SETTINGS
@given(repeat_arrays())
def test_noise_free_repeats_have_a_ceiling_of_one(rep):
    from llmvem.data.noise_ceiling import algonauts_noise_ceiling

    signal = rep[:, :1, :] + 25.0 * np.arange(rep.shape[0])[:, None, None]  # images differ
    exact = np.where(np.isnan(rep), np.nan, np.broadcast_to(signal, rep.shape))  # every repeat identical
    np.testing.assert_array_equal(algonauts_noise_ceiling(exact), 1.0)


# ------------------------------------------------------------------------- the Algonauts 2023 score's clipping
@SETTINGS
@given(st.integers(1, 30).flatmap(lambda n: st.tuples(
    arrays(np.float64, n, elements=st.floats(-1, 1)),
    arrays(np.float64, n, elements=st.floats(0, 1)))))
def test_noise_normalized_accuracy_is_r2_over_ceiling_clipped_to_0_100(r_nc):
    from llmvem.evaluate.metrics import NC_FLOOR

    r, nc = r_nc
    acc = noise_normalized_accuracy(r, nc)
    nc = np.where(nc == 0, NC_FLOOR, nc)  # a zero ceiling counts as a tiny one: any real correlation reaches it
    inside = (r > 0) & (r**2 < nc)
    np.testing.assert_allclose(acc[inside], 100 * r[inside] ** 2 / nc[inside], rtol=1e-12)
    assert np.all(acc[(r > 0) & (r**2 >= nc)] == 100.0)  # at or above the ceiling: clipped to 100
    assert np.all(acc[r <= 0] == 0.0)  # anti-correlated and uncorrelated voxels score 0, never negative


# ------------------------------------------------------------------------------------------ paired bootstrap
@SETTINGS
@given(st.integers(4, 12).flatmap(lambda n: st.integers(1, 4).flatmap(lambda v: st.tuples(
    arrays(np.float64, (n, v), elements=finite), arrays(np.float64, (n, v), elements=finite),
    arrays(np.float64, (n, v), elements=finite), arrays(np.float64, v, elements=st.floats(0.05, 1))))),
    st.integers(0, 2**31 - 1))
def test_paired_bootstrap_swapping_the_models_negates_the_difference(data, seed):
    from llmvem.evaluate.stats import paired_bootstrap

    y, a, b, nc = data
    for m in (y, a, b):
        assume(np.all(m.std(0) > 1e-3 * (1.0 + np.abs(m).max(0))))
    ab = paired_bootstrap(y, a, b, n_boot=40, seed=seed, noise_ceiling=nc)
    ba = paired_bootstrap(y, b, a, n_boot=40, seed=seed, noise_ceiling=nc)
    for metric in ("r", "accuracy"):
        x, z = ab["overall"][metric], ba["overall"][metric]
        assert (z["a"], z["b"]) == (x["b"], x["a"])
        assert z["diff"] == -x["diff"]
        assert z["p_value"] == pytest.approx(x["p_value"], abs=1e-12)
        assert z["ci_low"] == pytest.approx(-x["ci_high"], abs=1e-9)
        assert z["ci_high"] == pytest.approx(-x["ci_low"], abs=1e-9)
        assert x["ci_low"] <= x["ci_high"] and 0 < x["p_value"] <= 1
    r_a, r_b = pearson_r(y, a), pearson_r(y, b)
    ties = float(np.mean(r_a == r_b))
    assert ab["overall"]["fraction_improved"] + ba["overall"]["fraction_improved"] == pytest.approx(1 - ties)


@SETTINGS
@given(arrays(np.float64, st.integers(3, 10), elements=st.integers(-100, 100).map(lambda k: k / 10)),
       st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_split_half_ceiling_of_disagreeing_repeats_is_zero_for_odd_repeat_counts(x, n_splits, seed):
    """Repeats that contradict each other (x, -x) have no reliability, also when some image has 3 repeats (the
    Spearman–Brown factor is then above 2, which used to turn a split-half r of -1 into a ceiling of 1)."""
    from llmvem.data.noise_ceiling import split_half_noise_ceiling

    assume(np.any(x != 0))
    rep = np.full((x.size + 1, 3, 1), np.nan)
    rep[:-1, 0, 0], rep[:-1, 1, 0] = x, -x  # two repeats that disagree
    rep[-1, :, 0] = 0.0  # and one image with three (identical) repeats
    assert split_half_noise_ceiling(rep, n_splits=n_splits, seed=seed)[0] == 0.0
