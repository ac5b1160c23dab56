"""Sparse compute in training (``[sparsity] compute = "dense" | "sparse" | "auto"``): the hard-masked
Linear layers run their forward and input gradient with the weight's active entries as a CSR
matrix and compute the weight gradient only at the active positions (a sampled dense–dense
product, ``torch.sparse.sampled_addmm``), instead of dense products over mostly-zero weights.

It is a property of the model and its masks, set up by the :class:`~sparsefw.Sparsifier`
(:class:`SparseCompute`), not a second engine: the parameters, optimizer, masks, hooks and
state-dict keys stay what they are; each selected module's ``forward`` is swapped for one that
calls :class:`_SparseLinearFunction` with the layer's packed index structure.

* **Packing.** Each layer keeps the CSR structure of its mask and of the mask's transpose, and
  the positions of the active entries; the values are gathered from the dense weight at every
  forward (the optimizer keeps updating the dense parameter). Masks changed by a topology
  update are re-packed at update time (:meth:`SparseCompute.repack`); any other change (round
  ends, a loaded checkpoint) is noticed at the next forward (a mask is replaced, never edited in
  place: ``MaskSet.update``).
* **Weight gradient.** The active entries' gradients are written into a persistent dense buffer
  whose pruned entries stay zero (what hard masking makes of a dense gradient anyway), which
  becomes ``weight.grad`` (or is added into an existing one): no dense product and no fresh
  dense allocation per step. Because of that, the function returns no gradient for the weight
  through autograd, so hooks on the parameter's gradient accumulation do not see it (DDP's
  among them: see below).
* **Dense-gradient steps.** On a step whose after-backward topology update is due (RigL grows by
  the dense gradient), the weight gradient is the dense product, returned normally.
* **When.** The sparse path runs in the forward/backward of a training step (the Sparsifier
  marks it: ``step(closure)``'s closure, or from the first forward to ``step()`` in a loop
  without a closure) and under ``torch.no_grad`` (evaluation). Passes outside a step (SNIP and
  GraSP scores, diagnostics) compute densely, so ``torch.autograd.grad`` callers get ordinary
  weight gradients.
* **auto** measures, per layer and on its first training input, forward + backward of the dense
  Linear against the sparse path (interleaved medians, :mod:`sparsefw.timing`) and keeps the
  sparse path only where it is faster by :data:`AUTO_MARGIN`; measurements are cached per
  shape, non-zeros, rows, dtype, device and thread count. It then checks the choices on whole
  steps: for :data:`TRIAL_STEPS` steps the forward/backward alternates between the choices and
  all-dense, and unless the choices win by the same margin, every layer goes back to dense.

What it does not do (``sparse`` refuses with the reason, ``auto`` computes densely): forward
masks (their dense weights are trained), perturbation and gradient-correction components (they
read or perturb pruned entries), DDP (its gradient hooks would not fire), ``torch.compile`` and
autocast. Convolutions always compute densely.
"""

from __future__ import annotations

import statistics
import time
import types

import torch
import torch.nn.functional as F
from torch import nn

from sparsefw import timing
from sparsefw.config import COMPUTE_MODES
from sparsefw.masks import MaskSet

__all__ = ["AUTO_MARGIN", "COMPUTE_MODES", "PackedWeight", "SparseCompute", "unsupported"]

# ``COMPUTE_MODES`` lives in sparsefw.config (reading a config needs no torch)
#: auto keeps the sparse path only if its forward + backward is this much faster than dense
AUTO_MARGIN = 0.1
#: auto: steps of its whole-step check (alternating chosen/dense; the first two are warm-up)
TRIAL_STEPS = 10
#: measured seconds, ``key -> {"dense": s, "sparse": s}``
CACHE: dict[tuple, dict[str, float]] = {}


