"""Run a group of local worker processes for a test or a benchmark of the sharded heads (gloo on one
machine): one free port, ``spawn`` start, a deadline, and every process gone when the call returns."""
from __future__ import annotations

import os
import socket
import time

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free now (for ``MASTER_PORT``)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_local_group(worker, world: int, *args, timeout: float, env: dict | None = None) -> None:
    """Runs ``worker(rank, world, port, *args)`` in ``world`` spawned processes and waits for them; on
    an error in a worker (re-raised here) or past ``timeout`` seconds (``TimeoutError``) every process
    is stopped before this returns. ``env``: variables the children start with (set in this process
    only while they are spawned)."""
    saved = {k: os.environ.get(k) for k in (env or {})}
    os.environ.update(env or {})
    try:
        ctx = mp.start_processes(worker, args=(world, free_port(), *args), nprocs=world, join=False,
                                 start_method="spawn")
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
    deadline = time.monotonic() + timeout
    try:
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                raise TimeoutError(f"the {world}-process group did not finish within {timeout} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.terminate()
                p.join(5)
            if p.is_alive():
                p.kill()
                p.join()


def init_local_group(rank: int, world: int, port: int, *, timeout_s: float = 120.0, threads: int = 1) -> None:
    """The worker side of :func:`run_local_group`: a gloo process group on 127.0.0.1:``port`` (gloo's
    own connections on the loopback interface too, where there is one), ``threads`` intra-op threads."""
    import datetime

    import torch
    import torch.distributed as dist

    if "lo" in dict(socket.if_nameindex()).values():
        os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    torch.set_num_threads(threads)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout_s))
