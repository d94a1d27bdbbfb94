"""Programmatic dependent launch (PDL, Hopper and later): the next kernel starts before this one ends.

Launched with `launch_pdl=True`, a kernel's programs may be placed on the SMs while the kernel before
it still runs; each waits (`gdc_wait`) until that kernel has finished and its writes are visible,
then lets the kernel after it be placed (`gdc_launch_dependents`). The launch latency of each kernel
then hides behind the tail of the one before. That matters where a step is hundreds of short kernels:
decode at batch 1 gained 1.3% on an H200; the batch-32 and ShareGPT-like runs, with longer kernels,
did not move (benchmarks/results/seed-rows-H200-2026-11-21.md). Every kernel that takes PDL waits
before it touches memory, so the order of effects stays that of the stream.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = True  # `benchmarks/ab.py martlet.kernels.pdl.ENABLED=False` turns it off to measure what PDL is worth


def pdl_launch(device: torch.device) -> dict[str, bool]:
    """Launch arguments for a kernel that starts with `wait_for_previous_kernel`: its PDL constexpr and
    Triton's `launch_pdl`, which must agree (launched early without the wait, a kernel would race)."""
    pdl = ENABLED and _has_pdl(device)
    return {"PDL": pdl, "launch_pdl": pdl}


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """First thing in a kernel launched with `launch_pdl=PDL`."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()
