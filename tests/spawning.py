"""Spawning gloo worker processes for the distributed tests (tests/test_ddp.py,
tests/test_fsdp.py): a free loopback port, start, join with a limit, kill what hangs (pytest
would otherwise wait for it at exit), and the errors the workers reported through files."""

from __future__ import annotations

import socket
from pathlib import Path

import torch.multiprocessing as mp


def free_port() -> int:
    """A TCP port free on 127.0.0.1 at the time of asking."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn(target, out: Path, *args, world: int = 2, timeout: float = 240,
          check_errors: bool = True) -> list:
    """Run ``target(rank, world, port, *args)`` in ``world`` spawned processes and wait for
    them; fail if one hangs (it is killed) or, with ``check_errors``, wrote
    ``out/error<rank>.txt``. Returns the processes (their exit codes)."""
    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    hung = [p for p in procs if p.exitcode is None]
    for p in hung:
        p.kill()
        p.join()
    assert not hung, "worker did not finish"
    if check_errors:
        errors = [e.read_text() for e in sorted(Path(out).glob("error*.txt"))]
        assert not errors, errors[0]
    return procs