class PackedWeight:
    """The CSR structure of one layer's mask (and of its transpose) and the gradient buffer."""

    def __init__(self, param: nn.Parameter, mask: torch.Tensor, version: int = 0):
        self.param = param
        self.version = version  # of the MaskSet's mask this packing was built from
        out_f, in_f = mask.shape
        self.shape = (out_f, in_f)
        rows, cols = mask.nonzero(as_tuple=True)  # row-major order
        self.flat = rows * in_f + cols
        self.crow = _crow(rows, out_f)
        self.col = cols
        order = torch.argsort(cols * out_f + rows)  # the transpose's row-major order
        self.t_perm = order
        self.t_crow = _crow(cols[order], in_f)
        self.t_col = rows[order]
        ones = torch.ones(len(rows), dtype=param.dtype, device=param.device)
        self.pattern = torch.sparse_csr_tensor(self.crow, self.col, ones, self.shape,
                                               check_invariants=False)
        self.grad_buffer: torch.Tensor | None = None
        #: take the dense weight gradient on this step (a topology update reads it)
        self.dense_gradient = False

    def weight_csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.crow, self.col, values, self.shape,
                                       check_invariants=False)

    def weight_t_csr(self, values: torch.Tensor) -> torch.Tensor:
        return torch.sparse_csr_tensor(self.t_crow, self.t_col, values[self.t_perm],
                                       self.shape[::-1], check_invariants=False)

    def add_grad(self, values: torch.Tensor) -> None:
        """Put the active entries' gradient ``values`` into ``param.grad``."""
        p = self.param
        if p.grad is None:
            buf = self.grad_buffer
            if buf is None or buf.shape != p.shape:
                buf = self.grad_buffer = torch.zeros_like(p)
            buf.view(-1).index_copy_(0, self.flat, values)
            p.grad = buf
        else:
            p.grad.view(-1).index_add_(0, self.flat, values.to(p.grad.dtype))


def _crow(rows: torch.Tensor, n: int) -> torch.Tensor:
    counts = torch.bincount(rows, minlength=n)
    return torch.cat([counts.new_zeros(1), counts.cumsum(0)])


class _SparseLinearFunction(torch.autograd.Function):
    """``x Wᵀ + b`` with ``W`` the active entries of ``packed.param`` (see the module
    docstring for the weight gradient)."""

    @staticmethod
    def forward(ctx, x, weight, bias, packed: PackedWeight):
        values = weight.detach().reshape(-1).index_select(0, packed.flat)
        y = torch.mm(packed.weight_csr(values), x.t()).t()
        if bias is not None:
            y = y + bias
        ctx.packed = packed
        ctx.has_bias = bias is not None
        ctx.save_for_backward(x, values)
        return y

    @staticmethod
    def backward(ctx, gy):
        x, values = ctx.saved_tensors
        packed: PackedWeight = ctx.packed
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:
            gx = torch.mm(packed.weight_t_csr(values), gy.t()).t()
        if ctx.has_bias and ctx.needs_input_grad[2]:
            gb = gy.sum(0)
        if ctx.needs_input_grad[1]:
            if packed.dense_gradient:
                gw = gy.t().mm(x)
            else:
                sampled = torch.sparse.sampled_addmm(packed.pattern, gy.t(), x, beta=0.0)
                packed.add_grad(sampled.values())
        return gx, gw, gb, None


def sparse_linear(x: torch.Tensor, module: nn.Linear, packed: PackedWeight) -> torch.Tensor:
    """``module(x)`` through the sparse path (any leading dimensions)."""
    lead = x.shape[:-1]
    y = _SparseLinearFunction.apply(x.reshape(-1, module.in_features), module.weight,
                                    module.bias, packed)
    return y.reshape(*lead, module.out_features)


def unsupported(masks: MaskSet, *, perturb: bool, gradient_correct: bool, ddp: bool,
                compiled: bool, amp: bool) -> str | None:
    """Why sparse compute cannot run for this configuration, or ``None``."""
    if masks.kind != "hard":
        return "forward masks train dense weights (sparse compute needs hard masks)"
    for flag, why in ((perturb, "perturbation components perturb pruned weights"),
                      (gradient_correct, "gradient-correction components read pruned gradients"),
                      (ddp, "under DDP the weight gradient must go through its hooks"),
                      (compiled, "torch.compile does not trace the sparse kernels"),
                      (amp, "the sparse kernels run in float32 (no autocast)")):
        if flag:
            return why
    return None


