"""Part 6 — no host syncs: every registered topology, perturbation, gradient-correction and
schedule component (and the dense, hard and forward-masked baselines and all observers: the
cases of ``tests/test_no_host_sync.py`` plus the schedules) runs until it has taken at least 50
regular steps (neither a logging nor a topology update step) on the device. Two counters watch
those steps:

* the test module's counter of tensor reads to the host made by sparsefw code (``item``,
  ``tolist``, ``__bool__``, ...; any device);
* on CUDA, ``torch.cuda.set_sync_debug_mode("warn")``: every synchronising CUDA call warns, and
  the warnings are counted.

A regular step with a sync fails the part (logging and update steps keep the allowances the
test module documents). The step driver, the cases and the allowances are the test module's,
imported rather than copied, so the two cannot drift apart.
"""

from __future__ import annotations

import warnings

import pytest
import torch

from gpu_parts.budget import PartContext

REGULAR_STEPS = 50


class CudaSyncCounter:
    """A guard for ``run_steps``: counts synchronising CUDA calls inside each guarded step."""

    events: list[str] = []

    def __enter__(self):
        self._catch = warnings.catch_warnings(record=True)
        self._log = self._catch.__enter__()
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("warn")
        return self

    def __exit__(self, *exc):
        if torch.cuda.is_available():
            torch.cuda.set_sync_debug_mode("default")
        self._catch.__exit__(*exc)
        type(self).events += [str(w.message).splitlines()[0] for w in self._log
                              if "synchroniz" in str(w.message)]
        return False


def cases(mod) -> dict[str, dict]:
    """The test module's cases plus one per registered schedule component (schedules answer
    on every step; the test module does not list them). Mask initialisers run once, before
    training, outside the step, and are not stepped here."""
    out = dict(mod.CASES)
    for name in mod._REGISTRY.names("schedule"):
        over = {"schedule": [{"name": name}]}
        if name in ("mask_decay", "structure_decay"):  # β and N:M frames of forward masks
            over = mod.merge(mod.FORWARD_NM, over)
            if name == "structure_decay":
                over["topology_update"] = {"name": "nm", "n": 2, "m": 4, "every": 2}
        out[f"schedule:{name}"] = mod.merge(mod.HARD, over)
    return out


def steps_for(case: dict, mod, tiny: bool) -> int:
    """Steps to run so that ``REGULAR_STEPS`` of them are regular (fewer at ``--tiny``)."""
    if tiny:
        return 6
    per4 = mod.LOG_EVERY - 1  # regular steps among LOG_EVERY without topology updates
    n = REGULAR_STEPS * mod.LOG_EVERY // per4 + mod.LOG_EVERY
    return 2 * n + 4 if "topology_update" in case else n


def run(ctx: PartContext) -> None:
    from tests import test_no_host_sync as mod

    ctx.figures["cases"] = {}
    ctx.lines += ["| component | steps | regular | sparsefw host reads (regular) | "
                  "CUDA syncs (regular) | verdict |", "|---|---|---|---|---|---|"]
    all_cases = cases(mod)
    for case in sorted(all_cases):
        ctx.check(case)
        n = steps_for(all_cases[case], mod, ctx.tiny)
        raw = mod._raw(**all_cases[case])
        raw["train"]["device"] = ctx.device.type
        raw["train"]["epochs"] = n // 4 + 2  # the tiny data has 4 steps per epoch
        CudaSyncCounter.events = []
        with pytest.MonkeyPatch.context() as mp:
            counter = mod.SyncCounter(mp)
            records = mod.run_steps(raw, ctx.work_dir / case.replace(":", "-"), counter,
                                    n_steps=n, guard=CudaSyncCounter)
        regular = [r for r in records if not r["logging"] and not r["update"]]
        reads = sum(len(r["calls"]) for r in regular)
        cuda = len(CudaSyncCounter.events) if ctx.device.type == "cuda" else None
        problems = mod.check(records, case)
        if cuda:
            problems.append(f"{cuda} synchronising CUDA calls in regular steps: "
                            f"{sorted(set(CudaSyncCounter.events))[:3]}")
        ctx.figures["cases"][case] = {"steps": len(records), "regular": len(regular),
                                      "host_reads": reads, "cuda_syncs": cuda,
                                      "problems": problems}
        verdict = "ok" if not problems else "SYNCS"
        ctx.lines.append(f"| {case} | {len(records)} | {len(regular)} | {reads} | "
                         f"{'—' if cuda is None else cuda} | {verdict} |")
        for p in problems:
            ctx.fail(f"{case}: {p}")
    if ctx.device.type != "cuda":
        ctx.note("CUDA sync counter: not applicable on CPU (host reads are still counted)")
