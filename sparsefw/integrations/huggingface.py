"""Sparse training under Hugging Face's ``transformers.Trainer``: :class:`SparsifierCallback`.

Event map (transformers 5.x; ``docs/your-loop.md`` has the whole table)::

    on_train_begin          build the Sparsifier on the trainer's model and optimizer
                            (total steps = ``state.max_steps``); on resume load
                            ``checkpoint-N/sparsefw.pt``
    on_step_begin           begin_step(): schedule, before-forward topology, S²-SAM offsets
    on_pre_optimizer_step   post_backward(): restore, topology (dense .grad), corrections,
                            pruned gradients zeroed — after the Trainer's gradient clipping
    on_optimizer_step       after_step() (the Trainer itself steps the optimizer)
    on_save                 sparsefw.pt beside the Trainer's checkpoint
    on_train_end            finalize(): the binary masks written into the weights

The clipping norm includes pruned entries (the Trainer clips before any callback can mask):
set ``max_grad_norm=0`` where exact parity with a plain loop matters. Components that need a
pass of their own (SAM) or the step's batch (AGENT) cannot run from a callback: the callback
refuses them when training begins; DeepSpeed is refused (gradients are out of reach there).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerCallback

from sparsefw.sparsifier import Sparsifier, SparsifierError

__all__ = ["SparsifierCallback", "STATE_FILE"]

#: the Sparsifier's state inside each ``checkpoint-N`` directory
STATE_FILE = "sparsefw.pt"


class SparsifierCallback(TrainerCallback):
    """Run a sparsefw method inside ``transformers.Trainer``.

    ``config`` and ``options`` are what :class:`~sparsefw.Sparsifier` takes (method sections,
    keyword shortcuts such as ``density`` and ``topology``, ``batches`` for SNIP scores;
    ``total_steps`` defaults to the Trainer's ``max_steps``).
    The Sparsifier is built when training begins and is then ``callback.sparsifier``.
    """

    def __init__(self, config: Any = None, **options: Any):
        self.config = config
        self.options = options
        self.sparsifier: Sparsifier | None = None

    def on_train_begin(self, args, state, control, model=None, optimizer=None, **kwargs):
        if getattr(args, "deepspeed", None):
            raise SparsifierError("SparsifierCallback: DeepSpeed keeps the gradients out of "
                                  "reach of callbacks; it is not supported")
        if optimizer is None:
            raise SparsifierError("SparsifierCallback: the Trainer handed no optimizer to the "
                                  "callback")
        resume = Path(args.output_dir) / f"checkpoint-{state.global_step}" / STATE_FILE
        resuming = state.global_step > 0
        options = dict(self.options)
        total = options.pop("total_steps", None) or state.max_steps
        self.sparsifier = Sparsifier(
            model, optimizer, self.config, total_steps=total,
            init_masks=not resuming, front_door="huggingface", **options,
        )
        for need in ("closure", "batch", "inputs"):
            if need in self.sparsifier.needs:
                self.sparsifier._refuse(need)
        if resuming:
            if not resume.exists():
                raise SparsifierError(f"SparsifierCallback: resuming at step "
                                      f"{state.global_step} but {resume} does not exist")
            self.sparsifier.load_state_dict(torch.load(resume, map_location="cpu",
                                                       weights_only=True))

    def on_step_begin(self, args, state, control, **kwargs):
        self.sparsifier.begin_step()

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.post_backward()

    def on_optimizer_step(self, args, state, control, **kwargs):
        self.sparsifier.after_step()

    def on_save(self, args, state, control, **kwargs):
        if self.sparsifier is None or not state.is_world_process_zero:
            return
        folder = Path(args.output_dir) / f"checkpoint-{state.global_step}"
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / (STATE_FILE + ".tmp")
        torch.save(self.sparsifier.state_dict(), tmp)
        os.replace(tmp, folder / STATE_FILE)

    def on_train_end(self, args, state, control, **kwargs):
        if self.sparsifier is not None:
            self.sparsifier.finalize()
