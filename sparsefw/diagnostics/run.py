"""Analyse a finished (or checkpointed) run: load it, measure the sharpness of its loss surface
around the checkpoint, and write plots and numbers into ``RUN_DIR/analysis/``.

What is written (``sparsefw analyze RUN_DIR`` calls :func:`analyze_run`):

* ``landscape_1d.png`` — ``L(θ + α·d₁)`` along one filter-normalised direction;
* ``landscape_contour.png`` and ``landscape_surface.png`` — ``L(θ + α·d₁ + β·d₂)``;
* ``analysis.json`` — the loss at the checkpoint, the top Hessian eigenvalue (active weights),
  the roughness coefficients (see :mod:`sparsefw.diagnostics.landscape`), the density and the
  grids themselves.

The loss is the training loss of the run (cross entropy) over the first ``batches`` batches of
the *training* split in a fixed order (no shuffling), batch size ``[train] eval_batch_size``,
with the model in eval mode.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sparsefw.diagnostics.common import MaskedLoss
from sparsefw.diagnostics.hessian import top_eigenvalue
from sparsefw.diagnostics.landscape import (
    filter_normalised_direction,
    plot_contour,
    plot_slice,
    plot_surface,
    roughness,
    slice_1d,
    surface_2d,
)

ANALYSIS_DIR = "analysis"


def load_trainer(run_dir: str | Path, catalogue=None, device: str | None = None, *,
                 trust: bool = False):
    """Rebuild the run in ``run_dir`` from its ``run.json`` and load ``checkpoint.pt``
    (``trust``: with full unpickling, unsafe)."""
    from sparsefw import config as config_mod
    from sparsefw.engine import Trainer
    from sparsefw.engine.checkpoint import CHECKPOINT
    from sparsefw.engine.rundir import RUN_INFO, read_run_info
    from sparsefw.plugins import load_catalogue

    run_dir = Path(run_dir)
    info_path, ckpt = run_dir / RUN_INFO, run_dir / CHECKPOINT
    for path in (info_path, ckpt):
        if not path.exists():
            raise FileNotFoundError(f"{run_dir}: no {path.name} (not a run directory?)")
    catalogue = catalogue or load_catalogue()
    raw = read_run_info(run_dir)["raw_config"]
    if device is not None:
        raw = {**raw, "train": {**raw.get("train", {}), "device": device}}
    cfg = config_mod.structure(raw, catalogue.registry, source=str(info_path))
    trainer = Trainer(cfg, catalogue, run_dir=run_dir, raw_config=raw,
                      config_source=str(info_path))
    trainer.load_checkpoint(ckpt, trust=trust)
    return trainer


def analysis_batches(trainer, batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``batches`` training batches in data-set order (``eval_batch_size`` each)."""
    from sparsefw.engine.loaders import BatchSource

    source = BatchSource(trainer.data.train, trainer.cfg.train.eval_batch_size, trainer.device,
                         shuffle=False, in_memory=trainer.data.in_memory)
    out = []
    for batch in source.epoch():
        out.append(batch)
        if len(out) >= batches:
            break
    return out


def masked_loss_of(trainer, batches: int) -> MaskedLoss:
    """The run's loss over ``batches`` training batches as a function of its active weights."""
    return MaskedLoss(trainer.model, analysis_batches(trainer, batches),
                      loss_fn=trainer.state.loss_fn, masks=trainer.masks.masks)


def sharpness(
    loss: MaskedLoss,
    *,
    points: int = 21,
    radius: float = 1.0,
    iters: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    slice_points: int = 51,
) -> dict[str, Any]:
    """Top eigenvalue, 1-D slice, 2-D surface and roughness around the loss's current point."""
    params = loss.params()
    device = next(iter(params.values())).device
    gen = torch.Generator(device=device).manual_seed(seed)
    d1 = filter_normalised_direction(params, loss.masks, generator=gen)
    d2 = filter_normalised_direction(params, loss.masks, generator=gen)
    grid = torch.linspace(-radius, radius, points, dtype=torch.float64)
    line = torch.linspace(-radius, radius, slice_points, dtype=torch.float64)
    with torch.no_grad():
        loss0 = float(loss(params))
    z = surface_2d(loss, params, d1, d2, grid, grid)
    values = slice_1d(loss, params, d1, line)
    eig = top_eigenvalue(loss, params, iters=iters, tol=tol,
                         generator=torch.Generator(device=device).manual_seed(seed + 1))
    return {
        "loss": loss0,
        "top_eigenvalue": eig.value,
        "eigen_iterations": eig.iterations,
        "eigen_converged": eig.converged,
        "roughness": roughness(grid, grid, z),
        "grid": grid.tolist(),
        "surface": z.tolist(),
        "slice_alphas": line.tolist(),
        "slice": values.tolist(),
        "active_coordinates": loss.active_count(),
        "samples": loss.total,
    }


def analyze_run(
    run_dir: str | Path,
    *,
    out: str | Path | None = None,
    points: int = 21,
    radius: float = 1.0,
    batches: int = 2,
    iters: int = 100,
    tol: float = 1e-5,
    seed: int = 0,
    plots: bool = True,
    catalogue=None,
    device: str | None = None,
    trust: bool = False,
) -> dict[str, Any]:
    """Measure the sharpness of the run in ``run_dir`` at its checkpoint; write the plots and
    ``analysis.json`` into ``out`` (default ``run_dir/analysis``) and return the numbers."""
    trainer = load_trainer(run_dir, catalogue, device, trust=trust)
    loss = masked_loss_of(trainer, batches)
    result = sharpness(loss, points=points, radius=radius, iters=iters, tol=tol, seed=seed)
    result.update({
        "run_dir": str(run_dir),
        "step": trainer.state.step,
        "density": float(trainer.masks.density()) if trainer.masks.masks else 1.0,
        "settings": {"points": points, "radius": radius, "batches": batches, "iters": iters,
                     "tol": tol, "seed": seed},
    })
    out = Path(out) if out is not None else Path(run_dir) / ANALYSIS_DIR
    out.mkdir(parents=True, exist_ok=True)
    if plots:
        title = (f"density {result['density']:.3f}, λ_max {result['top_eigenvalue']:.3g}, "
                 f"Ra {result['roughness']['ra_plane']:.3g}")
        plot_slice(result["slice_alphas"], result["slice"], out / "landscape_1d.png", title)
        plot_contour(result["grid"], result["grid"], result["surface"],
                     out / "landscape_contour.png", title)
        plot_surface(result["grid"], result["grid"], result["surface"],
                     out / "landscape_surface.png", title)
    from sparsefw.engine.checkpoint import write_json

    write_json(out / "analysis.json", result)
    return result


__all__ = ["analysis_batches", "analyze_run", "load_trainer", "masked_loss_of", "sharpness"]
