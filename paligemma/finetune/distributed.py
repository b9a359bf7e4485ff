"""Process-group plumbing for data-parallel training (DDP or FSDP2), from torchrun's env vars.

A plain `python` run is a world of one, with every helper a no-op (`paligemma.process_group` joins and
leaves torchrun's group; under torchrun each process is rank RANK of WORLD_SIZE). The backend
is what torchrun users expect: nccl when training on CUDA (each process on GPU LOCAL_RANK, the
collectives' tensors moved there and back), gloo on the CPU.

FSDP here is FSDP2 (`torch.distributed.fsdp.fully_shard`): each SigLIP and Gemma layer is a
sharding unit, the root holds the rest (embeddings, projector, norms). Full (unsharded) weights
and optimizer state are gathered to rank 0 with `torch.distributed.checkpoint.state_dict`, for
checkpoints and evaluation; the same functions read plain models, so one checkpoint format
serves single-process, DDP and FSDP runs alike.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from ..errors import UsageError
from ..process_group import join_process_group, torchrun_world_size


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


def process_device(device: str | torch.device = "cpu") -> torch.device:
    """The device this process trains on: `device` ("auto": cuda if there is one), where plain "cuda" means
    GPU LOCAL_RANK under torchrun."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return device


def init_distributed(backend: str | None = None, device: str | torch.device = "cpu") -> DistEnv:
    """Join the process group described by the environment (once); a world of one without it. The
    backend defaults to nccl for a CUDA `device`, gloo otherwise."""
    if torchrun_world_size() <= 1:
        return DistEnv()
    device = process_device(device)
    if device.type == "cuda" and not dist.is_initialized():
        torch.cuda.set_device(device)
    rank, world_size = join_process_group(backend or ("nccl" if device.type == "cuda" else "gloo"))
    return DistEnv(world_size=world_size, rank=rank)


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for nccl, the CPU for gloo."""
    return torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(value: torch.Tensor, env: DistEnv) -> torch.Tensor:
    """The sum of `value` over all ranks (a new tensor on value's device; the input is unchanged)."""
    value = value.detach().clone()
    if env.enabled:
        moved = value.to(_comm_device())
        dist.all_reduce(moved, op=dist.ReduceOp.SUM)
        value = moved.to(value.device)
    return value


def all_gather_tensor(value: torch.Tensor, env: DistEnv) -> list[torch.Tensor]:
    """[rank 0's value, rank 1's, ...] on value's device; every rank's `value` must have the same shape and dtype."""
    if not env.enabled:
        return [value]
    moved = value.to(_comm_device())
    gathered = [torch.empty_like(moved) for _ in range(env.world_size)]
    dist.all_gather(gathered, moved)
    return [tensor.to(value.device) for tensor in gathered]


def all_gather_objects(value, env: DistEnv) -> list:
    """[rank 0's value, rank 1's, ...] of any picklable value (small ones: it is pickled through gloo)."""
    if not env.enabled:
        return [value]
    gathered = [None] * env.world_size
    dist.all_gather_object(gathered, value)
    return gathered


def barrier(env: DistEnv) -> None:
    if env.enabled:
        dist.barrier()


def shard_bounds(batch_size: int, env: DistEnv) -> tuple[int, int]:
    """This rank's slice [start, stop) of a global micro-batch of `batch_size` examples."""
    if batch_size % env.world_size:
        raise UsageError(f"batch_size {batch_size} is not divisible by the {env.world_size} processes: every "
                         "process takes an equal share of each global batch")
    per_rank = batch_size // env.world_size
    return env.rank * per_rank, (env.rank + 1) * per_rank


# ---------------------------------------------------------------------- wrapping and gradient sync

def wrap_model(model: nn.Module, env: DistEnv, fsdp: bool) -> nn.Module:
    """The module the training loop calls: `model` itself, DDP around it, or `model` sharded in place."""
    if fsdp:
        if not env.enabled:
            raise UsageError("FSDP shards the model over several processes: launch with torchrun "
                             "--nproc_per_node N (N >= 2)")
        from torch.distributed.fsdp import fully_shard
        for layer in [*model.vision_tower.encoder.layers, *model.language_model.layers]:
            fully_shard(layer)
        fully_shard(model)
        return model
    if env.enabled:
        on_gpu = next(model.parameters()).device
        # No buffer changes in training (no batch norm); a QLoRA base's quantized weights are buffers, which
        # DDP would otherwise broadcast before every forward pass.
        return nn.parallel.DistributedDataParallel(model, device_ids=[on_gpu] if on_gpu.type == "cuda" else None,
                                                   broadcast_buffers=False)
    return model


def is_sharded(model: nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule
    return isinstance(model, FSDPModule)


@contextlib.contextmanager
def gradient_sync(runner: nn.Module, sync: bool):
    """Skip the gradient all-reduce inside (for the first micro-batches of an accumulated step)."""
    if sync:
        yield
    elif isinstance(runner, nn.parallel.DistributedDataParallel):
        with runner.no_sync():
            yield
    elif is_sharded(runner):
        runner.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            runner.set_requires_gradient_sync(True)
    else:
        yield


# ---------------------------------------------------------------------- full state, from and to shards

_FULL = StateDictOptions(full_state_dict=True, cpu_offload=True)


def full_model_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every parameter, unsharded, under its plain name (empty on ranks > 0 when sharded). Collective."""
    return get_model_state_dict(model, options=_FULL)


def full_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The optimizer state keyed by parameter name, unsharded (empty on ranks > 0 when sharded). Collective."""
    return get_optimizer_state_dict(model, optimizer, options=_FULL)


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer | None, model_state: dict | None,
                    optimizer_state: dict | None) -> None:
    """Load full (unsharded) states into a model and optimizer, sharding them if the model is sharded."""
    options = StateDictOptions(full_state_dict=True)
    if model_state is not None:
        set_model_state_dict(model, model_state, options=options)
    if optimizer_state is not None:
        set_optimizer_state_dict(model, optimizer, optimizer_state, options=options)
