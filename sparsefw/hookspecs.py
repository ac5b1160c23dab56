"""Every extension point of sparsefw, grouped by phase.

Each specification is a body-less function. Its docstring says **when** the engine calls it,
what the **answer** means (a list of answers, the first non-``None`` answer, or "edit in place and
return ``None``") and which **invariants** an implementation must keep. Hooks are always called
with keyword arguments; an implementation may accept any subset of the parameters.

Two plugin managers use these specifications (see :mod:`sparsefw.plugins`):

* the *catalogue* (one per process) calls only :func:`sparsefw_register`;
* the *run manager* (one per run) holds just the components a config selected and calls
  everything else. Components registered in the run manager are registered in reverse config
  order, so that pluggy's last-registered-first rule calls them in config order.

Every hook receives ``state``, the run's :class:`sparsefw.state.TrainState`: model, optimizer,
masks, step and epoch counters, the merged schedule values, the current batch, the lifecycle's
helpers (``forward``, ``forward_backward``, ``closure``, ``train_batches``), a seeded
``generator`` and a ``metrics`` dict plugins may add device tensors to.

The lifecycle is a :class:`sparsefw.Sparsifier`, driven by ``sparsefw train`` or by a user's
own loop. A component that needs something only some front doors can give declares it in a
class attribute (or method) ``needs``: ``"closure"`` (a second evaluation of the step's loss,
``state.closure``), ``"batch"`` (``state.batch``), ``"train_batches"`` (passes over the
training data outside the step) or ``"inputs"`` (replacing the step's inputs); a front door
that cannot give it refuses the component with a message naming it.
"""

from __future__ import annotations

import pluggy

PROJECT = "sparsefw"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


# --------------------------------------------------------------------------------------------
# registration (catalogue)
# --------------------------------------------------------------------------------------------
@hookspec
def sparsefw_register(registry):
    """Add named components, models and data sets to ``registry``.

    Called once per process by the catalogue, once per plugin module, with ``registry`` bound to
    that plugin's source distribution. Use ``registry.add(slot, name, config=..., factory=...)``;
    ``slot`` is one of :data:`sparsefw.registry.SLOTS`. A name registered twice in one slot is an
    error that names both sources. Return ``None``.
    """


# --------------------------------------------------------------------------------------------
# before training
# --------------------------------------------------------------------------------------------
@hookspec(firstresult=True)
def sparsefw_mask_init(state, batches):
    """Choose the first masks. Called once, before the first step, after the model is on its
    device and ``state.masks`` holds all-ones masks for every sparsifiable parameter with
    ``state.masks.targets`` the per-layer density allocation.

    ``batches`` is a callable ``batches(n)`` returning ``n`` training batches ``(inputs,
    targets)`` on the run's device, for score-based methods (SNIP, GraSP).

    Answer: a ``dict`` mapping parameter name to a boolean mask of the parameter's shape, covering
    every name in ``state.masks``. First answer wins; exactly one provider per run (a config
    error otherwise). Invariant: each layer keeps exactly ``state.masks.targets[name]`` active
    entries unless the method is defined by a global threshold (say so in its docs). A
    component that sets its own densities (a round-based one such as ``lottery``) replaces
    ``state.masks.targets`` to match what it answers.
    """


# --------------------------------------------------------------------------------------------
# every step
# --------------------------------------------------------------------------------------------
@hookspec
def sparsefw_schedule(state):
    """Return named scalar values for this step, e.g. ``{"drop_fraction": 0.27}``.

    Called at the start of every step (``state.step`` is the index of the step about to run,
    ``state.total_steps`` the run's length). The engine merges all answers into
    ``state.values``; two components answering the same name is a config error detected before
    training. Values must be Python numbers (no tensors: no device sync), within the range the
    component documents. One name is read by the engine itself: ``mask_decay`` sets β of
    forward masks (``state.masks.decay``: the forward sees ``w ⊙ (m + β(1 − m))``) for the step.
    """


@hookspec
def sparsefw_perturb(state):
    """Return a :class:`sparsefw.state.Perturbation` for this step, or ``None``.

    Called after the schedule, before the forward/backward pass, in config order. A
    perturbation carries parameter offsets (``params``: name -> delta tensor) and/or replacement
    inputs (``inputs``), optionally with a ``scale`` (a 0-dim tensor: the offsets are
    ``scale · params[name]``, so a direction need not be scaled into a new tensor). The engine
    writes ``w + offsets`` into a second buffer, runs forward/backward with the parameters'
    storage swapped to it, then **restores the weights bit-exactly** by swapping the untouched
    originals back; implementations never restore anything themselves. A plugin may call
    ``state.closure(sync=False)`` to obtain an extra gradient first (SAM's ascent step: the
    step's loss re-evaluated at the current weights, on this rank alone under DDP) and must
    then declare ``needs = ("closure",)``; ``state.batch`` is the step's batch when the front
    door knows it.
    """


