"""Programmatic dependent launch (PDL, Hopper and later): the next kernel starts before this one ends.

Launched with `launch_pdl=True`, a kernel's programs may be placed on the SMs while the kernel before
it still runs; each waits (`gdc_wait`) until that kernel has finished and its writes are visible,
then lets the kernel after it be placed (`gdc_launch_dependents`). The launch latency and the ramp
of each kernel then hide behind the tail of the one before: in a decode step of ~300 small
kernels, that is most of the gap between them. Every kernel that takes PDL waits before it touches
memory that another kernel writes or reads, so the order of effects stays that of the stream.
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

ENABLED = True  # benchmarks/ab.py flips it to measure what PDL is worth


def use_pdl(device: torch.device) -> bool:
    return ENABLED and _has_pdl(device)


@functools.cache
def _has_pdl(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


@triton.jit
def wait_for_previous_kernel(PDL: tl.constexpr):
    """First thing in a kernel launched with `launch_pdl=PDL`."""
    if PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


@triton.jit
def prefetch_to_l2(ptrs):
    """Start bringing the 128-byte lines at `ptrs` into L2 and go on: no register waits for them."""
    tl.inline_asm_elementwise("prefetch.global.L2 [$1];", "=r,l", [ptrs], dtype=tl.int32, is_pure=False, pack=1)
