"""The small statistics sweeps and comparisons need, in plain Python (no torch import).

* :func:`mean_std` — mean and sample standard deviation (``n − 1`` in the denominator);
* :func:`t_cdf_two_sided` / :func:`t_quantile` — Student's t distribution for integer degrees
  of freedom, from the closed forms of Abramowitz & Stegun, *Handbook of Mathematical
  Functions*, 26.7.3 (odd ν) and 26.7.4 (even ν), inverted by bisection;
* :func:`paired` — the paired difference of two sets of runs seed by seed: mean, the
  t-interval ``mean ± t(1 − α/2, n − 1) · s / √n`` and the count of seeds whose difference has
  the sign of the mean;
* :func:`interpolate` — a run's curve read at a point between two of its evaluations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import attrs


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return mean, std


def t_cdf_two_sided(t: float, df: int) -> float:
    """``P(|T| ≤ t)`` for Student's t with ``df`` (a positive integer) degrees of freedom.

    With ``θ = atan(t / √ν)``: for odd ν, ``(2/π)(θ + sin θ · Σ_k a_k cos^(2k+1) θ)`` with
    ``a_0 = 1``, ``a_k = a_(k−1) · 2k / (2k + 1)`` over ``k < (ν − 1)/2`` (no sum for ν = 1);
    for even ν, ``sin θ · Σ_k b_k cos^(2k) θ`` with ``b_0 = 1``, ``b_k = b_(k−1) · (2k − 1) / 2k``
    over ``k < ν/2``.
    """
    if df < 1 or int(df) != df:
        raise ValueError(f"degrees of freedom must be a positive integer, got {df}")
    t = abs(t)
    theta = math.atan(t / math.sqrt(df))
    s, c = math.sin(theta), math.cos(theta)
    if df % 2:
        total, term = 0.0, c
        for k in range((df - 1) // 2):
            if k:
                term *= (2 * k) / (2 * k + 1) * c * c
            total += term
        return (2 / math.pi) * (theta + s * total)
    total, term = 0.0, 1.0
    for k in range(df // 2):
        if k:
            term *= (2 * k - 1) / (2 * k) * c * c
        total += term
    return s * total


def t_quantile(p: float, df: int) -> float:
    """The ``p`` quantile of Student's t with ``df`` degrees of freedom (``0 < p < 1``), to
    about 1e-12 relative, by bisection of :func:`t_cdf_two_sided`."""
    if not 0 < p < 1:
        raise ValueError(f"p must be in (0, 1), got {p}")
    if p == 0.5:
        return 0.0
    target = abs(2 * p - 1)  # P(|T| <= q) for the upper quantile q
    lo, hi = 0.0, 1.0
    while t_cdf_two_sided(hi, df) < target:
        hi *= 2
    for _ in range(200):
        mid = (lo + hi) / 2
        if t_cdf_two_sided(mid, df) < target:
            lo = mid
        else:
            hi = mid
        if hi - lo <= 1e-12 * hi:
            break
    q = (lo + hi) / 2
    return q if p > 0.5 else -q


@attrs.frozen
class Paired:
    """Differences ``a_s − b_s`` over the seeds both sides have."""

    n: int
    mean: float
    std: float
    #: the confidence interval of the mean difference (NaN bounds when ``n < 2``)
    low: float
    high: float
    #: seeds whose difference has the sign of the mean (ties with 0 do not count)
    agree: int
    level: float = 0.95

    def text(self, scale: float = 100.0, digits: int = 2) -> str:
        """``"+1.23 [−0.40, +2.86] 3/3"`` (values times ``scale``)."""
        f = f"{{:+.{digits}f}}"
        if self.n == 0:
            return "-"
        ci = (f" [{f.format(scale * self.low)}, {f.format(scale * self.high)}]"
              if self.n > 1 else "")
        return f"{f.format(scale * self.mean)}{ci} {self.agree}/{self.n}"


def paired(a: dict[int, float], b: dict[int, float], level: float = 0.95) -> Paired:
    """Paired differences of ``a`` against ``b`` (both keyed by seed) with a ``level``
    t-interval: ``mean ± t((1 + level)/2, n − 1) · std / √n``."""
    seeds = sorted(set(a) & set(b))
    diffs = [a[s] - b[s] for s in seeds if not (math.isnan(a[s]) or math.isnan(b[s]))]
    n = len(diffs)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, 0, level)
    mean, std = mean_std(diffs)
    if n > 1:
        half = t_quantile((1 + level) / 2, n - 1) * std / math.sqrt(n)
        low, high = mean - half, mean + half
    else:
        low = high = math.nan
    sign = (mean > 0) - (mean < 0)
    agree = sum(1 for d in diffs if sign and (d > 0) - (d < 0) == sign)
    return Paired(n, mean, std, low, high, agree, level)


def interpolate(xs: Sequence[float], ys: Sequence[float], x: float) -> float:
    """``y`` at ``x`` on the piecewise-linear curve through ``(xs, ys)`` (``xs`` ascending);
    NaN outside ``[xs[0], xs[-1]]``. Equal ``xs`` (no progress between evaluations) take the
    later ``y``."""
    if not xs or x < xs[0] or x > xs[-1]:
        return math.nan
    for i in range(1, len(xs)):
        if x <= xs[i]:
            x0, x1, y0, y1 = xs[i - 1], xs[i], ys[i - 1], ys[i]
            if x1 == x0:
                return y1
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return ys[-1]
