#!/usr/bin/env python
"""The peer table: sparsefw's hard-masked 90% step beside other sparse-training code, measured
by the benchmark harness (``bench.py``) in one run against the fastest plain PyTorch loop.

Rows, all on the same model, fixed batch and SGD settings (lr 0.05, momentum 0.9, weight decay
5e-4), timed in interleaved blocks like ``bench.py``'s variants:

  (a)  ``plain``          the fastest of the plain loops with torch's default, ``foreach`` and
                          ``fused`` SGD (``bench.py``'s baseline)
  (b)  ``hard90``         sparsefw's Trainer, hard masks at 90% sparsity (random, ERK)
  (b') ``loop_hard90``    the same method in the plain loop through :class:`sparsefw.Sparsifier`
  (b'') ``hard90_masked`` (b) with ``[optimizer] implementation = "fused_masked"`` (sparsefw's
                          CPU kernel folds the mask into the SGD update; where it builds)
  (c)  ``rigl``           sparsefw's RigL (Evci et al., arXiv 1911.11134) on (b): a regular
                          step, an update step and the cost amortised over ΔT = 100
  (c') ``rigl_kernels``   (c) with ``[sparsity] cpu_kernels = true`` (sparsefw's compiled CPU
                          kernels: the selection's pre-filter and ``fused_masked`` SGD)
  (d)  ``seed``           a hand-written "seed-style" mask loop of the kind one-off research
                          repositories write: float 0/1 masks (ERK, 90%), after ``backward``
                          ``p.grad.mul_(mask)`` per parameter, ``optimizer.step()``, then
                          ``p.data.mul_(mask)`` per parameter
  (e)  ``rigl_torch``     rigl-torch's ``RigLScheduler`` at 90% (``dense_allocation=0.1``, its
                          only distribution ``uniform``, which keeps the first layer dense;
                          ``ignore_linear_layers=False``; ``delta=100``): the loop of its README
                          (``loss.backward(); if pruner(): optimizer.step()``); regular step,
                          update step, amortised over ΔT = 100
  (e') ``rigl_torch_static``  the same with ``static_topo=True`` (a fixed random mask)
  (e'') ``rigl_torch_all``  the same scheduler with every layer 90% sparse, the first too:
                          random masks handed to it through its ``state_dict`` argument (its
                          resume path; it has no option for a sparse first layer)
  (f)  ``sparsimony``     sparsimony's ``RigL`` sparsifier at 90% (ERK distribution, cosine
                          drop schedule 0.3, ``delta_t=100``), ``prepare``\\ d on every
                          Linear/Conv weight (parametrizations); ``optimizer.step();
                          sparsifier.step()``; regular step, update cycle, amortised

Every masked row uses the optimizer kernels the engine's ``[optimizer] implementation = "auto"``
picks (fused SGD on CPU and CUDA): the peers take the user's optimizer and wrap its ``step``,
so they get the same kernels. A peer package that is not installed is reported "not installed"
and the other rows are measured (``tox -e bench-peers`` installs both peers, in that
environment only).

Update steps: the peers decide from a step counter whether a step grows and prunes; to time a
regular step the counter is moved past the update window (and, for an update step, onto it), so
every timed step is the kind it claims to be. rigl-torch accumulates the dense gradient in the
update step's own backward (``grad_accumulation_n=1``): its update block is one step.
sparsimony switches accumulation on at the end of the step before the update: its update block
is those two steps. Amortised over ΔT = 100: ``((ΔT - n) · regular + update block) / ΔT`` with
``n`` the block's steps (``bench.py``'s formula for sparsefw's RigL, where ``n = 1``).

``density`` is the fraction of non-zero weights over all Linear/Conv weights after the warm-up,
as the model computes them (so it shows what "90%" means to each peer).

Usage::

    python benchmarks/bench_peers.py --threads 1 --clock cpu           # MLP b32, b128, ResNet-32 b32
    python benchmarks/bench_peers.py --cases mlp:32 --repeats 11 --threads 1 --clock cpu
    tox -e bench-peers -- --threads 1 --clock cpu                     # with the peers installed
"""

from __future__ import annotations

import argparse
import datetime as dt
import gc
import importlib.util
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from sparsefw.distributions import allocate
from sparsefw.engine.optim import kernel_options
from sparsefw.masks import sparsifiable_params

