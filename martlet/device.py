"""Moving host data to the device without stalling it."""

from __future__ import annotations

import torch


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A host list on `device`, through pinned memory on a GPU: a copy from pageable memory would
    wait for all the work queued before it, which would undo the overlap of host and device."""
    host = torch.tensor(values, dtype=dtype)
    if device.type == "cuda":
        host = host.pin_memory()
    return host.to(device, non_blocking=True)
