"""What one optimizer step of the engine is made of: matched key schedules and per-loss-group gradient clipping.

**Matched epochs** (``train.epoch = "voxel_steps"``, the default). An epoch is the batches of the keys *with
responses* (the voxel-loss steps: one optimizer step each, times ``grad_accum``), interleaved as
:func:`llmvem.train.engine.key_schedule` does. Keys without responses (caption streams) do not add steps: each
voxel step draws ``ratio`` of their batches (a fraction: ``floor((t + 1) · ratio) - floor(t · ratio)`` at the
stage's t-th voxel step), from an endless sequence of their own seeded sampler epochs (:class:`KeyCycler`, as
neuralpredictors' cyclers), and their losses join that step's. So a model with a caption stream takes exactly the
optimizer steps and the learning-rate schedule of the same model without it (λ = 0 or no stream): the voxel
batches, their order and the schedule are identical. ``ratio = None`` draws as many stream batches per epoch as
visit the stream's rows once (``ceil(n_stream / batch)`` per epoch, spread evenly over its steps). With
``"all_batches"`` every batch of every key is its own step (the engine before matching).

**Per-loss-group clipping** (``train.clip_per_loss``, the default, when ``grad_clip`` is set and λ > 0). The
gradient of a step is the sum of two groups: the voxel group (voxel loss + readout penalty of the brain batches)
and the contrastive group (λ × InfoNCE of every batch that has captions). Each group's gradient (summed over the
step's batches and, under ``torchrun``, averaged over processes) is clipped to ``grad_clip`` on its own before
they are added, so λ cannot shrink the voxel step through a shared global norm. With one group (λ = 0) it is
the ordinary global clipping, bit for bit.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from fractions import Fraction

import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler

from llmvem.train.distributed import DistInfo

__all__ = ["GroupGrads", "KeyCycler", "extra_batch_counts", "resolve_ratio", "unit_schedule"]

Item = tuple[str, torch.Tensor]


def resolve_ratio(ratio: float | None, batches_per_pass: int, voxel_steps: int) -> Fraction:
    """Batches of an extra key per voxel step: ``ratio``, or (None) ``batches_per_pass / voxel_steps`` (its rows
    once per epoch), as an exact fraction so that every epoch draws the same number."""
    if ratio is None:
        return Fraction(batches_per_pass, max(voxel_steps, 1))
    if not ratio > 0:
        raise ValueError(f"ratio must be > 0, got {ratio}")
    return Fraction(ratio).limit_denominator(10**6)


def extra_batch_counts(ratio: Fraction, start: int, n: int) -> list[int]:
    """Extra batches at voxel steps ``start .. start + n - 1`` of a stage: ``floor((t+1)·ratio) - floor(t·ratio)``."""
    return [math.floor((t + 1) * ratio) - math.floor(t * ratio) for t in range(start, start + n)]


class KeyCycler:
    """The endless batch sequence of one key: its sampler's epochs (``set_epoch(0), (1), ...``), one after another.

    ``batches(start, count)`` is a pure function of its arguments (the sampler's seed fixes every order), so a
    resumed run draws the same batches.
    """

    def __init__(self, sampler: DistributedSampler, batch_size: int):
        self.sampler, self.batch_size = sampler, batch_size
        self.per_pass = max(1, math.ceil(len(sampler) / batch_size))
        self._pass, self._order = -1, ()

    def _batches_of_pass(self, j: int) -> tuple[torch.Tensor, ...]:
        if j != self._pass:
            self.sampler.set_epoch(j)
            self._order = torch.tensor(list(iter(self.sampler)), dtype=torch.int64).split(self.batch_size)
            self._pass = j
        return self._order

    def batches(self, start: int, count: int) -> list[torch.Tensor]:
        out = []
        for i in range(start, start + count):
            j, r = divmod(i, self.per_pass)
            out.append(self._batches_of_pass(j)[r])
        return out


def unit_schedule(voxel_items: Sequence[Item], extras: Mapping[str, tuple[KeyCycler, Fraction]], first_step: int
                  ) -> list[list[Item]]:
    """The epoch's units: each voxel batch with the extra keys' batches drawn for it (before it, so that the
    last forward of a step is the one that uses the most parameters: DDP synchronises on it).

    Parameters
    ----------
    voxel_items : sequence of (key, rows)
        The epoch's batches of the keys with responses, in their order.
    extras : mapping of key to (cycler, ratio)
    first_step : int
        Index of the epoch's first voxel step in the stage (``epoch × len(voxel_items)``).
    """
    n = len(voxel_items)
    drawn: dict[str, list[list[torch.Tensor]]] = {}
    for name, (cycler, ratio) in extras.items():
        counts = extra_batch_counts(ratio, first_step, n)
        flat = cycler.batches(math.floor(first_step * ratio), sum(counts))
        pos, per = 0, []
        for c in counts:
            per.append(flat[pos : pos + c])
            pos += c
        drawn[name] = per
    return [[*((name, b) for name in drawn for b in drawn[name][t]), voxel_items[t]] for t in range(n)]


class GroupGrads:
    """Gradient buffers of loss groups: summed over a step's batches, averaged over processes, clipped per group.

    Parameters
    ----------
    params : sequence of tensors
        The trained parameters (every one the optimizer steps).
    info : DistInfo
    """

    def __init__(self, params: Sequence[torch.Tensor], info: DistInfo):
        self.params, self.info = list(params), info
        self.buffers: dict[str, list[torch.Tensor]] = {}
        #: whether a parameter got a gradient this step (one that got none keeps ``grad = None``, so the optimizer
        #: skips it, as after an ordinary backward pass)
        self.touched = [False] * len(self.params)

    def add(self, groups: Mapping[str, torch.Tensor], scale: float) -> None:
        """Accumulate the gradients of each group's loss × ``scale`` (one backward pass per group)."""
        names = list(groups)
        for k, name in enumerate(names):
            grads = torch.autograd.grad(groups[name] * scale, self.params, retain_graph=k < len(names) - 1,
                                        allow_unused=True)
            buf = self.buffers.get(name)
            if buf is None:
                buf = self.buffers[name] = [torch.zeros_like(p) for p in self.params]
            for i, (b, g) in enumerate(zip(buf, grads, strict=True)):
                if g is not None:
                    b.add_(g)
                    self.touched[i] = True

    def finish(self, max_norm: float | None) -> dict[str, torch.Tensor]:
        """Average over processes, clip each group's norm to ``max_norm``, write the sum into ``p.grad``.

        Returns each group's norm before clipping (0-d tensors, not synchronised to the host).
        """
        norms: dict[str, torch.Tensor] = {}
        total: list[torch.Tensor] | None = None
        for name in sorted(self.buffers):  # the same order on every process
            buf = self.buffers[name]
            if self.info.distributed:
                flat = torch.cat([b.reshape(-1) for b in buf])
                dist.all_reduce(flat)
                flat /= self.info.world_size
                offset = 0
                for b in buf:
                    b.copy_(flat[offset : offset + b.numel()].view_as(b))
                    offset += b.numel()
            norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(b) for b in buf]))
            norms[name] = norm
            if max_norm is not None:
                coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
                for b in buf:
                    b.mul_(coef)
            if total is None:
                total = buf
            else:
                for t, b in zip(total, buf, strict=True):
                    t.add_(b)
        if self.info.distributed:  # a parameter one process left untouched may have a gradient on another
            used = torch.tensor(self.touched, dtype=torch.int32, device=self.params[0].device)
            dist.all_reduce(used)
            self.touched = [bool(u) for u in used.tolist()]
        for p, g, hit in zip(self.params, total or [None] * len(self.params), self.touched, strict=True):
            p.grad = g if hit else None
        self.buffers = {}
        self.touched = [False] * len(self.params)
        return norms
