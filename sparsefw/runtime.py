"""A sparse runtime for trained models: :func:`to_runtime` turns a masked model into a plain
``torch.nn.Module`` for inference in which every masked Linear and 1×1 stride-1 Conv2d computes
with the fastest of dense, CSR, BSR (the largest square block of 4/8/16/32 that fits the mask)
and, on CUDA with a 2:4 fp16/bf16 weight, 2:4 semi-structured, for each measured batch size.

The choice is measured, not predicted: for every batch size, each layer's candidates run on the
layer's real input (captured from a forward of the example input) on the target device,
interleaved, and the median of a few repeats decides (:mod:`sparsefw.timing`). A sparse layout
must beat dense by ``margin`` to be kept; otherwise the layer stays the original dense module.
Measurements are cached per process by device, dtype, thread count, layer shape, non-zeros,
candidate layouts and rows (:data:`CACHE`), so layers of equal shape and density are measured
once.

Before the choice, the masks are written into the weights and, for models with channel rules
(``ResNetCifar``, ``VGG``, ``MLP``: :func:`sparsefw.channels.channel_groups`), channels whose
every consumer weight is pruned are removed physically (channel-pruned models stay smaller).
Other convolutions (3×3, strided, grouped) stay dense: no sparse kernel for them is used.

What loads it: :func:`save_runtime` writes TorchScript when the model scripts (``torch.jit.load``
alone reads it, no sparsefw) and otherwise pickles the module (``torch.load(...,
weights_only=False)``, which imports the model's classes and :mod:`sparsefw.runtime_layers`, a
torch-only module). A 2:4 layer is never scriptable. ``torch.export.export`` traces CSR and BSR
layers in memory; saving an exported program holding them is not supported by torch.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from pathlib import Path

import attrs
import torch
from torch import nn

from sparsefw import timing
from sparsefw.masks import MaskSet, sparsifiable_params
from sparsefw.runtime_layers import SemiStructuredLinear, SparseLinear

__all__ = ["CACHE", "LayerChoice", "Runtime", "block_size", "load_runtime", "save_runtime",
           "to_runtime"]

#: measured seconds per call, ``key -> {candidate: seconds}`` (see the module docstring)
CACHE: dict[tuple, dict[str, float]] = {}
#: square BSR block sizes tried, largest first
BLOCK_SIZES = (32, 16, 8, 4)
#: a block size fits when the stored blocks hold at most this many times the non-zeros
BLOCK_FILL = 2.0


@attrs.frozen
class LayerChoice:
    """What the autotune decided for one layer: its kind (``linear``/``conv1x1``), weight shape
    ``(out, in)``, density, and per measured row count the layout and the seconds of each
    candidate."""

    name: str
    kind: str
    shape: tuple[int, int]
    density: float
    rows: tuple[int, ...]
    layouts: tuple[str, ...]
    times: tuple[dict, ...]

    def speedups(self) -> tuple[float, ...]:
        """Dense time over chosen-layout time, per row count (NaN where nothing was timed)."""
        return tuple(t["dense"] / t[lay] if t else float("nan") for t, lay in zip(self.times, self.layouts,
                                                            strict=True))


@attrs.frozen
class Runtime:
    """:func:`to_runtime`'s answer: the module and the per-layer choices."""

    module: nn.Module
    choices: tuple[LayerChoice, ...]
    channels_removed: int


def block_size(weight: torch.Tensor) -> int:
    """The largest square block size of :data:`BLOCK_SIZES` dividing both dimensions of the 2-D
    ``weight`` whose non-zero blocks hold at most :data:`BLOCK_FILL` × its non-zeros (0 if
    none fits)."""
    out_f, in_f = weight.shape
    nnz = int(torch.count_nonzero(weight))
    if nnz == 0:
        return 0
    for bs in BLOCK_SIZES:
        if out_f % bs or in_f % bs:
            continue
        blocks = weight.reshape(out_f // bs, bs, in_f // bs, bs).ne(0).any(3).any(1)
        if int(blocks.sum()) * bs * bs <= BLOCK_FILL * nnz:
            return bs
    return 0


def _semi_structured_ok(weight: torch.Tensor) -> bool:
    from sparsefw.export import semi_structured_problem
    from sparsefw.nm import is_nm

    return (weight.is_cuda and weight.dtype in (torch.float16, torch.bfloat16)
            and weight.shape[1] % 4 == 0 and semi_structured_problem(weight.device) is None
            and bool(is_nm(weight, 2, 4)))


def _is_conv1x1(m: nn.Module) -> bool:
    return (isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1) and m.stride == (1, 1)
            and m.padding in ((0, 0), "valid") and m.groups == 1
            and m.padding_mode == "zeros")


