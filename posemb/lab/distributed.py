"""Processes and process groups: which rank this is, joining and leaving the group that
``torchrun`` describes, the device of each rank, and how a ``torchrun`` worker ends.

A plain process is a group of one (rank 0 of 1), so the rest of the lab calls :func:`barrier` and
reads :func:`dist_info` without asking whether DDP is on.

Every module that ``torchrun`` can launch (``posemb.cli``, ``posemb.lab.train``) ends through
:func:`exit_process`.
"""
from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import NoReturn

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world_size > 1


def dist_info() -> DistInfo:
    """Rank and world size of the current process group (1 process when none is initialised)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return DistInfo()


def launched_by_torchrun() -> bool:
    """True in a worker that ``torchrun`` started as one of several (it sets RANK and WORLD_SIZE)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1 and "RANK" in os.environ


def init_distributed(device: str) -> DistInfo:
    """Join the process group that ``torchrun`` describes in the environment (gloo on CPU, NCCL
    on CUDA); a plain process stays alone. Returns this process's :class:`DistInfo`."""
    if not launched_by_torchrun() or (dist.is_available() and dist.is_initialized()):
        return dist_info()
    backend = "nccl" if device.startswith("cuda") else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group(backend=backend)
    return dist_info()


def resolve_device(device: str) -> str:
    """``auto`` means CUDA when present, else CPU; under DDP on CUDA, each rank its LOCAL_RANK GPU."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise ValueError(f"device {device!r} was asked for but CUDA is not available; use --device cpu")
        if device == "cuda" and launched_by_torchrun():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', 0))}"
    elif device != "cpu":
        raise ValueError(f"device must be 'auto', 'cpu', 'cuda' or 'cuda:N', got {device!r}")
    return device


def barrier() -> None:
    """Wait for every rank (nothing to wait for in a plain process)."""
    if dist_info().active:
        dist.barrier()


def shutdown_distributed(*, wait: bool = True) -> None:
    """Leave the process group: wait for every rank (``wait``), then destroy it. Without the
    barrier one rank could tear down gloo while its peer still used the connection, and gloo's
    background thread then aborted the process at exit ("terminate called without an active
    exception"). After an error, ``wait=False``: the other ranks may never reach the barrier."""
    if dist.is_available() and dist.is_initialized():
        if wait:
            dist.barrier()
        dist.destroy_process_group()


def exit_process(code: int, *, now: bool = False) -> NoReturn:
    """End the process with ``code``. A ``torchrun`` worker skips the interpreter's shutdown
    (flush, then ``os._exit``): even after a barrier and ``destroy_process_group``, gloo's threads
    can be torn down in the wrong order by C++ static destructors, which aborts a worker whose
    work is all done and written (exit -6). A plain process exits normally. ``now``: the same hard exit
    from any thread (a study worker whose parent is gone; ``posemb.lab.parallel_runs``)."""
    if now or launched_by_torchrun():
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    raise SystemExit(code)


def broadcast_from_main(obj):
    """Rank 0's ``obj`` on every rank (a picklable value; itself in a plain process)."""
    if not dist_info().active:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def start_processes(device: str, *, threads: int | None, batch_size: int) -> tuple[str, DistInfo]:
    """The start of every lab command: torch threads, the device (``auto`` resolved), the process
    group under ``torchrun``, and the check that the global batch splits evenly over the ranks."""
    if threads:
        torch.set_num_threads(threads)
    device = resolve_device(device)
    info = init_distributed(device)
    if batch_size % info.world_size:
        raise ValueError(f"batch_size ({batch_size}) must be divisible by the number of DDP "
                         f"processes ({info.world_size})")
    return device, info
