"""The divergence guard: a non-finite loss or gradient ends the run (or, if configured, skips
that step's update) with an error that names the step, and non-finite weights are never
written over a good checkpoint.

``[train] on_nonfinite``:

* ``"stop"`` (default): each step folds "was the loss non-finite" (and, on the last step of
  each logging window, "was any gradient") into two small tensors on the device (the first such
  step and what it was), with no host sync; :meth:`poll` reads them once per logging window and
  :meth:`check` before every checkpoint write, raising :class:`Diverged`. Training may run on
  for up to one logging window after the bad step, but nothing it computed is written: the
  checkpoint before the bad step stays the latest. The gradients are not read at every step
  because that pass over every gradient cost ~5% of a memory-bound step (an MLP at batch 32)
  and adds no safety: a non-finite gradient with a finite loss makes the updated weights
  non-finite, so the next step's loss is non-finite, and the weights are checked before every
  write anyway.
* ``"skip"``: the step's optimizer update is skipped instead and counted (one host sync per
  step, to decide); more than ``max_nonfinite_skips`` skipped steps raise :class:`Diverged`.

Under fp16 autocast the gradient scaler already skips steps whose scaled gradients overflow
(and lowers its scale), so the guard checks the loss only. Before a checkpoint is written the
weights themselves are checked too (an update can overflow with finite gradients).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from sparsefw import sharding

#: what was non-finite, as the codes folded into the device flag
_WHAT = {1: "loss", 2: "gradient", 3: "loss and gradient"}


class Diverged(RuntimeError):
    """Training produced a non-finite loss, gradient or weight."""

    def __init__(self, message: str, step: int):
        super().__init__(message)
        self.step = step


def _nonfinite(tensors: list[torch.Tensor]) -> torch.Tensor:
    """A bool scalar on the tensors' device: does any entry of ``tensors`` fail to be
    finite? (A NaN or an infinity makes its tensor's norm, and so the sum, non-finite.) One
    pass and no host sync; a float32 gradient whose squares overflow (an entry beyond ~1e19)
    counts as non-finite too — the device flag cannot tell the two apart without a second pass,
    and a gradient that large has diverged in all but name."""
    norms = torch._foreach_norm(tensors)
    return ~torch.isfinite(torch.stack(norms).double().sum())


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Are all entries of ``tensors`` finite? The host's answer, exact, and the same on every
    rank: each rank looks at its own shards (FSDP2 ``DTensor`` parameters: a ``DTensor``'s
    partial norm reads back as this rank's part only) and, when a tensor is sharded, the ranks
    agree by one all-reduce of the answer over its mesh, so that all of them raise alike."""
    finite = _locally_finite([sharding.local(t) for t in tensors])
    sharded = next((t for t in tensors if sharding.is_sharded(t)), None)
    if sharded is None:
        return finite
    flag = torch.tensor(0 if finite else 1, device=sharding.local(sharded).device)
    torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX,
                                 group=sharded.device_mesh.get_group())
    return not bool(flag)


def _locally_finite(tensors: list[torch.Tensor]) -> bool:
    """:func:`_all_finite` of plain tensors: one pass (the norms); a tensor whose norm is not
    finite is then looked at entry by entry, since its squares may have overflowed with every
    entry finite (float32 beyond ~1e19). On the CPU each norm is read as it is (a read there
    costs less than stacking them); on an accelerator the norms are summed there and read
    once. Sums are in double precision, so finite norms never add up to a false infinity."""
    norms = torch._foreach_norm(tensors)
    if norms[0].device.type == "cpu":
        if math.isfinite(sum(n.item() for n in norms)):
            return True
    elif bool(torch.isfinite(torch.stack(norms).double().sum())):
        return True
    return all(bool(torch.isfinite(t).all()) for t, n in zip(tensors, norms, strict=True)
               if not math.isfinite(n.item()))


class DivergenceGuard:
    """Watches one run's losses, gradients and weights (see the module docstring)."""

    def __init__(self, policy: str, max_skips: int, every: int, device: torch.device, *,
                 gradients: bool = True):
        self.policy = policy
        self.max_skips = max_skips
        self.every = max(int(every), 1)
        self.gradients = gradients
        self.skipped = 0
        self._first = torch.full((), -1, dtype=torch.long, device=device)
        self._what = torch.zeros((), dtype=torch.long, device=device)

    def after_backward(self, step: int, loss: torch.Tensor | None,
                       params: Iterable[torch.Tensor]) -> bool:
        """Look at step ``step``'s loss (``None``: not known to the front door) and final
        gradients (of ``params``: at every step under ``"skip"``, on the last step of each
        logging window under ``"stop"``); returns whether the optimizer update must be skipped
        (policy ``"skip"`` only)."""
        code = (~torch.isfinite(loss)).long() if loss is not None else self._what.new_zeros(())
        if self.gradients and (self.policy == "skip" or (step + 1) % self.every == 0):
            grads = [p.grad for p in params if p.grad is not None]
            if grads:
                code = code + 2 * _nonfinite(grads).long()
        if self.policy == "skip":
            what = int(code)
            if what:
                self.skipped += 1
                if self.skipped > self.max_skips:
                    raise Diverged(f"training diverged: non-finite {_WHAT[what]} at step {step}, "
                                   f"the {self.skipped}th step skipped for a non-finite value "
                                   f"(more than [train] max_nonfinite_skips = {self.max_skips})",
                                   step)
            return bool(what)
        first = (code > 0) & (self._first < 0)
        self._first = torch.where(first, step, self._first)
        self._what = torch.where(first, code, self._what)
        return False

    def poll(self, step: int) -> None:
        """At the end of a logging window (every ``every`` steps), :meth:`check`."""
        if step % self.every == 0:
            self.check()

    def check(self) -> None:
        """Raise :class:`Diverged` if a non-finite loss or gradient was seen (one host
        sync)."""
        if self.policy == "skip":
            return
        first = int(self._first)
        if first >= 0:
            what = _WHAT[int(self._what)]
            raise Diverged(f"training diverged: non-finite {what} at step {first}; the run "
                           f"stopped and nothing from that step on was checkpointed (lower the "
                           f"learning rate, or set [train] on_nonfinite = \"skip\")", first)

    def check_weights(self, step: int, params: Iterable[torch.Tensor]) -> None:
        """Raise :class:`Diverged` if a weight is non-finite (before a checkpoint write); one
        host sync. ``params``: a list is used as it is (the Trainer keeps one, since
        listing a model's parameters costs as much as the check itself)."""
        self.check()
        params = params if isinstance(params, list) else list(params)
        if not params:
            return
        with torch.no_grad():
            finite = _all_finite(params)
        if not finite:
            raise Diverged(f"training diverged: non-finite weights after step {step} (an "
                           f"update overflowed); the run stopped without checkpointing them",
                           step)

    def state_dict(self) -> dict[str, int]:
        """What a resume needs (the count of skipped steps)."""
        return {"skipped": self.skipped}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Restore :meth:`state_dict`."""
        self.skipped = int(state.get("skipped", 0))
