"""The tensor-parallel process group: who this process is, and the collectives the model uses.

Tensor parallelism over N ranks runs one process per rank (rank 0 is the driver: it schedules and
samples). Two groups join the same ranks:

- the device group (NCCL on CUDA, gloo on a CPU) carries the model's collectives: one all-reduce
  per row-parallel layer, the vocabulary-parallel embedding's all-reduce, the LM head's all-gather,
  and the sampled tokens' broadcast. It has a timeout: a rank that stops taking part makes the
  others fail, not wait forever.
- the control group (gloo, always on the CPU) carries the driver's one message per step. Workers
  wait on it for as long as the engine is idle, so theirs has no meaningful timeout (a dead driver
  closes its sockets, which ends their wait); the driver's send has the device group's timeout.

With one rank nothing here is set up and the model takes exactly its single-process path.
"""

from __future__ import annotations

import functools
import logging
import pickle
from collections.abc import Callable
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

logger = logging.getLogger("martlet")

# A collective that waits longer than this on another rank fails (the rank is hung or gone).
COLLECTIVE_TIMEOUT = timedelta(minutes=10)
IDLE_TIMEOUT = timedelta(days=365)  # workers wait on the driver's next step for as long as it idles

# all_gather_into_tensor's newer name (torch 2.10+), where the old one warns that it is deprecated.
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

_device_group: dist.ProcessGroup | None = None
_control_group: dist.ProcessGroup | None = None

T = TypeVar("T")


class CollectiveError(RuntimeError):
    """A collective failed: another rank died, or hung past the group's timeout. Other errors in a
    step (out of memory, a bug) keep their own type, so that they are not reported as a lost rank."""


def _collective(fn: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(fn)
    def wrapper(*args, **kwargs) -> T:
        try:
            return fn(*args, **kwargs)
        except torch.OutOfMemoryError:
            raise
        except RuntimeError as exc:  # gloo's timeout and a closed peer are plain RuntimeErrors
            raise CollectiveError(str(exc)) from exc

    return wrapper


def init(rank: int, world_size: int, init_method: str, device: torch.device) -> None:
    """Join the group of `world_size` ranks that meet at `init_method` ("tcp://host:port" or "env://")."""
    global _device_group, _control_group
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=COLLECTIVE_TIMEOUT, device_id=device if device.type == "cuda" else None)
    _device_group = dist.group.WORLD
    # Gloo's timeout is each rank's own: the driver's sends time out, the workers' receives do not.
    _control_group = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT if rank == 0 else IDLE_TIMEOUT)


def shutdown() -> None:
    global _device_group, _control_group
    if _device_group is not None:
        dist.destroy_process_group()
    _device_group = _control_group = None


def tp_size() -> int:
    return 1 if _device_group is None else dist.get_world_size(_device_group)


def tp_rank() -> int:
    return 0 if _device_group is None else dist.get_rank(_device_group)


@_collective
def all_reduce(x: torch.Tensor) -> torch.Tensor:
    """Sum x over the ranks, in place."""
    dist.all_reduce(x, group=_device_group)
    return x


@_collective
def all_gather(x: torch.Tensor) -> torch.Tensor:
    """Every rank's x side by side along the last dimension (each rank's x has the same shape)."""
    out = x.new_empty(tp_size() * x.shape[0], *x.shape[1:])  # the ranks' x one after another
    _all_gather_single(out, x.contiguous(), group=_device_group)
    return out.view(tp_size(), *x.shape).movedim(0, -2).flatten(-2)


@_collective
def broadcast(x: torch.Tensor) -> torch.Tensor:
    """The driver's x on every rank, in place."""
    dist.broadcast(x, src=0, group=_device_group)
    return x


@_collective
def wait_for_all_ranks() -> None:
    """A barrier without the device group's timeout: for waits of unknown length (loading weights)."""
    dist.monitored_barrier(group=_control_group, timeout=IDLE_TIMEOUT, wait_all_ranks=True)


@_collective
def min_over_ranks(value: int) -> int:
    t = torch.tensor([value], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN, group=_control_group)
    return int(t)


@_collective
def send_message(message: object) -> None:
    """The driver's message to every worker: plain Python (lists, ints, numpy arrays), no tensors."""
    data = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    header = torch.tensor([len(data)], dtype=torch.int64)
    dist.broadcast(header, src=0, group=_control_group)
    dist.broadcast(torch.frombuffer(bytearray(data), dtype=torch.uint8), src=0, group=_control_group)


@_collective
def receive_message() -> object:
    header = torch.empty(1, dtype=torch.int64)
    dist.broadcast(header, src=0, group=_control_group)
    data = torch.empty(int(header), dtype=torch.uint8)
    dist.broadcast(data, src=0, group=_control_group)
    return pickle.loads(data.numpy().tobytes())
