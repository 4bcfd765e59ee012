"""Scale-out under ``torchrun`` (DESIGN section 8): the process group, and the few collectives
that fit() (DistributedDataParallel training) and monte_carlo() (instances sharded across ranks)
need. Outside torchrun every function here is a no-op on a world of one process.

    torchrun --nproc-per-node 2 -m cimext.cli train --method atrice --out runs/ddp

CPU tensors use the gloo backend, CUDA tensors NCCL.
"""

from __future__ import annotations

import os
from typing import Any

import torch
import torch.distributed as dist


def is_initialized() -> bool:
    """Whether a torch.distributed process group with more than one process is running."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's rank (0 outside a process group)."""
    return dist.get_rank() if is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 outside a process group)."""
    return dist.get_world_size() if is_initialized() else 1


def is_main() -> bool:
    """Rank 0 (or the only process): the one that prints and writes files."""
    return rank() == 0


def init_from_env(backend: str | None = None) -> bool:
    """Join the process group that ``torchrun`` describes in the environment (WORLD_SIZE > 1),
    unless one is running already. ``backend`` defaults to gloo (nccl when CUDA is available and
    LOCAL_RANK is set). Returns whether this process is part of a group of more than one."""
    if is_initialized():
        return True
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1 or not dist.is_available():
        return False
    if dist.is_initialized():  # a group of one
        return False
    if backend is None:
        backend = "nccl" if torch.cuda.is_available() and "LOCAL_RANK" in os.environ else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ["LOCAL_RANK"]))
    dist.init_process_group(backend=backend)
    return True


def barrier() -> None:
    if is_initialized():
        dist.barrier()


def all_reduce_sum_(tensors: list[torch.Tensor]) -> None:
    """Sum every tensor over the ranks, in place, with one collective (flattened bucket)."""
    if not is_initialized() or not tensors:
        return
    flat = torch.cat([t.reshape(-1) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    offset = 0
    for t in tensors:
        n = t.numel()
        t.copy_(flat[offset : offset + n].view_as(t))
        offset += n


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order (``[obj]`` outside a process group)."""
    if not is_initialized():
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank."""
    if not is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
