"""Worker process for tests/test_ddp.py (importable by spawned processes)."""

from __future__ import annotations

import contextlib
import datetime
import io
import os
import sys

import attrs
import torch
import torch.distributed as dist
import torch.nn.functional as F

from sparsefw import config as config_mod
from sparsefw.engine import train
from sparsefw.hookspecs import hookimpl
from sparsefw.plugins import load_catalogue
from sparsefw.state import TopologyChange, UpdateInterval


@attrs.frozen
class DesyncConfig(UpdateInterval):
    """Test-only: flip one mask entry on rank 1 (a broken, rank-dependent topology rule)."""


@attrs.define(eq=False)
class Desync:
    cfg: DesyncConfig

    @hookimpl
    def sparsefw_topology_update(self, state):
        if state.dist.rank == 1:
            name = state.masks.names[-1]
            mask = state.masks.masks[name].clone()
            mask.view(-1)[0] = ~mask.view(-1)[0]
            state.masks.update(name, mask)
        return TopologyChange()


class DesyncPlugin:
    @hookimpl
    def sparsefw_register(self, registry):
        registry.add("topology_update", "desync", config=DesyncConfig, factory=Desync)


class KillAt(Exception):
    pass


def _report(out: str, rank: int, exc: Exception) -> None:
    """Tell the parent what failed on this rank (tests/spawning.py reads the file)."""
    with open(os.path.join(out, f"error{rank}.txt"), "w") as f:
        f.write(f"{type(exc).__name__}: {exc}")


def _setup(rank: int, world: int, port: int) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)


def sam_epsilon(rank: int, world: int, port: int, raw: dict, out: str) -> None:
    """One SAM step under DDP. Saves the ε the model saw in pass 2 (its weights then minus the
    weights of pass 1) and the ε computed by hand from this rank's own gradient on its shard of
    the batch: ``ρ·ĝ/‖ĝ‖``, ``ĝ`` the gradient masked by the hard masks, the norm over all
    parameters."""
    _setup(rank, world, port)
    from sparsefw.engine.trainer import Trainer

    catalogue = load_catalogue(autoload=False)
    cfg = config_mod.structure(raw, catalogue.registry)
    record: dict = {}
    try:
        trainer = Trainer(cfg, catalogue, run_dir=out, raw_config=raw)
        model = trainer.model

        def pass_two(module, _args):
            if "before" in record and "seen" not in record:
                record["seen"] = {n: p.detach() - record["before"][n]
                                  for n, p in module.named_parameters()}

        model.register_forward_pre_hook(pass_two)
        engine_pass = trainer.sparsifier._run_closure

        def first_pass(closure, *, sync=True):
            if "before" not in record:  # step 0, SAM's pass 1: this rank's gradient
                x, y = trainer.state.batch
                ref = {n: p.detach().clone().requires_grad_()
                       for n, p in model.named_parameters()}
                loss = F.cross_entropy(torch.func.functional_call(model, ref, (x,)), y)
                grads = dict(zip(ref, torch.autograd.grad(loss, list(ref.values())), strict=True))
                for n, m in trainer.masks.masks.items():
                    grads[n] = grads[n] * m
                norm = torch.sqrt(sum((g.double() ** 2).sum() for g in grads.values()))
                rho = cfg.perturb[0].options.rho
                record["expected"] = {n: (rho * g.double() / norm).float()
                                      for n, g in grads.items()}
                record["sync"] = sync
                loss = engine_pass(closure, sync=sync)
                record["before"] = {n: p.detach().clone() for n, p in model.named_parameters()}
                return loss
            return engine_pass(closure, sync=sync)

        trainer.sparsifier._run_closure = first_pass
        trainer.fit()
        del record["before"]
        torch.save(record, os.path.join(out, f"eps{rank}.pt"))
    except Exception as exc:  # report to the parent through a file
        _report(out, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()


def run(rank: int, world: int, port: int, raw: dict, out: str, resume: str | None,
        kill_at: int | None) -> None:
    _setup(rank, world, port)
    catalogue = load_catalogue(autoload=False, extra=[("desync", DesyncPlugin())])
    cfg = config_mod.structure(raw, catalogue.registry)
    try:
        if kill_at is not None:
            from sparsefw.engine.trainer import Trainer

            original = Trainer.step

            def dying(self, x, y):
                if self.state.step == kill_at:
                    raise KillAt
                return original(self, x, y)

            Trainer.step = dying
        trainer, _ = train(cfg, catalogue, run_dir=out, raw_config=raw, resume=resume)
        torch.save(
            {"model": trainer.model.state_dict(), "masks": dict(trainer.masks.masks),
             "step": trainer.state.step},
            os.path.join(out, f"rank{rank}.pt"),
        )
    except KillAt:
        pass
    except Exception as exc:  # report to the parent through a file
        _report(out, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
        sys.stdout.flush()


def run_loop(rank: int, world: int, port: int, out: str) -> None:
    """A user's own DDP loop with a Sparsifier around its optimizer: RigL + SAM on a rank's
    half of each global batch. Saves the weights, masks and the SAM ascent directions this
    rank computed (which must come from its own gradient, not the all-reduced one)."""
    import torch.nn.functional as F

    from sparsefw import Sparsifier

    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=90))
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 32), torch.nn.ReLU(),
                                    torch.nn.Linear(32, 4))
        ddp = torch.nn.parallel.DistributedDataParallel(model)
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1, momentum=0.9)
        catalogue = load_catalogue(autoload=False)
        sp = Sparsifier(ddp, opt, {"perturb": [{"name": "sam", "rho": 0.05}]},
                        catalogue=catalogue, density=0.3,
                        topology={"name": "rigl", "every": 2, "end": 1.0}, total_steps=6)
        eps = []

        def after(outcome, name, impls, kwargs):
            if name == "sparsefw_perturb":
                pert, = outcome.get_result()  # ε = scale · direction
                eps.append({n: t * pert.scale for n, t in pert.params.items()})

        sp.plugins.pm.add_hookcall_monitoring(lambda *args: None, after)
        init = {"model": {k: v.clone() for k, v in model.state_dict().items()},
                "masks": {k: v.clone() for k, v in sp.masks.masks.items()}}
        gen = torch.Generator().manual_seed(1)
        local = []
        for _ in range(6):
            x, y = torch.randn(16, 8, generator=gen), torch.randint(0, 4, (16,), generator=gen)
            xs, ys = x[rank * 8:(rank + 1) * 8], y[rank * 8:(rank + 1) * 8]
            local.append((xs, ys))

            def closure(xs=xs, ys=ys):
                loss = F.cross_entropy(ddp(xs), ys)
                loss.backward()
                return loss

            sp.step(closure)
        torch.save({"model": model.state_dict(), "masks": dict(sp.masks.masks), "eps": eps,
                    "batches": local, "step": sp.state.step, "init": init},
                   os.path.join(out, f"loop{rank}.pt"))
    except Exception as exc:  # report to the parent through a file
        _report(out, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()


def cli_train(rank: int, world: int, port: int, argv: list[str], out: str) -> None:
    """``sparsefw train`` (the CLI) on each rank, as torchrun would start it; what each rank
    printed and its exit code go to ``out/stdout<rank>.txt``."""
    _setup(rank, world, port)
    from sparsefw import cli

    printed = io.StringIO()
    try:
        with contextlib.redirect_stdout(printed):
            code = cli.main(argv)
        with open(os.path.join(out, f"stdout{rank}.txt"), "w") as f:
            f.write(f"exit {code}\n{printed.getvalue()}")
    except Exception as exc:
        _report(out, rank, exc)
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
