"""Per-parameter masks: :class:`MaskSet`, which parameters are sparsified, and mask helpers.

Two kinds of masking:

* ``hard`` — weights are dense tensors whose pruned entries are exactly zero; gradients of pruned
  entries are zeroed before the optimizer step, so momentum and Adam moments stay zero there, and
  the weights are re-masked after the step.
* ``forward`` — dense weights are kept and trained; the forward pass sees ``w * m_eff`` with
  ``m_eff = m + β·(1 − m)`` (β = ``decay``, 0 by default) and the backward pass is straight
  through (the dense weight receives the gradient of the masked product), as STE-style N:M
  methods need.

All per-step arithmetic is done with ``torch._foreach_*`` kernels over every masked parameter at
once; nothing here reads a tensor back to the host except :meth:`MaskSet.summary`.

Storage: each mask is kept once, as 0/1 in its parameter's dtype (4 bytes per fp32 weight), the
form those kernels multiply by (a bool or half-precision mask makes the CPU multiply 1.8-4.6x
slower). The bool masks components read (``MaskSet.masks``, :class:`BoolMasks`) are built from
it when read and released after every optimizer step.

Parameters sharded by FSDP2 (``DTensor`` parameters) get the mask of this rank's shard only; the
arithmetic runs on the local shards (:mod:`sparsefw.sharding`), and :meth:`MaskSet.update`
takes the whole layer's mask and keeps this rank's part.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable, Mapping
from typing import NamedTuple

import numpy as np
import torch
from torch import nn

from sparsefw import sharding
from sparsefw.config import MASK_KINDS

#: tensors at least this large are edited at indices through numpy views on the CPU
NUMPY_MIN_NUMEL = 1 << 16
_NUMPY_DTYPES = (torch.bool, torch.float32, torch.float64, torch.float16)


def flat_numpy(t: torch.Tensor) -> np.ndarray | None:
    """A flat zero-copy numpy view of ``t`` when numpy is the faster way to gather and
    scatter at ~10^5 indices (several times faster than torch's CPU index kernels): a large
    contiguous CPU tensor of a dtype numpy has; else None (use torch)."""
    if (t.device.type != "cpu" or t.numel() < NUMPY_MIN_NUMEL or not t.is_contiguous()
            or t.dtype not in _NUMPY_DTYPES):
        return None
    return t.detach().numpy().reshape(-1)
def fill_at(t: torch.Tensor, idx: torch.Tensor, value) -> None:
    """``t.view(-1)[idx] = value`` in place for a contiguous ``t`` (long flat indices on its
    device), through :func:`flat_numpy` where that is the faster way."""
    flat = flat_numpy(t)
    if flat is not None:
        flat[idx.numpy()] = value
    else:
        t.view(-1).index_fill_(0, idx, value)


_SPARSIFIABLE = (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def sparsifiable_params(
    model: nn.Module, dense_layers: Iterable[str] = (), first_layer_dense: bool = False
) -> dict[str, nn.Parameter]:
    """Weights of Linear/Conv layers, by parameter name, minus those matching ``dense_layers``
    and, with ``first_layer_dense``, minus the first such layer (:func:`first_layer`).

    A pattern is an ``fnmatch`` pattern tested against both the parameter name
    (``"fc.weight"``) and its module name (``"fc"``). Biases and normalisation parameters are
    never sparsified.
    """
    patterns = tuple(dense_layers)
    first = first_layer(model) if first_layer_dense else None
    out: dict[str, nn.Parameter] = {}
    for name, mod_name, module in _layers(model):
        if name == first or any(
                fnmatch.fnmatchcase(x, p) for p in patterns for x in (name, mod_name)):
            continue
        out[name] = module.weight
    return out


def _layers(model: nn.Module) -> list[tuple[str, str, nn.Module]]:
    """(weight name, module name, module) of every Linear/Conv layer, in module order."""
    return [(f"{n}.weight" if n else "weight", n, m) for n, m in model.named_modules()
            if isinstance(m, _SPARSIFIABLE) and m.weight is not None]


def first_layer(model: nn.Module) -> str | None:
    """Weight name of the model's input layer: its first Linear/Conv in module (registration)
    order — the stem convolution, a ViT's patch embedding, an MLP's first Linear. ``None`` when
    an ``nn.Embedding`` comes first (a language model's input layer, never sparsified) or the
    model has no such layer."""
    for n, m in model.named_modules():
        if isinstance(m, nn.Embedding):
            return None
        if isinstance(m, _SPARSIFIABLE) and m.weight is not None:
            return f"{n}.weight" if n else "weight"
    return None


class _StraightThrough(torch.autograd.Function):
    """``w * m`` forward, identity backward for ``w`` (straight-through estimator)."""

    @staticmethod
    def forward(ctx, weight, mask):
        return weight * mask

    @staticmethod
    def backward(ctx, grad):
        return grad, None


def topk_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Boolean mask of ``scores``' shape with exactly ``k`` True entries at the largest scores.

    Ties are broken by position (the lower flat index wins), deterministically.
    """
    flat = scores.reshape(-1)
    mask = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
    if k > 0:
        # stable sort on descending score: equal scores keep index order
        order = torch.sort(flat, descending=True, stable=True).indices[:k]
        mask[order] = True
    return mask.view_as(scores)


def bool_to(mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A bool mask as 0/1 in ``dtype``, converted through its uint8 view: the same values as
    ``mask.to(dtype)``, about five times faster on the CPU (torch's bool-to-float copy is not
    vectorised)."""
    return mask.view(torch.uint8).to(dtype)


class IndexEdits(NamedTuple):
    """What :meth:`MaskSet.update_at` calls did to one layer since :meth:`MaskSet.take_edits`:
    the flat indices they made inactive and those they made active (long tensors; an index
    may repeat and may be in both). Every entry that changed is among them."""

    dropped: torch.Tensor
    grown: torch.Tensor


class BoolMasks(Mapping[str, torch.Tensor]):
    """:attr:`MaskSet.masks`: each layer's mask as a bool tensor, read-only. The masks are
    stored once, as 0/1 in the parameter's dtype (what the per-step arithmetic multiplies
    by: 4 bytes per fp32 weight); a bool mask is built from it when first read and kept
    until :meth:`release` (the lifecycle releases them after every optimizer step), so no
    second copy outlives the code that asked for it. A mask handed to :meth:`MaskSet.update`
    is kept as given until then."""

    def __init__(self, floats: dict[str, torch.Tensor]):
        self._floats = floats
        self._bools: dict[str, torch.Tensor] = {}

    def __getitem__(self, name: str) -> torch.Tensor:
        m = self._bools.get(name)
        if m is None:
            f = self._floats[name]
            flat = flat_numpy(f)  # a large CPU mask: numpy's != 0, ~2x faster than .bool()
            m = f.bool() if flat is None else torch.from_numpy(flat != 0).view(f.shape)
            self._bools[name] = m  # (torch's .bool() is itself 2x faster than its != 0)
        return m

    def __iter__(self):
        return iter(self._floats)

    def __len__(self) -> int:
        return len(self._floats)

    def __contains__(self, name) -> bool:
        return name in self._floats

    def _keep(self, name: str, mask: torch.Tensor) -> None:
        self._bools[name] = mask

    def _forget(self, name: str) -> None:
        """Drop the bool mask of ``name`` (its stored mask changed; rebuilt when read)."""
        self._bools.pop(name, None)

    def release(self) -> None:
        """Drop the bool masks built or kept so far (they are rebuilt when read again)."""
        self._bools.clear()

    def held(self) -> list[torch.Tensor]:
        """The bool masks held right now (for memory accounting)."""
        return list(self._bools.values())


class MaskSet:
    """Masks keyed by parameter name, with the per-layer targets and the masking kind.

    ``masks[name]`` is a bool tensor of the parameter's shape (of this rank's shard, for a
    parameter sharded by FSDP2; :class:`BoolMasks`: built from the stored 0/1 mask when
    read); ``targets[name]`` the number of active entries the density allocation gave that
    layer (of the whole layer); ``version[name]`` counts the changes of its mask.
    """

    def __init__(self, params: Mapping[str, nn.Parameter], kind: str = "hard"):
        if kind not in MASK_KINDS:
            raise ValueError(f"unknown mask kind {kind!r}; choices: {', '.join(MASK_KINDS)}")
        self.kind = kind
        self.params: dict[str, nn.Parameter] = dict(params)
        #: the masks, stored once: 0/1 in the parameter's dtype
        self._float: dict[str, torch.Tensor] = {
            n: torch.ones_like(sharding.local(p)) for n, p in self.params.items()}
        self.masks = BoolMasks(self._float)
        #: per layer, how many times its mask changed (what a packing built from it checks)
        self.version: dict[str, int] = dict.fromkeys(self.params, 0)
        #: whether any parameter is sharded (FSDP2): counts are then all-reduced
        self.sharded = any(sharding.is_sharded(p) for p in self.params.values())
        self.targets: dict[str, int] = {n: p.numel() for n, p in self.params.items()}
        #: β of forward masking: weight of pruned entries in the forward pass
        self.decay: float = 0.0
        #: names whose mask may hold a zero: the only layers the per-step arithmetic touches
        self._sparse: list[str] = list(self.params)
        self._lists_cache: tuple[list, list] | None = None
        #: per layer, how its mask changed since :meth:`take_edits`: the flat indices
        #: :meth:`update_at` dropped and grew (alternating), or None (replaced whole)
        self._edits: dict[str, list[torch.Tensor] | None] = {}
        #: ``zero_inactive_`` of sparsefw's compiled CPU kernels (``[sparsity] cpu_kernels``;
        #: the Sparsifier sets it), which :meth:`zero_at` uses on large float32 CPU layers
        self.zero_kernel: Callable | None = None

    # ------------------------------------------------------------------ access
    @property
    def names(self) -> list[str]:
        """Masked parameter names, in model order."""
        return list(self.params)

    def __len__(self) -> int:
        return len(self.params)

    def __contains__(self, name: str) -> bool:
        return name in self.params

    def _store(self, name: str, mask: torch.Tensor) -> None:
        """Make the bool ``mask`` (this rank's shape) the mask of ``name``."""
        self._float[name] = bool_to(mask, self.params[name].dtype)
        self.masks._keep(name, mask)
        self.version[name] += 1
        if name not in self._sparse:  # conservatively: it may hold zeros now
            self._sparse.append(name)
        self._lists_cache = None
        self._edits[name] = None

    def refresh_sparse_layers(self) -> None:
        """Find the layers whose mask is all ones, with one host sync, so that the per-step
        arithmetic skips them. The engine calls it after mask initialisation, round ends and
        checkpoint loads (never inside a step); :meth:`update` marks a layer as possibly sparse
        again without syncing."""
        names = list(self.params)
        if not names:
            return
        full = torch.stack([self._float[n].all() for n in names]).tolist()
        self._sparse = [n for n, f in zip(names, full, strict=True) if not f]
        self._lists_cache = None

    def float_mask(self, name: str) -> torch.Tensor:
        """The stored mask of ``name``: 0/1 in the parameter's dtype, what the per-step
        arithmetic multiplies by (do not modify it; change masks with :meth:`update`)."""
        return self._float[name]

    def local_param(self, name: str) -> torch.Tensor:
        """The parameter of ``name`` as this rank holds it (its shard under FSDP2; a view:
        in-place edits under ``no_grad`` edit the parameter)."""
        return sharding.local(self.params[name])

    def update(self, name: str, mask: torch.Tensor) -> None:
        """Replace one mask (bool, the parameter's whole shape, on its device); for a sharded
        parameter this rank keeps its shard of it."""
        p = self.params[name]
        if mask.shape != p.shape or mask.dtype != torch.bool:
            raise ValueError(
                f"mask for {name} must be bool of shape {tuple(p.shape)}, "
                f"got {mask.dtype} {tuple(mask.shape)}"
            )
        self._store(name, sharding.shard_of(mask.to(p.device), p))

    def update_local(self, name: str, shard: torch.Tensor) -> None:
        """Replace the mask of this rank's shard of ``name`` (bool, the local shape)."""
        current = self._float[name]
        expected = current.shape
        if shard.shape != expected or shard.dtype != torch.bool:
            raise ValueError(f"local mask for {name} must be bool of shape {tuple(expected)}, "
                             f"got {shard.dtype} {tuple(shard.shape)}")
        self._store(name, shard.to(current.device))

    # ------------------------------------------------------------------ arithmetic
    def _lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """Parameters and float masks of the possibly sparse layers (cached between updates)."""
        if self._lists_cache is None:
            names = [n for n in self.params if n in self._sparse]
            self._lists_cache = ([self.local_param(n) for n in names],
                                 [self._float[n] for n in names])
        return self._lists_cache

    @torch.no_grad()
    def apply_(self, names: Iterable[str] | None = None) -> None:
        """Zero the pruned weights (hard masking; a no-op for forward masking); of the layers
        ``names`` only, if given."""
        if self.kind != "hard":
            return
        params, masks = self._lists()
        if names is not None:
            chosen = {id(self._float[n]) for n in names}
            kept = [i for i, m in enumerate(masks) if id(m) in chosen]
            params, masks = [params[i] for i in kept], [masks[i] for i in kept]
        if params:
            torch._foreach_mul_(params, masks)

    def hard_mask_lists(self) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        """The possibly sparse parameters and their 0/1 masks (hard masking; empty lists for
        forward masking): what a :class:`sparsefw.kernels.masked_sgd.MaskedSGD` masks the
        gradients of in its update. Lists kept between topology updates; do not modify."""
        if self.kind != "hard":
            return [], []
        return self._lists()

    @torch.no_grad()
    def mask_grads_(self) -> None:
        """Zero the gradients of pruned entries (hard masking only)."""
        if self.kind != "hard":
            return
        params, masks = self._lists()
        if self.sharded:  # the cached list holds the local shards; their .grad is not set
            names = [n for n in self.params if n in self._sparse]
            pairs = [(sharding.local(self.params[n].grad), self._float[n]) for n in names
                     if self.params[n].grad is not None]
        else:
            pairs = [(p.grad, m) for p, m in zip(params, masks, strict=True)
                     if p.grad is not None]
        if pairs:
            grads, fmasks = zip(*pairs, strict=True)
            torch._foreach_mul_(list(grads), list(fmasks))

    @torch.no_grad()
    def _with_state(self, name: str, optimizer: torch.optim.Optimizer | None
                    ) -> list[torch.Tensor]:
        """The weight of ``name`` and every optimizer state tensor of its shape (momentum,
        Adam moments): what starts at zero where a connection is grown."""
        p = self.params[name]
        state = optimizer.state.get(p, {}).values() if optimizer is not None else ()
        return [p.data, *(v for v in state if torch.is_tensor(v) and v.shape == p.shape)]

    def zero_where(
        self,
        name: str,
        where: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
    ) -> None:
        """Set the weight and every same-shaped optimizer state tensor of ``name`` to zero at
        ``where`` (bool, the mask's shape: this rank's shard under FSDP2). Used for grown
        connections, which start at zero with fresh state."""
        keep = bool_to(~where, self.params[name].dtype)
        for t in self._with_state(name, optimizer):
            sharding.local(t).mul_(keep.to(t.dtype))

    @torch.no_grad()
    def zero_pruned(self, optimizer: torch.optim.Optimizer | None = None, *,
                    weights: bool = True) -> None:
        """Zero every same-shaped optimizer state tensor (and, with ``weights``, the weight) at
        every pruned entry (hard masking). What the engine does when masks are set from outside
        a run's own steps (first masks, a loaded checkpoint): an optimizer that stepped densely
        before (a warm-up in the user's own loop) holds momentum there, which would move pruned
        weights. After it, the masked gradient keeps weight and state zero at pruned entries for
        SGD, Adam and AdamW, which :meth:`zero_at` (``grown_zero``) relies on."""
        if self.kind != "hard":
            return
        for n in self._sparse:
            f = self._float[n]
            tensors = self._with_state(n, optimizer)
            for t in tensors if weights else tensors[1:]:
                sharding.local(t).mul_(f.to(t.dtype))

    @torch.no_grad()
    def zero_at(
        self,
        name: str,
        edits: IndexEdits,
        old: torch.Tensor,
        optimizer: torch.optim.Optimizer | None = None,
        *,
        grown_zero: bool = False,
    ) -> bool:
        """:meth:`zero_where` for a mask edited only at the flat indices ``edits`` (what
        :meth:`take_edits` reports) since it was ``old`` (bool), then :meth:`apply_` of that
        layer, touching those entries only: the weight and every same-shaped optimizer state
        tensor are zeroed at the edited entries except where the mask is active both before
        and after (a dropped and re-grown entry keeps its value). Entries outside ``edits`` did
        not change, so they are already right.

        ``grown_zero``: the caller guarantees that weight and state are already zero wherever
        ``old`` is inactive (hard masks, an optimizer whose masked gradient keeps them there:
        :meth:`zero_pruned`), so only the dropped indices are looked at (``old`` is not read)
        and only the entries inactive now are written: half the gathers and scatters.
        Returns False, doing nothing, when a tensor is not contiguous (flat indices do not
        address it); the caller then takes the whole-mask route."""
        tensors = self._with_state(name, optimizer)
        if sharding.is_sharded(self.params[name]) or not all(t.is_contiguous() for t in tensors):
            return False
        new = self._float[name]
        idx = edits.dropped if grown_zero else torch.cat(edits)
        views = [flat_numpy(t) for t in (old, new, *tensors)]
        if (grown_zero and self.zero_kernel is not None and views[1] is not None
                and all(t.dtype == torch.float32 for t in (new, *tensors))
                and all(v is not None for v in views[2:])):  # one compiled loop, same writes
            self.zero_kernel(idx, new, tensors)
            return True
        if all(v is not None for v in views):  # large CPU layers: numpy gathers and scatters
            i = idx.numpy()
            now = views[1][i] != 0
            # (grown_zero: zeroing an entry inactive before as well is harmless: it is zero)
            zero = i[~now] if grown_zero else i[~(views[0][i] & now)]
            for v in views[2:]:
                v[zero] = 0
            return True
        # elsewhere without a host sync: no boolean indexing, a multiply at the indices
        keep = new.reshape(-1)[idx] != 0
        if not grown_zero:
            keep &= old.reshape(-1)[idx]
        for t in tensors:
            flat = t.view(-1)
            flat.index_copy_(0, idx, flat.index_select(0, idx) * bool_to(keep, t.dtype))
        return True

    def take_edits(self) -> dict[str, IndexEdits | None]:
        """The layers whose mask changed since the last call, and how: the flat indices
        :meth:`update_at` edited (:class:`IndexEdits`), or None for a mask replaced whole
        (:meth:`update`, :meth:`update_local`); the record starts afresh."""
        edits, self._edits = self._edits, {}
        return {n: None if e is None else IndexEdits(torch.cat(e[0::2]), torch.cat(e[1::2]))
                for n, e in edits.items()}

    def effective(self) -> dict[str, torch.Tensor]:
        """Forward masking: the weights the forward pass uses, ``w ⊙ m_eff`` with a
        straight-through gradient to ``w``. Empty for hard masking (weights already masked)."""
        if self.kind != "forward":
            return {}
        return {n: self.effective_weight(n) for n in self.params}

    def effective_weight(self, name: str, weight: torch.Tensor | None = None) -> torch.Tensor:
        """Forward masking: ``w ⊙ m_eff`` of one parameter, straight-through to ``w``.

        ``weight``: the whole (unsharded) weight FSDP2 all-gathered for this forward, in place
        of the sharded parameter; it is masked with the whole mask (:meth:`whole_float_mask`)
        and receives the straight-through gradient, which FSDP2 reduce-scatters to the shard.
        """
        if weight is None:
            weight, m = self.params[name], self._float[name]
        else:
            m = self.whole_float_mask(name).to(weight.dtype)
        if self.decay:
            m = m + self.decay * (1 - m)
        return _StraightThrough.apply(weight, m)

    @torch.no_grad()
    def whole_float_mask(self, name: str) -> torch.Tensor:
        """The mask of the whole layer as 0/1 in the parameter's dtype: for a sharded parameter
        one all-gather of the shards' masks (as uint8: a quarter of an fp32 weight's bytes;
        every rank of the mesh must reach it), else the cached :meth:`float_mask`."""
        p = self.params[name]
        if not sharding.is_sharded(p):
            return self._float[name]
        shard = sharding.to_dtensor(self._float[name].to(torch.uint8), p)
        return sharding.gather(shard).to(p.dtype)

    @torch.no_grad()
    def update_at(self, name: str, drop: torch.Tensor, grow: torch.Tensor) -> None:
        """Make the entries at the flat indices ``drop`` (long, on the mask's device) inactive,
        then those at ``grow`` active (an index in both stays active): the stored 0/1 mask is
        edited in place at those indices, not converted again. A bool mask read before
        (``masks[name]``) is left as it was (the mask before the edit); the next read builds
        the new one. The indices address the whole layer, so not for a parameter sharded by
        FSDP2 (topology components see whole layers: :func:`sparsefw.sharding.gathered_view`)."""
        if sharding.is_sharded(self.params[name]):
            raise ValueError(f"update_at needs the whole layer; {name} is sharded")
        fmask = self._float[name]
        if not fmask.is_contiguous():
            fmask = self._float[name] = fmask.contiguous()
            self._lists_cache = None
        fill_at(fmask, drop, 0)
        fill_at(fmask, grow, 1)
        self.masks._forget(name)
        self.version[name] += 1
        if name not in self._sparse:  # conservatively: it may hold zeros now
            self._sparse.append(name)
            self._lists_cache = None
        edits = self._edits.setdefault(name, [])
        if edits is not None:  # (None: replaced whole since, which covers these too)
            edits += [drop, grow]

    # ------------------------------------------------------------------ accounting
    def active_counts(self) -> torch.Tensor:
        """Active entries per layer as one device tensor (model order). Sharded: summed over
        the ranks (one all-reduce, which every rank must reach)."""
        if not self._float:
            return torch.zeros(0, dtype=torch.long)
        counts = torch.stack([torch.count_nonzero(f) for f in self._float.values()])
        if self.sharded:  # over the ranks of the parameters' mesh
            mesh = next(p for p in self.params.values() if sharding.is_sharded(p)).device_mesh
            torch.distributed.all_reduce(counts, group=mesh.get_group())
        return counts

    def numels(self) -> list[int]:
        """Entries per layer (model order)."""
        return [p.numel() for p in self.params.values()]

    def density(self) -> torch.Tensor:
        """Global density over the masked parameters, as a 0-d device tensor."""
        total = sum(self.numels())
        return self.active_counts().sum().double() / max(total, 1)

    def summary(self) -> dict[str, float]:
        """Global and per-layer densities as Python floats (one host sync)."""
        counts = self.active_counts().tolist()
        out = {"density": sum(counts) / max(sum(self.numels()), 1)}
        for (n, numel), c in zip(zip(self.params, self.numels(), strict=True), counts, strict=True):
            out[f"density/{n}"] = c / numel
        return out

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Kind, β, targets and masks; a sharded parameter's mask is a ``DTensor`` placed like
        the parameter (what ``torch.distributed.checkpoint`` saves and reshards)."""
        masks = {}
        for n, f in self._float.items():
            p, m = self.params[n], f.bool()  # (a new tensor: a copy)
            masks[n] = sharding.to_dtensor(m, p) if sharding.is_sharded(p) else m
        return {
            "kind": self.kind,
            "decay": self.decay,
            "targets": dict(self.targets),
            "masks": masks,
        }

    def load_state_dict(self, sd: Mapping) -> None:
        if sd["kind"] != self.kind:
            raise ValueError(f"checkpoint masks are {sd['kind']!r}, run uses {self.kind!r}")
        missing = set(self.params) ^ set(sd["masks"])
        if missing:
            raise ValueError(f"checkpoint masks do not match the model: {sorted(missing)}")
        self.decay = sd["decay"]
        self.targets = dict(sd["targets"])
        for n, m in sd["masks"].items():
            p = self.params[n]
            if sharding.is_sharded(m):
                if sharding.is_sharded(p) and tuple(m.placements) == tuple(p.placements) \
                        and m.device_mesh == p.device_mesh:
                    self.update_local(n, m.to_local())
                    continue
                m = m.full_tensor()
            self.update(n, m)
