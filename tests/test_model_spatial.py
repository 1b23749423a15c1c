"""Spatial readouts: the same predictions as neuralpredictors for the same weights, and they find what they model."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch.nn import functional as F

from llmvem.model.readout import PCAVoxelReadout
from llmvem.model.spatial import FactorizedReadout, FlatPlusSpatialReadout, GaussianReadout, map_shapes


def _maps(b: int, c: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(b, c, h, w, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("shape", [(6, 5, 7), (3, 9, 9)])  # H·W ≤ 64: one weight matrix; H·W > 64: masks first
def test_factorized_matches_neuralpredictors_full_factorized2d(shape):
    readouts = pytest.importorskip("neuralpredictors.layers.readouts")
    x = _maps(4, *shape)
    ours = FactorizedReadout(shape, 9, sparsity=0.3, seed=1)
    with torch.no_grad():
        ours.bias.copy_(torch.randn(9))
    ref = readouts.FullFactorized2d(shape, 9, bias=True, normalize=True, spatial_and_feature_reg_weight=0.3,
                                    mean_activity=torch.zeros(9))
    with torch.no_grad():
        ref.spatial.copy_(ours.spatial["map"])
        ref._features.copy_(ours.channels["map"])
        ref.bias.copy_(ours.bias)
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-5, atol=1e-5)
        # neuralpredictors 0.3.0 sums ‖m_v‖₁ ‖w_u‖₁ over all PAIRS of units (a keepdim broadcast in
        # FullFactorized2d.l1); ours is the per-unit penalty Σ_v ‖m_v‖₁ ‖w_v‖₁ — the same for one unit
        for v in range(9):
            one = readouts.FullFactorized2d(shape, 1, bias=False, spatial_and_feature_reg_weight=0.3)
            one.spatial.copy_(ours.spatial["map"][v: v + 1])
            one._features.copy_(ours.channels["map"][v: v + 1])
            solo = FactorizedReadout(shape, 1, sparsity=0.3)
            solo.spatial["map"].copy_(one.spatial)
            solo.channels["map"].copy_(one._features)
            torch.testing.assert_close(solo.regularizer(), one.regularizer(), rtol=1e-5, atol=1e-7)


def test_factorized_weight_matrix_and_mask_first_orders_agree_with_gradients():
    """The two evaluation orders of FactorizedReadout.forward: same outputs and same gradients."""
    x = _maps(8, 112, 7, 7)
    grads = []
    outs = []
    for limit in (64, 0):  # 7×7 = 49 positions: one (V, C·H·W) matrix, then forced mask-first
        ro = FactorizedReadout((112, 7, 7), 13, sparsity=0.1, seed=2, init_noise=1.0)
        ro.GEMM_MAX_POSITIONS = limit
        y = ro(x)
        (y.pow(2).sum() + ro.regularizer()).backward()
        outs.append(y.detach())
        grads.append([p.grad.clone() for p in ro.parameters()])
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-5, atol=1e-4)
    for a, b in zip(*grads, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("shape", [(5, 6, 8), (64, 3, 4)])  # H·W ≥ C: sample, then weight; H·W < C: the reverse
def test_gaussian_matches_neuralpredictors_full_gaussian2d(training, shape):
    readouts = pytest.importorskip("neuralpredictors.layers.readouts")
    c = shape[0]
    x = _maps(3, *shape)
    ours = GaussianReadout(shape, 11, init_mu_range=0.9, init_sigma=0.2, feature_l1=0.5, seed=2)
    with torch.no_grad():
        ours.features["map"].copy_(torch.randn(11, c))
        ours.bias.copy_(torch.randn(11))
    ref = readouts.FullGaussian2d(shape, 11, bias=True, gauss_type="isotropic", init_sigma=0.2,
                                  feature_reg_weight=0.5, mean_activity=torch.zeros(11))
    with torch.no_grad():
        ref._mu.copy_(ours.mu.view(1, 11, 1, 2))
        ref.sigma.copy_(ours.sigma.view(1, 11, 1, 1))
        ref._features.copy_(ours.features["map"].t().reshape(1, c, 1, 11))
        ref.bias.copy_(ours.bias)
    ours.train(training)
    ref.train(training)
    with torch.no_grad():
        torch.manual_seed(5)
        y_ours = ours(x)
        torch.manual_seed(5)
        y_ref = ref(x)
    torch.testing.assert_close(y_ours, y_ref, rtol=1e-5, atol=1e-5)  # in training: the same position draws
    torch.testing.assert_close(ours.regularizer(), ref.regularizer())


def test_gaussian_reads_the_map_at_its_position_and_chunks_units():
    x = _maps(2, 3, 5, 5)
    ro = GaussianReadout((3, 5, 5), 4, voxel_chunk=3).eval()
    with torch.no_grad():
        # align_corners: (-1, -1) is the top-left cell centre, (1, 0) the middle of the right edge
        ro.mu.copy_(torch.tensor([[-1.0, -1.0], [1.0, 0.0], [0.0, 0.0], [-0.5, 0.5]]))
        ro.features["map"].copy_(torch.eye(3)[[0, 1, 2, 0]])
        y = ro(x)
    torch.testing.assert_close(y[:, 0], x[:, 0, 0, 0])
    torch.testing.assert_close(y[:, 1], x[:, 1, 2, 4])
    torch.testing.assert_close(y[:, 2], x[:, 2, 2, 2])
    torch.testing.assert_close(y[:, 3], x[:, 0, 3, 1])  # y = 0.5 → row 3, x = -0.5 → column 1 on a 5-grid


def _planted(n: int, seed: int = 0):
    """Maps and responses of units that each read one channel at one place (what a Gaussian readout models)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 4, 7, 7, generator=g)
    x = F.avg_pool2d(x, 3, stride=1, padding=1)  # spatially smooth maps, like a CNN's
    rows, cols, chans = torch.tensor([1, 5, 3]), torch.tensor([2, 4, 6]), torch.tensor([0, 3, 1])
    y = x[:, chans, rows, cols] * torch.tensor([2.0, -1.5, 1.0]) + torch.tensor([0.5, 1.0, -1.0])
    return x, y + 0.05 * torch.randn(y.shape, generator=g), rows, cols


