"""Tensor-parallel workers: one process per rank beyond the driver, as vLLM's multiprocessing executor.

The engine's process is rank 0, the driver: it schedules, runs its own share of the model, and
samples. It spawns the other ranks of its node; each builds its share of the model and its own KV
pool (its KV heads only), then runs the steps the driver sends it (`ModelRunner.serve_steps`).
The scheduler and block manager exist on the driver only: the pools of all ranks have the same
number of blocks, so one block table serves them all.

All ranks meet through torch.distributed's TCP rendezvous at master_addr:master_port. On several
machines (`--nnodes N`), node 0 runs the engine and the first tensor_parallel_size / N ranks;
node k (`--node-rank k`) runs only its ranks (`run_node`), and stops when the driver does. Under
torchrun (one process per rank, RANK and WORLD_SIZE set), nothing is spawned: the ranks meet
through env://, rank 0 runs the command and the others a worker each (`launched_rank`).

A worker that dies is seen at once through its process sentinel: the engine fails with an error
that names the rank, rather than wait on a collective that can no longer complete.
"""

from __future__ import annotations

import atexit
import logging
import multiprocessing
import os
import socket
import threading
import time
from dataclasses import replace
from multiprocessing.connection import wait
from multiprocessing.process import BaseProcess
from typing import NoReturn

import torch

from martlet import distributed
from martlet.config import EngineConfig, ModelConfig

logger = logging.getLogger("martlet")

WORKER_EXIT_TIMEOUT = 30.0  # seconds workers get to leave their loop before they are killed
# Seconds after a worker died by which the engine must have failed, if it was waiting on the ranks;
# otherwise it is stuck (see `_watch`) and its process exits.
HANG_GRACE = 10.0


class WorkerDiedError(RuntimeError):
    """A tensor-parallel rank stopped: the engine cannot run another step."""


class Workers:
    """The driver's side: this node's other ranks, started, watched and stopped."""

    def __init__(self, config: EngineConfig, model_config: ModelConfig) -> None:
        if config.master_port is None:  # one node: any free port on the loopback
            config = replace(config, master_addr="127.0.0.1", master_port=_free_port())
        self.failure: str | None = None
        self.reported = False  # the failure has been raised to the engine's caller
        self.busy = True  # the engine waits on the ranks: starting up (until it says otherwise), or in a step
        self.stopping = False
        self.processes = [] if launched_rank() is not None else spawn_ranks(config, model_config, first_rank=1)
        self.ranks = {p.sentinel: rank for rank, p in enumerate(self.processes, start=1)}
        if self.processes:
            threading.Thread(target=self._watch, name="martlet-tp-monitor", daemon=True).start()
        atexit.register(self.shutdown)  # a script that ends without shutting down lets its workers go cleanly
        distributed.init(0, config.tensor_parallel_size, _init_method(config), rank_device(config, 0))

    def _watch(self) -> None:
        ended = wait(list(self.ranks))
        if self.stopping or self.failure is not None:  # stopped on purpose, or by `abandon`
            return
        process = self.processes[self.ranks[ended[0]] - 1]
        process.join(1)  # reaped, for its exit code
        self.failure = (f"tensor-parallel worker rank {self.ranks[ended[0]]} (pid {process.pid}) died "
                        f"with exit code {process.exitcode}")
        logger.error("%s: the engine cannot go on", self.failure)
        for p in self.processes:  # the others would wait on it forever
            p.kill()
        # Over gloo a collective with a dead peer fails at once and the engine raises. An NCCL
        # collective (or the rendezvous, at start-up) may wait until its timeout, minutes away, and
        # nothing unblocks it: an engine still stuck after a grace period ends its process.
        time.sleep(HANG_GRACE)
        if self.busy and not self.reported and not self.stopping:
            logger.critical("%s while the engine waited on it: exiting", self.failure)
            os._exit(1)

    def check(self) -> None:
        """Raise WorkerDiedError if a rank has died."""
        if self.failure is not None:
            self.reported = True
            raise WorkerDiedError(self.failure)

    def abandon(self, error: BaseException) -> None:
        """A step failed on the driver for a reason of its own (out of memory, a bug): the workers are
        inside that step's collectives, which the driver will not join, so they are stopped, and the
        engine cannot run another step."""
        self.failure = (f"the driver's step failed ({type(error).__name__}: {error}), so the tensor-parallel "
                        "workers were stopped")
        self.reported = True
        for p in self.processes:
            p.kill()

    def fail(self, error: distributed.CollectiveError) -> NoReturn:
        """Raise for a collective that failed: WorkerDiedError if a rank died (its sentinel may fire a
        moment after the collective fails), else the collective's error: a rank hung past the timeout."""
        self.reported = True
        if self.failure is None:
            time.sleep(0.5)
        if self.failure is not None:
            raise WorkerDiedError(self.failure) from error
        raise RuntimeError(f"a tensor-parallel collective failed (is a rank hung or unreachable?): {error}") from error

    def shutdown(self) -> None:
        """Tell the workers to stop, wait for them, and leave the process group."""
        if self.stopping:
            return
        self.stopping = True
        atexit.unregister(self.shutdown)
        if self.failure is None:
            try:
                distributed.send_message(None)
            except RuntimeError:  # one is gone already: it is killed below anyway
                pass
        for p in self.processes:
            p.join(WORKER_EXIT_TIMEOUT)
            if p.is_alive():
                p.kill()
                p.join()
        distributed.shutdown()


