"""Process-group setup from torchrun's environment, and the few collectives the trainer needs.

Without torchrun (WORLD_SIZE unset or 1) everything degrades to a single process, no process group,
so the same code runs in unit tests, on a laptop and in a multi-pod gang.
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    backend: str | None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def choose_backend(requested: str, cuda: bool) -> str:
    """``auto`` means nccl on GPU and gloo on CPU; nccl without a GPU can never work."""
    if requested == "auto":
        return "nccl" if cuda else "gloo"
    if requested == "nccl" and not cuda:
        raise ValueError("distributed.backend: nccl needs a GPU, none is visible; use gloo or auto")
    return requested


CPU_MAX_FILE = Path("/sys/fs/cgroup/cpu.max")


def cpu_limit(cpu_max: str | None) -> float | None:
    """CPUs the cgroup v2 ``cpu.max`` text allows ("200000 100000" -> 2.0); None when unlimited or unreadable."""
    if not cpu_max:
        return None
    parts = cpu_max.split()
    if len(parts) != 2 or parts[0] == "max":
        return None
    try:
        quota, period = float(parts[0]), float(parts[1])
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def thread_count(
    cpu_max: str | None, affinity: int | None, cpu_count: int | None, local_world_size: int, omp: str | None
) -> int | None:
    """Intra-op threads per process: the pod's CPUs shared by the processes of this pod.

    The pod's CPUs are its cgroup CPU limit (rounded down, at least 1: a thread more than the quota
    only gets throttled), else the CPUs this process may run on, else the node's core count. One process per
    core is the layout torchrun gives us; more threads than that oversubscribe (measured: 2 procs x
    1 thread beats 2 x 2 on 2 cores). None when ``OMP_NUM_THREADS`` is set: the user's choice wins.
    """
    if omp:
        return None
    limit = cpu_limit(cpu_max)
    cpus = max(1, math.floor(limit)) if limit is not None else (affinity or cpu_count or 1)
    if affinity:
        cpus = min(cpus, affinity)
    return max(1, cpus // max(1, local_world_size))


def _read_cpu_max() -> str | None:
    try:
        return CPU_MAX_FILE.read_text(encoding="utf-8")
    except OSError:
        return None


def _set_threads() -> None:
    try:
        affinity: int | None = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        affinity = None
    threads = thread_count(
        _read_cpu_max(),
        affinity,
        os.cpu_count(),
        int(os.environ.get("LOCAL_WORLD_SIZE", "1")),
        os.environ.get("OMP_NUM_THREADS"),
    )
    if threads is not None:
        torch.set_num_threads(threads)
        log.info("intra-op threads per process: %d", threads)


def init_distributed(requested_backend: str = "auto") -> DistContext:
    """Join the process group torchrun describes in the environment (or run alone)."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = torch.cuda.is_available()
    _set_threads()
    device = torch.device(f"cuda:{local_rank}") if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    if world_size == 1:
        return DistContext(0, 1, 0, device, None)
    backend = choose_backend(requested_backend, cuda)
    dist.init_process_group(backend=backend)
    log.info("rank %d/%d joined the %s process group (local rank %d)", rank, world_size, backend, local_rank)
    return DistContext(rank, world_size, local_rank, device, backend)


def shutdown(ctx: DistContext, *, finished: bool) -> None:
    """Leave the process group; after a finished run, only once every rank has finished.

    Rank 0 writes the final model and exports after the last collective. A rank that tore its gloo
    pairs down meanwhile could abort in gloo's background thread at exit ("terminate called without
    an active exception", seen once in ~20 two-process runs), which fails the gang although training
    succeeded. The barrier makes every rank leave together. After a failure a peer may already be
    gone, so no barrier then: torchrun stops the rest of the gang.
    """
    if not (ctx.distributed and dist.is_initialized()):
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()


def all_reduce_sum(ctx: DistContext, values: torch.Tensor) -> torch.Tensor:
    if ctx.distributed:
        dist.all_reduce(values, op=dist.ReduceOp.SUM)
    return values


def broadcast_from_main(ctx: DistContext, value: Any) -> Any:
    """Rank 0's ``value`` on every rank (so all ranks agree on e.g. which checkpoint to resume)."""
    if not ctx.distributed:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather_to_all(ctx: DistContext, value: Any) -> list[Any]:
    if not ctx.distributed:
        return [value]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, value)
    return out