def _candidates(module: nn.Module, x: torch.Tensor) -> dict[str, nn.Module]:
    """Each layout as a module computing what ``module`` computes (dense: ``module`` itself),
    keeping only those whose kernels run here on ``x`` (e.g. no BSR kernel for some dtypes)."""
    conv = not isinstance(module, nn.Linear)
    w2 = module.weight.detach().reshape(module.weight.shape[0], -1)
    makers = {"csr": lambda: SparseLinear(w2, module.bias, [0], ["csr"], conv1x1=conv)}
    bs = block_size(w2)
    if bs:
        makers[f"bsr{bs}"] = lambda: SparseLinear(w2, module.bias, [0], ["bsr"], bs,
                                                  conv1x1=conv)
    if not conv and _semi_structured_ok(w2):
        makers["2:4"] = lambda: SemiStructuredLinear(w2, module.bias, [0], ["2:4"])
    out: dict[str, nn.Module] = {"dense": module}
    for name, make in makers.items():
        try:
            layer = make()
            with torch.no_grad():
                layer(x)
        except (RuntimeError, NotImplementedError, ValueError):
            continue  # no kernel for this layout, dtype or shape on this device
        out[name] = layer
    return out


def _capture_inputs(model: nn.Module, names: Sequence[str], x: torch.Tensor) -> dict:
    """Each named module's input in one forward of ``x``."""
    seen: dict[str, torch.Tensor] = {}
    handles = []
    for n in names:
        def hook(_m, args, n=n):
            seen.setdefault(n, args[0].detach())
        handles.append(model.get_submodule(n).register_forward_pre_hook(hook))
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in handles:
            h.remove()
    return seen


def _rows(module: nn.Module, x: torch.Tensor) -> int:
    if isinstance(module, nn.Linear):
        return x.numel() // x.shape[-1]
    return x.shape[0] * x.shape[2] * x.shape[3]


def _batch_of(example: torch.Tensor, batch: int) -> torch.Tensor:
    """``batch`` samples cycled from ``example`` (whose first dimension is the batch)."""
    idx = torch.arange(batch, device=example.device) % example.shape[0]
    return example.index_select(0, idx)


@torch.no_grad()
def _prepare(model: nn.Module, masks: Mapping[str, torch.Tensor] | MaskSet | None
             ) -> tuple[nn.Module, int]:
    """A copy of ``model`` in eval mode with the masks written into its weights and dead
    channels removed where the model has channel rules; returns it and the channels removed."""
    from sparsefw.channels import channel_groups, count_params, export_pruned

    model = copy.deepcopy(model).eval()
    params = sparsifiable_params(model)
    given = masks.masks if isinstance(masks, MaskSet) else (masks or {})
    unknown = sorted(set(given) - set(params))
    if unknown:
        raise ValueError(f"masks for parameters that are no Linear/Conv weight: {unknown}")
    for n, m in given.items():
        params[n].mul_(m.to(device=params[n].device, dtype=params[n].dtype))
    found = MaskSet(params)
    for n, p in params.items():
        found.update(n, p.ne(0))
    try:
        groups = channel_groups(model, found.names)
    except ValueError:  # no channel rules for this architecture
        return model, 0
    before = count_params(model)
    small = export_pruned(model, groups, masks=found).eval()
    removed = sum(int(g.size) for g in groups) - sum(
        small.get_submodule(g.producer).weight.shape[0] for g in groups)
    return (small, removed) if count_params(small) < before else (model, 0)


