"""Run a function in N real processes joined by a gloo process group (CPU), for distributed tests.

Usage (fn must be a module-level function so the spawned children can import it):

    def _body(rank: int, world_size: int, scale: float) -> torch.Tensor:
        return utils.all_gather_concat(torch.full((1,), rank * scale))

    results = run_distributed(_body, 2, 3.0)   # one return value per rank, in rank order
"""

from __future__ import annotations

import os
import socket
import tempfile
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def find_free_port() -> int:
    """Ask the OS for a currently unused TCP port on 127.0.0.1."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(
    rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    out_dir: str,
    init: bool,
    timeout_s: float,
    args: tuple,
) -> None:
    # The torchrun variables, so code under test can also read them (e.g. utils.init_distributed).
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)  # N processes on a small CI box: avoid oversubscribing the cores
    try:
        if init:
            # A timeout turns a deadlocked collective into an error instead of a hung test run.
            dist.init_process_group(
                "gloo", init_method="env://", rank=rank, world_size=world_size, timeout=timedelta(seconds=timeout_s)
            )
        result = fn(rank, world_size, *args)
    except BaseException:
        # Written before the process group closes: a peer can only fail *because* of this rank (connection closed
        # by peer) after this file exists, so the parent always sees the original error, whichever rank spawn
        # happens to report first.
        with open(os.path.join(out_dir, f"rank{rank}.error"), "w") as f:
            f.write(traceback.format_exc())
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


class DistributedChildError(RuntimeError):
    """One or more children of `run_distributed` raised; the message holds every failed rank's traceback."""


def run_distributed(
    fn: Callable[..., Any], world_size: int = 2, *args: Any, init_process_group: bool = True, timeout_s: float = 60.0
) -> list[Any]:
    """Run `fn(rank, world_size, *args)` in `world_size` spawned processes; return their results by rank.

    With `init_process_group` (default) each child joins a gloo group before calling fn; pass False to
    let fn set the group up itself from the RANK/WORLD_SIZE/MASTER_* environment. An exception in any
    child terminates the others and raises DistributedChildError in the parent with the traceback of every rank
    that failed, in rank order: the original error is always in it, even when a peer's consequential error
    (e.g. gloo's "Connection closed by peer") is the one torch.multiprocessing noticed first. Results travel
    through torch.save, so tensors and plain Python values both work.
    """
    port = find_free_port()
    with tempfile.TemporaryDirectory() as out_dir:
        try:
            mp.spawn(
                _worker,
                args=(fn, world_size, port, out_dir, init_process_group, timeout_s, args),
                nprocs=world_size,
                join=True,
            )
        except (mp.ProcessRaisedException, mp.ProcessExitedException) as err:
            failed = [
                f"rank {r}:\n{open(path).read()}"
                for r in range(world_size)
                if os.path.exists(path := os.path.join(out_dir, f"rank{r}.error"))
            ]
            if not failed:
                raise
            raise DistributedChildError("\n".join(failed)) from err
        return [torch.load(os.path.join(out_dir, f"rank{r}.pt"), weights_only=False) for r in range(world_size)]
