"""``tensorboard`` observer: train metrics, evaluation metrics and per-layer densities as
TensorBoard scalars under ``<run_dir>/tb``."""

from __future__ import annotations

import attrs

from sparsefw.hookspecs import hookimpl
from sparsefw.registry import EmptyConfig


@attrs.define(eq=False)
class TensorBoardObserver:
    """Write scalars with ``torch.utils.tensorboard.SummaryWriter``."""

    #: reads metrics, never ``.grad``: a Trainer with ``fused_masked`` need not keep the
    #: masked gradients for it (:class:`sparsefw.kernels.masked_sgd.MaskedSGD`)
    reads_gradients_after_step = False

    cfg: EmptyConfig
    _writer: object = None

    @hookimpl
    def sparsefw_run_start(self, state):
        from torch.utils.tensorboard import SummaryWriter  # slow import: only when used

        self._writer = SummaryWriter(log_dir=str(state.run_dir / "tb"), purge_step=state.step or None)

    def _scalars(self, metrics, step):
        for key, value in metrics.items():
            if key not in ("step", "epoch") and isinstance(value, (int, float)):
                self._writer.add_scalar(key, value, step)

    @hookimpl
    def sparsefw_step_end(self, state, metrics):
        if metrics and self._writer is not None:
            self._scalars(metrics, state.step)

    @hookimpl
    def sparsefw_eval_end(self, state, metrics):
        if self._writer is not None:
            self._scalars(metrics, state.step)
            self._writer.flush()

    @hookimpl
    def sparsefw_run_end(self, state, metrics):
        if self._writer is not None:
            self._writer.close()
            self._writer = None


@hookimpl
def sparsefw_register(registry):
    registry.add("observer", "tensorboard", factory=TensorBoardObserver)