def to_runtime(
    model: nn.Module,
    example: torch.Tensor,
    *,
    masks: Mapping[str, torch.Tensor] | MaskSet | None = None,
    device: torch.device | str | None = None,
    batch_sizes: Sequence[int] = (1, 32),
    repeats: int = 7,
    margin: float = 0.05,
    layout: str | None = None,
) -> Runtime:
    """The sparse runtime of ``model`` (left untouched) for inference on ``device`` (default:
    where ``model`` is). ``example`` is an input batch (its samples are cycled to make each
    of ``batch_sizes``); ``masks`` (a :class:`MaskSet` or ``{parameter name: bool}``) are
    written into the weights first (without them, the weights' zeros are the mask).
    ``repeats`` timed repeats per candidate; a sparse layout must be ``margin`` faster than
    dense to be chosen. ``layout`` (``"csr"``, ``"bsr"``, ``"2:4"``) skips the measurement
    and uses that layout in every layer it applies to (tests, comparisons). See the module
    docstring."""
    if layout not in (None, "csr", "bsr", "2:4"):
        raise ValueError(f"layout {layout!r} is not one of: csr, bsr, 2:4")
    if not batch_sizes or any(int(b) <= 0 for b in batch_sizes):
        raise ValueError(f"batch_sizes must be positive, got {batch_sizes!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    runtime, removed = _prepare(model, masks)
    runtime = runtime.to(dev)
    example = example.to(dev)
    layers = {n: m for n, m in runtime.named_modules()
              if (isinstance(m, nn.Linear) or _is_conv1x1(m)) and m.weight.ne(0).any()
              and not bool(m.weight.ne(0).all())}
    batches = sorted({int(b) for b in batch_sizes})
    inputs = {b: _capture_inputs(runtime, list(layers), _batch_of(example, b)) for b in batches}
    # layers whose forward never runs (weights read by their parent, as in nn.MultiheadAttention's
    # out_proj) are left alone
    layers = {n: m for n, m in layers.items() if all(n in inputs[b] for b in batches)}
    threads = torch.get_num_threads() if dev.type == "cpu" else 0
    choices = []
    for name, module in layers.items():
        cands = _candidates(module, inputs[batches[0]][name])
        w = module.weight
        nnz = int(torch.count_nonzero(w))
        rows, layouts, times = [], [], []
        for b in batches:
            x = inputs[b][name]
            r = _rows(module, x)
            if layout is not None:
                forced = next((k for k in cands if k.startswith(layout)), "dense")
                rows.append(r)
                layouts.append(forced)
                times.append({})
                continue
            key = (str(dev), str(w.dtype), threads, type(module).__name__, tuple(w.shape), nnz,
                   tuple(cands), tuple(x.shape))
            if key not in CACHE:
                with torch.no_grad():
                    CACHE[key] = timing.median_times(
                        {k: (lambda c=c, x=x: c(x)) for k, c in cands.items()}, repeats=repeats,
                        device=dev)
            t = CACHE[key]
            rows.append(r)
            layouts.append(timing.pick(t, "dense", margin))
            times.append(dict(t))
        kind = "linear" if isinstance(module, nn.Linear) else "conv1x1"
        choices.append(LayerChoice(name=name, kind=kind, shape=(w.shape[0], w[0].numel()),
                                   density=nnz / w.numel(), rows=tuple(rows),
                                   layouts=tuple(layouts), times=tuple(times)))
        if any(lay != "dense" for lay in layouts):
            _set_module(runtime, name, _runtime_layer(module, cands, rows, layouts))
    return Runtime(module=runtime, choices=tuple(choices), channels_removed=removed)


def _runtime_layer(module: nn.Module, cands: dict, rows: list[int], layouts: list[str]):
    """The layer holding the chosen layouts (one sparse layout family per layer: 2:4, or
    CSR/BSR, whichever is chosen at the most row counts, dense at the others)."""
    w2 = module.weight.detach().reshape(module.weight.shape[0], -1)
    sparse = [lay for lay in layouts if lay != "dense"]
    family = max(set(sparse), key=sparse.count)
    layouts = [lay if lay in ("dense", family) else "dense" for lay in layouts]
    if family == "2:4":
        return SemiStructuredLinear(w2, module.bias, rows, layouts)
    bs = int(family[3:]) if family.startswith("bsr") else 0
    plain = ["bsr" if lay.startswith("bsr") else lay for lay in layouts]
    return SparseLinear(w2, module.bias, rows, plain, bs,
                        conv1x1=not isinstance(module, nn.Linear))


def _set_module(model: nn.Module, name: str, module: nn.Module) -> None:
    owner, _, attr = name.rpartition(".")
    setattr(model.get_submodule(owner) if owner else model, attr, module)


def save_runtime(module: nn.Module, path: str | Path) -> str:
    """Write ``module`` to ``path``: TorchScript if it scripts (returns ``"torchscript"``),
    else the pickled module (returns ``"pickle"``). :func:`load_runtime` reads either."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        scripted = torch.jit.script(module)
    except Exception:  # noqa: BLE001 - any scripting failure means: pickle instead
        torch.save(module, path)
        return "pickle"
    torch.jit.save(scripted, str(path))
    return "torchscript"


def load_runtime(path: str | Path, map_location: str | torch.device | None = None
                 ) -> nn.Module:
    """A model written by :func:`save_runtime` (TorchScript, else the pickled module)."""
    try:
        return torch.jit.load(str(path), map_location=map_location)
    except RuntimeError:
        return torch.load(path, map_location=map_location, weights_only=False)
