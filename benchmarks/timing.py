"""Timing helpers shared by the benchmarks (``bench.py``, ``bench_nm_gpu.py``, ``gpu_suite.py``).

On CUDA a timed block is measured with CUDA events recorded on the current stream around the
block (the GPU's own clock, no host sync inside the block); on CPU with the wall clock and the
process CPU clock. Both report seconds, so callers do not care which device they time.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def sync(device: torch.device) -> None:
    """Wait for the device's queued work (a no-op on CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def stats(samples: list[float]) -> dict:
    """Median, quartiles and inter-quartile range of ``samples`` (seconds), in milliseconds."""
    ms = [s * 1e3 for s in samples]
    med = statistics.median(ms)
    if len(ms) >= 2:
        q1, _, q3 = statistics.quantiles(ms, n=4, method="inclusive")
    else:
        q1 = q3 = med
    return {"median_ms": med, "q1_ms": q1, "q3_ms": q3, "iqr_ms": q3 - q1, "samples_ms": ms}


class BlockTimer:
    """Times one block of work on ``device``: ``with timer: ...`` then ``timer.seconds`` (CUDA
    events on CUDA, else the wall clock) and ``timer.cpu_seconds`` (process CPU time).

    The device is synchronised before the block starts and after it ends, so queued work of
    the previous block never leaks into this one."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"
        self.seconds = float("nan")
        self.cpu_seconds = float("nan")
        self.clock = "cuda events" if self.cuda else "wall"

    def __enter__(self) -> BlockTimer:
        sync(self.device)
        if self.cuda:
            self._start = torch.cuda.Event(enable_timing=True)
            self._end = torch.cuda.Event(enable_timing=True)
            self._start.record()
        self._c0, self._t0 = time.process_time(), time.perf_counter()
        return self

    def __exit__(self, *exc) -> bool:
        if self.cuda:
            self._end.record()
        sync(self.device)
        wall = time.perf_counter() - self._t0
        self.cpu_seconds = time.process_time() - self._c0
        self.seconds = self._start.elapsed_time(self._end) / 1e3 if self.cuda else wall
        return False


def time_op(fn: Callable[[], object], device: torch.device, repeats: int,
            warmup: int = 3) -> dict:
    """``fn()`` after ``warmup`` untimed calls, timed ``repeats`` times one call per block;
    :func:`stats` of the samples plus ``clock`` (which clock measured them)."""
    for _ in range(warmup):
        fn()
    samples = []
    timer = BlockTimer(device)
    for _ in range(repeats):
        with timer:
            fn()
        samples.append(timer.seconds)
    return {**stats(samples), "clock": timer.clock}
