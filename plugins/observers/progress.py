"""``progress`` observer: a tqdm bar over the run's steps (on a terminal) and one line per
evaluation (always)."""

from __future__ import annotations

import attrs
from tqdm import tqdm

from sparsefw.hookspecs import hookimpl
from sparsefw.registry import EmptyConfig


@attrs.define(eq=False)
class ProgressObserver:
    """Show progress and print each evaluation."""

    #: reads metrics, never ``.grad``: a Trainer with ``fused_masked`` need not keep the
    #: masked gradients for it (:class:`sparsefw.kernels.masked_sgd.MaskedSGD`)
    reads_gradients_after_step = False

    cfg: EmptyConfig
    _bar: object = None

    @hookimpl
    def sparsefw_run_start(self, state):
        self._bar = tqdm(total=state.total_steps, initial=state.step, unit="step",
                         dynamic_ncols=True, disable=None, leave=False)

    @hookimpl
    def sparsefw_step_end(self, state, metrics):
        if self._bar is None:
            return
        self._bar.update(1)
        if metrics:
            self._bar.set_postfix(loss=f"{metrics['train/loss']:.4f}", refresh=False)

    @hookimpl
    def sparsefw_eval_end(self, state, metrics):
        tqdm.write(
            f"epoch {state.epoch + 1:>3} step {state.step:>6}  "
            f"test loss {metrics['test/loss']:.4f}  test acc {metrics['test/acc']:.4f}  "
            f"density {metrics['density']:.4f}"
        )

    @hookimpl
    def sparsefw_run_end(self, state, metrics):
        if self._bar is not None:
            self._bar.close()
            self._bar = None


@hookimpl
def sparsefw_register(registry):
    registry.add("observer", "progress", factory=ProgressObserver)
