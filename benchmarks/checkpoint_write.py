#!/usr/bin/env python
"""What the reliability checks add to writing a checkpoint, on the quickstart run.

Times ``Trainer.save_checkpoint()`` as it is (``new``: the finiteness check of the weights and
the divergence flags, ``torch.save`` to a temporary file, checking that it ends with the zip
end record, fsync, keeping the replaced file as ``checkpoint.prev.pt``, fsync of the
directory) against the write without those checks
(``base``: the same payload, ``torch.save`` to a temporary file, fsync, one rename, fsync of the
directory: what the engine did before). The integrity checksums cost nothing here: they are the
CRC-32s ``torch.save`` writes into every zip record anyway (verified on load, timed apart).
The two are interleaved over many repeats, each write after an (untimed) training step as in a
run, so that machine load spreads over both; each figure is a median. The fsync that both include dominates and varies with the load of the machine, so
the added operations are also timed on their own (the weights check, the end-of-archive check,
the extra rename) and their sum is given as a share of the base write: that figure is
steady where the end-to-end difference is not.

    python benchmarks/checkpoint_write.py [--repeats 400] [--dir runs/bench-ckpt]
"""

from __future__ import annotations

import argparse
import os
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


def _base_save(trainer: Trainer) -> None:
    """The write without the new checks (the payload built exactly as save_checkpoint does)."""
    guard, keep = trainer.guard.check_weights, checkpoint.save
    trainer.guard.check_weights = lambda *a, **k: None
    checkpoint.save = lambda path, payload: checkpoint.atomic_write(
        path, lambda f: torch.save(payload, f))
    try:
        trainer.save_checkpoint()
    finally:
        trainer.guard.check_weights, checkpoint.save = guard, keep


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--repeats", type=int, default=400)
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
    variants = {"base": lambda: _base_save(trainer), "new": trainer.save_checkpoint}
    times: dict[str, list[float]] = {k: [] for k in variants}
    for i in range(args.repeats + 20):
        for name, fn in (variants.items() if i % 2 else reversed(variants.items())):
            trainer.step(x, y)  # as in a run, a write follows computation (untimed)
            t = time.perf_counter()
            fn()
            if i >= 20:  # warm-up
                times[name].append(time.perf_counter() - t)
    paired = statistics.median(n - b for n, b in zip(times["new"], times["base"], strict=True))
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
    base, new = (statistics.median(times[k]) * 1e3 for k in ("base", "new"))
    print(f"quickstart checkpoint: {size / 1024:.0f} KiB, {args.repeats} interleaved repeats")
    print(f"  base write  {base:.3f} ms (median)")
    print(f"  new write   {new:.3f} ms (median)")
    print(f"  overhead    {new - base:+.3f} ms = {100 * (new - base) / base:+.2f} % (difference of "
          f"medians); median of paired differences {paired * 1e3:+.3f} ms = "
          f"{100 * paired * 1e3 / base:+.2f} %")
    added = check + archive + rename
    print(f"  added operations alone: weights check {check:.3f} ms, end-of-archive check "
          f"{archive:.3f} ms, rename {rename:.3f} ms; sum {added:.3f} ms = "
          f"{100 * added / base:.2f} % of the base write")
    print(f"  verify on load (CRC-32 of every record): {verify:.3f} ms")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
