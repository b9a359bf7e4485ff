"""Process-group plumbing for data-parallel training (DDP on gloo), read from torchrun's env vars.

`torchrun --nproc_per_node N` sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a
plain `python` run has none of them and is a world of one, with every helper a no-op.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistEnv:
    world_size: int = 1
    rank: int = 0

    @property
    def is_main(self) -> bool:
        """Rank 0 alone writes files, logs and evaluates."""
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def init_distributed(backend: str = "gloo") -> DistEnv:
    """Join the process group described by the environment (once); a world of one without it."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        return DistEnv()
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return DistEnv(world_size=dist.get_world_size(), rank=dist.get_rank())


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of `value` over all ranks (a new tensor; the input is unchanged)."""
    value = value.detach().clone()
    if env.enabled:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shard_bounds(batch_size: int, env: DistEnv) -> tuple[int, int]:
    """This rank's slice [start, stop) of a global micro-batch of `batch_size` examples."""
    if batch_size % env.world_size:
        raise ValueError(f"batch_size {batch_size} is not divisible by the {env.world_size} processes: every "
                         "process takes an equal share of each global batch")
    per_rank = batch_size // env.world_size
    return env.rank * per_rank, (env.rank + 1) * per_rank
