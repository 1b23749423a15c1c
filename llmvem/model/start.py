"""Closed-form starts of the network: the PCA voxel readout (and a linear core) at the ridge solution.

Stage 1 from a random head has to find, by gradient steps on 40,000-voxel batches, what one ridge regression
gives in closed form; at NSD scale it never did (issue 27: validation r fell from the first epoch on, test r 0.26
against the ridge's 0.42 on the same features). :func:`ridge_start` puts the readout there before the first step:

- targets: the training responses' PCA scores ``Z = (Y - mean) Bᵀ`` (n_train, k). Because the basis is
  orthonormal, the squared error of scores equals the squared error of the voxel responses within the basis'
  span, so a ridge on the scores is the voxel ridge restricted to the readout's output space;
- one penalty for all components, chosen by exact leave-one-out (:class:`llmvem.model.ridge.RidgeCV`,
  ``cv="loo"``, ``local_alpha=False``; the grid :data:`~llmvem.model.ridge.DEFAULT_ALPHAS` is for z-scored
  features, which the readout reads);
- without a core the head is the ridge solution ``W`` (k, D); with a linear core of ``c`` units the core and head
  are its best rank-``c`` factorisation (reduced-rank ridge): ``V_c`` = the top ``c`` principal directions of the
  ridge's fitted scores, core weight ``V_cᵀ W`` (c, D), head weight ``V_c`` (k, c). An MLP core, or a core shared
  by several data keys, keeps its random start (and so does the head behind it).

Where the readout also reads the alignment head's embedding (``readout_aligned``) those input columns start at 0.

``model.readout_init: auto`` keeps both starts as candidates: the engine validates the ridge start, puts back
the random parameters (:func:`random_start_parameters`, taken before the ridge start wrote over them) and trains
from there; validation keeps whichever is better. The two answer different sizes: on a 10,000-image NSD-size
subject the ridge start is far ahead of anything stage 1 reaches from random weights (validation r 0.407 vs
0.364), on a 500-image V4 session training from random weights beats it in 7 of 9 sessions (and gradient steps
from the ridge start never improved on it: best epoch 0 in all 9; ``bench/results/v4_readout_start.json``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import nn

from llmvem.model.readout import PCAVoxelReadout

__all__ = ["READOUT_STARTS", "random_start_parameters", "ridge_start"]

log = logging.getLogger(__name__)

#: Values of ``model.readout_init``.
READOUT_STARTS = ("ridge", "random", "auto")


def _start_targets(network: Any) -> list[nn.Module]:
    """The modules :func:`ridge_start` may write: a linear core and each flat PCA readout's head."""
    mods: list[nn.Module] = [network.core] if isinstance(network.core, nn.Linear) else []
    for readout in network.readouts.values():
        flat = getattr(readout, "flat", readout)
        if isinstance(flat, PCAVoxelReadout):
            mods.append(flat.head)
    return mods


@torch.no_grad()
def random_start_parameters(network: Any) -> dict[str, torch.Tensor]:
    """CPU copies of the parameters :func:`ridge_start` may overwrite, by their names in ``network``: taken
    before it, they put the random start back (``model.readout_init: auto``)."""
    wanted = {id(p) for m in _start_targets(network) for p in m.parameters()}
    return {n: p.detach().to("cpu", copy=True) for n, p in network.named_parameters() if id(p) in wanted}


def _ridge(x: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Ridge of ``z`` (n, k) on ``x`` (n, D) with one α chosen by leave-one-out: weights (k, D), intercept (k,),
    the α."""
    from llmvem.model.ridge import DEFAULT_ALPHAS, RidgeCV

    fit = RidgeCV(alphas=DEFAULT_ALPHAS, cv="loo", local_alpha=False, scoring="neg_mse",
                  device=str(x.device), progress_bar=False).fit(x.cpu().numpy(), z.cpu().numpy())
    coef = torch.from_numpy(np.ascontiguousarray(fit.coef_.T)).to(x.device)
    return coef, torch.from_numpy(fit.intercept_).to(x.device), float(fit.best_alphas_[0])


@torch.no_grad()
def ridge_start(network: Any, responses: Mapping[str, torch.Tensor], features: torch.Tensor) -> dict[str, Any]:
    """Start each key's flat PCA readout (and a linear core) at the ridge solution of its training scores.

    Parameters
    ----------
    network : LLMVEM
        Initialised (PCA bases and feature statistics fitted).
    responses : mapping of data key to tensor (n_key, n_voxels)
        The training responses given to ``network.initialize``.
    features : tensor of shape (sum of n_key, n_features)
        Their concatenated raw readout features, in the order of ``responses`` (as ``network.initialize`` gets
        them).

    Returns
    -------
    dict
        Per key the chosen α (``{"main": {"alpha": 10.0, "rank": 256}}``) or why the key kept its random start.
    """
    x_all = features.float()
    if network.standardize_features:
        x_all = (x_all - network.feature_mean.to(x_all.device)) / network.feature_std.to(x_all.device)
    core = network.core
    sizes = [int(y.shape[0]) for y in responses.values()]
    out: dict[str, Any] = {}
    if sum(sizes) != x_all.shape[0] or (core is not None and (not isinstance(core, nn.Linear) or len(sizes) > 1)):
        why = "the features do not split into the keys' rows" if sum(sizes) != x_all.shape[0] else \
            "a core other than one linear core of one data key"
        log.info("readout ridge start skipped: %s", why)
        return {k: {"skipped": why} for k in responses}
    start = 0
    for (key, y), n in zip(responses.items(), sizes, strict=True):
        x, start = x_all[start:start + n], start + n
        readout = network.readouts[key]
        flat = getattr(readout, "flat", readout)  # a spatial residual readout: its flat part
        if not isinstance(flat, PCAVoxelReadout):
            out[key] = {"skipped": "not a PCA readout"}
            continue
        z = flat.latent_targets(y).scores.to(x.device)
        coef, intercept, alpha = _ridge(x, z)  # (k, D), (k,)
        head = flat.head.weight
        head.zero_()
        if core is None:
            head[:, :coef.shape[1]] = coef.to(head.device)
            flat.head.bias.copy_(intercept.to(head.device))
            out[key] = {"alpha": alpha}
            continue
        xc_mean = x.mean(0)
        fitted = (x - xc_mean) @ coef.t()  # (n, k): the ridge's centred fitted scores
        evals, evecs = torch.linalg.eigh((fitted.t() @ fitted).double())
        rank = min(core.out_features, coef.shape[0])
        v = evecs[:, -rank:].flip(1).to(coef.dtype)  # (k, rank): top principal directions of the fitted scores
        core.weight[:rank] = (v.t() @ coef).to(core.weight.device)
        core.bias.zero_()
        head[:, :rank] = v.to(head.device)  # columns beyond the rank stay 0; their core rows keep a random start
        # intercept: equal to the ridge's prediction at the mean feature row
        flat.head.bias.copy_((intercept + coef @ xc_mean - v @ (v.t() @ coef @ xc_mean)).to(head.device))
        out[key] = {"alpha": alpha, "rank": rank}
    return out
