"""Sparse training under Lightning: :class:`SparsifierCallback` (automatic optimization).

Event map (Lightning 2.x; ``docs/your-loop.md`` has the whole table)::

    on_fit_start               build the Sparsifier on the module and its (first) optimizer,
                               total steps = ``trainer.estimated_stepping_batches``; apply a
                               state restored from a checkpoint
    on_train_batch_start       begin_step() on the first micro-batch of each optimizer step;
                               a ``(inputs, targets)`` batch is handed to the components
    on_before_optimizer_step   post_backward(): restore, topology, corrections, pruned
                               gradients zeroed (before Lightning's gradient clipping)
    on_train_batch_end         after_step() once the optimizer has stepped
    state_dict / load_state_dict   the Sparsifier's state inside Lightning's checkpoint

Components that need a pass of their own (SAM) need a closure: use manual optimization and
call ``sparsifier.step(closure)`` in ``training_step``.
"""

from __future__ import annotations

from typing import Any

import torch
from lightning.pytorch.callbacks import Callback

from sparsefw.sparsifier import Sparsifier

__all__ = ["SparsifierCallback"]


class SparsifierCallback(Callback):
    """Run a sparsefw method inside ``lightning.pytorch.Trainer``.

    ``config`` and ``options`` are what :class:`~sparsefw.Sparsifier` takes; ``total_steps``
    defaults to ``trainer.estimated_stepping_batches`` (give it when a run is stopped and
    resumed with another ``max_steps``). The Sparsifier is built when fitting starts and is
    then ``callback.sparsifier``.
    """

    def __init__(self, config: Any = None, **options: Any):
        self.config = config
        self.options = options
        self.sparsifier: Sparsifier | None = None
        self._restored: dict | None = None
        self._seen_step = 0

    def on_fit_start(self, trainer, pl_module):
        if self.sparsifier is not None:
            return
        optimizer = trainer.optimizers[0]
        options = dict(self.options)
        total = options.pop("total_steps", None) or int(trainer.estimated_stepping_batches)
        self.sparsifier = Sparsifier(
            pl_module, optimizer, self.config, total_steps=total,
            init_masks=self._restored is None, front_door="lightning", **options,
        )
        if self._restored is not None:
            self.sparsifier.load_state_dict(self._restored)
            self._restored = None
        for need in ("closure", "inputs"):
            if need in self.sparsifier.needs:
                self.sparsifier._refuse(need)
        self._seen_step = trainer.global_step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx % trainer.accumulate_grad_batches:
            return
        if isinstance(batch, (tuple, list)) and len(batch) == 2 and all(
                torch.is_tensor(t) for t in batch):
            self.sparsifier.state.batch = (batch[0], batch[1])
        self.sparsifier.begin_step()

    def on_before_optimizer_step(self, trainer, pl_module, optimizer):
        self.sparsifier.post_backward()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step != self._seen_step:  # the optimizer stepped
            self._seen_step = trainer.global_step
            self.sparsifier.after_step()

    def state_dict(self) -> dict[str, Any]:
        return {} if self.sparsifier is None else self.sparsifier.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before it creates the optimizers: keep it until then
        if state_dict:
            self._restored = state_dict
