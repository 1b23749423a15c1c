"""Process-group setup for ``torchrun`` (multi-GPU, multi-node, and a CPU gloo path).

``torchrun --nproc_per_node N -m llmvem train ...`` sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and
``MASTER_ADDR``/``MASTER_PORT``; :func:`setup_distributed` reads them, joins the process group (NCCL on CUDA,
gloo on CPU) and picks the device of this process. Without those variables everything is a single process.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from llmvem.utils import resolve_device

__all__ = ["DistInfo", "barrier", "broadcast_float", "cleanup_distributed", "setup_distributed"]


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands.

    Attributes
    ----------
    rank, world_size, local_rank : int
    device : torch.device
    initialized_here : bool
        Whether :func:`setup_distributed` created the process group (and so should destroy it).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def setup_distributed(device: str = "auto") -> DistInfo:
    """Join the ``torchrun`` process group if the environment describes one, and choose this process's device.

    Parameters
    ----------
    device : str
        ``"auto"`` (CUDA when visible), ``"cpu"``, ``"cuda"`` or ``"cuda:K"``. Under torchrun with CUDA each
        process takes ``cuda:LOCAL_RANK``.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device)
    if dev.startswith("cuda") and world > 1:
        torch_device = torch.device("cuda", local_rank)
        torch.cuda.set_device(torch_device)
    else:
        torch_device = torch.device(dev)
    created = False
    if world > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch_device.type == "cuda" else "gloo"
        dist.init_process_group(backend=backend, rank=rank, world_size=world)
        created = True
    if dist.is_available() and dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
    else:
        rank, world = 0, 1
    return DistInfo(rank=rank, world_size=world, local_rank=local_rank, device=torch_device,
                    initialized_here=created)


def cleanup_distributed(info: DistInfo) -> None:
    """Destroy the process group if :func:`setup_distributed` created it."""
    if info.initialized_here and dist.is_initialized():
        dist.destroy_process_group()


def barrier(info: DistInfo) -> None:
    """Wait for every process (no-op in a single process)."""
    if info.distributed:
        dist.barrier()


def broadcast_float(value: float, info: DistInfo) -> float:
    """Rank 0's ``value`` on every process (so decisions such as early stopping agree everywhere)."""
    if not info.distributed:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=info.device if info.device.type == "cuda" else "cpu")
    dist.broadcast(t, src=0)
    return float(t.item())