@pytest.mark.parametrize("kind", ["gaussian", "factorized"])
def test_spatial_readouts_learn_planted_units(kind):
    x, y, rows, cols = _planted(600)
    xt, yt, _, _ = _planted(200, seed=1)
    if kind == "gaussian":
        ro = GaussianReadout((4, 7, 7), 3, init_mu_range=0.5, init_sigma=0.3, seed=0)
        lr = 0.05
    else:
        ro = FactorizedReadout((4, 7, 7), 3, sparsity=1e-4, smoothness=1e-4, init_noise=0.1, seed=0)
        lr = 0.05
    ro.initialize(y)
    torch.testing.assert_close(ro.bias.detach(), y.mean(0))
    opt = torch.optim.Adam(ro.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(0)
    for _ in range(400):
        idx = torch.randint(0, 600, (64,), generator=gen)
        opt.zero_grad()
        loss = F.mse_loss(ro(x[idx]), y[idx]) + ro.regularizer() / 600
        loss.backward()
        opt.step()
    ro.eval()
    with torch.no_grad():
        pred = ro(xt)
    r = [np.corrcoef(pred[:, v].numpy(), yt[:, v].numpy())[0, 1] for v in range(3)]
    assert min(r) > 0.95, r
    if kind == "gaussian":
        found = ((ro.mu.detach() + 1) / 2 * 6).round()  # normalised → cell index (align_corners)
        torch.testing.assert_close(found[:, 0], cols.float())
        torch.testing.assert_close(found[:, 1], rows.float())
    else:
        peak = ro.mask().detach().abs().flatten(1).argmax(1)
        torch.testing.assert_close(peak, rows * 7 + cols)


def test_factorized_ridge_start_recovers_planted_rank_one_units():
    """The ridge start (dual form, penalty by leave-one-out error) keeps each unit's first singular pair: on
    units that ARE rank-1 per layer (a mask × channel weights, two layers) it predicts held-out images almost
    exactly before any training, where the random start predicts nothing."""
    shapes = {"a": (8, 5, 5), "b": (6, 5, 5)}
    truth = FactorizedReadout(shapes, 7, init_noise=1.0, seed=3)

    def data(n: int, seed: int) -> tuple[dict, torch.Tensor]:
        maps = {k: _maps(n, *s, seed=seed + i) for i, (k, s) in enumerate(shapes.items())}
        with torch.no_grad():
            y = truth(maps) + 0.1 * torch.randn(n, 7, generator=torch.Generator().manual_seed(seed + 9))
        return maps, y

    (x, y), (xt, yt) = data(400, 0), data(200, 100)
    ro = FactorizedReadout(shapes, 7, seed=1)
    frac = ro.initialize_from_ridge(x, y - y.mean(0))
    assert frac in FactorizedReadout.RIDGE_ALPHAS
    ro.initialize(y)  # the bias: the mean response
    with torch.no_grad():
        pred = ro(xt)
        for k in shapes:  # stored as used: unit-norm masks, the scale in the channel weights
            torch.testing.assert_close(ro.spatial[k].pow(2).sum(dim=(1, 2)), torch.ones(7))
        random_start = FactorizedReadout(shapes, 7, seed=1)(xt)
    r = [np.corrcoef(pred[:, v].numpy(), yt[:, v].numpy())[0, 1] for v in range(7)]
    assert min(r) > 0.99, r
    assert float((random_start - random_start.mean(0)).abs().max()) < 0.05  # ~0: the random start predicts nothing
    with pytest.raises(ValueError, match=r"targets: expected shape \(400, 7\)"):
        ro.initialize_from_ridge(x, y[:, :3])
    # beyond RIDGE_MAX_IMAGES: a seeded subset, the same start twice, still the planted units
    small = FactorizedReadout(shapes, 7, seed=1)
    small.RIDGE_MAX_IMAGES = 250
    again = FactorizedReadout(shapes, 7, seed=1)
    again.RIDGE_MAX_IMAGES = 250
    small.initialize_from_ridge(x, y - y.mean(0))
    again.initialize_from_ridge(x, y - y.mean(0))
    assert all(torch.equal(a, b) for a, b in zip(small.parameters(), again.parameters(), strict=True))
    assert not torch.equal(small.spatial["a"], ro.spatial["a"])  # not all 400 images
    small.initialize(y)
    with torch.no_grad():
        pred = small(xt)
    assert min(np.corrcoef(pred[:, v].numpy(), yt[:, v].numpy())[0, 1] for v in range(7)) > 0.9  # 250 images, 350 values


def test_several_layers_at_once_sum_per_layer_readouts():
    maps = {"block5@grid4": _maps(2, 6, 4, 4), "block9@map": _maps(2, 3, 7, 7, seed=1)}
    shapes = map_shapes(maps)
    assert shapes == {"block5@grid4": (6, 4, 4), "block9@map": (3, 7, 7)}
    for ro in (FactorizedReadout(shapes, 5, seed=3), GaussianReadout(shapes, 5, init_mu_range=0.8, seed=3)):
        ro.eval()
        with torch.no_grad():
            ro.bias.copy_(torch.arange(5.0))
            both = ro(maps)
            ro.bias.zero_()
            parts = []
            for k in maps:
                single = type(ro)(shapes[k], 5)
                single.eval()
                single.load_state_dict({n.replace(f".{k}", ".map"): p for n, p in ro.state_dict().items()
                                        if "." not in n or n.endswith(f".{k}")})
                parts.append(single(maps[k]))
        torch.testing.assert_close(both, parts[0] + parts[1] + torch.arange(5.0))
        with pytest.raises(ValueError, match="missing"):
            ro({"block5@grid4": maps["block5@grid4"]})


def test_factorized_penalties_prefer_sparse_smooth_masks():
    ro = FactorizedReadout((2, 6, 6), 2, sparsity=1.0, smoothness=0.0)
    with torch.no_grad():
        ro.channels["map"].fill_(1.0)
        ro.spatial["map"][0] = 0.0
        ro.spatial["map"][0, 2, 3] = 1.0  # one cell
        ro.spatial["map"][1] = 1.0  # everywhere
    sparse_one = (ro.mask()[0].abs().sum() * 2).item()
    assert sparse_one == pytest.approx(2.0, abs=1e-4)
    assert ro.regularizer().item() == pytest.approx(2.0 + 2 * 6.0, rel=1e-4)  # ‖m‖₁ = 36/6 for a flat unit mask
    ro.sparsity, ro.smoothness = 0.0, 1.0
    lap = ro.regularizer().item()
    with torch.no_grad():
        ro.spatial["map"][0] = 1.0
    assert ro.regularizer().item() < 1e-8 < lap  # flat masks are perfectly smooth; a single cell is not


def test_flat_plus_spatial_residual_in_pca_space():
    n, d, v = 40, 5, 6
    gen = torch.Generator().manual_seed(0)
    feats, maps, y = torch.randn(n, d, generator=gen), _maps(n, 3, 4, 4), torch.randn(n, v, generator=gen)
    flat = PCAVoxelReadout(d, v, n_components=v, voxel_loss="pca")
    combo = FlatPlusSpatialReadout(flat, GaussianReadout((3, 4, 4), v))
    combo.initialize(y)
    assert torch.count_nonzero(combo.spatial.bias) == 0
    combo.eval()
    with torch.no_grad():
        vox, latent = combo.forward_latent(feats, maps)
        torch.testing.assert_close(vox, flat(feats) + combo.spatial(maps))
        torch.testing.assert_close(latent, flat.encode(vox), rtol=1e-4, atol=1e-4)  # all components kept
    assert combo.loss(vox, y, latent) > 0
    with pytest.raises(ValueError, match="units"):
        FlatPlusSpatialReadout(flat, GaussianReadout((3, 4, 4), v + 1))
