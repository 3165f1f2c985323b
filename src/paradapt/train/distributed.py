"""Data-parallel glue: the same run on N processes gives the loss curve of one process.

Every rank draws the same global batch (the data order is a function of the seed), keeps
its contiguous share of the rows, and computes each adapter's loss as *its rows' summed
loss divided by the adapter's weight in the whole global batch* (rows for classification,
target tokens for LM). Summing those partial losses over ranks gives exactly the
single-process mean, so an all-reduce SUM of the adapter gradients gives the
single-process gradient; clipping and AdamW then run identically on every rank, and
the adapters stay equal without broadcasting weights. Only rank 0 writes files.

Launch with ``torchrun --nproc_per_node=N`` or ``accelerate launch``: both set ``RANK``,
``WORLD_SIZE``, ``MASTER_ADDR`` and ``MASTER_PORT``, which :func:`init_from_env` reads
(gloo on CPU, nccl on CUDA).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class Dist:
    """This process's place in the group (rank 0 of 1 when not distributed)."""

    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def share(self, n: int) -> tuple[int, int]:
        """The contiguous row range [start, stop) of an ``n``-row global batch held by this rank."""
        return self.rank * n // self.world, (self.rank + 1) * n // self.world

    def shard(self, batch: dict[str, torch.Tensor], names: list[str]) -> tuple[dict, list[str]]:
        """This rank's rows of a collated global batch (padding width kept, so rows are unchanged)."""
        if not self.enabled:
            return batch, names
        start, stop = self.share(len(names))
        return {k: v[start:stop] for k, v in batch.items()}, names[start:stop]

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """All-reduce SUM in place (a no-op in one process); CPU tensors travel via CUDA under nccl."""
        if not self.enabled:
            return tensor
        if dist.get_backend() == "nccl" and not tensor.is_cuda:
            moved = tensor.to(torch.device("cuda", torch.cuda.current_device()))
            dist.all_reduce(moved, op=dist.ReduceOp.SUM)
            return tensor.copy_(moved)
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        return tensor

    def sum_grads(self, params: list[torch.nn.Parameter]) -> None:
        """Sum the gradients of ``params`` over ranks in one flat all-reduce.

        A rank that had no rows of an adapter has ``grad=None`` there; it sends zeros so every
        rank joins the same collective.
        """
        if not self.enabled or not params:
            return
        flat = torch.cat(
            [(p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1) for p in params]
        )
        self.sum_(flat)
        offset = 0
        for p in params:
            n = p.numel()
            p.grad = flat[offset : offset + n].view_as(p).clone()
            offset += n

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()


def current() -> Dist:
    """The process group already set up (by :func:`init_from_env` or the caller), else one process."""
    if dist.is_available() and dist.is_initialized():
        return Dist(dist.get_rank(), dist.get_world_size())
    return Dist()


def init_from_env() -> Dist:
    """Join the group that ``torchrun`` / ``accelerate launch`` describe in the environment."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and dist.is_available() and not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(local_device())
        dist.init_process_group(backend=backend)
    return current()


def local_device() -> torch.device:
    """CUDA device ``LOCAL_RANK`` when CUDA is there, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")
