"""``MaskedSGD``: torch's SGD with hard masks folded into its update (CPU, float32).

A hard-masked step zeroes the pruned entries of every masked gradient (``g ← g ⊙ m``) and then
runs the optimizer: two passes over each masked weight's memory where a plain step makes one.
:class:`MaskedSGD` is a :class:`torch.optim.SGD` that does both in one pass for the parameters
it is given masks for (``sparsefw/kernels/masked_sgd.cpp``), with the same results bit for bit
as the mask pass followed by torch's fused SGD — weights, momentum buffers, and ``.grad``,
which holds the masked gradient afterwards as before. Parameters without a mask take the same
kernel without the mask (torch's fused SGD, bit for bit); parameters the kernel does not take
(not float32, not contiguous, not on the CPU) go through torch's fused SGD, masked ones after a
mask pass of their own. Under a loss scaler (fp16) the scaler unscales
the gradients before the step, as for a non-fused optimizer.

The :class:`sparsefw.Sparsifier` (and so the Trainer, with ``[optimizer] implementation =
"fused_masked"``) hands its hard masks to a ``MaskedSGD`` and leaves the gradient masking to it
when it runs the optimizer step itself (``sparsifier.step``). In a loop of your own::

    optimizer = MaskedSGD(model.parameters(), lr=0.1, momentum=0.9, weight_decay=5e-4)
    sparsifier = Sparsifier(model, optimizer, "run.toml", total_steps=...)
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch.autograd.graph import increment_version
from torch.optim.sgd import sgd  # torch's functional SGD

from sparsefw.kernels import load_kernels, vector_width

__all__ = ["MaskedSGD", "MaskSource"]

#: what a ``MaskedSGD`` asks for its masks at each step: parallel lists of parameters and
#: their 0/1 masks (in the parameter's dtype); called once per step, so a mask store can hand
#: out the lists it keeps anyway
MaskSource = Callable[[], tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]]]


class MaskedSGD(torch.optim.SGD):
    """SGD (momentum, dampening, Nesterov, weight decay, maximize: torch's semantics) whose
    step also zeroes the pruned gradient entries of the parameters :attr:`mask_source` names,
    in the same pass. Builds sparsefw's kernel on construction (about 30 s the first time;
    :class:`sparsefw.kernels.KernelUnavailable` says why where it cannot)."""

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False):
        self._kernel = load_kernels()
        self._width = vector_width()
        super().__init__(params, lr=lr, momentum=momentum, dampening=dampening,
                         weight_decay=weight_decay, nesterov=nesterov, maximize=maximize,
                         fused=True)
        # a GradScaler unscales before step() (the kernel takes no scale of its own)
        self._step_supports_amp_scaling = False
        #: where the step's masks come from (``None``: none, a plain fused SGD step)
        self.mask_source: MaskSource | None = None
        #: write the masked gradients back into ``.grad`` (one more write per masked entry);
        #: ``False`` leaves ``.grad`` unmasked after the step, for a caller that discards the
        #: gradients before anything reads them (the Trainer, when no component can)
        self.keep_masked_grads = True

    @torch.no_grad()
    def step(self, closure=None):
        """One SGD step: per parameter group, one kernel call over the parameters it takes
        (masked ones masked in the same pass, their ``.grad`` left masked), torch's fused
        SGD for the rest. Returns the closure's loss, if a closure was given."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        masks = self._masks()
        for group in self.param_groups:
            momentum = group["momentum"]
            params, grads, group_masks, bufs, first, rest = [], [], [], [], [], []
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                m = masks.get(p)
                if not _takes(p, g, m):
                    if m is not None:
                        g.mul_(m)
                    rest.append(p)
                    continue
                params.append(p)
                grads.append(g)
                group_masks.append(m)
                if momentum != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    first.append(buf is None)
                    if buf is None:
                        buf = state["momentum_buffer"] = torch.empty_like(p)
                    bufs.append(buf)
            if params:
                lr = group["lr"]
                self._kernel.masked_sgd_(
                    params, grads, group_masks, bufs, first,
                    float(lr), float(momentum), float(group["dampening"]),
                    float(group["weight_decay"]), bool(group["nesterov"]),
                    bool(group["maximize"]), self._width, self.keep_masked_grads)
                # written through raw pointers: tell autograd, as torch's in-place ops do
                increment_version(params + bufs + (grads if self.keep_masked_grads else []))
            if rest:
                self._torch_step(group, rest)
        return loss

    def _masks(self) -> dict[torch.Tensor, torch.Tensor]:
        if self.mask_source is None:
            return {}
        params, masks = self.mask_source()
        return dict(zip(params, masks, strict=True))

    def _torch_step(self, group: dict, params: list[torch.Tensor]) -> None:
        """torch's fused SGD for the parameters the kernel does not take (their gradients
        already masked)."""
        momentum = group["momentum"]
        bufs = [self.state[p].get("momentum_buffer") for p in params]
        # torch's fused kernel takes plain tensors (not DTensor shards: its default then)
        plain = all(type(p.grad) is torch.Tensor for p in params)
        sgd(
            params, [p.grad for p in params], bufs, fused=True if plain else None,
            weight_decay=group["weight_decay"], momentum=momentum, lr=group["lr"],
            dampening=group["dampening"], nesterov=group["nesterov"],
            maximize=group["maximize"])
        if momentum != 0:
            for p, buf in zip(params, bufs, strict=True):
                self.state[p]["momentum_buffer"] = buf


def _takes(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor | None) -> bool:
    """Does the kernel take this parameter (float32, contiguous, on the CPU, a plain dense
    gradient — not a tensor subclass such as an FSDP2 shard; its mask, if any, the same)?"""
    ok = (type(g) is torch.Tensor and p.dtype == torch.float32 and p.device.type == "cpu"
          and g.dtype == torch.float32 and g.layout == torch.strided and p.is_contiguous()
          and g.is_contiguous() and g.shape == p.shape)
    if ok and m is not None:
        ok = m.dtype == torch.float32 and m.is_contiguous() and m.shape == p.shape
    return ok
