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

from typing import Literal

import torch
from torch import nn

__all__ = ["LinearVoxelReadout", "PCAVoxelReadout", "Readout", "default_pca_components", "fit_pca"]


def default_pca_components(n_train: int, n_voxels: int, cap: int = 2048) -> int:
    """Number of PCA components used when the config leaves it unset: ``min(cap, n_train, n_voxels)``."""
    return int(min(cap, n_train, n_voxels))


def fit_pca(responses: torch.Tensor, n_components: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """PCA of a response matrix by SVD of the centred data (computed in float64).

    Parameters
    ----------
    responses : tensor of shape (n_samples, n_voxels)
    n_components : int
        At most ``min(n_samples, n_voxels)``.

    Returns
    -------
    mean : tensor of shape (n_voxels,), float32
    basis : tensor of shape (n_components, n_voxels), float32
        Orthonormal rows, in order of decreasing explained variance, with a deterministic sign (the largest
        absolute loading of each component is positive).
    explained_variance : tensor of shape (n_components,), float32
        Variance of the training responses along each component.
    """
    if responses.ndim != 2:
        raise ValueError(f"responses: expected shape (n_samples, n_voxels), got {tuple(responses.shape)}")
    n, v = responses.shape
    if not 1 <= n_components <= min(n, v):
        raise ValueError(f"n_components={n_components}: expected 1..min(n_samples={n}, n_voxels={v})")
    y = responses.detach().to(torch.float64)
    mean = y.mean(dim=0)
    _, s, vh = torch.linalg.svd(y - mean, full_matrices=False)
    basis = vh[:n_components]
    flip = torch.sign(basis.gather(1, basis.abs().argmax(dim=1, keepdim=True)))
    basis = basis * torch.where(flip == 0, torch.ones_like(flip), flip)
    var = s[:n_components] ** 2 / max(n - 1, 1)
    return mean.float(), basis.float().contiguous(), var.float()


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

    @torch.no_grad()
    def initialize(self, train_responses: torch.Tensor) -> None:
        mean, basis, var = fit_pca(train_responses, self.n_components)
        self.mean.copy_(mean.to(self.mean.device))
        self.basis.copy_(basis.to(self.basis.device))
        self.explained_variance.copy_(var.to(self.basis.device))

    def scores(self, features: torch.Tensor) -> torch.Tensor:
        """Predicted component scores, shape (B, n_components)."""
        return self.head(features)

    def encode(self, responses: torch.Tensor) -> torch.Tensor:
        """Responses (B, n_voxels) → component scores (B, n_components), in float32 even under autocast."""
        with torch.autocast(responses.device.type, enabled=False):
            return (responses.float() - self.mean) @ self.basis.t()

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

    def loss(self, voxels: torch.Tensor, targets: torch.Tensor, latent: torch.Tensor | None = None) -> torch.Tensor:
        if self.voxel_loss == "pca":
            if latent is None:
                raise ValueError("voxel_loss='pca' needs the predicted component scores (latent)")
            return torch.mean((latent.float() - self.encode(targets)) ** 2)
        return torch.mean((voxels.float() - targets.float()) ** 2)
