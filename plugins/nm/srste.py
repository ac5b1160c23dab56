"""``srste`` gradient correction: sparse-refined straight-through estimator (Zhou et al., "Learning
N:M Fine-grained Structured Sparse Neural Networks From Scratch", ICLR 2021, arXiv 2102.04010).

With the N:M mask ``m`` of this step's forward and the straight-through gradient ``g`` of the
masked product, the weight receives

    ∂L/∂W := g + λ_W · (1 − m) ⊙ W,         λ_W = 2e-4 by default,

a decay on the pruned weights only, so that pruned weights that keep losing the magnitude contest
shrink instead of oscillating across the mask boundary. The term is added to the gradient (not to
the weights), so an adaptive optimizer rescales it, as in the references. Pair it with the ``nm``
mask initialisation and topology (every = 1) and ``[sparsity] kind = "forward"``. SR-STE assumes a
binary mask: combining it with a ``mask_decay`` schedule (β > 0) is rejected, as in Google's
reference ("SR-STE only works with non-decaying mask").
"""

from __future__ import annotations

import attrs
import torch

from sparsefw.config import ConfigError, in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.sharding import local


@attrs.frozen
class SRSTEConfig:
    """``lambda_w``: the decay on pruned weights (λ_W; the paper's and both references' 2e-4)."""

    lambda_w: float = attrs.field(default=2e-4, validator=in_range(0, lo_open=False))


@torch.no_grad()
def srste_correct_(grads: list[torch.Tensor], params: list[torch.Tensor],
                   masks: list[torch.Tensor], lambda_w: float) -> None:
    """``g += λ_W · (1 − m) ⊙ W`` for every triple, in a few foreach kernels (masks are float)."""
    if not grads or lambda_w == 0:
        return
    kept = torch._foreach_mul(params, masks)
    pruned = torch._foreach_sub(params, kept)
    torch._foreach_add_(grads, pruned, alpha=lambda_w)


@attrs.define(eq=False)
class SRSTE:
    """Add ``λ_W (1 − m) ⊙ W`` to the gradient of every N:M-masked weight."""

    #: for sparsefw.testing.contract
    contract_hints = {"mask_kind": "forward"}

    cfg: SRSTEConfig

    @hookimpl
    def sparsefw_run_start(self, state):
        problems = []
        if state.masks.kind != "forward":
            problems.append("gradient_correct 'srste' needs [sparsity] kind = \"forward\"")
        if any(s.name == "mask_decay" for s in state.config.schedule):
            problems.append("gradient_correct 'srste' assumes a binary mask; it cannot be combined "
                            "with the 'mask_decay' schedule (MDGF)")
        if problems:
            raise ConfigError(problems)

    @hookimpl
    def sparsefw_gradient_correct(self, state):
        masks = state.masks
        # under FSDP2 each rank corrects its own shards (weight, gradient and mask shards
        # line up): the term is elementwise, so no collective is needed
        triples = [(local(p.grad), masks.local_param(n), masks.float_mask(n))
                   for n, p in masks.params.items() if p.grad is not None]
        if not triples:
            return
        grads, params, fmasks = (list(x) for x in zip(*triples, strict=True))
        srste_correct_(grads, [p.detach() for p in params], fmasks, self.cfg.lambda_w)


@hookimpl
def sparsefw_register(registry):
    registry.add("gradient_correct", "srste", config=SRSTEConfig, factory=SRSTE)