import bench
from bench import (
    BLOCK_S,
    PLAIN_IMPLEMENTATIONS,
    PRESETS,
    REWARM_BELOW_S,
    RIGL_EVERY,
    EngineRunner,
    PlainRunner,
    Sizes,
    SparsifierRunner,
    Variant,
    batch_tensors,
    machine_info,
    model_spec,
    tensor_bytes,
)
from timing import BlockTimer, stats

#: global density of every masked row
DENSITY = 0.1
#: RigL's drop fraction (cosine-decayed from this) in the peers, as in sparsefw's ``rigl``
ALPHA = 0.3
#: the peers' end of topology updates: never reached in a benchmark
T_END = 10**9
#: the cases of the issue's peer table: (model key, batch)
DEFAULT_CASES = "mlp:32,mlp:128,resnet32:32"
TINY_CASES = "mlp:8,resnet20:8"
#: the peer packages (PyPI name, import name); installed by ``tox -e bench-peers`` only
PEERS = {"rigl_torch": ("rigl-torch==0.5.2", "rigl_torch"),
         "rigl_torch_static": ("rigl-torch==0.5.2", "rigl_torch"),
         "sparsimony": ("sparsimony==0.1.0", "sparsimony")}


def auto_kernels(device: torch.device) -> str:
    """Name of the SGD kernels of ``[optimizer] implementation = "auto"`` on ``device``."""
    opts = kernel_options("auto", device)
    return next((k for k, on in opts.items() if on), "for_loop")


# ------------------------------------------------------------------------------ peer runners
class SeedLoopRunner(PlainRunner):
    """The plain loop with float 0/1 masks applied per parameter around the optimizer step."""

    def __init__(self, spec, registry, device: torch.device):
        super().__init__(spec, registry, device, compile=False)
        params = sparsifiable_params(self.model)
        dens = allocate({n: tuple(p.shape) for n, p in params.items()}, DENSITY, "erk")
        gen = torch.Generator().manual_seed(0)
        self.masks = [(p, (torch.rand(p.shape, generator=gen) < dens[n]).float().to(device))
                      for n, p in params.items()]
        with torch.no_grad():
            for p, m in self.masks:
                p.mul_(m)

    def step(self, x, y) -> None:
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        for p, m in self.masks:
            p.grad.mul_(m)
        self.optimizer.step()
        for p, m in self.masks:
            p.data.mul_(m)

    def state_bytes(self) -> int:
        return tensor_bytes(self.model, self.optimizer, self.masks)


