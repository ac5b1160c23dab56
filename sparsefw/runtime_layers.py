"""The layers of an exported sparse runtime model (see :mod:`sparsefw.runtime`). This module
imports torch only: it is all an exported model needs besides torch, and a TorchScript export
needs not even this.

:class:`SparseLinear` computes ``y = x Wᵀ + b`` (a Linear) or a 1×1 stride-1 convolution with
``W`` held in the layouts its autotune chose, one per measured number of rows (rows: the
leading dimensions of a Linear's input multiplied together; ``N·H·W`` for a 1×1 conv). The
sparse layouts are stored as their plain index and value tensors and rebuilt in the forward
(a constructor call, no copy), so the state dict holds dense tensors only, ``torch.load(...,
weights_only=True)`` reads it, and TorchScript can script and save the layer.

:class:`SemiStructuredLinear` is the CUDA 2:4 path (``torch.sparse.to_sparse_semi_structured``,
fp16/bf16 on compute capability >= 8.0); tensor subclasses are not scriptable, so a model with
such a layer is saved pickled.
"""


import torch
import torch.nn.functional as F
from torch import nn

#: layouts :class:`SparseLinear` can hold
LAYOUTS = ("dense", "csr", "bsr")


def _chosen(batches: list[int], layouts: list[str], rows: int) -> str:
    """The layout measured at the largest row count not above ``rows`` (the smallest
    measured one below all of them)."""
    chosen = layouts[0]
    for i in range(len(batches)):  # TorchScript: no zip(strict=...)
        if batches[i] <= rows:
            chosen = layouts[i]
    return chosen


class SparseLinear(nn.Module):
    """A Linear (or a 1×1 stride-1 Conv2d, ``conv1x1=True``) whose weight is stored dense, as
    CSR and/or as BSR (square ``blocksize``), used per number of rows as ``batches`` and
    ``layouts`` say (parallel lists, ``batches`` ascending)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batches: list[int],
                 layouts: list[str], blocksize: int = 0, conv1x1: bool = False):
        super().__init__()
        if len(batches) != len(layouts) or not batches:
            raise ValueError("batches and layouts must be parallel, non-empty lists")
        unknown = [x for x in layouts if x not in LAYOUTS]
        if unknown:
            raise ValueError(f"unknown layouts {unknown}; choices: {', '.join(LAYOUTS)}")
        if "bsr" in layouts and blocksize <= 0:
            raise ValueError("the bsr layout needs a blocksize")
        w = weight.detach().reshape(weight.shape[0], -1).contiguous()
        self.out_features = int(w.shape[0])
        self.in_features = int(w.shape[1])
        self.conv1x1 = conv1x1
        self.batches = [int(b) for b in batches]
        self.layouts = [str(x) for x in layouts]
        self.blocksize = int(blocksize)
        self.has_bias = bias is not None
        index = torch.zeros(0, dtype=torch.long, device=w.device)
        empty = w.new_zeros(0)
        self.register_buffer("weight", w if "dense" in layouts else empty)
        self.register_buffer("bias", bias.detach().clone() if bias is not None else empty)
        csr = w.to_sparse_csr() if "csr" in layouts else None
        self.register_buffer("csr_crow", csr.crow_indices() if csr is not None else index)
        self.register_buffer("csr_col", csr.col_indices() if csr is not None else index)
        self.register_buffer("csr_values", csr.values() if csr is not None else empty)
        bsr = w.to_sparse_bsr((blocksize, blocksize)) if "bsr" in layouts else None
        self.register_buffer("bsr_crow", bsr.crow_indices() if bsr is not None else index)
        self.register_buffer("bsr_col", bsr.col_indices() if bsr is not None else index)
        self.register_buffer("bsr_values", bsr.values() if bsr is not None else empty)

    def layout_for(self, rows: int) -> str:
        """The layout used for a product with ``rows`` rows."""
        return _chosen(self.batches, self.layouts, rows)

    def _weight_times(self, xt: torch.Tensor, layout: str) -> torch.Tensor:
        """``W @ xt`` for ``xt`` of shape ``(in_features, n)``."""
        size = [self.out_features, self.in_features]
        if layout == "csr":
            if torch.jit.is_scripting():  # TorchScript's constructor has no check_invariants
                w = torch.sparse_csr_tensor(self.csr_crow, self.csr_col, self.csr_values, size)
            else:
                w = torch.sparse_csr_tensor(self.csr_crow, self.csr_col, self.csr_values, size,
                                            check_invariants=False)
            return torch.mm(w, xt)
        if layout == "bsr":
            if torch.jit.is_scripting():
                w = torch.sparse_bsr_tensor(self.bsr_crow, self.bsr_col, self.bsr_values, size)
            else:
                w = torch.sparse_bsr_tensor(self.bsr_crow, self.bsr_col, self.bsr_values, size,
                                            check_invariants=False)
            return torch.mm(w, xt)
        return torch.mm(self.weight, xt)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv1x1:
            n, c, h, w = x.shape[0], x.shape[1], x.shape[2], x.shape[3]
            layout = self.layout_for(n * h * w)
            y = self._weight_times(x.transpose(0, 1).reshape(c, n * h * w), layout)
            if self.has_bias:
                y = y + self.bias.unsqueeze(1)
            return y.reshape(self.out_features, n, h, w).transpose(0, 1)
        lead = list(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        layout = self.layout_for(x2.shape[0])
        if layout == "dense":
            y = F.linear(x2, self.weight, self.bias if self.has_bias else None)
        else:
            y = self._weight_times(x2.t(), layout).t()
            if self.has_bias:
                y = y + self.bias
        return y.reshape(lead + [self.out_features])

    def extra_repr(self) -> str:
        plan = ", ".join(f"{b}:{x}" for b, x in zip(self.batches, self.layouts, strict=True))
        kind = "conv1x1" if self.conv1x1 else "linear"
        return (f"{kind}, in_features={self.in_features}, out_features={self.out_features}, "
                f"rows->layout=[{plan}], blocksize={self.blocksize}")


class SemiStructuredLinear(nn.Module):
    """A Linear whose weight is also held as a 2:4 semi-structured sparse tensor (CUDA,
    fp16/bf16), used for the row counts where the autotune chose ``"2:4"``; the dense weight
    for the others (kept only when some row count uses it)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, batches: list[int],
                 layouts: list[str]):
        super().__init__()
        from torch.sparse import to_sparse_semi_structured

        if len(batches) != len(layouts) or not batches:
            raise ValueError("batches and layouts must be parallel, non-empty lists")
        unknown = [x for x in layouts if x not in ("dense", "2:4")]
        if unknown:
            raise ValueError(f"SemiStructuredLinear layouts are dense or 2:4, got {unknown}")
        w = weight.detach().contiguous()
        self.out_features, self.in_features = int(w.shape[0]), int(w.shape[1])
        self.batches = [int(b) for b in batches]
        self.layouts = [str(x) for x in layouts]
        self.semi = nn.Parameter(to_sparse_semi_structured(w), requires_grad=False)
        self.register_buffer("weight", w if "dense" in layouts else w.new_zeros(0))
        self.bias = nn.Parameter(bias.detach().clone(), requires_grad=False) \
            if bias is not None else None

    def layout_for(self, rows: int) -> str:
        """The layout used for a product with ``rows`` rows."""
        return _chosen(self.batches, self.layouts, rows)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = list(x.shape[:-1])
        x2 = x.reshape(-1, self.in_features)
        w = self.semi if self.layout_for(x2.shape[0]) == "2:4" else self.weight
        return F.linear(x2, w, self.bias).reshape(lead + [self.out_features])
