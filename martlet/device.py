"""The device: how many SMs it has, and moving host data to it without stalling it."""

from __future__ import annotations

import functools

import numpy as np
import torch


@functools.cache
def num_sms(device: torch.device) -> int:
    """Streaming multiprocessors; on the CPU (the Triton interpreter) a nominal 4, so that kernels
    that size their grids by it still see several programs in tests."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def to_device(values: list | np.ndarray, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list or array on `device`, through pinned memory on a GPU: a copy from pageable memory
    would wait for all the work queued before it, which would undo the overlap of host and device."""
    host = torch.as_tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
