"""Running the runs of a sweep: one run in this process (:func:`run_one`) and many in long-lived
worker processes (:class:`WorkerPool`).

A worker is ``python -m sparsefw.workers``: it pays the imports once (torch, the engine, the
plugins, and the ``torch._dynamo`` import torch's optimizers trigger on first construction),
then reads one :class:`RunSpec` per line of JSON on its stdin and answers each with the run's
result row, one line of JSON on its stdout. Each run is what a lone ``sparsefw train CONFIG
--set ... --run-dir DIR`` does — a fresh catalogue, the config loaded from its file, a
:class:`~sparsefw.engine.Trainer` that seeds torch's generators from the config — so its
results equal the lone run's bit for bit (``tests/test_sweep_workers.py`` checks this).

Each run's row records its cost: wall time, process CPU time, training passes and FLOPs
(:mod:`sparsefw.cost`). Workers take runs from one shared queue, in the order given.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import subprocess
import sys
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

import attrs

RESULT_FILE = "result.json"
LOG_FILE = "train.log"


@attrs.frozen
class RunSpec:
    """One run of a sweep (plain data: it crosses process boundaries as JSON)."""

    method: str
    config: str
    point: tuple[tuple[str, str], ...]
    seed: int
    overrides: tuple[str, ...]
    run_dir: str

    def to_json(self) -> dict:
        return {"method": self.method, "config": self.config,
                "point": [list(p) for p in self.point], "seed": self.seed,
                "overrides": list(self.overrides), "run_dir": self.run_dir}

    @classmethod
    def from_json(cls, data: dict) -> RunSpec:
        return cls(method=data["method"], config=data["config"],
                   point=tuple(tuple(p) for p in data["point"]), seed=data["seed"],
                   overrides=tuple(data["overrides"]), run_dir=data["run_dir"])


def result_row(spec: RunSpec, status: str, metrics: dict | None = None, *, wall: float = 0.0,
               cpu: float = 0.0, cost: dict | None = None, error: str = "") -> dict:
    """The row :func:`run_one` writes to ``result.json``: the spec, the final metrics and
    the cost (``time_s`` wall, ``cpu_s`` process CPU, then the :func:`run_cost` fields)."""
    metrics = metrics or {}
    return {
        "method": spec.method, "config": spec.config,
        "point": {k: v for k, v in spec.point}, "seed": spec.seed, "status": status,
        "test/acc": metrics.get("test/acc"), "test/loss": metrics.get("test/loss"),
        "density": metrics.get("density"), "step": metrics.get("step"),
        "time_s": round(wall, 3), "cpu_s": round(cpu, 3), **(cost or {}),
        "run_dir": spec.run_dir, "error": error,
    }


def run_cost(trainer) -> dict:
    """Passes and FLOPs of a finished run (from its ``metrics.jsonl`` evaluation records and
    one measuring forward pass), plus what :func:`sparsefw.cost.cost_curve` needs to redo the
    curve: ``steps_per_epoch``, ``batch_size`` and ``layer_flops``."""
    from sparsefw.commands.report import read_metrics
    from sparsefw.cost import cost_curve, layer_flops

    sample = trainer.data.test[0][0].unsqueeze(0).to(trainer.device)
    flops = layer_flops(trainer.model, sample)
    batch = trainer.cfg.train.batch_size
    _, evals = read_metrics(trainer.run_dir)
    curve = cost_curve(evals, flops, batch_size=batch, steps_per_epoch=trainer.steps_per_epoch)
    last = curve[-1] if curve else None
    return {
        "passes_forward": last.forward if last else None,
        "passes_backward": last.backward if last else None,
        "flops_dense": last.flops_dense if last else None,
        "flops_sparse": last.flops_sparse if last else None,
        "steps_per_epoch": trainer.steps_per_epoch, "batch_size": batch, "layer_flops": flops,
    }


def run_one(spec: RunSpec) -> dict:
    """Train one run exactly as ``sparsefw train`` would (output to ``train.log`` in its
    directory); writes and returns its ``result.json`` row. A failure is recorded, not raised."""
    from sparsefw import config as config_mod
    from sparsefw.engine import train
    from sparsefw.engine.checkpoint import write_json
    from sparsefw.plugins import load_catalogue

    run_dir = Path(spec.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    wall, cpu = time.perf_counter(), time.process_time()
    with open(run_dir / LOG_FILE, "w") as log, contextlib.redirect_stdout(log), \
            contextlib.redirect_stderr(log), warnings.catch_warnings():
        try:
            catalogue = load_catalogue()
            cfg, raw = config_mod.load(spec.config, catalogue.registry, spec.overrides)
            trainer, metrics = train(cfg, catalogue, run_dir=run_dir, raw_config=raw,
                                     config_source=spec.config)
            wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
            try:
                cost = run_cost(trainer)
            except Exception:  # the run trained; only its cost estimate failed
                traceback.print_exc()
                cost = {}
            row = result_row(spec, "ok", metrics, wall=wall, cpu=cpu, cost=cost)
        except Exception as exc:  # one failed run must not end the sweep
            traceback.print_exc()
            row = result_row(spec, "failed", wall=time.perf_counter() - wall,
                             cpu=time.process_time() - cpu, error=f"{type(exc).__name__}: {exc}")
    write_json(run_dir / RESULT_FILE, row)
    return row


def finished(spec: RunSpec) -> dict | None:
    """The run's ``result.json`` row if it finished, else ``None``."""
    path = Path(spec.run_dir) / RESULT_FILE
    if not path.exists():
        return None
    try:
        row = json.loads(path.read_text())
    except json.JSONDecodeError:
        return None
    return row if row.get("status") == "ok" else None


