"""What a run cost: training passes and an analytic FLOP estimate along its evaluations.

The engine counts every forward and backward pass in ``state.passes`` (evaluation passes
included); the ``jsonl`` observer writes the *training* passes so far into each evaluation
record of ``metrics.jsonl`` (:data:`FORWARD`, :data:`BACKWARD`; the evaluation passes go to
:data:`EVAL_FORWARD`). From those records and the per-sample FLOPs of each layer
(:func:`layer_flops`) :func:`cost_curve` estimates the compute spent up to each evaluation:

* a forward pass over a batch of ``B`` samples costs ``B · Σ_l F_l · d_l`` where ``F_l`` is the
  layer's dense multiply-add count per sample (2 FLOPs each) and ``d_l`` its density — 1 for the
  *dense* estimate, the mask density logged at the interval's closing evaluation
  (``density/<layer>``) for the *effective-sparse* one;
* a backward pass costs twice its forward pass (gradients of the inputs and of the weights), the
  convention of Evci et al. (RigL, arXiv 1911.11134, appendix H);
* a backward pass whose weight gradients are read *dense* (:data:`DENSE_GRAD`: SNFS's dense
  momentum, arXiv 1907.04840, reads them at every step) pays its weight-gradient half at full
  density, as appendix H charges SNFS (``2·f_S + f_D`` per backward). Dense gradients a topology
  rule reads only on its update steps (RigL, every ΔT steps) are not added: at ΔT = 100 they
  are under 1% of the run.

Only Linear and Conv layers count (``F_l = 2 · fan_in · output elements``); normalisation,
activations and attention score products are left out. It is an estimate to compare methods
by, not a profile.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import attrs

#: eval-record keys written by the ``jsonl`` observer
FORWARD = "passes/forward"
BACKWARD = "passes/backward"
EVAL_FORWARD = "passes/eval_forward"
#: eval-record key: training backward passes whose weight gradients were read dense
DENSE_GRAD = "passes/dense_grad"
#: the key of those passes in ``state.passes`` (present only in runs that read them)
DENSE_GRAD_PASSES = "dense_grad"
#: relative cost of a backward pass (in forward passes of the same layer)
BACKWARD_FACTOR = 2


def layer_flops(model, sample) -> dict[str, int]:
    """Dense FLOPs per sample of every Linear/Conv layer of ``model``, by weight name, measured
    with forward hooks on one forward pass of ``sample`` (one sample with a leading batch
    dimension of 1). A layer called several times per sample counts every call. The model is
    put in eval mode for the pass (no batch-norm statistics change) and restored."""
    import torch

    from sparsefw.masks import sparsifiable_params

    weights = sparsifiable_params(model)
    modules = dict(model.named_modules())
    flops = dict.fromkeys(weights, 0)
    handles = []
    for name, weight in weights.items():
        module = modules[name[: -len("weight")].rstrip(".")]
        fan_in = weight[0].numel()

        def hook(_module, _inputs, output, name=name, fan_in=fan_in):
            flops[name] += 2 * fan_in * output.numel() // output.shape[0]

        handles.append(module.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            model(sample)
    finally:
        model.train(was_training)
        for h in handles:
            h.remove()
    return flops


@attrs.frozen
class CostPoint:
    """The cost of a run up to one evaluation, and the evaluation's test accuracy."""

    step: int
    epochs: float
    acc: float
    forward: int
    backward: int
    flops_dense: float
    flops_sparse: float

    @property
    def passes(self) -> int:
        """Forward plus backward training passes."""
        return self.forward + self.backward


def cost_curve(evals: Sequence[Mapping[str, Any]], flops: Mapping[str, int], *,
               batch_size: int, steps_per_epoch: int) -> list[CostPoint]:
    """One :class:`CostPoint` per evaluation record that carries pass counts (records without
    them, from runs not logged by the ``jsonl`` observer of this version, are skipped)."""
    dense_per_sample = sum(flops.values())
    points: list[CostPoint] = []
    fwd_prev = bwd_prev = dgrad_prev = 0
    dense = sparse = 0.0
    for record in evals:
        if FORWARD not in record or BACKWARD not in record:
            continue
        fwd, bwd = int(record[FORWARD]), int(record[BACKWARD])
        dgrad = int(record.get(DENSE_GRAD, 0))
        units = ((fwd - fwd_prev) + BACKWARD_FACTOR * (bwd - bwd_prev)) * batch_size
        sparse_per_sample = sum(f * float(record.get(f"density/{n}", 1.0))
                                for n, f in flops.items())
        dense += units * dense_per_sample
        # the weight-gradient half of a dense-read backward at full density instead of sparse
        sparse += (units * sparse_per_sample
                   + (dgrad - dgrad_prev) * batch_size * (dense_per_sample - sparse_per_sample))
        fwd_prev, bwd_prev, dgrad_prev = fwd, bwd, dgrad
        points.append(CostPoint(
            step=int(record["step"]), epochs=int(record["step"]) / max(steps_per_epoch, 1),
            acc=float(record["test/acc"]), forward=fwd, backward=bwd,
            flops_dense=dense, flops_sparse=sparse))
    return points
