"""Voxel readouts: PCA mapping exactness, loss spaces, the readout contract."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from llmvem.model.readout import LinearVoxelReadout, PCAVoxelReadout, default_pca_components, fit_pca


def _responses(n=30, v=50, rank=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    if rank is None:
        return torch.randn(n, v, generator=g) * 2 + 3
    return torch.randn(n, rank, generator=g) @ torch.randn(rank, v, generator=g) + 1.5


def test_default_components_follow_the_paper():
    assert default_pca_components(9000, 40000) == 2048
    assert default_pca_components(500, 300) == 300
    assert default_pca_components(120, 300) == 120


def test_pca_reconstructs_training_responses_exactly_with_all_components():
    y = _responses(30, 50)
    ro = PCAVoxelReadout(n_features=4, n_voxels=50, n_components=30)
    ro.initialize(y)
    rec = ro.decode(ro.encode(y))
    assert torch.allclose(rec, y, atol=1e-4)
    # basis is orthonormal
    assert torch.allclose(ro.basis @ ro.basis.t(), torch.eye(30), atol=1e-5)


def test_pca_with_fewer_components_keeps_the_top_variance_like_sklearn():
    from sklearn.decomposition import PCA

    y = _responses(40, 25, seed=3)
    mean, basis, var = fit_pca(y, 5)
    sk = PCA(n_components=5, svd_solver="full").fit(y.numpy().astype(np.float64))
    np.testing.assert_allclose(var.numpy(), sk.explained_variance_, rtol=1e-4)
    # same subspace (signs may differ): |cosine| of matched components is 1
    cos = np.abs(np.sum(basis.numpy() * sk.components_, axis=1))
    np.testing.assert_allclose(cos, 1.0, atol=1e-4)
    np.testing.assert_allclose(mean.numpy(), y.numpy().mean(0), atol=1e-5)


def test_low_rank_responses_are_exact_with_rank_plus_one_components():
    y = _responses(60, 40, rank=4)
    ro = PCAVoxelReadout(n_features=3, n_voxels=40, n_components=4)
    ro.initialize(y)
    assert torch.allclose(ro.decode(ro.encode(y)), y, atol=1e-4)


def test_pca_sign_convention_is_deterministic():
    y = _responses(20, 15, seed=1)
    _, b1, _ = fit_pca(y, 5)
    _, b2, _ = fit_pca(y.clone(), 5)
    assert torch.equal(b1, b2)
    assert (b1.gather(1, b1.abs().argmax(1, keepdim=True)) > 0).all()


def test_forward_is_head_then_basis_plus_mean():
    torch.manual_seed(0)
    y = _responses(30, 12)
    ro = PCAVoxelReadout(n_features=6, n_voxels=12, n_components=8)
    ro.initialize(y)
    x = torch.randn(5, 6)
    expected = ro.head(x) @ ro.basis + ro.mean
    assert torch.allclose(ro(x), expected, atol=1e-6)
    assert ro(x).shape == (5, 12)


def test_voxel_and_pca_loss_agree_up_to_scale_when_targets_lie_in_the_span():
    torch.manual_seed(0)
    y = _responses(30, 50)
    x = torch.randn(30, 7)
    vox = PCAVoxelReadout(7, 50, 30, voxel_loss="voxel")
    vox.initialize(y)
    pca = PCAVoxelReadout(7, 50, 30, voxel_loss="pca")
    pca.load_state_dict(vox.state_dict())
    with torch.no_grad():
        pred_v, lat_v = vox.forward_latent(x)
        pred_p, lat_p = pca.forward_latent(x)
        loss_v = vox.loss(pred_v, y, lat_v)
        loss_p = pca.loss(pred_p, y, lat_p)
    # orthonormal basis: summed squared errors are equal, means differ by n_voxels / n_components
    assert float(loss_v * 50) == pytest.approx(float(loss_p * 30), rel=1e-4)
    with pytest.raises(ValueError, match="latent"):
        pca.loss(pred_p, y, None)


def test_linear_readout_starts_at_the_mean_and_regularizer_is_half_l2():
    y = _responses(30, 9)
    ro = LinearVoxelReadout(4, 9, l2=0.5)
    ro.initialize(y)
    with torch.no_grad():
        ro.linear.weight.zero_()
    assert torch.allclose(ro(torch.randn(3, 4)), y.mean(0).expand(3, 9), atol=1e-6)
    with torch.no_grad():
        ro.linear.weight.fill_(2.0)
    assert ro.regularizer().item() == pytest.approx(0.5 * 0.5 * 4.0 * 36)


def test_fit_pca_rejects_bad_shapes():
    with pytest.raises(ValueError, match="n_components=40"):
        fit_pca(torch.randn(10, 30), 40)
    with pytest.raises(ValueError, match="shape"):
        fit_pca(torch.randn(10), 2)


# ------------------------------------------------------------------ the memory-bounded (Gram) path
def _spectrum_responses(n, v, seed=0):
    """Responses with a decaying spectrum (as brain data have) plus an offset, float32."""
    g = torch.Generator().manual_seed(seed)
    r = min(n, v)
    scales = torch.logspace(1, -1, r)
    return ((torch.randn(n, r, generator=g) * scales) @ torch.linalg.qr(torch.randn(v, r, generator=g))[0].t()
            + 2.0).float()


def _principal_cosines(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosines of the principal angles between the row spaces of two orthonormal bases (k, v)."""
    return torch.linalg.svdvals(a.double() @ b.double().t())


