"""Run a function on several real processes with a gloo process group (CPU)."""

from __future__ import annotations

import datetime
import os
import socket
import tempfile
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _worker(rank: int, world_size: int, port: int, out_dir: str, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        result = fn(rank, world_size, *args)
        torch.save(result, os.path.join(out_dir, f"{rank}.pt"))
        dist.barrier()
    finally:
        dist.destroy_process_group()


TIMEOUT_SECONDS = 300.0
"""Wall-clock limit of one :func:`run_ranks` (a mismatched collective waits for ever)."""


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> list[Any]:
    """Run ``fn(rank, world_size, *args)`` on ``world_size`` processes; return their results."""
    with tempfile.TemporaryDirectory() as out_dir:
        context = mp.spawn(_worker, args=(world_size, _free_port(), out_dir, fn, args), nprocs=world_size, join=False)
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while not context.join(timeout=max(deadline - time.monotonic(), 0.0)):
            if time.monotonic() >= deadline:
                for process in context.processes:
                    process.kill()
                raise TimeoutError(f"{fn.__name__} on {world_size} ranks did not finish in {TIMEOUT_SECONDS:.0f} s")
        return [torch.load(os.path.join(out_dir, f"{rank}.pt"), weights_only=False) for rank in range(world_size)]


def _worker_that_may_be_left(
    rank: int, world_size: int, port: int, out_dir: str, timeout_s: float, fn: Callable[..., Any], args: tuple
) -> None:
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    init = f"tcp://127.0.0.1:{port}"
    timeout = datetime.timedelta(seconds=timeout_s)
    dist.init_process_group("gloo", init_method=init, rank=rank, world_size=world_size, timeout=timeout)
    torch.save(fn(rank, world_size, *args), os.path.join(out_dir, f"{rank}.pt"))
    # No barrier and no destroy_process_group: a peer may be gone, and tearing the group down
    # with it is not what the test measures.
    os._exit(0)


def run_ranks_with_lost_peers(
    fn: Callable[..., Any], world_size: int, timeout_s: float, *args: Any, wait_for: tuple[int, ...] = (0,)
) -> list[Any | None]:
    """As :func:`run_ranks` with a process group ``timeout`` of ``timeout_s``, where ranks may die or hang.

    Returns once the ranks ``wait_for`` have reported (or every process has ended, or
    :data:`TIMEOUT_SECONDS` have passed); the processes still running are then killed. A rank
    that reported nothing gives None.
    """
    context = mp.get_context("spawn")
    port = _free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        paths = [os.path.join(out_dir, f"{rank}.pt") for rank in range(world_size)]
        processes = [
            context.Process(
                target=_worker_that_may_be_left, args=(rank, world_size, port, out_dir, timeout_s, fn, args)
            )
            for rank in range(world_size)
        ]
        for process in processes:
            process.start()
        deadline = time.monotonic() + TIMEOUT_SECONDS
        while time.monotonic() < deadline and any(process.is_alive() for process in processes):
            # A rank's file is complete once its process has ended (it exits right after saving).
            if all(os.path.exists(paths[rank]) and not processes[rank].is_alive() for rank in wait_for):
                break
            time.sleep(0.05)
        for process in processes:
            if process.is_alive():
                process.kill()
            process.join()
        return [torch.load(path, weights_only=False) if os.path.exists(path) else None for path in paths]
