#!/usr/bin/env python
"""The GPU check in one command: tests, correctness and speed of sparsefw on a device, written to
a report.

    python benchmarks/gpu_suite.py --out OUT_DIR                       # on a GPU machine
    python benchmarks/gpu_suite.py --device cpu --tiny --out OUT_DIR   # toy sizes, < 1 min on CPU

Parts (one module each under ``benchmarks/gpu_parts/``), in the order they run:

1. tests on the device (``tests_part``)          2. the quickstart on the device vs CPU
4. 2:4 semi-structured kernels (``semi``)         5. data pipeline (``pipeline``)
6. no host syncs (``syncs``)                      3. step time vs a plain loop (``steptime``)

Each part gets a share of ``--budget-s`` (time an earlier part leaves unused goes to the next;
the step-time part runs last and takes what is left); a part whose time runs out stops and is
reported as *cut* with what it finished. Writes ``OUT_DIR/gpu-report.md`` and
``OUT_DIR/gpu-report.json`` (plus ``tests-junit.xml``). Exits 1 when a correctness part failed
or a part crashed, 2 when the device is not there, else 0. ``benchmarks/GPU.md`` explains every
figure.
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the sync part reuses tests/test_no_host_sync.py
    sys.path.insert(1, str(ROOT))
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")  # torch.compile's C++ build

import torch  # noqa: E402

from gpu_parts import pipeline, quickstart, report, semi, steptime, syncs, tests_part  # noqa: E402
from gpu_parts.budget import Part, PartContext, plan_deadlines, run_part  # noqa: E402

#: the parts in the order they run, with their shares of the budget
PARTS = (
    Part("tests", "1. Tests on the device", 0.25, tests_part.run, checks=True),
    Part("quickstart", "2. Quickstart on the device vs CPU", 0.07, quickstart.run, checks=True),
    Part("semi_structured", "4. 2:4 semi-structured kernels", 0.06, semi.run, checks=True),
    Part("pipeline", "5. Data pipeline", 0.06, pipeline.run, checks=False),
    Part("no_host_sync", "6. No host syncs", 0.14, syncs.run, checks=True),
    Part("steptime", "3. Step time vs a plain PyTorch loop", 0.42, steptime.run, checks=False),
)
DEFAULT_BUDGET_S = 420.0


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="folder for gpu-report.md / gpu-report.json")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true",
                   help="toy sizes (checks that every part runs; its figures mean nothing)")
    p.add_argument("--budget-s", type=float, default=DEFAULT_BUDGET_S,
                   help=f"time for all parts together, seconds (default {DEFAULT_BUDGET_S:.0f})")
    p.add_argument("--steptime-modes", default="eager,compile",
                   help="step-time part: eager, compile, or both (default eager,compile; a "
                        "second call can measure only what the first had to cut)")
    p.add_argument("--only", default=None,
                   help="comma-separated part keys to run: " + ", ".join(p.key for p in PARTS))
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_suite: --device cuda, but torch sees no CUDA device here "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda}); "
              "use --device cpu --tiny to check the suite itself", file=sys.stderr)
        return 2
    if args.tiny and device.type == "cpu":
        # toy tensors: one thread each; several threads on a busy CPU spin-wait for each other
        # (ten times slower on a shared 2-core machine)
        torch.set_num_threads(1)
        os.environ["OMP_NUM_THREADS"] = "1"  # the pytest child process too
    # the benchmark collects garbage before every variant it builds; objects of the imports so
    # far (torch's, most of the heap) never become garbage: keep them out of those collections
    gc.freeze()
    modes = tuple(args.steptime_modes.split(","))
    if not modes or set(modes) - {"eager", "compile"}:
        print(f"gpu_suite: --steptime-modes {args.steptime_modes!r}: give eager, compile or "
              "eager,compile", file=sys.stderr)
        return 2
    parts = list(PARTS)
    if args.only:
        keys = args.only.split(",")
        unknown = sorted(set(keys) - {p.key for p in PARTS})
        if unknown:
            print(f"gpu_suite: unknown part(s) {unknown}; choose from "
                  f"{[p.key for p in PARTS]}", file=sys.stderr)
            return 2
        parts = [p for p in PARTS if p.key in keys]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python benchmarks/gpu_suite.py " + " ".join(sys.argv[1:] if argv is None else argv)
    meta = report.machine(device, ROOT)
    meta.update(command=command, budget_s=args.budget_s, tiny=args.tiny)
    print(f"gpu_suite: {meta.get('device_name')} · torch {meta['torch']} · budget "
          f"{args.budget_s:.0f} s", flush=True)
    deadline = plan_deadlines(parts, started, started + args.budget_s)
    results = []
    work = Path(tempfile.mkdtemp(prefix="sparsefw-gpu-suite-"))
    try:
        for i, part in enumerate(parts):
            ctx = PartContext(part.key, device, args.tiny, ROOT, out, work / part.key,
                              deadline(i), options={"steptime_modes": modes})
            ctx.work_dir.mkdir(parents=True)
            print(f"-- {part.title}: up to {ctx.remaining():.0f} s", flush=True)
            rec = run_part(part, ctx)
            results.append(rec)
            print(f"   {rec['status']} in {rec['wall_s']} s"
                  + "".join(f"\n   FAILED: {f}" for f in rec["failures"])
                  + (f"\n{rec['detail']}" if rec["status"] == "error" else ""), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    results.sort(key=lambda r: r["title"])  # the report reads in the order 1..6
    bad = [r["title"] for r in results
           if r["status"] in ("failed", "error") or r["failures"]]
    meta["wall_s"] = time.monotonic() - started
    meta["clocks_after"] = report.clocks() if device.type == "cuda" else None
    meta["verdict"] = "FAILED: " + "; ".join(bad) if bad else "passed"
    md, js = report.write(out, meta, results)
    print(f"gpu_suite: {meta['verdict']} in {meta['wall_s']:.0f} s; wrote {md} and {js}")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