@pytest.mark.parametrize("n,v,k", [(120, 400, 40), (120, 400, 120), (400, 90, 30), (400, 90, 90), (60, 60, 60)])
def test_gram_path_matches_the_exact_svd(n, v, k):
    y = _spectrum_responses(n, v, seed=n + v)
    m_svd, b_svd, var_svd = fit_pca(y, k, method="svd")
    m_gram, b_gram, var_gram = fit_pca(y, k, method="gram")
    assert b_gram.dtype == torch.float32 and b_gram.shape == (k, v)
    np.testing.assert_allclose(m_gram.numpy(), m_svd.numpy(), atol=1e-5)
    # explained variance within 1e-3 (relative to the first component's) and the same subspace
    assert float((var_gram - var_svd).abs().max() / var_svd[0]) < 1e-3
    rank = min(n - 1, v)  # the centred data have rank n - 1 at most
    kept = min(k, rank)
    cos = _principal_cosines(b_gram[:kept], b_svd[:kept])
    assert float(cos.min()) > 1 - 1e-4
    # orthonormal rows (the completion beyond the rank included), and the sign convention of the SVD path
    np.testing.assert_allclose((b_gram.double() @ b_gram.double().t()).numpy(), np.eye(k), atol=1e-4)
    assert (b_gram.gather(1, b_gram.abs().argmax(1, keepdim=True)) > 0).all()
    # well-separated leading components agree one by one, signs included
    np.testing.assert_allclose(b_gram[:5].numpy(), b_svd[:5].numpy(), atol=1e-3)


def test_gram_path_reconstructs_low_rank_responses_and_is_deterministic():
    y = _responses(80, 300, rank=6)
    ro = PCAVoxelReadout(n_features=3, n_voxels=300, n_components=6)
    mean, basis, _ = fit_pca(y, 6, method="gram")
    ro.mean.copy_(mean)
    ro.basis.copy_(basis)
    assert torch.allclose(ro.decode(ro.encode(y)), y, atol=1e-3)
    assert torch.equal(fit_pca(y.clone(), 6, method="gram")[1], basis)


def test_auto_takes_the_exact_svd_on_small_data_and_the_gram_path_beyond(monkeypatch):
    import llmvem.model.readout as readout

    y = _spectrum_responses(50, 70)
    calls = []
    monkeypatch.setattr(readout, "_pca_gram", lambda *a: calls.append("gram") or readout._pca_svd(*a))
    fit_pca(y, 10)
    assert calls == []
    monkeypatch.setattr(readout, "EXACT_SVD_BYTES", 8 * 50 * 70 - 1)
    fit_pca(y, 10)
    assert calls == ["gram"]
    with pytest.raises(ValueError, match="method"):
        fit_pca(y, 10, method="eig")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gram_path_on_cuda_matches_the_cpu():
    y = _spectrum_responses(150, 500)
    _, b_cpu, var_cpu = fit_pca(y, 30, method="gram")
    _, b_gpu, var_gpu = fit_pca(y.cuda(), 30, method="gram")
    assert b_gpu.is_cuda
    assert float(_principal_cosines(b_gpu.cpu(), b_cpu).min()) > 1 - 1e-4
    assert float((var_gpu.cpu() - var_cpu).abs().max() / var_cpu[0]) < 1e-3
