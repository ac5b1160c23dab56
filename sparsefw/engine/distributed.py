"""Multi-process training through ``torchrun`` + DDP, and the checks that keep ranks in sync.

Launch: ``torchrun --nproc_per_node=N -m sparsefw.cli train CONFIG`` (or the ``sparsefw``
script). Every rank builds the same model from the same seed, draws the same masks from the same
generator, and takes a contiguous slice of each global batch (``[train] batch_size`` is the
global batch, split evenly over the ranks), so the averaged DDP gradient equals the
single-process gradient of the global batch. Topology decisions therefore come from identical
(all-reduced) gradients and identical random streams; :func:`check_masks_in_sync` verifies it
after every update instead of assuming it.

``[train] parallel = "fsdp"`` shards instead of replicating (:func:`fully_shard_layers`; FSDP2,
Zhao et al., arXiv 2304.11277): the same launch, the same global batch split, masks sharded
with their weights (:mod:`sparsefw.sharding`), checkpoints through
:mod:`sparsefw.distributed_checkpoint`.
"""

from __future__ import annotations

import datetime
import os

import attrs
import torch
import torch.distributed as dist


@attrs.frozen
class DistContext:
    """This process's place in the job: ``rank`` of ``world_size`` (1: not distributed)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def from_env(device_type: str) -> DistContext:
    """Join the process group described by torchrun's environment (``WORLD_SIZE`` > 1);
    NCCL on CUDA, gloo on CPU. Without those variables: a single-process context."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return DistContext()
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    if not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, timeout=datetime.timedelta(minutes=10))
    return DistContext(rank=rank, world_size=world, local_rank=local)


def shard(batch_size: int, ctx: DistContext) -> slice:
    """This rank's slice of a global batch of ``batch_size`` samples."""
    per = batch_size // ctx.world_size
    return slice(ctx.rank * per, (ctx.rank + 1) * per)


def all_reduce_sum_(tensor: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """Sum ``tensor`` over ranks in place (a no-op for one process)."""
    if ctx.enabled:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_reduce_mean_(tensors: list[torch.Tensor], ctx: DistContext) -> list[torch.Tensor]:
    """Average a list of tensors over ranks in place, in one collective (flattened); a no-op
    for one process. For plugins that compute a statistic on their rank's shard."""
    if not ctx.enabled or not tensors:
        return tensors
    flat = torch.cat([t.reshape(-1).to(torch.float64) for t in tensors])
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    flat /= ctx.world_size
    for t, part in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        t.copy_(part.view_as(t))
    return tensors


def barrier(ctx: DistContext) -> None:
    if ctx.enabled:
        dist.barrier()


class RanksOutOfSync(RuntimeError):
    """Ranks hold different masks (or weights): the replicas have diverged."""


def fingerprints(tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """One float64 fingerprint per tensor: the position-weighted sum of its entries. Equal
    tensors give equal fingerprints; a moved or flipped entry changes it."""
    out = []
    for t in tensors.values():
        flat = t.detach().reshape(-1).double()
        weights = torch.arange(1, flat.numel() + 1, device=flat.device, dtype=torch.float64)
        out.append(torch.stack([flat.sum(), (flat * weights.remainder(9973)).sum()]))
    if not out:
        return torch.zeros(0, 2, dtype=torch.float64)
    return torch.stack(out)


def check_in_sync(tensors: dict[str, torch.Tensor], ctx: DistContext, what: str) -> None:
    """Compare fingerprints of ``tensors`` across ranks (one all-gather); raise
    :class:`RanksOutOfSync` naming the first differing layer."""
    if not ctx.enabled or not tensors:
        return
    mine = fingerprints(tensors)
    gathered = [torch.empty_like(mine) for _ in range(ctx.world_size)]
    dist.all_gather(gathered, mine)
    stacked = torch.stack(gathered)  # (world, layers, 2)
    differs = (stacked != stacked[0]).any(dim=2).any(dim=0).tolist()
    names = list(tensors)
    bad = [names[i] for i, d in enumerate(differs) if d]
    if bad:
        raise RanksOutOfSync(
            f"{what} of layer {bad[0]!r} differs across ranks"
            + (f" (and {len(bad) - 1} more layers)" if len(bad) > 1 else "")
            + "; every rank must take the same topology decision (use all-reduced quantities "
            "and state.generator for randomness)"
        )


def check_fsdp(cfg) -> None:
    """Refuse ``[train]`` settings the Trainer does not run under ``parallel = "fsdp"`` yet
    (:class:`~sparsefw.sharding.NotSupportedUnderFSDP`, naming the setting)."""
    from sparsefw.sharding import NotSupportedUnderFSDP

    tc = cfg.train
    refused = []
    if tc.compile:
        refused.append("[train] compile = true (torch.compile of a fully_shard-ed model)")
    if tc.amp != "off":
        refused.append(f"[train] amp = {tc.amp!r} (mixed precision needs FSDP's MixedPrecisionPolicy)")
    if cfg.sparsity.kind != "hard":
        refused.append(f"[sparsity] kind = {cfg.sparsity.kind!r} (the Trainer's own forward "
                       "masking; forward masks run under FSDP in a user's loop with the "
                       "Sparsifier)")
    if cfg.optimizer.implementation == "fused":
        refused.append('[optimizer] implementation = "fused" (no fused kernels for sharded '
                       'DTensor parameters; "auto" takes "foreach" under FSDP)')
    if tc.rounds > 1:
        refused.append(f"[train] rounds = {tc.rounds} (lottery-ticket rewinding of sharded weights)")
    if refused:
        raise NotSupportedUnderFSDP(
            'not supported by the Trainer under parallel = "fsdp" yet: ' + "; ".join(refused)
            + ' — use parallel = "ddp" for these')


def fully_shard_layers(model: torch.nn.Module, names) -> torch.nn.Module:
    """``fully_shard`` every layer owning one of the weights ``names`` (each layer its own
    all-gather group, ``Shard(0)``), then the root (the remaining parameters)."""
    from torch.distributed.fsdp import fully_shard

    owners = {n.rsplit(".", 1)[0] for n in names}
    for mod_name, module in model.named_modules():
        if mod_name in owners and mod_name:
            fully_shard(module)
    fully_shard(model)
    return model
