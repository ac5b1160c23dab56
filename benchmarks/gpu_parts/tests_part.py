"""Part 1 — tests on the device: ``tests/gpu``, the CUDA-only no-host-sync tests, and a chosen
set of the CPU suite's tests run with ``--device`` (every test that takes the ``device`` fixture
or builds its run with ``make_config`` then runs there; see ``tests/conftest.py``).

The set is chosen to check what could differ on a GPU, within two minutes on an H200: the hard
mask invariant through real runs, S²-SAM/SAM perturb-then-restore bit for bit, resume bit for bit
(deterministic algorithms switched on), N:M patterns (kernel and run), RigL/SET drop = grow
through real runs (every dynamic topology method). pytest runs in a child process, stopped at
the part's budget.
"""

from __future__ import annotations

import os
import subprocess
import sys
import xml.etree.ElementTree as ET

from gpu_parts.budget import Cut, PartContext

#: node ids run on the device (a renamed test makes pytest, and so this part, fail loudly)
DEVICE_TESTS = (
    "tests/gpu",
    "tests/test_no_host_sync.py::test_no_host_sync_in_step_cuda",
    "tests/test_masks.py::test_short_run_keeps_pruned_weights_zero",
    "tests/test_sam.py::test_perturb_then_restore_is_bit_exact",
    "tests/test_sam.py::test_s2sam_resume_is_exact",
    "tests/test_resume.py::test_kill_and_resume_is_bit_identical",
    "tests/test_nm_properties.py::test_every_group_keeps_exactly_the_n_largest",
    "tests/test_nm.py::test_ste_run_masks_are_nm_and_dense_weights_survive",
    "tests/test_topology_properties.py::test_trainer_grown_weights_start_at_zero_with_zero_state",
)


def _junit_summary(path) -> dict:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    out = {"tests": 0, "failures": 0, "errors": 0, "skipped": 0, "failed": [], "skipped_why": {}}
    for s in suites:
        for k in ("tests", "failures", "errors", "skipped"):
            out[k] += int(s.get(k, 0))
        for case in s.iter("testcase"):
            name = f"{case.get('classname')}::{case.get('name')}"
            for tag in ("failure", "error"):
                el = case.find(tag)
                if el is not None:
                    out["failed"].append(f"{name}: {(el.get('message') or '').splitlines()[:1]}")
            skip = case.find("skipped")
            if skip is not None:
                why = skip.get("message", "")
                out["skipped_why"][why] = out["skipped_why"].get(why, 0) + 1
    out["passed"] = out["tests"] - out["failures"] - out["errors"] - out["skipped"]
    return out


def run(ctx: PartContext) -> None:
    junit = ctx.out_dir / "tests-junit.xml"
    # --tiny: the same node ids with hypothesis's dev profile (fewer examples), seeded
    tiny = ["--hypothesis-seed=0"] if ctx.tiny else []
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *tiny, "--device",
           ctx.device.type, f"--junitxml={junit}", *DEVICE_TESTS]
    env = dict(os.environ)
    env.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")
    env["HYPOTHESIS_PROFILE"] = "dev" if ctx.tiny else env.get("HYPOTHESIS_PROFILE", "ci")
    if ctx.device.type == "cuda":  # deterministic cuBLAS: read when the first handle is made
        env.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    ctx.figures["command"] = " ".join(cmd[1:])
    timeout = max(1.0, ctx.remaining())
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                              cwd=ctx.root, env=env)
    except subprocess.TimeoutExpired as exc:
        out = exc.stdout.decode() if isinstance(exc.stdout, bytes) else exc.stdout or ""
        ctx.figures["output_tail"] = out[-3000:]
        raise Cut(f"pytest stopped at the part's budget ({timeout:.0f} s)") from None
    ctx.figures["returncode"] = proc.returncode
    ctx.figures["output_tail"] = (proc.stdout + proc.stderr)[-3000:]
    if not junit.exists():
        ctx.fail(f"pytest wrote no report (exit {proc.returncode}): "
                 f"{(proc.stdout + proc.stderr)[-500:]}")
        return
    summary = _junit_summary(junit)
    ctx.figures.update(summary)
    ctx.lines += [
        "| tests | passed | failed | errors | skipped |",
        "|---|---|---|---|---|",
        f"| {summary['tests']} | {summary['passed']} | {summary['failures']} | "
        f"{summary['errors']} | {summary['skipped']} |",
        "",
    ]
    for why, n in summary["skipped_why"].items():
        ctx.lines.append(f"- skipped ({n}): {why}")
    for name in summary["failed"]:
        ctx.fail(name)
    if proc.returncode not in (0, 5) and not summary["failed"]:
        ctx.fail(f"pytest exited {proc.returncode}: {(proc.stdout + proc.stderr)[-500:]}")
