"""Voxel readouts: image features in, one predicted response per voxel out.

Every readout follows one contract (as in neuralpredictors): ``forward(features)`` maps features of shape
(batch, n_features) to responses of shape (batch, n_voxels); ``regularizer()`` is a scalar penalty the trainer
adds to the loss; ``initialize(train_responses)`` sets what is fitted in closed form from the training responses
before gradient descent starts (the PCA basis, the response mean). ``forward_latent(features)`` also returns
the readout's latent prediction (PCA scores) and ``loss(voxels, targets, latent)`` is the voxel loss in the
readout's own target space.

:class:`PCAVoxelReadout` is the paper's voxel mapping: the training responses are reduced by PCA, a linear head
predicts the component scores and the fixed basis maps them back to voxels (plus the mean). With
``voxel_loss="pca"`` the MSE is taken between predicted and true component scores, otherwise between voxel
responses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
import torch
from torch import nn

__all__ = ["EXACT_SVD_BYTES", "LatentTargets", "LinearVoxelReadout", "PCAVoxelReadout", "Readout",
           "default_pca_components", "fit_pca"]


def default_pca_components(n_train: int, n_voxels: int, cap: int = 2048) -> int:
    """Number of PCA components used when the config leaves it unset: ``min(cap, n_train, n_voxels)``."""
    return int(min(cap, n_train, n_voxels))


#: Bytes of the float64 copy of a response matrix below which :func:`fit_pca` (``method="auto"``) takes the exact
#: SVD, the path of earlier versions (small data keep their figures to the last digit); above it, the Gram path.
EXACT_SVD_BYTES = 64 * 2**20

#: Bytes of float64 scratch one block of responses may use in the Gram path.
_PCA_BLOCK_BYTES = 64 * 2**20


def fit_pca(responses: torch.Tensor, n_components: int, method: Literal["auto", "svd", "gram"] = "auto"
            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of a response matrix: mean, orthonormal basis and explained variance of the top components.

    Two paths with the same result (the subspace and the variances; float rounding aside, and with the signs
    fixed as below; ``tests/test_model_readout.py`` checks them against each other):

    - ``"svd"``: the exact SVD of the centred data in float64 (float64 copy, centred copy, U and Vᵀ: about
      5 × the float64 matrix). For small data.
    - ``"gram"``: the eigendecomposition of the smaller Gram matrix of the centred data — images × images,
      ``Yc Ycᵀ``, when there are fewer images than voxels, else voxels × voxels — accumulated in float64 over
      blocks of voxels (BLAS ``dsyrk`` on the CPU), only its top ``n_components`` eigenpairs computed, then the
      basis ``diag(1/s) Uᵀ Yc`` block by block and stored in float32. Extra memory: the Gram matrix (8 n²
      bytes), the basis (4 k v bytes), ``U`` (8 n k bytes) and one block of 64 MiB; the responses are never
      copied whole. At NSD size (7,971 × 39,548, k = 2,048) that is ≈ 1 GB beside the 1.26 GB of responses,
      against ≈ 10 GB for the SVD, and ~10× faster.

    ``"auto"`` takes the SVD while the float64 matrix is under :data:`EXACT_SVD_BYTES`, else the Gram path.

    Parameters
    ----------
    responses : tensor of shape (n_samples, n_voxels)
        Any float dtype, on any device (the work runs there; the eigendecomposition of a CPU Gram matrix uses
        SciPy's subset solver, which computes only the top ``n_components``).
    n_components : int
        At most ``min(n_samples, n_voxels)``.
    method : {"auto", "svd", "gram"}

    Returns
    -------
    mean : tensor of shape (n_voxels,), float32
    basis : tensor of shape (n_components, n_voxels), float32
        Orthonormal rows, in order of decreasing explained variance, with a deterministic sign (the largest
        absolute loading of each component is positive). Components beyond the rank of the centred data (zero
        variance) are orthonormal completions.
    explained_variance : tensor of shape (n_components,), float32
        Variance of the training responses along each component.
    """
    if responses.ndim != 2:
        raise ValueError(f"responses: expected shape (n_samples, n_voxels), got {tuple(responses.shape)}")
    n, v = responses.shape
    if not 1 <= n_components <= min(n, v):
        raise ValueError(f"n_components={n_components}: expected 1..min(n_samples={n}, n_voxels={v})")
    if method not in ("auto", "svd", "gram"):
        raise ValueError(f"method: expected 'auto', 'svd' or 'gram', got {method!r}")
    if method == "svd" or (method == "auto" and 8 * n * v <= EXACT_SVD_BYTES):
        mean, basis, var = _pca_svd(responses.detach(), n_components)
    else:
        mean, basis, var = _pca_gram(responses.detach(), n_components)
    return mean.float(), _fix_signs(basis.float()).contiguous(), var.float()


