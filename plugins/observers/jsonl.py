"""``jsonl`` observer: every logged train step and every evaluation as one JSON line in
``metrics.jsonl``. On resume, lines from steps after the checkpoint are dropped first, so the
file reads as the uninterrupted run's.

Each evaluation record also carries the run's cost so far (:mod:`sparsefw.cost`): the training
forward and backward passes (``passes/forward``, ``passes/backward``) and the forward passes
spent on evaluations (``passes/eval_forward``), and in runs that read dense weight gradients at
every step (SNFS) the backward passes that did (``passes/dense_grad``). The engine's ``state.passes`` counts both kinds;
the passes made between ``epoch_end`` and ``eval_end`` are the evaluation's."""

from __future__ import annotations

import json

import attrs

from sparsefw.cost import BACKWARD, DENSE_GRAD, DENSE_GRAD_PASSES, EVAL_FORWARD, FORWARD
from sparsefw.engine.checkpoint import atomic_write
from sparsefw.hookspecs import hookimpl
from sparsefw.registry import EmptyConfig

METRICS_FILE = "metrics.jsonl"


@attrs.define(eq=False)
class JsonlObserver:
    """Append metrics to ``<run_dir>/metrics.jsonl``."""

    #: reads metrics, never ``.grad``: a Trainer with ``fused_masked`` need not keep the
    #: masked gradients for it (:class:`sparsefw.kernels.masked_sgd.MaskedSGD`)
    reads_gradients_after_step = False

    cfg: EmptyConfig
    _file: object = None
    #: forward passes spent on evaluations so far, and the count when the epoch ended
    _eval_forward: int = 0
    _at_epoch_end: dict | None = None

    @hookimpl
    def sparsefw_run_start(self, state):
        path = state.run_dir / METRICS_FILE
        if path.exists():
            kept = []
            for line in path.read_text().splitlines():
                try:
                    record = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut by a kill
                step = record.get("step", 0) if isinstance(record, dict) else 0
                if not isinstance(step, (int, float)) or step <= state.step:  # foreign: kept
                    kept.append(line)
                    if isinstance(record, dict) and record.get("kind") == "eval":
                        self._eval_forward = int(record.get(EVAL_FORWARD, 0))
            text = "".join(f"{line}\n" for line in kept).encode()
            atomic_write(path, lambda f: f.write(text))
        self._file = open(path, "a", buffering=1)

    def _write(self, kind, metrics):
        if self._file is not None and metrics:
            self._file.write(json.dumps({"kind": kind, **metrics}) + "\n")

    @hookimpl
    def sparsefw_step_end(self, state, metrics):
        self._write("train", metrics)

    @hookimpl
    def sparsefw_epoch_end(self, state):
        self._at_epoch_end = dict(state.passes)

    @hookimpl
    def sparsefw_eval_end(self, state, metrics):
        at_end = self._at_epoch_end or dict(state.passes)
        cost = {FORWARD: at_end["forward"] - self._eval_forward, BACKWARD: at_end["backward"]}
        if DENSE_GRAD_PASSES in at_end:  # backward passes whose weight gradients were read dense
            cost[DENSE_GRAD] = at_end[DENSE_GRAD_PASSES]
        self._eval_forward += state.passes["forward"] - at_end["forward"]
        self._at_epoch_end = None
        self._write("eval", {**metrics, **cost, EVAL_FORWARD: self._eval_forward})

    @hookimpl
    def sparsefw_run_end(self, state, metrics):
        if self._file is not None:
            self._file.close()
            self._file = None


@hookimpl
def sparsefw_register(registry):
    registry.add("observer", "jsonl", factory=JsonlObserver)
