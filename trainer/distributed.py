"""One process or many: the same training code runs alone or under ``torchrun``.

``torchrun --nproc-per-node N`` sets RANK, WORLD_SIZE, LOCAL_RANK and LOCAL_WORLD_SIZE; with
WORLD_SIZE > 1 a process group is started (gloo on CPU, nccl on GPU). Rank 0 reads the data,
reports, saves, exports and publishes; the others train their shard of every global batch.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from typing import Any, TypeVar

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistEnv:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    local_world_size: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False  # this code started the process group and ends it

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_int(name: str, default: int) -> int:
    return int(os.environ.get(name, default))


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


def init_distributed(device: str = "auto", num_threads: int = 0) -> DistEnv:
    """Read the launcher's environment, start the process group, pick device and threads."""
    rank, world = _env_int("RANK", 0), _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    local_world = _env_int("LOCAL_WORLD_SIZE", world)
    use_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
        # processes on one machine share its cores; one process alone keeps torch's default
        if num_threads or local_world > 1:
            torch.set_num_threads(num_threads or max(1, available_cores() // local_world))
    owns = False
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if use_cuda else "gloo",
            device_id=dev if use_cuda else None,
        )
        owns = True
    threads = torch.get_num_threads()
    log.info(
        "training process",
        extra={"rank": rank, "world_size": world, "device": str(dev), "threads": threads},
    )
    return DistEnv(rank, world, local_rank, local_world, dev, owns)


def broadcast(env: DistEnv, obj: T) -> T:
    """Rank 0's ``obj`` on every rank (pickled); the others' ``obj`` is ignored."""
    if not env.distributed:
        return obj
    box: list[Any] = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather(env: DistEnv, obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (pickled)."""
    if not env.distributed:
        return [obj]
    out: list[Any] = [None] * env.world_size
    dist.all_gather_object(out, obj)
    return out


def all_reduce_sum(env: DistEnv, values: list[float]) -> list[float]:
    """Element-wise sums over ranks of a few numbers."""
    if not env.distributed:
        return values
    tensor = torch.tensor(values, dtype=torch.float64, device=env.device)
    dist.all_reduce(tensor)
    return [float(v) for v in tensor.tolist()]


def barrier(env: DistEnv) -> None:
    if env.distributed:
        dist.barrier()


def shutdown(env: DistEnv) -> None:
    if env.owns_group and dist.is_initialized():
        dist.destroy_process_group()
