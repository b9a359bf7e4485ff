"""Joining and leaving torchrun's process group: shared by `paligemma batch` and `paligemma finetune`.

`torchrun --nproc_per_node N` sets WORLD_SIZE, RANK, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; a
plain `python` run has none of them and is a world of one, in which both helpers do nothing.
"""

from __future__ import annotations

import os

import torch.distributed as dist


def torchrun_world_size() -> int:
    """How many processes torchrun started (WORLD_SIZE); 1 outside torchrun."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def join_process_group(backend: str = "gloo") -> tuple[int, int]:
    """(rank, world_size) of this process: joins the group torchrun describes (once, with `backend`),
    or (0, 1) outside torchrun."""
    if torchrun_world_size() <= 1:
        return 0, 1
    if not dist.is_initialized():
        dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size()


def leave_process_group() -> None:
    """Leave the process group, if one was joined (before exiting). A process that exits still in its
    group leaves the teardown to the interpreter's exit, where gloo's worker threads can still be
    running: the process then aborts now and then ("terminate called without an active exception"),
    failing a finished run."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
