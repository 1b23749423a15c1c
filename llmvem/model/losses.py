"""Losses of LLM-VEM: voxel MSE + λ × symmetric InfoNCE between image and caption embeddings.

The contrastive term follows CLIP / open_clip's ``ClipLoss`` with two differences that matter for brain data:

* **Identical captions are positives, not negatives.** Two images with the same caption (a label captioner,
  repeated stimuli, a coarse description) must not be pushed apart. Rows with the same text id form a group; the
  target of each row is uniform over its group, in both directions (image→text and text→image). The trainer's
  ids are hashes of the normalised caption texts (:func:`llmvem.embed.text.caption_ids`), carried with the
  embeddings; only when no ids are given are bit-identical embeddings grouped (:func:`group_ids_from_embeddings`,
  a fallback: one caption embedded in two differently padded batches can differ in its last bits).
* Under ``torchrun`` the embeddings of all processes are gathered **with gradients** so negatives come from the
  global batch and the loss value equals the single-process loss on the same global batch. Gradients flowing
  back through the gather are summed over processes; since every process computes the same global loss, DDP's
  gradient averaging then yields exactly the single-process gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F

__all__ = [
    "LossParts",
    "contrastive_loss",
    "gather_no_grad",
    "gather_with_grad",
    "group_ids_from_embeddings",
    "info_nce",
    "total_loss",
]


def _world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every process along dim 0, keeping gradients to every process's input.

    Identity outside ``torch.distributed``. All processes must pass the same shape.
    """
    if _world_size() == 1:
        return x
    from torch.distributed import _functional_collectives as fc

    if hasattr(fc, "all_gather_single_autograd"):
        # torch >= 2.10: the autograd-aware functional collective (torch.distributed.nn.functional.all_gather is
        # deprecated there); works with gloo and NCCL.
        out = fc.all_gather_single_autograd(x.contiguous(), 0, dist.group.WORLD)
        return fc.wait_tensor(out) if hasattr(fc, "wait_tensor") else out
    import torch.distributed.nn.functional as dist_nn  # pragma: no cover - older torch

    return torch.cat(dist_nn.all_gather(x), dim=0)  # pragma: no cover


def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate ``x`` (B, ...) from every process along dim 0 (no gradient). Identity outside distributed."""
    if _world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(_world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)


def group_ids_from_embeddings(embeddings: torch.Tensor) -> torch.Tensor:
    """Integer group of each row: rows with bit-identical embeddings share a group (the fallback when the caption
    texts' ids are not known; prefer :func:`llmvem.embed.text.caption_ids`).

    Parameters
    ----------
    embeddings : tensor of shape (n, d)

    Returns
    -------
    int64 tensor of shape (n,)
    """
    _, inverse = torch.unique(embeddings.detach(), dim=0, return_inverse=True)
    return inverse.to(torch.int64)


def info_nce(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
             text_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Symmetric InfoNCE with multi-positive targets.

    Both inputs are L2-normalised here; logits are ``logit_scale * image @ text.T``. Row ``i`` counts every
    ``j`` with ``text_ids[j] == text_ids[i]`` as positive, with target probability ``1 / n_positives``; the loss
    is the mean of the image→text and text→image cross-entropies.

    Parameters
    ----------
    image_emb : tensor of shape (B, d)
    text_emb : tensor of shape (B, d)
    logit_scale : scalar tensor or float
        Inverse temperature (already exponentiated, e.g. 1/0.07).
    text_ids : int tensor of shape (B,), optional
        Caption identity; ``None`` derives it from identical rows of ``text_emb``.

    Returns
    -------
    scalar tensor (float32)
    """
    if image_emb.ndim != 2 or text_emb.shape != image_emb.shape:
        raise ValueError(f"expected image and text embeddings of the same shape (B, d), got "
                         f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}")
    img = F.normalize(image_emb.float(), dim=-1)
    txt = F.normalize(text_emb.float(), dim=-1)
    if text_ids is None:
        text_ids = group_ids_from_embeddings(txt)
    positives = (text_ids.view(-1, 1) == text_ids.view(1, -1)).float()
    targets = positives / positives.sum(dim=1, keepdim=True)
    logits = logit_scale * img @ txt.t()
    loss_i2t = -(targets * F.log_softmax(logits, dim=1)).sum(dim=1).mean()
    # positives is symmetric, so the text→image targets are the same matrix applied to logits.T
    loss_t2i = -(targets * F.log_softmax(logits.t(), dim=1)).sum(dim=1).mean()
    return 0.5 * (loss_i2t + loss_t2i)


def contrastive_loss(image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: torch.Tensor | float,
                     text_ids: torch.Tensor | None = None, gather: bool = True) -> torch.Tensor:
    """:func:`info_nce` over the global batch: under ``torch.distributed`` the local rows of every process are
    gathered first (image embeddings with gradients), so negatives come from all processes.

    ``text_ids``, when given, must be consistent across processes (e.g. dataset-wide caption ids).
    """
    if gather and _world_size() > 1:
        image_emb = gather_with_grad(image_emb)
        text_emb = gather_no_grad(text_emb.detach()) if not text_emb.requires_grad else gather_with_grad(text_emb)
        if text_ids is not None:
            text_ids = gather_no_grad(text_ids)
    return info_nce(image_emb, text_emb, logit_scale, text_ids)


@dataclass
class LossParts:
    """The parts of one training loss (tensors, for backward; call ``.item()`` to log).

    ``total = voxel + regularizer + lambda_align * align``; :meth:`groups` splits it into the voxel group and the
    contrastive group, whose gradients the engine can clip separately (``train.clip_per_loss``).
    """

    total: torch.Tensor
    voxel: torch.Tensor
    align: torch.Tensor | None
    regularizer: torch.Tensor
    lambda_align: float = 0.0

    def groups(self) -> dict[str, torch.Tensor]:
        """``{"voxel": voxel + regularizer, "align": lambda_align * align}``, each only when it is in ``total``
        (a captions-only batch has no voxel group; λ = 0 has no contrastive group)."""
        out: dict[str, torch.Tensor] = {}
        if self.voxel.requires_grad or self.regularizer.requires_grad:
            out["voxel"] = self.voxel + self.regularizer
        if self.lambda_align != 0.0 and self.align is not None:
            out["align"] = self.lambda_align * self.align
        return out


def total_loss(voxel: torch.Tensor, align: torch.Tensor | None, lambda_align: float,
               regularizer: torch.Tensor | None = None) -> LossParts:
    """``voxel + lambda_align * align + regularizer``.

    With ``lambda_align == 0`` the alignment term is not added at all (not multiplied by zero), so a NaN in it
    could never leak and the result is bit-identical to the plain encoding model's loss.
    """
    reg = regularizer if regularizer is not None else torch.zeros((), device=voxel.device)
    total = voxel + reg
    if lambda_align != 0.0:
        if align is None:
            raise ValueError("lambda_align > 0 needs the alignment loss")
        total = total + lambda_align * align
    return LossParts(total=total, voxel=voxel, align=align, regularizer=reg, lambda_align=float(lambda_align))
