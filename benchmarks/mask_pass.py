"""Where a hard-masked step's time goes: the cost of the one pass that masks the gradients.

``bench.py`` compares sparsefw's hard-masked step with the fastest plain loop. On a
memory-bound model (the benchmark MLP at a small batch) nearly all of the gap is one pass over
every masked gradient and its mask: ``g ← g ⊙ m`` (what the engine does before the optimizer
step with SGD/Adam/AdamW, as ``torch._foreach_mul_``). This script times that pass on its own,
added to the same plain loop, so that the engine's figure can be read against it:

* ``plain``        the plain loop (``bench.py``'s, with the optimizer kernels chosen by
                   ``--implementation``);
* ``+ mask pass``  the same loop with ``torch._foreach_mul_(grads, float_masks)`` after the
                   backward (sparsefw's per-step work with 4-byte masks);
* ``+ masked_fill`` the same with ``grad.masked_fill_(~mask, 0)`` and 1-byte bool masks (the
                   representation of some peers; its extra reads of the bool mask are cheaper,
                   its kernel is not).
* ``masked kernel`` the plain loop with sparsefw's :class:`~sparsefw.kernels.masked_sgd.MaskedSGD`
                   (``[optimizer] implementation = "fused_masked"``): the mask folded into the
                   SGD update, no pass of its own (left out where the kernel cannot be built).

The variants run interleaved in one process (blocks of steps, the order rotated each
repeat); ratios are medians of per-repeat ratios to the plain block of the same repeat, on the
process CPU clock. Nothing of sparsefw runs here but that kernel: it measures the machine.

    python benchmarks/mask_pass.py --batch 32 --repeats 15
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench  # noqa: E402  (the benchmark's model, batch and plain loop)


class MaskedLoop(bench.PlainRunner):
    """The plain loop plus one gradient-masking pass per step (``how``: ``foreach`` with 0/1
    float masks, or ``masked_fill`` with bool masks), at ``density`` on every Linear/Conv
    weight (uniform random masks: the pass costs the same whatever the pattern)."""

    def __init__(self, spec, registry, implementation: str, how: str, density: float):
        super().__init__(spec, registry, torch.device("cpu"), False,
                         implementation=implementation)
        g = torch.Generator().manual_seed(0)
        weights = [m.weight for m in self.model.modules()
                   if isinstance(m, (torch.nn.Linear, torch.nn.Conv2d))]
        bools = [torch.rand(w.shape, generator=g) < density for w in weights]
        with torch.no_grad():
            for w, b in zip(weights, bools, strict=True):
                w.mul_(b)
        self.weights = weights
        self.how = how
        self.floats = [b.float() for b in bools]
        self.inverse = [~b for b in bools]
        if how == "kernel":
            from sparsefw.kernels.masked_sgd import MaskedSGD

            o = bench.OPTIM
            self.optimizer = MaskedSGD(self.model.parameters(), lr=o["lr"],
                                       momentum=o["momentum"], nesterov=o["nesterov"],
                                       weight_decay=o["weight_decay"])
            self.optimizer.mask_source = lambda: (weights, self.floats)

    def step(self, x, y) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        loss = torch.nn.functional.cross_entropy(self.forward(x), y)
        loss.backward()
        if self.how == "kernel":  # the optimizer masks
            self.optimizer.step()
            return
        with torch.no_grad():
            grads = [w.grad for w in self.weights]
            if self.how == "foreach":
                torch._foreach_mul_(grads, self.floats)
            else:
                for gr, inv in zip(grads, self.inverse, strict=True):
                    gr.masked_fill_(inv, 0)
        self.optimizer.step()


def measure(args) -> dict[str, list[float]]:
    """Per-step CPU seconds of each variant, one sample per repeat (interleaved)."""
    torch.set_num_threads(args.threads)
    sizes = bench.Sizes(**{**bench.PRESETS["full"].__dict__, "batch": args.batch})
    spec = bench.model_spec(args.model, sizes)
    registry = bench.build_catalogue([]).registry
    x, y = bench.batch_tensors(spec, torch.device("cpu"))
    runners = {
        "plain": bench.PlainRunner(spec, registry, torch.device("cpu"), False,
                                   implementation=args.implementation),
        "+ mask pass": MaskedLoop(spec, registry, args.implementation, "foreach", args.density),
        "+ masked_fill": MaskedLoop(spec, registry, args.implementation, "masked_fill",
                                    args.density),
    }
    if bench.masked_sgd_unavailable(torch.device("cpu")) is None:
        runners["masked kernel"] = MaskedLoop(spec, registry, args.implementation, "kernel",
                                              args.density)
    for r in runners.values():
        for _ in range(3):
            r.step(x, y)
    samples: dict[str, list[float]] = {k: [] for k in runners}
    keys = list(runners)
    for rep in range(args.repeats):
        for key in keys[rep % len(keys):] + keys[:rep % len(keys)]:
            runners[key].step(x, y)  # untimed: re-warm the caches after the previous block
            t0 = time.process_time()
            for _ in range(args.steps):
                runners[key].step(x, y)
            samples[key].append((time.process_time() - t0) / args.steps)
    return samples


def report(samples: dict[str, list[float]]) -> str:
    plain = samples["plain"]
    lines = [f"{'variant':16s} {'cpu ms':>8s} {'x plain':>8s}  (median of per-repeat ratios)"]
    for key, s in samples.items():
        ratio = statistics.median(a / b for a, b in zip(s, plain, strict=True))
        lines.append(f"{key:16s} {statistics.median(s) * 1e3:8.2f} {ratio:7.2f}x")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="mlp", help="a bench.py model key (default mlp)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--density", type=float, default=0.1)
    ap.add_argument("--implementation", default="fused",
                    choices=bench.PLAIN_IMPLEMENTATIONS, help="optimizer kernels (default fused)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--steps", type=int, default=10, help="steps per timed block")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    print(report(measure(args)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
