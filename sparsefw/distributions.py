"""Layer-wise density allocation: uniform, ER (Mocanu et al., arXiv 1707.04780) and ERK
(Evci et al., RigL, arXiv 1911.11134).

Every function takes the shapes of the sparsified layers and a global density ``d`` and returns a
density per layer such that ``Σ density_l · N_l = d · Σ N_l`` (N_l = numel). For ER/ERK a layer
whose raw density would exceed 1 is made dense and the scale ε is solved again over the rest,
until no layer exceeds 1.

Convolutions (shape ``(c_out, c_in, h, w)``) are where readings differ; ``kernel`` says whether
the kernel's spatial dimensions enter the layer score:

* ``erk``, ``kernel = True`` (default): Σ dims / Π dims, RigL's ERK;
* ``er``, ``kernel = True`` (default): (n_in + n_out)/(n_in·n_out) with n_in = c_in·h·w, the
  kernel folded into the fan-in (the convolution read as its c_out × c_in·h·w im2col matrix);
* ``kernel = False``, either method: the channels only, (c_in + c_out)/(c_in·c_out).

The channels-only score is google-research/rigl's ``get_sparsities_erdos_renyi`` with
``include_kernel=False`` (its ``erdos_renyi``); ``erk`` with the kernel is the same function with
``include_kernel=True``. Fully connected layers score the same under all four. ``[sparsity]
er_kernel`` chooses; ``docs/methods/erk.md`` gives the references and the default's reasons.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

DISTRIBUTIONS = ("uniform", "er", "erk")


def raw_score(shape: tuple[int, ...], method: str, kernel: bool = True) -> float:
    """The unnormalised density of a layer of ``shape`` under ``method`` (``"er"``/``"erk"``);
    ``kernel``: whether a convolution's spatial dimensions count (see the module docstring)."""
    if not kernel and len(shape) > 2:
        shape = tuple(shape[:2])  # (c_out, c_in): channels only
    if method == "erk":
        return sum(shape) / math.prod(shape)
    n_out = shape[0]
    n_in = math.prod(shape[1:]) if len(shape) > 1 else 1
    return (n_in + n_out) / (n_in * n_out)


def convention(method: str, kernel: bool = True) -> str:
    """One line naming the layer score ``method`` uses with ``kernel`` (for ``describe``)."""
    if method == "uniform":
        return "uniform: every sparsified layer at the global density"
    if not kernel:
        return (f"{method}, er_kernel = false: channels only, (c_in + c_out)/(c_in·c_out) "
                "(rigl's erdos_renyi)")
    if method == "erk":
        return "erk, er_kernel = true: Σ dims / Π dims (RigL's ERK, rigl's erdos_renyi_kernel)"
    return ("er, er_kernel = true: (n_in + c_out)/(n_in·c_out) with n_in = c_in·h·w "
            "(kernel folded into the fan-in)")


def allocate(
    shapes: Mapping[str, tuple[int, ...]], density: float, method: str = "erk",
    *, kernel: bool = True,
) -> dict[str, float]:
    """Density per layer for global ``density`` in (0, 1].

    ``method`` is one of :data:`DISTRIBUTIONS`; ``kernel`` is :func:`raw_score`'s.
    """
    if method not in DISTRIBUTIONS:
        raise ValueError(f"unknown distribution {method!r}; choices: {', '.join(DISTRIBUTIONS)}")
    if not 0 < density <= 1:
        raise ValueError(f"density must be in (0, 1], got {density}")
    if method == "uniform" or density == 1:
        return {n: float(density) for n in shapes}
    numel = {n: math.prod(s) for n, s in shapes.items()}
    raw = {n: raw_score(tuple(s), method, kernel) for n, s in shapes.items()}
    dense: set[str] = set()
    while True:
        budget = density * sum(numel.values()) - sum(numel[n] for n in dense)
        denom = sum(raw[n] * numel[n] for n in shapes if n not in dense)
        eps = budget / denom if denom > 0 else 0.0
        over = [n for n in shapes if n not in dense and eps * raw[n] > 1]
        if not over:
            break
        # densify the layer with the highest raw score first, as the reference does
        dense.add(max(over, key=lambda n: raw[n]))
    return {n: 1.0 if n in dense else eps * raw[n] for n in shapes}


def active_counts(
    shapes: Mapping[str, tuple[int, ...]], density: float, method: str = "erk",
    *, kernel: bool = True,
) -> dict[str, int]:
    """Number of active weights per layer for :func:`allocate`'s densities.

    Each layer's count is rounded to the nearest integer (at least 1), so the global count is
    within one weight per layer of ``density · Σ N_l``.
    """
    dens = allocate(shapes, density, method, kernel=kernel)
    out = {}
    for n, s in shapes.items():
        numel = math.prod(s)
        out[n] = min(numel, max(1, round(dens[n] * numel)))
    return out