class SparseCompute:
    """The sparse layers of one model: which Linear modules compute sparsely, their packings,
    the forward swap, and re-packing. ``mode`` is ``"sparse"`` (every hard-masked Linear) or
    ``"auto"`` (measured per layer at its first training forward)."""

    def __init__(self, model: nn.Module, masks: MaskSet, mode: str):
        if mode not in ("sparse", "auto"):
            raise ValueError(f"compute {mode!r}: SparseCompute runs 'sparse' or 'auto'")
        self.mode = mode
        self.masks = masks
        #: module name -> parameter name, for the masked 2-D Linear weights
        self.layers: dict[str, str] = {}
        for mod_name, mod in model.named_modules():
            pname = f"{mod_name}.weight" if mod_name else "weight"
            if isinstance(mod, nn.Linear) and pname in masks.params \
                    and mod.weight is masks.params[pname]:
                self.layers[mod_name] = pname
        self.modules = {n: model.get_submodule(n) for n in self.layers}
        self.packed: dict[str, PackedWeight] = {}
        #: per layer: True sparse, False dense, missing: auto has not measured yet
        self.choice: dict[str, bool] = {n: True for n in self.layers} if mode == "sparse" else {}
        self.times: dict[str, dict[str, float]] = {}
        self._dense_gradient = False
        #: the sparse path runs in a training step's own forward/backward (the Sparsifier sets
        #: it) and without autograd; passes outside a step (SNIP/GraSP scores, diagnostics,
        #: ``torch.autograd.grad`` callers) compute densely and get ordinary weight gradients
        self._active = False
        #: auto's check of its per-layer choices on whole steps (see :meth:`_end_pass`)
        self.trial: list[tuple[bool, float]] = []
        self.verified: bool | None = None if mode == "auto" else True
        self.clock = time.perf_counter
        self._started: float | None = None
        for name, mod in self.modules.items():
            mod.forward = types.MethodType(self._forward_of(name), mod)

    # ------------------------------------------------------------------ the swap
    def _forward_of(self, name: str):
        def forward(mod: nn.Linear, x: torch.Tensor) -> torch.Tensor:
            if mod.weight is not self.masks.params[self.layers[name]] or (
                    torch.is_grad_enabled() and not self.active):
                return F.linear(x, mod.weight, mod.bias)
            if name not in self.choice:
                if not (mod.training and torch.is_grad_enabled()):
                    return F.linear(x, mod.weight, mod.bias)
                self.choice[name] = self._measure(name, x)
            if not self.choice[name] or (self.verified is None and self._trial_dense):
                return F.linear(x, mod.weight, mod.bias)
            return sparse_linear(x, mod, self._packing(name))
        return forward

    def remove(self) -> None:
        """Give every module its own forward back."""
        for mod in self.modules.values():
            mod.__dict__.pop("forward", None)

    # ------------------------------------------------------------------ packing
    def _packing(self, name: str) -> PackedWeight:
        pname = self.layers[name]
        version = self.masks.version[pname]
        packed = self.packed.get(name)
        if packed is None or packed.version != version:
            packed = self.packed[name] = PackedWeight(self.masks.params[pname],
                                                      self.masks.masks[pname], version)
            packed.dense_gradient = self._dense_gradient
        return packed

    def repack(self) -> None:
        """Re-pack the layers whose mask changed (after a topology update)."""
        for name in self.layers:
            if self.choice.get(name):
                self._packing(name)

    @property
    def dense_gradient(self) -> bool:
        """Whether this step's weight gradients are dense (a topology update reads them)."""
        return self._dense_gradient

    @dense_gradient.setter
    def dense_gradient(self, value: bool) -> None:
        self._dense_gradient = bool(value)
        for packed in self.packed.values():
            packed.dense_gradient = self._dense_gradient

    # ------------------------------------------------------------------ auto
    def _measure(self, name: str, x: torch.Tensor) -> bool:
        """auto: whether the sparse path's forward + backward beats dense for this layer."""
        mod = self.modules[name]
        pname = self.layers[name]
        mask = self.masks.masks[pname]
        w = mod.weight.detach()
        rows = x.numel() // x.shape[-1]
        key = (str(w.device), str(w.dtype), torch.get_num_threads(), tuple(w.shape),
               int(mask.sum()), rows, mod.bias is not None)
        if key not in CACHE:
            CACHE[key] = _time_layer(mod, mask, x.detach().reshape(rows, -1))
        self.times[name] = CACHE[key]
        t = CACHE[key]
        return timing.pick(t, "dense", AUTO_MARGIN) == "sparse"

    # ------------------------------------------------------------------ auto's step check
    @property
    def active(self) -> bool:
        """Whether a training step's own forward/backward is running (set by the Sparsifier)."""
        return self._active

    @active.setter
    def active(self, value: bool) -> None:
        value = bool(value)
        if value and not self._active:
            self._start_pass()
        elif self._active and not value:
            self._end_pass()
        self._active = value

    @property
    def _trial_dense(self) -> bool:
        """During auto's check, every other step computes densely."""
        return len(self.trial) % 2 == 1

    def _sync(self) -> None:
        if self.masks.params and next(iter(self.masks.params.values())).is_cuda:
            torch.cuda.synchronize()

    def _start_pass(self) -> None:
        if self.verified is None and any(self.choice.values()):
            self._sync()
            self._started = self.clock()

    def _end_pass(self) -> None:
        """auto: the per-layer choices are measured in isolation; whole steps see more (the
        other layers, memory traffic, a busy machine). For :data:`TRIAL_STEPS` steps after the
        choices exist, forward/backward alternate between them and all-dense; unless the
        choices' median beats dense's by :data:`AUTO_MARGIN`, every layer computes densely."""
        if self._started is None:
            return
        self._sync()
        self.trial.append((self._trial_dense, self.clock() - self._started))
        self._started = None
        if len(self.trial) >= TRIAL_STEPS:
            kept = self.trial[2:]  # the first pair warms both up
            sparse = statistics.median(t for dense, t in kept if not dense)
            dense = statistics.median(t for dense, t in kept if dense)
            self.verified = sparse * (1.0 + AUTO_MARGIN) <= dense
            if not self.verified:
                self.choice = {n: False for n in self.choice}

    def summary(self) -> dict[str, str]:
        """``module name -> "sparse" | "dense" | "unmeasured"``."""
        return {n: ("unmeasured" if n not in self.choice else
                    "sparse" if self.choice[n] else "dense") for n in self.layers}


def _time_layer(mod: nn.Linear, mask: torch.Tensor, x: torch.Tensor) -> dict[str, float]:
    """Seconds of forward + backward (input and weight gradient) of ``mod`` on ``x``, dense
    and sparse, on copies of its weight (the module's gradients are left alone)."""
    w = nn.Parameter(mod.weight.detach() * mask)
    b = nn.Parameter(mod.bias.detach().clone()) if mod.bias is not None else None
    xi = x.clone().requires_grad_(True)
    gen = torch.Generator(device=x.device).manual_seed(0)  # the run's random stream is untouched
    gy = torch.randn(x.shape[0], mod.out_features, dtype=x.dtype, device=x.device, generator=gen)
    packed = PackedWeight(w, mask)

    def dense():
        w.grad = None
        F.linear(xi, w, b).backward(gy)

    def sparse():
        w.grad = None
        _SparseLinearFunction.apply(xi, w, b, packed).backward(gy)

    return timing.median_times({"dense": dense, "sparse": sparse}, repeats=5, number=2,
                               device=x.device)