def _pca_svd(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    y = y.to(torch.float64)
    n = y.shape[0]
    mean = y.mean(dim=0)
    _, s, vh = torch.linalg.svd(y - mean, full_matrices=False)
    return mean, vh[:k], s[:k] ** 2 / max(n - 1, 1)


def _top_eigh(gram: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ``k`` largest eigenvalues (descending, clamped at 0) and their eigenvectors of a symmetric float64
    matrix; on the CPU with SciPy's subset driver (computes only those k, and ~4× faster than torch's here)."""
    m = gram.shape[0]
    if gram.device.type == "cpu":
        import scipy.linalg

        # .T: the Fortran-ordered view of the symmetric matrix, so LAPACK works in place without a copy
        lam, vec = scipy.linalg.eigh(gram.numpy().T, subset_by_index=[m - k, m - 1], driver="evr",
                                     overwrite_a=True, check_finite=False)
        _reverse_columns(vec)  # descending, in place: no second (m, k) float64 copy
        return torch.from_numpy(lam[::-1].copy()).clamp_min(0.0), torch.from_numpy(vec)
    lam_t, vec_t = torch.linalg.eigh(gram)
    lam_t, vec_t = lam_t[m - k:], vec_t[:, m - k:]
    return lam_t.flip(0).clamp_min(0.0), vec_t.flip(1)


def _reverse_columns(a: np.ndarray) -> None:
    """Reverse the column order of a 2-D array in place, one column pair at a time."""
    k = a.shape[1]
    tmp = np.empty(a.shape[0], dtype=a.dtype)
    for j in range(k // 2):
        tmp[:] = a[:, j]
        a[:, j] = a[:, k - 1 - j]
        a[:, k - 1 - j] = tmp


def _pca_gram(y: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    n, v = y.shape
    dev = y.device
    f64 = torch.float64
    col_step = max(1, _PCA_BLOCK_BYTES // (8 * n))
    cols = [slice(s, min(s + col_step, v)) for s in range(0, v, col_step)]
    mean = torch.empty(v, dtype=f64, device=dev)
    for sl in cols:
        mean[sl] = y[:, sl].to(f64).mean(dim=0)

    def centred(rows: slice, sl: slice) -> torch.Tensor:
        return y[rows, sl].to(f64).sub_(mean[sl])  # one float64 copy of the block, centred in place

    everything = slice(0, n)
    if n > v:  # voxels × voxels covariance: its eigenvectors are the basis
        cov = torch.zeros(v, v, dtype=f64, device=dev)
        row_step = max(1, _PCA_BLOCK_BYTES // (8 * v))
        for s in range(0, n, row_step):
            _add_gram(cov, centred(slice(s, min(s + row_step, n)), slice(0, v)).t())
        lam, vec = _top_eigh(_symmetrized(cov), k)
        return mean, vec.t().contiguous(), lam / max(n - 1, 1)
    gram = torch.zeros(n, n, dtype=f64, device=dev)
    for sl in cols:
        _add_gram(gram, centred(everything, sl))
    gram = _symmetrized(gram)
    lam, u = _top_eigh(gram, k)
    del gram
    # Components at rounding level (beyond the rank of the centred data) have no direction to recover from U;
    # they are completed with an orthonormal basis of what the others leave.
    tol = float(lam[0]) * max(n, v) * float(torch.finfo(f64).eps) * 10.0 if lam.numel() else 0.0
    good = int((lam > tol).sum())
    proj = u[:, :good].div_(lam[:good].sqrt()).t()  # (good, n): the rows of diag(1/s) Uᵀ, in U's memory
    del u
    basis = torch.empty(k, v, dtype=torch.float32, device=dev)
    norm2 = torch.zeros(good, dtype=f64, device=dev)
    for sl in cols:
        rows = proj @ centred(everything, sl)
        norm2 += rows.pow(2).sum(dim=1)
        basis[:good, sl] = rows
    ok = (norm2 - 1.0).abs() < 1e-3  # a row off unit length came from a rounding-level eigenvalue
    good = int(ok.long().cumprod(0).sum())
    if good < k:
        basis[good:] = _complete_basis(basis[:good], k - good)
        lam[good:] = 0.0
    return mean, basis, lam / max(n - 1, 1)


def _add_gram(gram: torch.Tensor, block: torch.Tensor) -> None:
    """``gram += block @ blockᵀ`` in place (float64): on the CPU only the lower triangle, by BLAS ``dsyrk`` (half
    the work of a product); elsewhere the whole matrix."""
    if gram.device.type != "cpu":
        gram.addmm_(block, block.t())
        return
    from scipy.linalg.blas import dsyrk

    # gram is symmetric: its buffer read as Fortran order is the same matrix, so dsyrk updates it in place;
    # block (m, w) in C order is blockᵀ (w, m) in Fortran order, hence trans=1.
    out = dsyrk(1.0, block.contiguous().numpy().T, beta=1.0, c=gram.numpy().T, trans=1, lower=1, overwrite_c=1)
    if out.__array_interface__["data"][0] != gram.numpy().__array_interface__["data"][0]:
        gram.copy_(torch.from_numpy(out.T))  # pragma: no cover - a BLAS wrapper that copied


def _symmetrized(gram: torch.Tensor) -> torch.Tensor:
    """The full symmetric matrix from :func:`_add_gram`'s result (on the CPU only one triangle holds it)."""
    if gram.device.type != "cpu":
        return gram
    # Fortran lower triangle = C upper triangle: mirror it onto the lower one, in place, a few rows at a time
    n = gram.shape[0]
    step = max(1, _PCA_BLOCK_BYTES // (8 * max(n, 1)))
    for s in range(0, n, step):
        e = min(s + step, n)
        gram[s:e, :s] = gram[:s, s:e].t()
        block = gram[s:e, s:e]
        block.copy_(torch.triu(block) + torch.triu(block, 1).t())
    return gram


def _complete_basis(basis: torch.Tensor, extra: int) -> torch.Tensor:
    """``extra`` orthonormal rows orthogonal to the orthonormal rows of ``basis`` (m, v), seeded."""
    v = basis.shape[1]
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(extra, v, generator=g, dtype=torch.float64).to(basis.device)
    b64 = basis.to(torch.float64)
    for _ in range(2):  # twice is enough (Gram-Schmidt "twice is enough")
        rand -= (rand @ b64.t()) @ b64
    q, _ = torch.linalg.qr(rand.t())
    return q.t().to(basis.dtype)


def _fix_signs(basis: torch.Tensor) -> torch.Tensor:
    """Each row flipped (in place, a few rows at a time) so that its largest absolute loading is positive."""
    step = max(1, _PCA_BLOCK_BYTES // (4 * max(basis.shape[1], 1)))
    for s in range(0, basis.shape[0], step):
        rows = basis[s:s + step]
        flip = torch.sign(rows.gather(1, rows.abs().argmax(dim=1, keepdim=True)))
        rows.mul_(torch.where(flip == 0, torch.ones_like(flip), flip))
    return basis


@dataclass
class LatentTargets:
    """Training responses in a PCA readout's latent space: enough to compute its voxel loss exactly without
    decoding predictions to voxels (:meth:`PCAVoxelReadout.loss`).

    For an orthonormal basis ``B`` and mean ``m``, ``‖Bᵀz + m - y‖² = ‖z - B(y - m)‖² + ‖r‖²`` with ``r`` the part
    of ``y - m`` outside the basis' span: the voxel MSE of a batch is ``(Σ‖z - c‖² + Σ‖r‖²) / (B · n_voxels)``,
    its value and its gradient, at the cost of ``k`` numbers per image instead of ``n_voxels``.

    Attributes
    ----------
    scores : tensor of shape (n, k)
        ``c = B (y - m)``, float32.
    residual : tensor of shape (n,)
        ``‖r‖²`` per image, float32.
    n_voxels : int
    """

    scores: torch.Tensor
    residual: torch.Tensor
    n_voxels: int

    def __getitem__(self, rows: torch.Tensor) -> LatentTargets:
        return LatentTargets(self.scores[rows], self.residual[rows], self.n_voxels)

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def to(self, device: torch.device | str) -> LatentTargets:
        return LatentTargets(self.scores.to(device), self.residual.to(device), self.n_voxels)


class Readout(nn.Module):
    """Contract of a voxel readout (see module docstring).

    Attributes
    ----------
    n_features : int
    n_voxels : int
    """

    n_features: int
    n_voxels: int

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        """Features (B, n_features) → predicted responses (B, n_voxels)."""
        raise NotImplementedError

    def regularizer(self) -> torch.Tensor:
        """Scalar penalty added to the training loss (0 when the readout has none)."""
        raise NotImplementedError

    def initialize(self, train_responses: torch.Tensor) -> None:
        """Fit closed-form parts (basis, mean) from training responses of shape (n_train, n_voxels)."""
        raise NotImplementedError

    def forward_latent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Predicted responses (B, n_voxels) and the readout's latent prediction (PCA scores), or None."""
        return self(features), None

    def loss(self, voxels: torch.Tensor, targets: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        """Mean squared error of predictions ``voxels`` (B, n_voxels) against ``targets`` (B, n_voxels), in the
        readout's loss space (``latent`` is what :meth:`forward_latent` returned)."""
        return torch.mean((voxels.float() - targets.float()) ** 2)


class LinearVoxelReadout(Readout):
    """One linear map from features to every voxel; the bias starts at the training mean response.

    Parameters
    ----------
    n_features : int
    n_voxels : int
    l2 : float
        Weight of ``0.5 * ||W||²`` in :meth:`regularizer`.
    """

    def __init__(self, n_features: int, n_voxels: int, l2: float = 0.0):
        super().__init__()
        self.n_features, self.n_voxels, self.l2 = int(n_features), int(n_voxels), float(l2)
        self.linear = nn.Linear(self.n_features, self.n_voxels)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear(features)

    def regularizer(self) -> torch.Tensor:
        return 0.5 * self.l2 * self.linear.weight.pow(2).sum()

    @torch.no_grad()
    def initialize(self, train_responses: torch.Tensor) -> None:
        self.linear.bias.copy_(train_responses.detach().float().mean(dim=0).to(self.linear.bias.device))


class PCAVoxelReadout(Readout):
    """Linear head onto PCA components of the training responses, mapped back to voxels by the fixed basis.

    Parameters
    ----------
    n_features : int
    n_voxels : int
    n_components : int
        Components kept (``default_pca_components`` gives the paper's ``min(2048, n_train, n_voxels)``).
    voxel_loss : {"voxel", "pca"}
        Space of the MSE in :meth:`loss`: voxel responses, or component scores (cheaper for 40k voxels; equal
        up to a constant and a scale when all components are kept, because the basis is orthonormal).
    l2 : float
        Weight of ``0.5 * ||W||²`` in :meth:`regularizer`.

    Attributes
    ----------
    mean : buffer of shape (n_voxels,)
    basis : buffer of shape (n_components, n_voxels)
    head : nn.Linear (n_features → n_components)
    """

    def __init__(self, n_features: int, n_voxels: int, n_components: int,
                 voxel_loss: Literal["voxel", "pca"] = "voxel", l2: float = 0.0):
        super().__init__()
        if voxel_loss not in ("voxel", "pca"):
            raise ValueError(f"voxel_loss: expected 'voxel' or 'pca', got {voxel_loss!r}")
        self.n_features, self.n_voxels, self.n_components = int(n_features), int(n_voxels), int(n_components)
        self.voxel_loss, self.l2 = voxel_loss, float(l2)
        self.head = nn.Linear(self.n_features, self.n_components)
        nn.init.zeros_(self.head.bias)
        self.register_buffer("mean", torch.zeros(self.n_voxels))
        self.register_buffer("basis", torch.zeros(self.n_components, self.n_voxels))
        self.register_buffer("explained_variance", torch.zeros(self.n_components))

    #: Buffers fixed by :meth:`initialize` and never changed by training (checkpoints need not copy them).
    CONSTANT_BUFFERS = ("mean", "basis", "explained_variance")

    @torch.no_grad()
    def initialize(self, train_responses: torch.Tensor) -> None:
        mean, basis, var = fit_pca(train_responses, self.n_components)
        # replaced, not copied into: the zero buffers' pages are never touched (at NSD size the basis is 0.3 GB)
        for name, value in (("mean", mean), ("basis", basis), ("explained_variance", var)):
            old = getattr(self, name)
            self._buffers[name] = value.to(old.device, old.dtype).contiguous()

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted component scores, shape (B, n_components)."""
        return self.head(features)

    def encode(self, responses: torch.Tensor) -> torch.Tensor:
        """Responses (B, n_voxels) → component scores (B, n_components), in float32 even under autocast."""
        with torch.autocast(responses.device.type, enabled=False):
            return (responses.float() - self.mean) @ self.basis.t()

    @torch.no_grad()
    def latent_targets(self, responses: torch.Tensor, block_bytes: int = _PCA_BLOCK_BYTES) -> LatentTargets:
        """Responses (n, n_voxels) → their :class:`LatentTargets`, on the basis' device, a block of rows at a time
        (no full-size copy of the responses)."""
        dev = self.basis.device
        n = int(responses.shape[0])
        step = max(1, block_bytes // (8 * max(self.n_voxels, 1)))
        scores = torch.empty(n, self.n_components, dtype=torch.float32, device=dev)
        residual = torch.empty(n, dtype=torch.float32, device=dev)
        for s in range(0, n, step):
            yc = responses[s:s + step].to(dev, torch.float32) - self.mean
            c = yc @ self.basis.t()
            scores[s:s + step] = c
            residual[s:s + step] = (yc.double().pow(2).sum(1) - c.double().pow(2).sum(1)).clamp_min(0.0).float()
        return LatentTargets(scores, residual, self.n_voxels)

    def decode(self, scores: torch.Tensor) -> torch.Tensor:
        """Component scores (B, n_components) → responses (B, n_voxels), in float32 even under autocast."""
        with torch.autocast(scores.device.type, enabled=False):
            return scores.float() @ self.basis + self.mean

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.decode(self.scores(features))

    def forward_latent(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        scores = self.scores(features)
        return self.decode(scores), scores

    def regularizer(self) -> torch.Tensor:
        return 0.5 * self.l2 * self.head.weight.pow(2).sum()

    def loss(self, voxels: torch.Tensor | None, targets: torch.Tensor | LatentTargets,
             latent: torch.Tensor | None = None) -> torch.Tensor:
        """The MSE of :attr:`voxel_loss`'s space; ``targets`` may be the batch's :class:`LatentTargets`, then only
        ``latent`` (the predicted scores) is needed and the value equals the voxel-space one (see there)."""
        if isinstance(targets, LatentTargets):
            if latent is None:
                raise ValueError("latent targets need the predicted component scores (latent)")
            sq = (latent.float() - targets.scores).pow(2)
            if self.voxel_loss == "pca":
                return sq.mean()
            return (sq.sum() + targets.residual.sum()) / (sq.shape[0] * self.n_voxels)
        assert voxels is not None
        if self.voxel_loss == "pca":
            if latent is None:
                raise ValueError("voxel_loss='pca' needs the predicted component scores (latent)")
            return torch.mean((latent.float() - self.encode(targets)) ** 2)
        return torch.mean((voxels.float() - targets.float()) ** 2)
