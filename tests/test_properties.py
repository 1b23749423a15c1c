"""Property-based checks (hypothesis) of the metrics, RDMs and noise ceilings."""

from __future__ import annotations

import numpy as np
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
