"""Part 2 — the quickstart recipe (``configs/quickstart.toml``) trained on the device and on the
CPU in the same process: the device's final test accuracy must be within one point (0.01) of
the CPU's. ``--tiny`` trains 2 epochs instead of 30."""

from __future__ import annotations

import time

from sparsefw import config as config_mod
from sparsefw.engine import Trainer
from sparsefw.plugins import load_catalogue

from gpu_parts.budget import PartContext

#: largest allowed |device accuracy − CPU accuracy|
TOLERANCE = 0.01


def train(ctx: PartContext, catalogue, device: str) -> dict:
    """One quickstart run on ``device``: final metrics and wall time."""
    overrides = [f"train.device={device}", 'logging.observers=["jsonl"]']
    if ctx.tiny:
        overrides.append("train.epochs=2")
    path = ctx.root / "configs" / "quickstart.toml"
    cfg, raw = config_mod.load(path, catalogue.registry, overrides)
    t0 = time.perf_counter()
    trainer = Trainer(cfg, catalogue, run_dir=ctx.work_dir / f"quickstart-{device}",
                      raw_config=raw)
    metrics = trainer.fit()
    return {"device": device, "test_acc": metrics["test/acc"], "test_loss": metrics["test/loss"],
            "steps": trainer.state.step, "wall_s": time.perf_counter() - t0,
            "density": trainer.masks.summary().get("density")}


def run(ctx: PartContext) -> None:
    catalogue = load_catalogue(autoload=False)
    runs = {}
    for device in ("cpu", ctx.device.type):
        ctx.check(f"the {device} run")
        runs[device] = train(ctx, catalogue, device)
    ctx.figures["runs"] = runs
    cpu, dev = runs["cpu"], runs[ctx.device.type]
    gap = dev["test_acc"] - cpu["test_acc"]
    ctx.figures.update(accuracy_gap=gap, tolerance=TOLERANCE)
    ctx.lines += ["| run | test acc | test loss | steps | wall s |", "|---|---|---|---|---|"]
    for name, r in (("cpu", cpu), (ctx.device.type, dev)):
        ctx.lines.append(f"| {name} | {r['test_acc']:.4f} | {r['test_loss']:.4f} | "
                         f"{r['steps']} | {r['wall_s']:.1f} |")
    ctx.lines.append("")
    ctx.lines.append(f"- device − CPU accuracy: {gap:+.4f} (allowed ±{TOLERANCE})")
    if abs(gap) > TOLERANCE:
        ctx.fail(f"quickstart on {ctx.device.type}: accuracy {dev['test_acc']:.4f} is not "
                 f"within {TOLERANCE} of the CPU's {cpu['test_acc']:.4f}")
