"""RSA: RDMs, condensed form, RDM comparison, Algonauts 2019 score, leave-one-subject-out ceiling."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import needs_shared
from scipy import stats
from scipy.spatial.distance import pdist, squareform

from llmvem.errors import DataValidationError
from llmvem.evaluate.rsa import (
    algonauts2019_score,
    compare_rdms,
    leave_one_subject_out_ceiling,
    rdm,
    upper,
)


def test_rdm_is_correlation_distance():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 20))
    d = rdm(x)
    np.testing.assert_allclose(d, squareform(pdist(x, metric="correlation")), atol=1e-12)
    np.testing.assert_array_equal(np.diag(d), 0.0)
    np.testing.assert_array_equal(d, d.T)


def test_rdm_hand_values():
    x = np.array([[1.0, 2.0, 3.0], [2.0, 4.0, 6.0], [3.0, 2.0, 1.0]])
    np.testing.assert_allclose(rdm(x), [[0, 0, 2], [0, 0, 2], [2, 2, 0]], atol=1e-12)


def test_rdm_of_feature_maps_keeps_where_things_are():
    rng = np.random.default_rng(3)
    maps = rng.standard_normal((4, 3, 5, 5))
    maps[1] = maps[0][:, ::-1, :]  # the same features, mirrored top to bottom
    d = rdm(maps)
    np.testing.assert_allclose(d, squareform(pdist(maps.reshape(4, -1), metric="correlation")), atol=1e-12)
    assert d[0, 1] > 0.5  # the map tells the mirrored image apart ...
    assert rdm(maps.mean(axis=(2, 3)))[0, 1] == pytest.approx(0.0, abs=1e-12)  # ... the pooled vector cannot


def test_rdm_rejects_constant_rows_and_bad_shapes():
    with pytest.raises(DataValidationError, match=r"stimulus rows \[1\] are constant"):
        rdm(np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]]))
    with pytest.raises(DataValidationError, match="patterns: expected shape"):
        rdm(np.zeros(5))


def test_upper_is_squareform_order():
    rng = np.random.default_rng(1)
    d = squareform(rng.random(10))  # 5 × 5
    np.testing.assert_array_equal(upper(d), squareform(d))
    np.testing.assert_array_equal(upper(np.arange(9.0).reshape(3, 3)), [1.0, 2.0, 5.0])
    with pytest.raises(DataValidationError, match="square matrix"):
        upper(np.zeros((3, 4)))


def test_compare_rdms_matches_scipy_square_and_condensed():
    rng = np.random.default_rng(2)
    a = rdm(rng.standard_normal((12, 30)))
    b = rdm(rng.standard_normal((12, 30)) + 0.0)
    b = (a + 0.5 * b) / 1.5
    ref = stats.spearmanr(squareform(a, checks=False), squareform(b, checks=False))[0]
    assert compare_rdms(a, b) == pytest.approx(ref, abs=1e-12)
    assert compare_rdms(upper(a), b) == pytest.approx(ref, abs=1e-12)  # mixed forms
    assert compare_rdms(a, b, method="pearson") == pytest.approx(
        stats.pearsonr(upper(a), upper(b))[0], abs=1e-12)
    # ties get average ranks, as in scipy
    u, v = np.array([1.0, 1.0, 2.0, 3.0, 3.0, 4.0]), np.array([2.0, 1.0, 2.0, 5.0, 4.0, 4.0])
    assert compare_rdms(u, v) == pytest.approx(stats.spearmanr(u, v)[0], abs=1e-12)
    assert compare_rdms(u, -u) == pytest.approx(-1.0)


def test_compare_rdms_errors():
    with pytest.raises(DataValidationError, match="expected 6 dissimilarities"):
        compare_rdms(np.arange(6.0), np.arange(10.0))
    with pytest.raises(DataValidationError, match="n \\(n - 1\\) / 2"):
        compare_rdms(np.arange(5.0), np.arange(5.0))
    with pytest.raises(DataValidationError, match="method"):
        compare_rdms(np.arange(3.0), np.arange(3.0), method="kendall")


def test_algonauts2019_score_hand_value():
    model = np.array([1.0, 2.0, 3.0, 4.0, 5.0, 6.0])
    subjects = np.stack([model, model[::-1], np.array([1.0, 3.0, 2.0, 4.0, 6.0, 5.0])])
    rho = [1.0, -1.0, stats.spearmanr(model, subjects[2])[0]]  # 1, -1, 0.8857...
    expected = 100 * np.mean(np.square(rho)) / 0.5
    assert algonauts2019_score(model, subjects, 0.5) == pytest.approx(expected)
    assert algonauts2019_score(squareform(model), np.stack([squareform(s) for s in subjects]), 0.5) == \
        pytest.approx(expected)
    with pytest.raises(DataValidationError, match="noise_ceiling_r2"):
        algonauts2019_score(model, subjects, 0.0)
    with pytest.raises(DataValidationError, match="model_rdm: expected 6"):
        algonauts2019_score(np.arange(10.0), subjects, 0.5)


def test_leave_one_subject_out_ceiling_hand_and_bounds():
    s = np.array([[1.0, 2.0, 3.0, 4.0, 5.0, 6.0], [1.0, 2.0, 3.0, 4.0, 6.0, 5.0], [2.0, 1.0, 3.0, 4.0, 5.0, 6.0]])
    lower, upper_ = leave_one_subject_out_ceiling(s)
    lo_ref = np.mean([stats.spearmanr(s[i], np.delete(s, i, 0).mean(0))[0] for i in range(3)])
    up_ref = np.mean([stats.spearmanr(s[i], s.mean(0))[0] for i in range(3)])
    assert lower == pytest.approx(lo_ref) and upper_ == pytest.approx(up_ref)
    assert lower < upper_ <= 1.0
    # identical subjects: both bounds are 1
    assert leave_one_subject_out_ceiling(np.stack([s[0]] * 4)) == pytest.approx((1.0, 1.0))
    with pytest.raises(DataValidationError, match="at least 2 subjects"):
        leave_one_subject_out_ceiling(s[:1])


@pytest.mark.shared_data
def test_kriegeskorte92_human_it():
    """Kriegeskorte et al. 2008: 4 human IT subjects, reference model RDMs and the published monkey IT RDM."""
    from scipy.io import loadmat

    folder = needs_shared("kriegeskorte92")
    brain = loadmat(folder / "92_brainRDMs.mat")["RDMs"]
    subjects = np.stack([(brain[0, i, 0]["RDM"] + brain[0, i, 1]["RDM"]) / 2 for i in range(4)])
    assert subjects.shape == (4, 92, 92)
    lower, upper_ = leave_one_subject_out_ceiling(subjects)
    assert lower == pytest.approx(0.3786, abs=1e-3)
    assert upper_ == pytest.approx(0.6607, abs=1e-3)

    models = loadmat(folder / "92_modelRDMs.mat")["Models"][0]
    by_name = {str(m["name"][0]): m["RDM"] for m in models}
    mean_hit = subjects.mean(0)
    # categorical (animacy) structure dominates human IT; a V1 model barely relates to it
    assert compare_rdms(by_name["animacy"], mean_hit) == pytest.approx(0.588, abs=2e-3)
    assert compare_rdms(by_name["V1"], mean_hit) < 0.1
    score = algonauts2019_score(by_name["animacy"], subjects, lower**2)
    assert score > algonauts2019_score(by_name["HMAX"], subjects, lower**2)

    # the supplementary condensed RDMs are in squareform order: the monkeyIT model equals the figure-1 mIT RDM
    fig1 = loadmat(folder / "Kriegeskorte_Neuron2008_supplementalData.mat")["RDMs_mIT_hIT_fig1"][0]
    m_it = np.asarray(fig1[0]["RDM"], dtype=np.float64).ravel()
    h_it = np.asarray(fig1[1]["RDM"], dtype=np.float64).ravel()
    assert compare_rdms(by_name["monkeyIT"], m_it) == pytest.approx(1.0)
    assert compare_rdms(m_it, h_it) == pytest.approx(0.4389, abs=1e-3)
