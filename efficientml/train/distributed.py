"""Data-parallel training on ``torch.distributed``: the process group from ``torchrun``'s environment,
the model in ``DistributedDataParallel``, each global batch split into contiguous per-rank shards.

    torchrun --nproc_per_node 2 -m efficientml finetune smollm2-135m --dataset tinyshakespeare --out ft

Every rank draws the same global batches (same seed), keeps rows ``[r·B/W, (r+1)·B/W)`` of each, and
scales its loss by W before ``backward``: DDP averages gradients over the W ranks, so the step's
gradient is the single-process gradient of the whole batch (to float summation order). Only rank 0
logs, shows progress and saves. The backend is gloo (CPU) unless ``init_distributed("nccl")`` asks for
NCCL (models on CUDA, one device per rank).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Iterator

import torch
import torch.distributed as dist
import torch.nn as nn

from efficientml.core.errors import ConfigError


@dataclass(frozen=True)
class DistContext:
    """This process's place in the group."""

    rank: int
    world_size: int
    backend: str

    @property
    def main(self) -> bool:
        return self.rank == 0

    def shard(self, t: torch.Tensor) -> torch.Tensor:
        """This rank's contiguous share of a global batch (rows)."""
        if t.shape[0] % self.world_size:
            raise ConfigError(f"a global batch of {t.shape[0]} rows does not split over {self.world_size} "
                              "processes; use a batch size that is a multiple of the number of processes")
        n = t.shape[0] // self.world_size
        return t[self.rank * n:(self.rank + 1) * n]

    def all_sum(self, x: float) -> float:
        t = torch.tensor([x], dtype=torch.float64)
        dist.all_reduce(t)
        return float(t.item())

    def wrap(self, model: nn.Module) -> nn.Module:
        dev = next(model.parameters()).device
        ids = [dev.index] if dev.type == "cuda" else None
        return nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def close(self) -> None:
        """Leave the group cleanly: wait for every rank, then destroy it (a rank that exits while gloo's
        threads still run can abort with "terminate called without an active exception")."""
        if dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()

    @contextlib.contextmanager
    def no_sync(self, ddp: nn.Module, skip: bool) -> Iterator[None]:
        """Skip the gradient all-reduce of an accumulation micro-batch that is not the step's last."""
        with (ddp.no_sync() if skip else contextlib.nullcontext()):
            yield


def init_distributed(backend: str = "gloo") -> DistContext | None:
    """Join the process group ``torchrun`` describes (``WORLD_SIZE`` > 1 in the environment); None for a
    single process. An already initialised group is reused."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1 and not dist.is_initialized():
        return None
    if not dist.is_available():
        raise ConfigError("this torch build has no torch.distributed; run a single process")
    if not dist.is_initialized():
        dist.init_process_group(backend)
    return DistContext(dist.get_rank(), dist.get_world_size(), dist.get_backend())

