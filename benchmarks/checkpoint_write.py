#!/usr/bin/env python
"""What the reliability checks add to writing a checkpoint, on the quickstart run.

Times ``Trainer.save_checkpoint()`` as it is (``new``: ``torch.save`` to a temporary file, the
start of its write-back to disk, then, while it travels, the check that the file ends with the
zip end record and the finiteness check of the weights and the divergence flags; fsync,
keeping the replaced file as ``checkpoint.prev.pt``, fsync of the directory) against the write
without those checks (``base``: the same payload, ``torch.save`` to a temporary file, fsync, one
rename, fsync of the directory: what the engine did before). A third write, ``base +
write-back``, is the base with the early write-back start alone: it shows that starting the
write-back early does not make the base itself faster (what it buys is room for the checks).
The integrity checksums cost nothing here: they are the CRC-32s ``torch.save`` writes into
every zip record anyway (verified on load, timed apart).
The writes are interleaved in a shuffled order over many repeats, each write after an (untimed)
training step as in a run, so that machine load spreads over all; each figure is a median, and
the overhead is the median of the paired differences with a bootstrap 95% interval. The
added operations are also timed on their own (the weights check, the end-of-archive check, the
extra rename; hot, in a loop) and their sum given as a share of the base write.

    python benchmarks/checkpoint_write.py [--repeats 1000] [--dir runs/bench-ckpt]
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

from sparsefw import config
from sparsefw.engine import Trainer, checkpoint
from sparsefw.plugins import load_catalogue

ROOT = Path(__file__).resolve().parent.parent


def _base_save(trainer: Trainer, *, writeback: bool = False) -> None:
    """The write without the new checks (the payload built exactly as save_checkpoint does);
    ``writeback``: with the early start of the write-back alone."""
    keep = checkpoint.save

    def save(path, payload, **_):
        checkpoint.atomic_write(path, lambda f: torch.save(payload, f),
                                check=(lambda f: None) if writeback else None)

    checkpoint.save = save
    try:
        trainer.save_checkpoint()
    finally:
        checkpoint.save = keep


def _paired(new: list[float], base: list[float], rounds: int = 2000) -> tuple[float, ...]:
    """Median of the paired differences ``new - base`` and its bootstrap 95% interval."""
    diffs = [n - b for n, b in zip(new, base, strict=True)]
    rng = random.Random(0)
    boot = sorted(statistics.median(rng.choices(diffs, k=len(diffs))) for _ in range(rounds))
    return statistics.median(diffs), boot[int(0.025 * rounds)], boot[int(0.975 * rounds)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=1000)
    p.add_argument("--dir", help="run directory (default: a temporary one under runs/)")
    args = p.parse_args(argv)
    catalogue = load_catalogue(autoload=False)
    cfg, raw = config.load(ROOT / "configs" / "quickstart.toml", catalogue.registry,
                           ["logging.observers=[]", "train.device='cpu'"])
    (ROOT / "runs").mkdir(exist_ok=True)
    run_dir = Path(args.dir) if args.dir else Path(tempfile.mkdtemp(dir=ROOT / "runs",
                                                                    prefix="bench-ckpt-"))
    trainer = Trainer(cfg, catalogue, run_dir=run_dir, raw_config=raw)
    trainer._init_masks()
    x, y = next(iter(trainer.train_source.epoch(0)))
    for _ in range(3):
        trainer.step(x, y)  # optimizer state exists, as in any real checkpoint
    variants = {"base": lambda: _base_save(trainer), "new": trainer.save_checkpoint,
                "base + write-back": lambda: _base_save(trainer, writeback=True)}
    times: dict[str, list[float]] = {k: [] for k in variants}
    order, shuffle = list(variants), random.Random(0).shuffle
    for i in range(args.repeats + 20):
        shuffle(order)
        for name in order:
            trainer.step(x, y)  # as in a run, a write follows computation (untimed)
            t = time.perf_counter()
            variants[name]()
            if i >= 20:  # warm-up
                times[name].append(time.perf_counter() - t)
    ckpt = run_dir / checkpoint.CHECKPOINT

    def median_ms(fn, n=200) -> float:
        out = []
        for _ in range(n):
            t = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t)
        return statistics.median(out) * 1e3

    check = median_ms(lambda: trainer.guard.check_weights(0, trainer._parameters))
    with open(ckpt, "rb") as f:
        archive = median_ms(lambda: checkpoint._complete_archive(f))
    moved = ckpt.with_name("moved.pt")

    def rename_twice() -> None:
        os.replace(ckpt, moved)
        os.replace(moved, ckpt)

    rename = median_ms(rename_twice) / 2
    verify = median_ms(lambda: checkpoint.verify(ckpt), 50)
    size = ckpt.stat().st_size
    if not args.dir:
        shutil.rmtree(run_dir)
    base = statistics.median(times["base"]) * 1e3
    print(f"quickstart checkpoint: {size / 1024:.0f} KiB, {args.repeats} interleaved repeats")
    for name in variants:
        print(f"  {name:18s} {statistics.median(times[name]) * 1e3:.3f} ms (median)")
    for name in ("new", "base + write-back"):
        mid, lo, hi = (1e3 * v for v in _paired(times[name], times["base"]))
        print(f"  {name} - base: median of paired differences {mid:+.3f} ms = "
              f"{100 * mid / base:+.2f} % of the base write (95% interval "
              f"{100 * lo / base:+.2f} % to {100 * hi / base:+.2f} %)")
    added = check + archive + rename
    print(f"  added operations alone: weights check {check:.3f} ms, end-of-archive check "
          f"{archive:.3f} ms, rename {rename:.3f} ms; sum {added:.3f} ms = "
          f"{100 * added / base:.2f} % of the base write")
    print(f"  verify on load (CRC-32 of every record): {verify:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
