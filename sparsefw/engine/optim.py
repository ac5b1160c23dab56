"""Optimizers (SGD with momentum/Nesterov/weight decay, AdamW) and learning-rate multipliers
(constant, cosine, step, linear, each with optional linear warm-up), stepped once per step.

AdamW keeps one step count per tensor (PyTorch's ``state["step"]``), not per entry. A weight
grown by a topology update starts with zero moments (the engine zeroes them) while its tensor's
count t is large, so bias correction no longer scales its moments up: its first update is
``lr·(1 − β₁)g / √((1 − β₂)g²) ≈ 3.2·lr`` for β = (0.9, 0.999), against about ``lr`` for a weight
present from the first step. The references share this; see ``docs/methods/set.md``."""

from __future__ import annotations

import functools

import torch

from sparsefw.config import LRScheduleConfig, OptimizerConfig, RunConfig
from sparsefw.schedules import cosine_remaining, linear_remaining, progress, span

#: keyword arguments of ``torch.optim`` optimizers for each explicit implementation
KERNELS = {"fused": {"fused": True}, "foreach": {"foreach": True},
           "for_loop": {"foreach": False},
           # MaskedSGD: torch's fused SGD for what its own kernel does not take
           "fused_masked": {"fused": True}}


@functools.cache
def fused_supported(device: torch.device) -> bool:
    """Does this torch have fused SGD/AdamW kernels for ``device``? (CUDA and CPU in torch
    ≥ 2.4; other back ends fall back to ``foreach``.)"""
    try:
        torch.optim.SGD([torch.zeros(1, device=device)], lr=0.1, fused=True)
    except (RuntimeError, ValueError, TypeError):
        return False
    return True


def kernel_options(implementation: str, device: torch.device) -> dict[str, bool]:
    """The ``fused``/``foreach`` keyword of an ``implementation`` (``auto``: fused where
    supported, else foreach). Measured on the 2-core reference CPU (benchmarks/RESULTS.md):
    fused SGD's update is about 2.5× faster than foreach or the per-tensor loop, with the same
    results for plain momentum SGD; Nesterov and AdamW differ from foreach in the last bits."""
    if implementation == "auto":
        implementation = "fused" if fused_supported(device) else "foreach"
    return dict(KERNELS[implementation])


def fused_masked_problems(cfg: RunConfig, device: torch.device) -> list[str]:
    """Why ``[optimizer] implementation = "fused_masked"`` cannot run this configuration
    (empty: it can; the kernel is built here if it was not yet)."""
    from sparsefw import kernels

    problems = []
    if cfg.optimizer.name != "sgd":
        problems.append(f'it is an SGD kernel: set [optimizer] name = "sgd" (got '
                        f'{cfg.optimizer.name!r}) or another implementation')
    if device.type != "cpu":
        problems.append(f'it runs on the CPU: [train] device resolves to {device.type!r} '
                        f'(use "auto" or "fused" there)')
    if cfg.sparsity.kind != "hard":
        problems.append(f'it folds hard masks into the update: [sparsity] kind is '
                        f'{cfg.sparsity.kind!r}')
    if cfg.train.parallel == "fsdp":
        problems.append('sharded DTensor parameters are not plain CPU tensors: [train] '
                        'parallel = "fsdp"')
    if not problems and (reason := kernels.unavailable()):
        problems.append(reason)
    return problems


def build_optimizer(cfg: OptimizerConfig, params, device: torch.device) -> torch.optim.Optimizer:
    """The configured optimizer, with the kernels of ``cfg.implementation``
    (``fused_masked``: a :class:`sparsefw.kernels.masked_sgd.MaskedSGD`; check the run with
    :func:`fused_masked_problems` first)."""
    if cfg.implementation == "fused_masked":
        from sparsefw.kernels.masked_sgd import MaskedSGD

        return MaskedSGD(params, lr=cfg.lr, momentum=cfg.momentum,
                         nesterov=cfg.nesterov and cfg.momentum > 0,
                         weight_decay=cfg.weight_decay)
    fast = kernel_options(cfg.implementation, device)
    if cfg.name == "sgd":
        return torch.optim.SGD(
            params,
            lr=cfg.lr,
            momentum=cfg.momentum,
            nesterov=cfg.nesterov and cfg.momentum > 0,
            weight_decay=cfg.weight_decay,
            **fast,
        )
    return torch.optim.AdamW(
        params, lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps, weight_decay=cfg.weight_decay, **fast
    )


def lr_multiplier(cfg: LRScheduleConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based) of ``total_steps``."""
    warmup = int(cfg.warmup_epochs * steps_per_epoch)
    if step < warmup:
        return (step + 1) / warmup
    t = progress(step, warmup, max(total_steps, warmup + 1))
    if cfg.name == "constant":
        return 1.0
    if cfg.name in ("cosine", "linear"):
        shape = cosine_remaining if cfg.name == "cosine" else linear_remaining
        return span(shape, 1.0, cfg.final_scale, t)
    # step decay at fractions of the whole run
    frac = step / max(total_steps, 1)
    return cfg.gamma ** sum(frac >= m for m in cfg.milestones)


def build_lr_schedule(
    cfg: LRScheduleConfig,
    optimizer: torch.optim.Optimizer,
    round_steps: int,
    steps_per_epoch: int,
    iteration=None,
) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_multiplier` over a round of ``round_steps`` steps.
    ``iteration(step)`` maps the run's step to the iteration within the round (rounds restart
    or replay the schedule; default: the step itself); the state is checkpointed."""
    at = iteration or (lambda s: s % round_steps)
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_multiplier(cfg, at(s), round_steps, steps_per_epoch)
    )
