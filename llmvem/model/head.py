"""The alignment head: the projection of the pooled image embedding into the caption-embedding space."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["AlignmentHead"]


class AlignmentHead(nn.Module):
    """Projects the pooled image embedding into the caption-embedding space; output rows are L2-normalised.

    Parameters
    ----------
    in_dim : int
        Size of the pooled image embedding.
    out_dim : int
        Size of the text embedding (or ``align_dim``).
    kind : {"linear", "mlp"}
        A single linear map, or Linear → GELU → Linear with ``out_dim`` hidden units.
    """

    def __init__(self, in_dim: int, out_dim: int, kind: str = "linear"):
        super().__init__()
        if kind == "linear":
            self.proj: nn.Module = nn.Linear(in_dim, out_dim)
        elif kind == "mlp":
            self.proj = nn.Sequential(nn.Linear(in_dim, out_dim), nn.GELU(), nn.Linear(out_dim, out_dim))
        else:
            raise ValueError(f"projection: expected 'linear' or 'mlp', got {kind!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.proj(x).float(), dim=-1)
