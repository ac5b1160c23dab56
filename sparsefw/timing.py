"""Wall-clock comparison of alternative implementations of the same computation, as the sparse
runtime's and sparse training's autotune need it: every candidate timed in the same process,
interleaved (candidate order rotated every repeat, so load spikes on a shared machine hit all of
them alike), the median of several repeats kept, CUDA synchronised around each measurement.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Mapping

import torch


def _sync(device: torch.device | None) -> None:
    if device is not None and device.type == "cuda":
        torch.cuda.synchronize(device)


def median_times(
    candidates: Mapping[str, Callable[[], object]],
    *,
    repeats: int = 5,
    number: int = 3,
    warmup: int = 2,
    device: torch.device | None = None,
) -> dict[str, float]:
    """Seconds per call of each candidate: the median over ``repeats`` of the mean of
    ``number`` back-to-back calls, candidates interleaved within every repeat."""
    names = list(candidates)
    for name in names:
        for _ in range(warmup):
            candidates[name]()
    _sync(device)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(repeats):
        shift = r % len(names) if names else 0
        for name in names[shift:] + names[:shift]:
            fn = candidates[name]
            _sync(device)
            start = time.perf_counter()
            for _ in range(number):
                fn()
            _sync(device)
            samples[name].append((time.perf_counter() - start) / number)
    return {n: statistics.median(s) for n, s in samples.items()}


def pick(times: Mapping[str, float], baseline: str, margin: float) -> str:
    """The fastest candidate, unless it beats ``baseline`` by less than the relative
    ``margin`` (then ``baseline``): a noisy measurement never trades the baseline for a tie."""
    best = min(times, key=times.__getitem__)
    if best != baseline and times[best] * (1.0 + margin) > times[baseline]:
        return baseline
    return best
