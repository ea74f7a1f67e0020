"""Process groups for `torchrun`: nccl on GPU, gloo on CPU; one process is the default."""

from __future__ import annotations

import os
from collections.abc import Iterator, Sized
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

from ..errors import ConfigError

__all__ = [
    "DistEnv", "ShardSampler", "all_reduce_sum", "count_processes", "init_distributed", "resolve_device",
    "shutdown_distributed",
]  # fmt: skip


@dataclass(frozen=True)
class DistEnv:
    """This process's place in the run: rank, world size and device."""

    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def resolve_device(requested: str, local_rank: int = 0) -> torch.device:
    """"auto" is CUDA device `local_rank` when torch sees one, else the CPU."""
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("device: 'cuda' was asked for, but torch sees no CUDA device; use --device cpu")
    if requested == "cpu" or (requested == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    torch.cuda.set_device(local_rank)
    return torch.device("cuda", local_rank)


def init_distributed(device: str = "auto", timeout_minutes: float = 30.0) -> DistEnv:
    """Join the process group that torchrun describes in the environment (RANK, WORLD_SIZE,
    LOCAL_RANK, MASTER_ADDR, MASTER_PORT); without it, a single process.

    The backend is nccl when the processes use CUDA devices and gloo otherwise. A collective
    that waits longer than `timeout_minutes` (a process died or hangs) fails instead of waiting
    for ever.
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, local_rank)
    if world_size > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if dev.type == "cuda" else "gloo", rank=rank, world_size=world_size,
            timeout=timedelta(minutes=timeout_minutes),
        )  # fmt: skip
    return DistEnv(rank=rank, world_size=world_size, local_rank=local_rank, device=dev)


def shutdown_distributed() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum a float64 tensor over all processes (no-op for one process)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        backend_device = values.device if dist.get_backend() != "gloo" else torch.device("cpu")
        summed = values.to(backend_device)
        dist.all_reduce(summed, op=dist.ReduceOp.SUM)
        return summed.to(values.device)
    return values


def count_processes(flag: bool, device: torch.device) -> int:
    """How many processes have `flag` set (`int(flag)` for one process). Every process of a
    group must call it at the same point: it is a collective."""
    return int(all_reduce_sum(torch.tensor([float(flag)], dtype=torch.float64, device=device)).item())


class ShardSampler(Sampler[int]):
    """Indices rank, rank + W, rank + 2W, ... of a data set, in order, with no padding.

    For evaluation: every sample is seen exactly once across the processes, so sums of losses
    and hits reduced over ranks are exact (DistributedSampler pads the last shard with repeats).
    """

    def __init__(self, dataset: Sized, rank: int, world_size: int) -> None:
        self.indices = range(rank, len(dataset), world_size)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)
