"""Worker processes for tests/test_fsdp.py: a user's loop around a ``fully_shard``-ed MLP or
small GPT with a Sparsifier (importable by spawned processes; also run in-process, unsharded, as the
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


#: the small GPT (sparsefw.models.gpt): vocabulary 13 (lm_head's rows split 7 + 6), context 8
GPT_VOCAB, GPT_LEN = 13, 8


def gpt() -> torch.nn.Module:
    """One pre-norm block of width 16 (qkv 48×16, proj 16×16, fc1 32×16, fc2 16×32): every
    fan-in a multiple of 4, so 2:4 groups fit; embeddings and LayerNorms stay dense."""
    from sparsefw.models.gpt import GPTConfig, build_gpt

    torch.manual_seed(0)
    return build_gpt(GPTConfig(dim=16, depth=1, heads=2, mlp_ratio=2), input_shape=(GPT_LEN,),
                     num_classes=GPT_VOCAB)


#: RigL with S²-SAM (Ji et al., NeurIPS 2024): the previous step's gradient as the
#: perturbation; ρ large enough that the perturbation shows in the weights
RIGL_S2SAM = {"sparsity": {"density": 0.3},
              "topology_update": {"name": "rigl", "every": 2, "end": 1.0, "decay": "constant"},
              "perturb": [{"name": "s2sam", "rho": 0.5}]}

#: S²-SAM on forward masks (N:M + SR-STE) and with ``perturb_pruned``: the previous gradient
#: is kept as a copy (not as references to the ``.grad`` tensors)
NM_S2SAM = {**NM_SRSTE, "perturb": [{"name": "s2sam", "rho": 0.5}]}
RIGL_S2SAM_PRUNED = {**RIGL_S2SAM, "perturb": [{"name": "s2sam", "rho": 0.5,
                                                 "perturb_pruned": True}]}


def shard(model: torch.nn.Module, placement_fn=None) -> torch.nn.Module:
    """``fully_shard`` every Linear layer (each its own all-gather group), then the root."""
    from torch.distributed.fsdp import fully_shard

    for layer in model.modules():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer, shard_placement_fn=placement_fn)
    fully_shard(model, shard_placement_fn=placement_fn)
    return model


def batches(arch: str, classes: int):
    """Fixed global batches: ``(x, y)`` for the MLP, token ids and next tokens for the GPT."""
    gen = torch.Generator().manual_seed(1)
    while True:
        if arch == "gpt":
            yield (torch.randint(0, GPT_VOCAB, (GLOBAL_BATCH, GPT_LEN), generator=gen),
                   torch.randint(0, GPT_VOCAB, (GLOBAL_BATCH, GPT_LEN), generator=gen))
        else:
            yield (torch.randn(GLOBAL_BATCH, 8, generator=gen),
                   torch.randint(0, classes, (GLOBAL_BATCH,), generator=gen))


def train_loop(method: str, steps: int, rank: int = 0, world: int = 1, sharded: bool = False,
               catalogue=None, save: tuple[str, int] | None = None,
               resume: tuple[str, int] | None = None, arch: str = "mlp",
               closure: bool = True) -> dict:
    """``steps`` Sparsifier steps on this rank's slice of fixed global batches; returns the
    whole masks, the whole weights and the densities. ``save=(dir, k)`` writes a distributed
    checkpoint before step ``k``; ``resume=(dir, k)`` loads one and continues from step ``k``.
    ``arch``: ``"mlp"`` (:func:`mlp`, or :func:`nm_mlp` for the N:M recipes) or ``"gpt"``.
    ``closure=False``: ``loss.backward(); sp.step()`` (the perturbation applied by the forward
    pre-hook), with the whole global batch's loss evaluated inside ``sp.unperturbed()`` between
    the backward and the step (``"unperturbed"`` in the result)."""
    from sparsefw import Sparsifier, distributed_checkpoint, sharding
    from sparsefw.plugins import load_catalogue

    recipe = {"nm_srste": NM_SRSTE, "nm_ste": NM_STE, "rigl_s2sam": RIGL_S2SAM,
              "nm_s2sam": NM_S2SAM, "rigl_s2sam_pruned": RIGL_S2SAM_PRUNED}.get(method)
    if arch == "gpt":
        model, classes = gpt(), GPT_VOCAB
    else:
        model = nm_mlp() if method.startswith("nm") else mlp()
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
    data = batches(arch, classes)
    per = GLOBAL_BATCH // world
    updates = 0
    unperturbed: list[torch.Tensor] = []
    if resume is not None:
        distributed_checkpoint.load(resume[0], model, opt, sp)
    for i in range(steps):
        x, y = next(data)
        if resume is not None and i < resume[1]:
            continue
        if save is not None and i == save[1]:
            distributed_checkpoint.save(save[0], model, opt, sp)
        xs, ys = x[rank * per:(rank + 1) * per], y[rank * per:(rank + 1) * per]
        updates += sp.topology_due()
        if not closure:
            opt.zero_grad()
            F.cross_entropy(model(xs), ys).backward()
            with torch.no_grad(), sp.unperturbed():
                unperturbed.append(F.cross_entropy(model(x), y))
            sp.step()
            continue

        def step_closure(xs=xs, ys=ys):
            loss = F.cross_entropy(model(xs), ys)
            loss.backward()
            return loss

        sp.step(step_closure)
    held = sharding.memory_per_rank(model, sp.masks, opt)  # between steps: what persists
    view = sharding.gathered_view(sp.masks)
    return {"masks": {n: m.clone() for n, m in view.masks.items()}, "first": first,
            "model": {n: sharding.gather(p.detach()).clone()
                      for n, p in model.named_parameters()},
            "densities": sp.densities(), "updates": updates,
            "unperturbed": [float(v) for v in unperturbed],
            "bytes": held,
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


def run_cases(rank: int, world: int, port: int, out: str, cases: list[tuple]) -> None:
    """Several cases in one process group (one spawn, in order): ``(tag, kwargs)`` runs
    :func:`train_loop` sharded and writes ``<tag><rank>.pt``; ``("nm_split", {})`` and
    ``("refusals", {})`` write what was refused, ``("guard_verdicts", {})`` what the
    divergence guard answered. A failing case writes ``<tag><rank>.err``
    with its traceback and the next case runs."""
    try:
        _setup(rank, world, port)
        for tag, kwargs in cases:
            try:
                if tag == "nm_split":
                    nm_split(out, rank)
                elif tag == "refusals":
                    refusals(out, rank)
                elif tag == "guard_verdicts":
                    guard_verdicts(out, rank)
                elif "raw" in kwargs:
                    result = trainer_run(os.path.join(out, tag), **kwargs)
                    torch.save(result, os.path.join(out, f"{tag}{rank}.pt"))
                else:
                    result = train_loop(rank=rank, world=world, sharded=True, **kwargs)
                    torch.save(result, os.path.join(out, f"{tag}{rank}.pt"))
            except Exception:
                with open(os.path.join(out, f"{tag}{rank}.err"), "w") as f:
                    f.write(traceback.format_exc())
    except Exception:
        _report(out, rank)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()


def trainer_run(run_dir: str, raw: dict, resume_prev_of: str | None = None) -> dict:
    """A Trainer run of the config ``raw`` (``[train] parallel`` decides DDP or FSDP) in
    ``run_dir``; returns the whole masks and weights and the step. ``resume_prev_of``: copy
    that finished run directory to ``run_dir`` without its current checkpoint (as a kill
    between the two renames of a checkpoint write leaves it) and resume from the kept
    previous one."""
    import shutil

    from sparsefw import config as config_mod
    from sparsefw import distributed_checkpoint, sharding
    from sparsefw.engine import Trainer
    from sparsefw.plugins import load_catalogue

    catalogue = load_catalogue(autoload=False)
    cfg = config_mod.structure(raw, catalogue.registry)
    if resume_prev_of is not None:
        if not dist.is_initialized() or dist.get_rank() == 0:
            shutil.copytree(resume_prev_of, run_dir)
            shutil.rmtree(os.path.join(run_dir, distributed_checkpoint.CHECKPOINT_DIR))
        if dist.is_initialized():
            dist.barrier()
    trainer = Trainer(cfg, catalogue, run_dir=run_dir, raw_config=raw)
    if resume_prev_of is not None:
        trainer.load_checkpoint(distributed_checkpoint.resume_path(run_dir))
    start = trainer.state.step
    metrics = trainer.fit()
    view = sharding.gathered_view(trainer.masks)
    return {"masks": {n: m.clone() for n, m in view.masks.items()},
            "model": {n: sharding.gather(p.detach()).clone()
                      for n, p in trainer.model.named_parameters()},
            "start": start, "step": trainer.state.step, "metrics": metrics,
            "local_masks": {n: tuple(m.shape) for n, m in trainer.masks.masks.items()}}


def _refused(out: str, name: str, make) -> None:
    """Write ``out/name`` with the exception ``make()`` raised, or ``accepted``."""
    try:
        make()
        text = "accepted"
    except Exception as exc:
        text = f"{type(exc).__name__}: {exc}"
    with open(os.path.join(out, name), "w") as f:
        f.write(text)


def nm_split(out: str, rank: int) -> None:
    """N:M 2:4 groups along the input dimension, weights sharded on it (Shard(1)): refused."""
    from torch.distributed.tensor import Shard

    from sparsefw import Sparsifier
    from sparsefw.plugins import load_catalogue

    model = torch.nn.Sequential(torch.nn.Linear(12, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    shard(model, placement_fn=lambda p: Shard(1) if p.dim() == 2 else Shard(0))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    _refused(out, f"refused{rank}.txt", lambda: Sparsifier(
        model, opt, {"sparsity": {"kind": "forward", "density": 0.5},
                     "topology_update": {"name": "nm", "n": 2, "m": 4}},
        catalogue=load_catalogue(autoload=False), total_steps=4))


def guard_verdicts(out: str, rank: int) -> None:
    """The divergence guard on a sharded MLP, each rank writing what it answered. Weights (what
    runs before every checkpoint write): first two finite entries whose squares overflow
    float32, on rank 0's shard only; then also a NaN, on rank 1's shard only. Gradients (of a
    fresh model): an infinity on rank 1's shard only, under ``stop`` (read at the window's end)
    and under ``skip`` (read every step)."""
    import math

    from sparsefw import sharding
    from sparsefw.engine.guard import Diverged, DivergenceGuard

    def verdict(check) -> str:
        try:
            return "diverged" if check() else "finite"
        except Diverged:
            return "diverged"

    model = shard(mlp())
    params = list(model.parameters())
    guard = DivergenceGuard("stop", 0, 1, torch.device("cpu"))
    local = sharding.local(params[0].detach()).view(-1)
    answers = []
    for values, owner in (((3e19, -3e19), 0), ((math.nan,), 1)):
        if rank == owner:
            with torch.no_grad():
                local[:len(values)] = torch.tensor(values)
        answers.append(verdict(lambda: guard.check_weights(0, params)))
    model = shard(mlp())
    params = list(model.parameters())
    model(torch.ones(4, 8)).sum().backward()
    if rank == 1:
        sharding.local(params[2].grad).view(-1)[0] = math.inf
    for policy in ("stop", "skip"):
        guard = DivergenceGuard(policy, 5, 1, torch.device("cpu"))
        answers.append(verdict(lambda guard=guard: guard.after_backward(0, torch.tensor(1.0),
                                                                        params)
                               or guard.check()))
    torch.save(answers, os.path.join(out, f"guard_verdicts{rank}.pt"))


def refusals(out: str, rank: int) -> None:
    """Forward masks with a topology other than ``nm``, MDGF's decaying mask and two-pass SAM
    on a Shard(0)-placed MLP: refused (not verified under FSDP)."""
    from sparsefw import Sparsifier
    from sparsefw.plugins import load_catalogue

    cases = {"forward_rigl": {"sparsity": {"kind": "forward", "density": 0.5},
                              "topology_update": {"name": "rigl", "every": 2, "end": 1.0}},
             "mask_decay": {**NM_STE, "schedule": [{"name": "mask_decay"}]},
             "sam": {**RIGL_S2SAM, "perturb": [{"name": "sam"}]}}
    model = shard(nm_mlp())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    for tag, config in cases.items():
        _refused(out, f"{tag}{rank}.txt", lambda config=config: Sparsifier(
            model, opt, config, catalogue=load_catalogue(autoload=False), total_steps=4))
