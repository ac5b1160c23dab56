"""The suite's report: ``gpu-report.json`` (every figure, the machine and versions) and
``gpu-report.md`` (the same for reading: one section per part, its status and table)."""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
from pathlib import Path

import torch

STATUS_WORDS = {
    "passed": "passed", "measured": "measured", "failed": "FAILED", "error": "ERROR",
    "cut": "cut (ran out of its time budget; what it finished is below)",
}


def _nvidia_smi(query: str) -> str | None:
    try:
        out = subprocess.run(["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


CLOCKS = "driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.limit"


def clocks() -> str | None:
    """Driver, SM clock, its maximum, memory clock and power limit, as nvidia-smi reads them."""
    return _nvidia_smi(CLOCKS)


def machine(device: torch.device, root: Path) -> dict:
    """Versions, device and clocks."""
    info = {
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "python": platform.python_version(), "platform": platform.platform(),
        "torch": torch.__version__, "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
        "device": device.type,
    }
    try:
        import torchvision

        info["torchvision"] = torchvision.__version__
    except ImportError:
        info["torchvision"] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(device_name=props.name, capability=f"{props.major}.{props.minor}",
                    memory_gib=round(props.total_memory / 2**30, 1),
                    multiprocessors=props.multi_processor_count,
                    driver_and_clocks=clocks())
    else:
        info["device_name"] = platform.processor() or "cpu"
    try:
        info["git"] = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root,
                                     capture_output=True, text=True,
                                     timeout=5).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        info["git"] = None
    return info


def write(out_dir: Path, meta: dict, parts: list[dict]) -> tuple[Path, Path]:
    """Write both files; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "gpu-report.json"
    js.write_text(json.dumps({"meta": meta, "parts": parts}, indent=1, default=str))
    md = out_dir / "gpu-report.md"
    md.write_text(markdown(meta, parts))
    return md, js


def markdown(meta: dict, parts: list[dict]) -> str:
    name = meta.get("device_name") or meta["device"]
    lines = [
        "# sparsefw GPU suite report", "",
        f"- device: **{name}** ({meta['device']}"
        + (f", capability {meta['capability']}, {meta['memory_gib']} GiB" if "capability" in meta
           else "") + ")",
        f"- torch {meta['torch']} (CUDA {meta['cuda']}, cuDNN {meta['cudnn']}), torchvision "
        f"{meta['torchvision']}, Python {meta['python']}; sparsefw at git {meta.get('git')}",
        f"- driver, SM clock, max SM clock, memory clock, power limit: "
        f"{meta.get('driver_and_clocks') or '—'} (at the start); "
        f"{meta.get('clocks_after') or '—'} (at the end)",
        f"- command: `{meta['command']}`; budget {meta['budget_s']} s, used "
        f"{meta['wall_s']:.0f} s; date {meta['date']}",
        f"- verdict: **{meta['verdict']}**", "",
        "| part | status | budget s | wall s |", "|---|---|---|---|",
    ]
    for p in parts:
        lines.append(f"| {p['title']} | {STATUS_WORDS.get(p['status'], p['status'])} | "
                     f"{p['budget_s']} | {p['wall_s']} |")
    for p in parts:
        lines += ["", f"## {p['title']}", "", f"Status: **{STATUS_WORDS.get(p['status'])}**"
                  f" ({p['wall_s']} s of {p['budget_s']} s)", ""]
        if p.get("detail"):
            lines += ["```", p["detail"], "```", ""]
        for f in p["failures"]:
            lines.append(f"- FAILED: {f}")
        for n in p["notes"]:
            lines.append(f"- note: {n}")
        if p["failures"] or p["notes"]:
            lines.append("")
        lines += p["table"]
    return "\n".join(lines).rstrip() + "\n"