@hookspec(firstresult=True)
def sparsefw_topology_update(state):
    """Change the mask topology. Called at steps ``t`` with ``start <= t < end`` and
    ``(t - start) % every == 0`` of the component's :class:`~sparsefw.state.UpdateInterval`
    config (or, if the component defines ``topology_due(state) -> bool``, when that says so).

    *When in the step* is the component's class attribute ``phase``: ``"after_backward"``
    (default) — after backward and weight restore, while the parameters' ``.grad`` still hold
    the dense gradient (pruned entries included), as RigL needs; ``"before_forward"`` — right
    after the schedule hooks, before any forward, for masks computed from the current weights
    alone (N:M recomputation), so that the step's forward and backward see the new mask.

    Edit masks only through ``state.masks.update(name, new_mask)``. With hard masks the engine
    then always zeroes the value and every same-shaped optimizer state tensor of each entry whose
    mask changed (grown entries start at zero with fresh state) and re-applies the masks; forward
    masks keep the dense weights as they are. Answer: a
    :class:`sparsefw.state.TopologyChange` (dropped and grown counts per layer), or ``None``
    when nothing changed. At most one topology component per run.
    """


@hookspec
def sparsefw_gradient_correct(state):
    """Edit ``param.grad`` in place; return ``None``.

    Called after backward (and after a topology update on update steps), before the hard masks
    zero the gradients of pruned entries and before ``optimizer.step()``. Every configured
    component runs, in config order. Gradients seen here are dense; whatever a correction writes
    at pruned positions is zeroed afterwards (hard masking), so a correction never needs to know
    the mask to keep the sparsity invariant.
    """


# --------------------------------------------------------------------------------------------
# epochs
# --------------------------------------------------------------------------------------------
@hookspec
def sparsefw_epoch_start(state):
    """Called before the first step of each epoch (``state.epoch`` is the epoch about to run).
    A plugin may make its own pass over the training data with ``state.train_batches()`` (for
    example a statistics pass) without touching the optimizer. Return ``None``."""


@hookspec
def sparsefw_epoch_end(state):
    """Called after the last step of each epoch, before evaluation. Return ``None``."""


@hookspec
def sparsefw_round_end(state):
    """Called at the end of each training round but the last (``[train] rounds > 1``), after
    that round's final evaluation and checkpoint. Round-based methods (iterative magnitude
    pruning with rewinding) prune and rewind here, through ``state.masks.update`` and in-place
    weight copies. Afterwards the engine re-applies the masks, clears the optimizer state, and
    the next round replays iterations ``[train] round_start`` to the end of the first round
    (learning-rate schedule and data position). Return ``None``."""


# --------------------------------------------------------------------------------------------
# evaluation
# --------------------------------------------------------------------------------------------
@hookspec
def sparsefw_evaluate(state, batches):
    """Extra evaluation metrics. Called during each evaluation with ``batches``, a callable
    returning an iterator over the test batches on the device. Answer: a ``dict`` of metric
    name -> Python float (robust accuracy under attack, calibration, ...), merged into the
    evaluation metrics; or ``None``. The model is in eval mode; gradients may be enabled with
    ``torch.enable_grad()`` where an attack needs them."""


# --------------------------------------------------------------------------------------------
# observers
# --------------------------------------------------------------------------------------------
@hookspec
def sparsefw_run_start(state):
    """Called once after ``mask_init``, before the first epoch (also after a resume).
    ``state.run_dir`` exists. Return ``None``."""


@hookspec
def sparsefw_step_end(state, metrics):
    """Called after every optimizer step and mask application. ``metrics`` maps names to
    0-d tensors still on the device; ``metrics`` is ``None`` except every ``log_every`` steps,
    when it holds Python floats read with one host sync. Observers must not sync otherwise.
    Return ``None``."""


@hookspec
def sparsefw_eval_end(state, metrics):
    """Called after each evaluation with ``metrics`` (Python floats: test loss, accuracy,
    densities, ...). Return ``None``."""


@hookspec
def sparsefw_run_end(state, metrics):
    """Called once when training ends normally, with the final evaluation metrics. Release
    files and writers here. Return ``None``."""


# --------------------------------------------------------------------------------------------
# checkpoints
# --------------------------------------------------------------------------------------------
@hookspec
def sparsefw_state_dict(state):
    """Return this component's resumable state (tensors, numbers, RNG states), or ``None`` if it
    has none. The engine calls each component's implementation separately and stores the answer
    under the component's run key, so components never collide."""


@hookspec
def sparsefw_load_state_dict(state, plugin_state):
    """Restore the state returned earlier by this component's :func:`sparsefw_state_dict`.
    Called after the model, optimizer and masks are restored. Return ``None``."""
