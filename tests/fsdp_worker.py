"""Worker processes for tests/test_fsdp.py: a user's loop around a ``fully_shard``-ed MLP with
a Sparsifier (importable by spawned processes; also run in-process, unsharded, as the
single-process reference)."""

from __future__ import annotations

import datetime
import os
import sys
import traceback

import torch
import torch.distributed as dist
import torch.nn.functional as F

GLOBAL_BATCH = 16


def mlp() -> torch.nn.Sequential:
    """33 hidden units: dimension 0 splits unevenly (17 + 16) over two ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 33), torch.nn.ReLU(), torch.nn.Linear(33, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 4))


def nm_mlp() -> torch.nn.Sequential:
    """For 2:4 groups along the input dimension every fan-in is a multiple of 4; the last
    layer's 5 rows split unevenly (3 + 2) over two ranks."""
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(8, 36), torch.nn.ReLU(), torch.nn.Linear(36, 16),
                               torch.nn.ReLU(), torch.nn.Linear(16, 5))


#: N:M + SR-STE (Zhou et al., arXiv 2102.04010): forward masks, the 2:4 mask recomputed from
#: |w| every 2 steps; λ_W far above the paper's 2e-4 so that the decay term shows in the weights
NM_SRSTE = {"sparsity": {"kind": "forward", "density": 0.5},
            "mask_init": {"name": "nm"},
            "topology_update": {"name": "nm", "n": 2, "m": 4, "every": 2, "end": 1.0},
            "gradient_correct": [{"name": "srste", "lambda_w": 0.05}]}

#: plain STE: the same recipe without the SR-STE term (the test's sensitivity check)
NM_STE = {k: v for k, v in NM_SRSTE.items() if k != "gradient_correct"}


def shard(model: torch.nn.Module, placement_fn=None) -> torch.nn.Module:
    from torch.distributed.fsdp import fully_shard

    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, shard_placement_fn=placement_fn)
    fully_shard(model, shard_placement_fn=placement_fn)
    return model


def train_loop(method: str, steps: int, rank: int = 0, world: int = 1, sharded: bool = False,
               catalogue=None, save: tuple[str, int] | None = None,
               resume: tuple[str, int] | None = None) -> dict:
    """``steps`` Sparsifier steps on this rank's slice of fixed global batches; returns the
    whole masks, the whole weights and the densities. ``save=(dir, k)`` writes a distributed
    checkpoint before step ``k``; ``resume=(dir, k)`` loads one and continues from step ``k``."""
    from sparsefw import Sparsifier, distributed_checkpoint, sharding
    from sparsefw.plugins import load_catalogue

    recipe = {"nm_srste": NM_SRSTE, "nm_ste": NM_STE}.get(method)
    model = mlp() if recipe is None else nm_mlp()
    classes = model[-1].out_features
    if sharded:
        shard(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    catalogue = catalogue or load_catalogue(autoload=False)
    if recipe is None:
        sp = Sparsifier(model, opt, catalogue=catalogue, density=0.3,
                        topology={"name": method, "every": 2, "end": 1.0, "decay": "constant"},
                        total_steps=steps)
    else:
        sp = Sparsifier(model, opt, recipe, catalogue=catalogue, total_steps=steps)
    first = {n: m.clone() for n, m in sharding.gathered_view(sp.masks).masks.items()}
    gen = torch.Generator().manual_seed(1)
    per = GLOBAL_BATCH // world
    updates = 0
    if resume is not None:
        distributed_checkpoint.load(resume[0], model, opt, sp)
    for i in range(steps):
        x = torch.randn(GLOBAL_BATCH, 8, generator=gen)
        y = torch.randint(0, classes, (GLOBAL_BATCH,), generator=gen)
        if resume is not None and i < resume[1]:
            continue
        if save is not None and i == save[1]:
            distributed_checkpoint.save(save[0], model, opt, sp)
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        updates += sp.topology_due()

        def closure(xs=xs, ys=ys):
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        sp.step(closure)
    view = sharding.gathered_view(sp.masks)
    return {"masks": {n: m.clone() for n, m in view.masks.items()}, "first": first,
            "model": {n: sharding.gather(p.detach()).clone()
                      for n, p in model.named_parameters()},
            "densities": sp.densities(), "updates": updates,
            "bytes": sharding.memory_per_rank(model, sp.masks, opt),
            "local_masks": {n: tuple(m.shape) for n, m in sp.masks.masks.items()}}


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    # a rank whose peer died fails its collective after a minute instead of gloo's 30
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))


def _report(out: str, rank: int) -> None:
    with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
        f.write(traceback.format_exc())


def run_loop(rank: int, world: int, port: int, out: str, method: str, steps: int,
             save=None, resume=None, tag: str = "fsdp") -> None:
    try:
        _setup(rank, world, port)
        result = train_loop(method, steps, rank, world, sharded=True, save=save, resume=resume)
        torch.save(result, os.path.join(out, f"{tag}{rank}.pt"))
    except Exception:  # report to the parent through a file
        _report(out, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()


def nm_split(rank: int, world: int, port: int, out: str) -> None:
    """N:M 2:4 groups along the input dimension, weights sharded on it (Shard(1)): refused."""
    from torch.distributed.tensor import Shard

    from sparsefw import Sparsifier
    from sparsefw.plugins import load_catalogue

    try:
        _setup(rank, world, port)
        model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(),
                                    torch.nn.Linear(8, 4))
        shard(model, placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        try:
            Sparsifier(model, opt, {"sparsity": {"kind": "forward", "density": 0.5},
                                    "topology_update": {"name": "nm", "n": 2, "m": 4}},
                       catalogue=load_catalogue(autoload=False), total_steps=4)
        except Exception as exc:
            with open(os.path.join(out, f"refused{rank}.txt"), "w") as f:
                f.write(f"{type(exc).__name__}: {exc}")
    except Exception:
        _report(out, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def refusals(rank: int, world: int, port: int, out: str) -> None:
    """Forward masks with a topology other than ``nm``, and MDGF's decaying mask, on a
    Shard(0)-placed MLP: refused (not verified under FSDP)."""
    from sparsefw import Sparsifier
    from sparsefw.plugins import load_catalogue

    cases = {"forward_rigl": {"sparsity": {"kind": "forward", "density": 0.5},
                              "topology_update": {"name": "rigl", "every": 2, "end": 1.0}},
             "mask_decay": {**NM_STE, "schedule": [{"name": "mask_decay"}]}}
    try:
        _setup(rank, world, port)
        model = shard(nm_mlp())
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        for tag, config in cases.items():
            try:
                Sparsifier(model, opt, config, catalogue=load_catalogue(autoload=False),
                           total_steps=4)
                text = "accepted"
            except Exception as exc:
                text = f"{type(exc).__name__}: {exc}"
            with open(os.path.join(out, f"{tag}{rank}.txt"), "w") as f:
                f.write(text)
    except Exception:
        _report(out, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
