"""A one-shot all-reduce over NVLink (torch symmetric memory) against NCCL's, at decode message sizes.

    torchrun --nproc-per-node 2 benchmarks/allreduce_symm_mem.py [--hidden 4096 5120 8192] [--tokens 1 8 32 128 256]

A decode step of tensor parallelism all-reduces [tokens, hidden] activations twice per layer: a few
KiB to a few MiB, where latency, not bandwidth, decides. NCCL's ring/tree pays a fixed cost per
call; a one-shot all-reduce has each GPU read every peer's buffer straight over NVLink and add them
(`torch.ops.symm_mem.one_shot_all_reduce`); `two_shot_all_reduce_` splits the sum across GPUs. Each
method is captured in a CUDA graph of `--reps` calls, as a decode step would be, and timed by CUDA
events; rank 0 prints microseconds per call. Results are checked against a float64 reference sum.
NVLink multicast (`multimem_all_reduce_`) is left out: it is kept off on the machines we borrow.
"""

from __future__ import annotations

import argparse
import os

import torch
import torch.distributed as dist


def timed_graph(fn, reps: int, iters: int) -> float:
    """Microseconds per call of fn, captured `reps` times in one CUDA graph."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up outside the graph (NCCL and the symmetric buffers set themselves up)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(reps):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    dist.barrier()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1000 / (iters * reps)


def measure(shape: tuple[int, int], device: torch.device, group: str, reps: int, iters: int) -> dict[str, float]:
    """Microseconds per all-reduce of a bf16 tensor of `shape`, per method (NaN: not in this torch)."""
    import torch.distributed._symmetric_memory as symm_mem

    generator = torch.Generator(device).manual_seed(dist.get_rank())
    x = torch.randn(shape, dtype=torch.bfloat16, device=device, generator=generator)
    reference = x.double()
    dist.all_reduce(reference)
    nccl_buf = x.clone()
    symm = symm_mem.empty(shape, dtype=torch.bfloat16, device=device)
    symm_mem.rendezvous(symm, group)
    out = torch.empty_like(x)
    methods = {
        "nccl": (lambda: dist.all_reduce(nccl_buf), None),
        "one_shot": (lambda: torch.ops.symm_mem.one_shot_all_reduce_out(symm, "sum", group, out), out),
        "two_shot": (lambda: torch.ops.symm_mem.two_shot_all_reduce_(symm, "sum", group), symm),
    }
    results = {}
    for name, (fn, result) in methods.items():
        try:
            if result is not None:  # check once on fresh inputs: within bf16's rounding of the float64 sum
                symm.copy_(x)
                fn()
                torch.testing.assert_close(result.double(), reference, rtol=2e-2, atol=2e-2 * dist.get_world_size())
            results[name] = timed_graph(fn, reps, iters)  # the buffers then overflow: only the time counts
        except (RuntimeError, AttributeError) as exc:
            results[name] = float("nan")
            if dist.get_rank() == 0:
                print(f"{name} unavailable: {exc}")
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--hidden", type=int, nargs="+", default=[4096, 5120, 8192])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 32, 128, 256])
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--iters", type=int, default=50)
    args = parser.parse_args()
    rank = int(os.environ["RANK"])
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    dist.init_process_group("nccl", device_id=device)
    world = dist.get_world_size()
    import torch.distributed._symmetric_memory as symm_mem

    group = dist.group.WORLD.group_name
    if hasattr(symm_mem, "enable_symm_mem_for_group"):  # needed before torch 2.8, a no-op or absent after
        symm_mem.enable_symm_mem_for_group(group)
    if rank == 0:
        print(f"{world} x {torch.cuda.get_device_name(device)}, torch {torch.__version__}; us per all-reduce (bf16)")
        print(f"{'tokens':>6} {'hidden':>6} {'KiB':>7} {'nccl':>8} {'one_shot':>9} {'two_shot':>9}")
    for hidden in args.hidden:
        for tokens in args.tokens:
            results = measure((tokens, hidden), device, group, args.reps, args.iters)
            if rank == 0:
                kib = tokens * hidden * 2 / 1024
                print(f"{tokens:>6} {hidden:>6} {kib:>7.0f} {results['nccl']:>8.1f} {results['one_shot']:>9.1f} "
                      f"{results['two_shot']:>9.1f}", flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