# ------------------------------------------------------------------------------ the pool
class WorkerPool:
    """``jobs`` worker processes fed from one queue; each runs with ``OMP_NUM_THREADS``
    ``threads`` (unless set already) and logs its own stderr to ``log_dir/worker<k>.log``.
    A worker that dies fails the run it held and is replaced for the next one."""

    def __init__(self, jobs: int, threads: int, log_dir: str | Path):
        self.jobs = max(1, jobs)
        self.threads = threads
        self.log_dir = Path(log_dir)

    def _start(self, k: int) -> subprocess.Popen:
        env = dict(os.environ)
        env.setdefault("OMP_NUM_THREADS", str(self.threads))
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"worker{k}.log", "a")
        try:
            return subprocess.Popen([sys.executable, "-m", "sparsefw.workers"], env=env,
                                    stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=log,
                                    text=True, bufsize=1)
        finally:
            log.close()

    def run(self, specs: Sequence[RunSpec], done: Callable[[int, dict], None]) -> None:
        """Run every spec; call ``done(index, row)`` (from the calling thread) as each ends."""
        todo: queue.Queue[int] = queue.Queue()
        for i in range(len(specs)):
            todo.put(i)
        results: queue.Queue[tuple[int, dict]] = queue.Queue()

        def serve(k: int) -> None:
            proc = None
            try:
                while True:
                    try:
                        i = todo.get_nowait()
                    except queue.Empty:
                        return
                    if proc is None or proc.poll() is not None:
                        proc = self._start(k)
                    results.put((i, self._ask(proc, k, specs[i])))
            finally:
                if proc is not None and proc.poll() is None:
                    proc.stdin.close()
                    proc.wait()

        threads = [threading.Thread(target=serve, args=(k,), daemon=True)
                   for k in range(min(self.jobs, len(specs)))]
        for t in threads:
            t.start()
        for _ in range(len(specs)):
            done(*results.get())
        for t in threads:
            t.join()

    def _ask(self, proc: subprocess.Popen, k: int, spec: RunSpec) -> dict:
        try:
            proc.stdin.write(json.dumps(spec.to_json()) + "\n")
            proc.stdin.flush()
            line = proc.stdout.readline()
        except OSError:
            line = ""
        if line:
            return json.loads(line)
        code = proc.wait()
        log = self.log_dir / f"worker{k}.log"
        tail = log.read_text()[-2000:] if log.exists() else ""
        return finished(spec) or result_row(spec, "failed",
                                            error=f"worker exited {code}: {tail}")


# ------------------------------------------------------------------------------ the worker
def warm_up() -> None:
    """Pay the imports a run would pay on its first optimizer: torch, the engine, the plugins
    and ``torch._dynamo`` (imported lazily by ``torch.optim.Optimizer``). Touches no random
    state."""
    import torch

    from sparsefw.engine import train  # noqa: F401
    from sparsefw.plugins import load_catalogue

    load_catalogue()
    torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.0)


def serve(requests, answers) -> None:
    """The worker loop: one JSON :class:`RunSpec` per line of ``requests``, one JSON result
    row per line of ``answers``."""
    for line in requests:
        if line.strip():
            row = run_one(RunSpec.from_json(json.loads(line)))
            answers.write(json.dumps(row) + "\n")
            answers.flush()


def main() -> int:
    """Entry point of a worker process: the protocol keeps the original stdout; anything else
    written to file descriptor 1 (C extensions, stray prints) goes to stderr, the worker's log."""
    answers = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)
    sys.stdout = sys.stderr
    warm_up()
    serve(sys.stdin, answers)
    return 0


if __name__ == "__main__":
    sys.exit(main())