class RiglTorchRunner(PlainRunner):
    """rigl-torch's ``RigLScheduler`` on the plain loop's model and optimizer.

    ``every_layer``: every weighted layer 90% sparse, the first too (its ``uniform`` keeps the
    first layer dense and has no option against it): the scheduler is built from a
    ``state_dict`` (its resume argument) holding random 90% masks for every layer."""

    update_steps = 1

    def __init__(self, spec, registry, device: torch.device, static: bool = False,
                 every_layer: bool = False):
        from rigl_torch.RigL import RigLScheduler
        from rigl_torch.util import get_W

        super().__init__(spec, registry, device, compile=False)
        self.every = RIGL_EVERY
        resume = None
        if every_layer:
            weights, linear = get_W(self.model, return_linear_layers_mask=True)
            gen = torch.Generator().manual_seed(0)
            masks = []
            for w in weights:
                keep = torch.zeros(w.numel(), dtype=torch.bool)
                keep[torch.randperm(w.numel(), generator=gen)[:round(DENSITY * w.numel())]] = 1
                masks.append(keep.view_as(w).to(w.device))
            resume = {"dense_allocation": DENSITY, "S": [1 - DENSITY] * len(weights),
                      "N": [w.numel() for w in weights],
                      "hyperparams": {"delta_T": self.every, "alpha": ALPHA, "T_end": T_END,
                                      "ignore_linear_layers": False, "static_topo": static,
                                      "sparsity_distribution": "uniform",
                                      "grad_accumulation_n": 1},
                      "step": 0, "rigl_steps": 0, "backward_masks": masks,
                      "_linear_layers_mask": linear}
        self.pruner = RigLScheduler(self.model, self.optimizer, dense_allocation=DENSITY,
                                    sparsity_distribution="uniform", ignore_linear_layers=False,
                                    T_end=T_END, delta=self.every, alpha=ALPHA,
                                    grad_accumulation_n=1, static_topo=static,
                                    state_dict=resume)

    def _train(self, x, y) -> None:
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        if self.pruner():
            self.optimizer.step()

    def step(self, x, y) -> None:
        """A regular step: not one whose backward accumulates the dense gradient for an update
        (the counter is moved past it)."""
        if self.pruner.step % self.every == self.every - 1:
            self.pruner.step += 1
        self._train(x, y)

    def update_step(self, x, y) -> None:
        """The update step: its backward accumulates the dense gradient, then drop and grow."""
        self.pruner.step = (self.pruner.step // self.every + 1) * self.every - 1
        self._train(x, y)

    def state_bytes(self) -> int:
        return tensor_bytes(self.model, self.optimizer, self.pruner)


class SparsimonyRunner(PlainRunner):
    """sparsimony's ``RigL`` sparsifier ``prepare``\\ d on the plain loop's model (every
    Linear/Conv weight), wrapping its optimizer."""

    update_steps = 2

    def __init__(self, spec, registry, device: torch.device):
        from sparsimony.distributions.base import ERKDistribution
        from sparsimony.dst.rigl import RigL
        from sparsimony.schedulers.base import CosineDecayScheduler

        super().__init__(spec, registry, device, compile=False)
        self.every = RIGL_EVERY
        names = list(sparsifiable_params(self.model))
        self.sparsifier = RigL(
            scheduler=CosineDecayScheduler(ALPHA, t_end=T_END, delta_t=self.every),
            distribution=ERKDistribution(), optimizer=self.optimizer, sparsity=1 - DENSITY)
        self.sparsifier.prepare(self.model, [{"tensor_fqn": n} for n in names])

    def _train(self, x, y) -> None:
        self.optimizer.zero_grad()
        loss = F.cross_entropy(self.model(x), y)
        loss.backward()
        self.optimizer.step()
        self.sparsifier.step()

    def step(self, x, y) -> None:
        """A regular step: neither an update nor the step before one (which switches dense
        gradient accumulation on for the next backward)."""
        if self.sparsifier._step_count % self.every >= self.every - 2:
            self.sparsifier._step_count += 2
        self._train(x, y)

    def update_step(self, x, y) -> None:
        """The update cycle: the step that switches accumulation on, then the update step."""
        c = self.sparsifier._step_count
        self.sparsifier._step_count = (c // self.every + 1) * self.every - 2
        self._train(x, y)
        self._train(x, y)

    def state_bytes(self) -> int:
        return tensor_bytes(self.model, self.optimizer)


# ------------------------------------------------------------------------------ rows
@dataclass
class Row:
    """One row of the peer table."""

    key: str
    label: str
    build: Callable[[], Any]
    base: str | None = "hard90"
    kernels: str = ""
    #: the peer package's (PyPI spec, import name), None for sparsefw and the seed-style loop
    package: tuple[str, str] | None = None
    note: str = ""
    #: whether the row changes its topology: its update step (``runner.update_step``) is timed
    updates: bool = False


class NotRegistered(LookupError):
    """A sparsefw component the row needs is not registered."""


def rows(spec, catalogue, device: torch.device, sizes: Sizes, run_dir: Path) -> list[Row]:
    """The table's rows for ``spec``, each with a builder of its runner."""
    registry = catalogue.registry
    kern = auto_kernels(device)
    bench_variants = {v.key: v for v in bench.variants(spec, registry, set(registry.entries))}

    def engine(key: str) -> Callable[[], Any]:
        def build():
            v: Variant = bench_variants[key]
            missing = (bench.missing_components(v, set(registry.entries))
                       or (v.unavailable and v.unavailable(device)))
            if missing:
                raise NotRegistered(missing)
            return EngineRunner(spec, v, catalogue, device, False, sizes,
                                run_dir / f"{spec.key}-b{spec.batch}-{key}")
        return build

    return [
        Row("plain", "(a) plain PyTorch loop",
            lambda: {impl: PlainRunner(spec, registry, device, False, implementation=impl)
                     for impl in PLAIN_IMPLEMENTATIONS}, base=None),
        Row("hard90", "(b) sparsefw hard 90%, Trainer", engine("hard90"), base="plain",
            kernels=kern),
        Row("loop_hard90", "(b') sparsefw hard 90%, loop + Sparsifier",
            lambda: SparsifierRunner(spec, bench_variants["loop_hard90"], catalogue, device,
                                     False), kernels=kern),
        Row("hard90_masked", "(b'') sparsefw hard 90%, Trainer, fused_masked",
            engine("hard90_masked"), kernels="fused_masked",
            note="the mask folded into the SGD update by sparsefw's CPU kernel"),
        Row("rigl", "(c) sparsefw RigL 90%, regular step", engine("rigl"),
            kernels=kern, updates=True),
        Row("rigl_kernels", "(c') sparsefw RigL 90%, cpu_kernels", engine("rigl_kernels"),
            kernels="fused_masked", updates=True,
            note="[sparsity] cpu_kernels: compiled selection and fused_masked SGD"),
        Row("seed", "(d) seed-style mask loop 90%",
            lambda: SeedLoopRunner(spec, registry, device), kernels=kern,
            note="float masks, grad.mul_ / data.mul_ per parameter"),
        Row("rigl_torch", "(e) rigl-torch RigLScheduler 90%",
            lambda: RiglTorchRunner(spec, registry, device), kernels=kern, updates=True,
            package=PEERS["rigl_torch"], note="uniform: its first layer stays dense"),
        Row("rigl_torch_static", "(e') rigl-torch static_topo 90%",
            lambda: RiglTorchRunner(spec, registry, device, static=True), kernels=kern,
            package=PEERS["rigl_torch_static"], note="uniform: its first layer stays dense"),
        Row("rigl_torch_all", "(e'') rigl-torch RigLScheduler, every layer 90%",
            lambda: RiglTorchRunner(spec, registry, device, every_layer=True), kernels=kern,
            updates=True, package=PEERS["rigl_torch"],
            note="first layer sparse too: masks given through its state_dict argument"),
        Row("sparsimony", "(f) sparsimony RigL 90%",
            lambda: SparsimonyRunner(spec, registry, device), kernels=kern, updates=True,
            package=PEERS["sparsimony"], note="ERK; parametrized weights"),
    ]


def weight_density(model: torch.nn.Module) -> float:
    """Fraction of non-zero entries over every Linear/Conv weight as the model computes it."""
    ws = [w.detach() for w in sparsifiable_params(model).values()]
    total = sum(w.numel() for w in ws)
    return sum(int(torch.count_nonzero(w)) for w in ws) / total if total else float("nan")


# ------------------------------------------------------------------------------ measuring
def measure_case(spec, catalogue, device: torch.device, sizes: Sizes, args, run_dir: Path,
                 only: set[str] | None, log=print) -> dict:
    """Build every available row for ``spec``, warm each up and measure its memory, then time
    all of them in interleaved repeats. Returns the case's record (``bench.py``'s shape)."""
    x, y = batch_tensors(spec, device)
    results: dict[str, dict] = {}
    runners: dict[str, Any] = {}
    estimate: dict[str, float] = {}
    updating: set[str] = set()
    for row in rows(spec, catalogue, device, sizes, run_dir):
        if only is not None and row.key not in only:
            continue
        rec: dict[str, Any] = {"label": row.label, "base": row.base, "note": row.note,
                               "kernels": row.kernels}
        results[row.key] = rec
        if row.package and importlib.util.find_spec(row.package[1]) is None:
            rec.update(status="not installed",
                       reason=f"pip install --no-deps {row.package[0]} (tox -e bench-peers)")
            continue
        try:
            built = row.build()
            group = built if isinstance(built, dict) else {None: built}
            for impl, runner in group.items():
                for _ in range(sizes.warmup):
                    t0 = time.perf_counter()
                    runner.step(x, y)
                    estimate[row.key] = time.perf_counter() - t0
                if row.updates:
                    runner.update_step(x, y)
                    runner.step(x, y)
                runners[row.key if impl is None else f"{row.key}@{impl}"] = runner
            main = list(group.values())[-1]  # the plain row: its fused loop
            rec["density"] = weight_density(main.model)
            if args.memory:
                rec.update(bench.measure_memory(main, x, y, device, 0))
            if row.updates:
                updating.add(row.key)
            rec["status"] = "ok"
        except NotRegistered as exc:
            rec.update(status="not available", reason=str(exc))
        except Exception as exc:  # report and go on with the other rows
            rec.update(status="error", reason=f"{type(exc).__name__}: {exc}".splitlines()[0])
            if args.strict:
                raise
            log(f"  ! {row.key}: {rec['reason']}")

    blocks: list[tuple[str, Callable | None, Callable, int]] = []
    for key, runner in runners.items():
        est = estimate.get(key.partition("@")[0], 0.0)
        k = max(1, min(sizes.steps, math.ceil(BLOCK_S / max(est, 1e-6))))
        warm = runner.step if est < REWARM_BELOW_S else None
        blocks.append((key, warm, runner.step, k))
        if key in updating:
            blocks.append((f"{key}@update", warm, runner.update_step, 1))
    wall_s: dict[str, list[float]] = {b[0]: [] for b in blocks}
    cpu_s: dict[str, list[float]] = {b[0]: [] for b in blocks}
    timer = BlockTimer(device)
    for _ in range(sizes.repeats):
        for key, warm, fn, k in blocks:
            if warm is not None:
                warm(x, y)
            with timer:
                for _ in range(k):
                    fn(x, y)
            wall_s[key].append(timer.seconds / k)
            cpu_s[key].append(timer.cpu_seconds / k)

    for key in wall_s:
        main, _, what = key.partition("@")
        wall, cpu = stats(wall_s[key]), stats(cpu_s[key])
        st = dict(cpu if args.clock == "cpu" else wall)
        st.update(clock=args.clock, wall_ms=wall["median_ms"], cpu_ms=cpu["median_ms"],
                  wall=wall, cpu=cpu)
        if what:
            results[main][what] = st
        else:
            results[main].update(st)
    bench.pick_fastest_plain(results, runners)
    if "plain" in results and results["plain"].get("implementation"):
        results["plain"]["kernels"] = results["plain"]["implementation"]
    bench.derive_ratios(results, runners)
    _amortise_peers(results, runners)
    out = {"model": spec.key, "arch": spec.label, "batch": spec.batch,
           "params": sum(p.numel() for p in runners["plain"].model.parameters())
           if "plain" in runners else None, "variants": results}
    runners.clear()
    gc.collect()
    return out


def _amortise_peers(results: dict[str, dict], runners: dict) -> None:
    """The peers' cost amortised over their update interval (ΔT = 100 steps), from their
    regular step and their timed update block of ``update_steps`` steps."""
    plain = results.get("plain", {}).get("median_ms")
    hard = results.get("hard90", {}).get("median_ms")
    for key, rec in results.items():
        runner = runners.get(key)
        n = getattr(runner, "update_steps", None)
        if key == "rigl" or n is None or "update" not in rec or rec.get("median_ms") is None:
            continue
        every = runner.every
        rec["update"]["steps"] = n
        amort = ((every - n) * rec["median_ms"] + rec["update"]["median_ms"]) / every
        rec["amortised"] = {"every": every, "median_ms": amort,
                            "x_plain": amort / plain if plain else None,
                            "x_base": amort / hard if hard else None}


# ------------------------------------------------------------------------------ output
def _f(v, fmt="{:.2f}") -> str:
    return "—" if v is None else fmt.format(v)


def format_case(device: str, res: dict) -> str:
    """One case as a markdown table."""
    rs = res["variants"]
    clock = next((r.get("clock") for r in rs.values() if r.get("clock")), "cpu")
    other = "wall" if clock == "cpu" else "cpu"
    lines = [f"### {device} · {res['arch']}", "",
             f"| row | kernels | {clock} ms | IQR ms | {other} ms | x plain | x hard90 | "
             "density | state MB | peak MB |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rs.values():
        if r.get("status") != "ok":
            lines.append(f"| {r['label']} | {r.get('status')}: {r.get('reason', '')} "
                         "| | | | | | | | |")
            continue
        lines.append(
            f"| {r['label']} | {r.get('kernels', '')} | {_f(r.get('median_ms'))} | "
            f"{_f(r.get('iqr_ms'))} | {_f(r.get(other + '_ms'))} | {_f(r.get('x_plain'))}x | "
            f"{_f(r.get('x_base'))}{'x' if r.get('x_base') is not None else ''} | "
            f"{_f(r.get('density'), '{:.3f}')} | {_f(r.get('state_mb'))} | "
            f"{_f(r.get('peak_mb'))} |")
        if "update" in r:
            u = r["update"]
            n = u.get("steps", 1)
            what = "update step" if n == 1 else f"update cycle ({n} steps)"
            lines.append(f"| &nbsp;&nbsp;{what} | | {_f(u['median_ms'])} | {_f(u['iqr_ms'])} | "
                         f"{_f(u.get(other + '_ms'))} | "
                         f"{_f(u['median_ms'] / rs['plain']['median_ms'])}x | | | | |")
        if "amortised" in r:
            a = r["amortised"]
            lines.append(f"| &nbsp;&nbsp;amortised at ΔT = {a['every']} | | "
                         f"{_f(a['median_ms'])} | | | {_f(a['x_plain'])}x | "
                         f"{_f(a['x_base'])}x | | | |")
    notes = [f"{r['label']}: {r['note']}" for r in rs.values() if r.get("note")]
    if notes:
        lines += [""] + [f"- {n}" for n in notes]
    return "\n".join(lines)


def format_summary(results: list[dict]) -> str:
    """Every row's ratio to the plain loop (amortised where the row has updates), per case."""
    heads = [f"{r['model']} b{r['batch']}" for r in results]
    lines = ["### x plain (amortised at ΔT = 100 where the row updates its topology)", "",
             "| row | " + " | ".join(heads) + " |", "|---" * (len(heads) + 1) + "|"]
    keys = list(dict.fromkeys(k for r in results for k in r["variants"]))
    for key in keys:
        cells, label = [], key
        for r in results:
            rec = r["variants"].get(key, {})
            label = rec.get("label", label)
            if rec.get("status") != "ok":
                cells.append(rec.get("status", "—"))
                continue
            x = rec["x_plain"]
            a = rec.get("amortised", {}).get("x_plain")
            cells.append(f"{_f(x)}x" + (f" ({_f(a)}x)" if a is not None else ""))
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", default=None,
                   help=f"comma-separated model:batch (default {DEFAULT_CASES}; "
                        f"--tiny: {TINY_CASES})")
    p.add_argument("--tiny", action="store_true",
                   help="smoke-test sizes (tests only: figures are meaningless)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--repeats", type=int, default=None, help="timed repeats per row")
    p.add_argument("--steps", type=int, default=None, help="most steps per timed block")
    p.add_argument("--warmup", type=int, default=None, help="warm-up steps per row")
    p.add_argument("--only", default=None,
                   help="comma-separated row keys to run (plain and hard90 are always run)")
    p.add_argument("--no-memory", dest="memory", action="store_false",
                   help="skip the memory columns (the CPU peak needs a profiled step per row)")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="which clock the medians and ratios use (cpu: steadier on a shared CPU)")
    p.add_argument("--strict", action="store_true", help="re-raise a row's error")
    p.add_argument("--out", default="benchmarks/out/peers.json", help="JSON output path")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    preset = "tiny" if args.tiny else "full"
    sizes = PRESETS[preset]
    over = {k: getattr(args, k) for k in ("repeats", "steps", "warmup")
            if getattr(args, k) is not None}
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("CUDA: not available on this machine", file=sys.stderr)
        return 2
    catalogue = bench.build_catalogue([])
    only = {"plain", "hard90", *args.only.split(",")} if args.only else None
    cases = [(m, int(b)) for m, b in (c.split(":") for c in
                                      (args.cases or (TINY_CASES if args.tiny
                                                      else DEFAULT_CASES)).split(","))]
    info = machine_info()
    info["peers"] = {name: importlib.util.find_spec(mod) is not None
                     for name, mod in {v[0]: v[1] for v in PEERS.values()}.items()}
    started = time.perf_counter()
    command = " ".join(["python", *sys.argv]) if argv is None else " ".join(
        ["bench_peers.py", *argv])
    print(f"sparsefw peer table ({preset}) · {info['cpu']} · {info['cores']} cores · "
          f"torch {info['torch']} ({info['torch_threads']} threads) · peers: "
          + ", ".join(f"{k} {'installed' if v else 'not installed'}"
                      for k, v in info["peers"].items()), flush=True)
    results = []
    with tempfile.TemporaryDirectory(prefix="sparsefw-peers-") as tmp:
        for key, batch in cases:
            case_sizes = Sizes(**{**sizes.__dict__, **over, "batch": batch})
            spec = model_spec(key, case_sizes)
            res = measure_case(spec, catalogue, device, case_sizes, args, Path(tmp), only)
            res["device"] = device.type
            results.append(res)
            print(format_case(device.type, res) + "\n", flush=True)
    summary = format_summary(results)
    print(summary)
    info["loadavg_after"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    payload = {"meta": {**info, "date": dt.datetime.now().isoformat(timespec="seconds"),
                        "command": command, "preset": preset, "clock": args.clock,
                        "optimizer": bench.OPTIM, "density": DENSITY, "rigl_every": RIGL_EVERY,
                        "wall_s": time.perf_counter() - started},
               "results": results, "markdown": "\n\n".join(
                   [format_case(r["device"], r) for r in results] + [summary])}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(payload, indent=1, default=str))
    print(f"wrote {out} ({payload['meta']['wall_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