def spawn_ranks(config: EngineConfig, model_config: ModelConfig, first_rank: int) -> list[BaseProcess]:
    """Start this node's ranks from `first_rank` on, each in a spawned process (CUDA cannot fork)."""
    per_node = config.tensor_parallel_size // config.nnodes
    node_ranks = range(config.node_rank * per_node, (config.node_rank + 1) * per_node)
    context = multiprocessing.get_context("spawn")
    processes = []
    for rank in node_ranks:
        if rank >= first_rank:
            process = context.Process(target=run_worker, args=(config, model_config, rank, logging.getLogger().level),
                                      name=f"martlet-tp-rank-{rank}", daemon=True)
            process.start()
            processes.append(process)
    return processes


def run_worker(config: EngineConfig, model_config: ModelConfig, rank: int, log_level: int) -> None:
    """A worker's main: join the group, build this rank's share of the model and its KV pool, serve steps."""
    from martlet.engine.model_runner import ModelRunner
    from martlet.models.loader import build_engine_model

    logging.basicConfig(level=log_level, format=f"rank {rank}: %(message)s")
    device = rank_device(config, rank)
    config = replace(config, device=device)
    distributed.init(rank, config.tensor_parallel_size, _init_method(config), device)
    torch.manual_seed(config.seed)
    ModelRunner(config, model_config, build_engine_model(config, model_config, quiet=True)).serve_steps()
    distributed.shutdown()


def run_node(config: EngineConfig, model_config: ModelConfig) -> int:
    """Node k > 0 of a multi-node engine: run this node's ranks until the driver stops them; the exit
    status is the first nonzero one of theirs."""
    processes = spawn_ranks(config, model_config, first_rank=0)
    for p in processes:
        p.join()
    return next((p.exitcode for p in processes if p.exitcode), 0)


def launched_rank() -> int | None:
    """This process's rank when a launcher (torchrun) started one process per rank, else None."""
    return int(os.environ["RANK"]) if "RANK" in os.environ and "WORLD_SIZE" in os.environ else None


def rank_device(config: EngineConfig, rank: int) -> torch.device:
    """The device of `rank`: on CUDA its GPU on its node."""
    if config.device.type != "cuda":
        return config.device
    if launched_rank() is not None:
        return torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    return torch.device("cuda", rank % (config.tensor_parallel_size // config.nnodes))


def _init_method(config: EngineConfig) -> str:
    if launched_rank() is not None:
        if int(os.environ["WORLD_SIZE"]) != config.tensor_parallel_size:
            raise ValueError(f"launched as {os.environ['WORLD_SIZE']} processes (WORLD_SIZE) for "
                             f"tensor_parallel_size={config.tensor_parallel_size}: they must be equal")
        return "env://"
    return f"tcp://{config.master_addr}:{config.master_port}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
