"""The objects hooks receive and return: :class:`TrainState`, :class:`Perturbation`,
:class:`TopologyChange`, and the :class:`UpdateInterval` every topology component carries."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import attrs
import torch

from sparsefw.masks import MaskSet


def _positive(_inst, attribute, value):
    if value <= 0:
        raise ValueError(f"{attribute.name} must be > 0, got {value}")


@attrs.frozen
class UpdateInterval:
    """When a topology component runs: at steps ``t`` with ``start <= t < end`` and
    ``(t - start) % every == 0``. ``end`` in (0, 1] is a fraction of the run's total steps,
    above 1 an absolute step."""

    every: int = attrs.field(default=100, validator=_positive)
    start: int = attrs.field(default=0, validator=attrs.validators.ge(0))
    end: float = attrs.field(default=0.75, validator=_positive)

    def end_step(self, total_steps: int) -> int:
        """``end`` as an absolute step for a run of ``total_steps`` steps."""
        return int(self.end * total_steps) if self.end <= 1 else int(self.end)

    def due(self, step: int, total_steps: int) -> bool:
        """Whether the component runs at ``step``."""
        return (
            self.start <= step < self.end_step(total_steps)
            and (step - self.start) % self.every == 0
        )


@attrs.define(eq=False)
class Perturbation:
    """What a ``perturb`` hook asks the engine to do around the forward/backward pass.

    ``params``: parameter name -> offset added to that parameter (restored bit-exactly after the
    backward). ``scale``: when given (a 0-dim tensor on the parameters' device, or a number),
    the offset of each parameter is ``scale · params[name]``: the engine folds the product into
    its add, so a direction (a gradient) need not be scaled into a new tensor first, and the
    scale can stay on the device (SAM's and S²-SAM's ``ρ/‖g‖``, no host sync). The engine reads
    ``params`` only while applying, before the forward; it never writes them. ``inputs``:
    replacement inputs for this step (adversarial examples).
    """

    params: dict[str, torch.Tensor] = attrs.field(factory=dict)
    inputs: torch.Tensor | None = None
    scale: torch.Tensor | float | None = None


@torch.no_grad()
def add_offsets_(
    params: list[torch.Tensor], deltas: list[torch.Tensor],
    scale: torch.Tensor | float | None = None,
) -> None:
    """``params[i] += scale · deltas[i]`` (``+= deltas[i]`` without a scale), in place.

    With a tensor ``scale`` on the CPU this is one fused pass per parameter (``addcmul_``: no
    scaled copy of the deltas is made; the product is rounded inside the fused kernel, as
    ``addcmul`` does). On an accelerator it is two multi-tensor kernels (a scaled copy, then
    the add), fewer launches than one kernel per parameter. No host synchronisation.
    """
    if not params:
        return
    if scale is None:
        torch._foreach_add_(params, deltas)
    elif not torch.is_tensor(scale):
        torch._foreach_add_(params, deltas, alpha=scale)
    elif params[0].device.type == "cpu":  # CPU foreach kernels loop over tensors anyway
        torch._foreach_addcmul_(params, deltas, [scale] * len(params))
    else:
        torch._foreach_add_(params, torch._foreach_mul(deltas, scale))


@torch.no_grad()
def offset_into(
    out: list[torch.Tensor], params: list[torch.Tensor], deltas: list[torch.Tensor],
    scale: torch.Tensor | float | None = None,
) -> None:
    """``out[i] = params[i] + scale · deltas[i]`` (``+ deltas[i]`` without a scale), the
    parameters left alone: the perturbed weights written into the engine's second buffers.

    On the CPU one pass per parameter (``addcmul`` with a tensor ``scale``, whose product is
    rounded inside the fused kernel); on an accelerator a copy and :func:`add_offsets_`, a few
    multi-tensor kernels instead of one kernel per parameter. No host synchronisation.
    """
    if not params:
        return
    if params[0].device.type != "cpu":
        torch._foreach_copy_(out, params)
        add_offsets_(out, deltas, scale)
        return
    for o, p, d in zip(out, params, deltas, strict=True):
        if scale is None:
            torch.add(p, d, out=o)
        elif torch.is_tensor(scale):
            torch.addcmul(p, d, scale, out=o)
        else:
            torch.add(p, d, alpha=scale, out=o)


@attrs.define(eq=False)
class TopologyChange:
    """Answer of ``topology_update``: counts per layer (Python ints or 0-d tensors) and whether
    to skip this step's optimizer update (an option of some RigL references)."""

    dropped: dict[str, Any] = attrs.field(factory=dict)
    grown: dict[str, Any] = attrs.field(factory=dict)
    skip_optimizer_step: bool = False


@attrs.define(eq=False)
class TrainState:
    """Everything a hook may read or use; one object so the contract can grow compatibly.

    Counters: ``step`` is the number of optimizer steps taken so far (the index of the step in
    progress during a step), ``epoch`` the current epoch, ``total_steps`` the run's length.
    """

    #: the local model (beneath DDP and ``torch.compile``)
    model: torch.nn.Module
    #: the optimizer (unwrapped from Accelerate's or Lightning's wrapper)
    optimizer: torch.optim.Optimizer
    #: the run's masks: edit them only with ``masks.update(name, new_mask)``
    masks: MaskSet
    #: ``loss_fn(output, target)`` of the components' own passes
    loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
    device: torch.device
    #: the run's seeded generator: every random choice of a component comes from it
    generator: torch.Generator
    #: the run directory (``None`` outside the Trainer)
    run_dir: Path | None
    #: the run's config (a :class:`sparsefw.config.RunConfig`)
    config: Any
    #: the run's :class:`sparsefw.data.DataSplits` (shapes, classes, input range)
    data: Any
    steps_per_epoch: int
    #: optimizer steps of the whole run
    total_steps: int
    #: optimizer steps taken so far (the index of the step in progress during a step)
    step: int = 0
    epoch: int = 0
    #: training round (``[train] rounds``; lottery-ticket style methods)
    round: int = 0
    steps_per_round: int = 0
    #: this step's schedule values, merged from every ``schedule`` component
    values: dict[str, float] = attrs.field(factory=dict)
    #: this step's ``(inputs, targets)``, when the front door knows it (``needs = ("batch",)``)
    batch: tuple[torch.Tensor, torch.Tensor] | None = None
    #: this step's loss (a detached device tensor), after the forward/backward
    loss: torch.Tensor | None = None
    #: device tensors to log (summed or read every ``log_every`` steps; never ``.item()``)
    metrics: dict[str, torch.Tensor] = attrs.field(factory=dict)
    #: lifecycle helpers, set by the :class:`~sparsefw.Sparsifier`: ``forward(x)`` and
    #: ``forward_backward(x, y, sync=True)`` run the local model as the masks define it;
    #: ``closure(sync=True)`` re-evaluates this step's loss and gradient at the current weights
    #: (inside a step with a closure only; ``sync=False``: this rank alone under DDP);
    #: ``train_batches()`` iterates over training batches outside the step
    forward_backward: Callable[..., torch.Tensor] | None = None
    forward: Callable[..., torch.Tensor] | None = None
    closure: Callable[..., Any] | None = None
    train_batches: Callable[[], Iterator[tuple[torch.Tensor, torch.Tensor]]] | None = None
    #: inputs that replace the step's batch inputs (adversarial training), set by the lifecycle
    inputs: torch.Tensor | None = None
    #: per masked parameter, the momentum ``m ← β·m + g`` of the *dense* gradient (pruned
    #: entries included), kept by the lifecycle only for components that declare
    #: ``needs = ("dense_momentum",)`` (β: their ``dense_momentum_beta``); ``None`` otherwise
    dense_momentum: dict[str, torch.Tensor] | None = None
    #: this process's place in a multi-process job (:class:`sparsefw.engine.distributed.DistContext`)
    dist: Any = None
    #: counts of forward and backward passes in this run (for tests and cost accounting)
    passes: dict[str, int] = attrs.field(factory=lambda: {"forward": 0, "backward": 0})
    _named_params: dict[str, torch.nn.Parameter] | None = attrs.field(
        default=None, init=False, repr=False)

    @property
    def named_params(self) -> dict[str, torch.nn.Parameter]:
        """Trainable parameters by name (collected once: a run never swaps its parameters)."""
        if self._named_params is None:
            self._named_params = dict(self.model.named_parameters())
        return self._named_params
