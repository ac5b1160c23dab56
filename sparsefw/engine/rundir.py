"""The run directory and its ``run.json``: resolved config, plugins with versions, seed, git
revision and library versions.

A run directory belongs to one run. An automatic one, ``out_dir/<name>-<time>``, is created with
an exclusive ``mkdir`` (a collision, such as two runs started in the same second, takes the next
free ``-2``, ``-3``, … suffix); its name is sanitised so it always lies inside ``out_dir``. The
CLI's ``--run-dir`` must be new or empty and is claimed with :func:`claim` (an exclusive create
of :data:`CLAIM`), so two runs never share a directory; ``--resume`` reopens a run's directory
after checking that nothing about the code or config changed (:func:`resume_differences`).
"""

from __future__ import annotations

import functools
import json
import os
import platform
import re
import subprocess
import time
from pathlib import Path
from typing import Any

import torch

from sparsefw.config import RunConfig, to_dict
from sparsefw.engine.checkpoint import write_json

RUN_INFO = "run.json"
#: created exclusively when a run claims its directory
CLAIM = ".sparsefw-run"
#: longest run-directory stem taken from ``[train] name`` or the config file name
MAX_STEM = 64


class RunDirError(ValueError):
    """A run directory that cannot be used: taken by another run, or not a run at all."""


def sanitise(name: str) -> str:
    """``name`` as one safe path component: characters other than letters, digits, ``.``,
    ``_``, ``+`` and ``-`` become ``_``; no leading dot or dash; at most :data:`MAX_STEM`
    characters; never empty."""
    clean = re.sub(r"[^A-Za-z0-9._+-]", "_", name)[:MAX_STEM].lstrip(".-")
    return clean or "run"


def claim(path: str | Path) -> Path:
    """Make ``path`` this run's directory: it must be new or empty, and of two processes
    claiming it at once one gets :class:`RunDirError` (the claim is an exclusive create)."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        taken = sorted(p.name for p in path.iterdir())
    except OSError as exc:
        raise RunDirError(f"run directory {path}: {exc.strerror or exc}") from None
    if taken:
        shown = ", ".join(taken[:5]) + (", …" if len(taken) > 5 else "")
        raise RunDirError(f"run directory {path} is not empty ({shown}): choose a new one, or "
                          f"continue the run there with --resume {path}")
    try:
        os.close(os.open(path / CLAIM, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        raise RunDirError(f"run directory {path} was just claimed by another run") from None
    return path


def _new_run_dir(out_dir: Path, stem: str) -> Path:
    base = f"{stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for i in range(1, 10_000):
        path = out_dir / (base if i == 1 else f"{base}-{i}")
        try:
            path.mkdir()
        except FileExistsError:
            continue
        return path
    raise RunDirError(f"{out_dir}: no free run directory name for {base}")


def make_run_dir(cfg: RunConfig, run_dir: str | Path | None, source: str, ctx=None) -> Path:
    """``run_dir`` (created if needed) if given, else a new, exclusively created
    ``out_dir/<name or config stem>-<timestamp>[-N]``. In a multi-process job rank 0 decides
    and every rank gets its directory."""
    main = ctx is None or not ctx.enabled or ctx.is_main
    path = None
    if main:
        if run_dir is None:
            stem = sanitise(cfg.train.name or Path(source).stem or "run")
            path = _new_run_dir(Path(cfg.train.out_dir), stem)
        else:
            path = Path(run_dir)
            path.mkdir(parents=True, exist_ok=True)
    if ctx is not None and ctx.enabled:
        import torch.distributed as dist

        box = [None if path is None else str(path)]
        dist.broadcast_object_list(box, src=0)
        path = Path(box[0])
    return path


@functools.cache
def git_revision() -> str | None:
    """The git commit of the sparsefw source this process runs, when it runs from a git
    checkout of sparsefw (an installed copy has none: its version says which it is)."""
    package = Path(__file__).resolve().parent.parent
    try:
        subprocess.run(["git", "-C", str(package), "ls-files", "--error-unmatch", "__init__.py"],
                       capture_output=True, timeout=5, check=True)
        out = subprocess.run(["git", "-C", str(package), "rev-parse", "HEAD"],
                             capture_output=True, text=True, timeout=5, check=True)
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def versions() -> dict[str, str]:
    """The versions recorded in ``run.json`` and compared on resume."""
    from sparsefw import __version__

    return {"sparsefw": __version__, "torch": torch.__version__,
            "python": platform.python_version()}


def component_records(cfg: RunConfig, catalogue) -> list[dict[str, str]]:
    """``{key, source, version}`` of every component ``cfg`` selects, as ``run.json`` lists
    them."""
    from sparsefw.plugins import selected

    out = []
    for prefix, slot, sel in selected(cfg):
        entry = catalogue.registry.get(slot, sel.name)
        key = f"{prefix}:{sel.name}" if slot != "observer" else f"observer:{sel.name}"
        out.append({"key": key, "source": entry.source, "version": entry.version})
    return out


def write_run_info(run_dir: Path, cfg: RunConfig, raw: dict | None, catalogue) -> None:
    """Write ``run.json`` atomically."""
    write_json(
        run_dir / RUN_INFO,
        {
            "config": to_dict(cfg),
            "raw_config": raw,
            "seed": cfg.seed,
            "plugins": component_records(cfg, catalogue),
            "git_revision": git_revision(),
            "versions": versions(),
        },
    )


def read_run_info(run_dir: str | Path, *, missing_ok: bool = False) -> dict[str, Any]:
    """``run_dir``'s ``run.json``; :class:`RunDirError` naming the file when it is missing
    (``missing_ok``: an empty dict instead) or not what the engine writes."""
    path = Path(run_dir) / RUN_INFO
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        if missing_ok:
            return {}
        raise RunDirError(f"{path}: not found ({run_dir} is not a run directory?)") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RunDirError(f"{path} cannot be read: {exc}") from None
    if not isinstance(info, dict) or not isinstance(info.get("raw_config"), dict):
        raise RunDirError(f"{path}: not a run.json written by sparsefw (no raw_config table)")
    return info


def _differences(then: Any, now: Any, where: str = "") -> list[str]:
    """``key: run X, now Y`` for every leaf where two plain-data trees differ."""
    if isinstance(then, dict) and isinstance(now, dict):
        out = []
        for k in [*then, *(k for k in now if k not in then)]:
            out += _differences(then.get(k), now.get(k), f"{where}.{k}" if where else str(k))
        return out
    if then != now:
        return [f"{where or '(top)'}: run {json.dumps(then)[:80]}, now {json.dumps(now)[:80]}"]
    return []


def resume_differences(info: dict[str, Any], cfg: RunConfig, catalogue) -> list[str]:
    """What differs between the run recorded in ``info`` and this process resuming it with
    ``cfg``: the resolved config, the sparsefw revision, library versions and component
    versions. Empty when the resume reproduces the run."""
    out = []
    recorded = info.get("config")
    if recorded is not None:
        now = json.loads(json.dumps(to_dict(cfg), default=str))
        out.extend(f"config {d}" for d in _differences(recorded, now)[:10])
    rev = git_revision()
    if info.get("git_revision") and rev and info["git_revision"] != rev:
        out.append(f"sparsefw git revision: run {info['git_revision'][:12]}, now {rev[:12]}")
    then = info.get("versions") or {}
    for lib, now in versions().items():
        if lib != "python" and then.get(lib) not in (None, now):
            out.append(f"{lib} version: run {then[lib]}, now {now}")
    old = {p.get("key"): p for p in info.get("plugins") or [] if isinstance(p, dict)}
    for rec in component_records(cfg, catalogue):
        before = old.get(rec["key"])
        if before is not None and (before.get("source"), before.get("version")) != (
                rec["source"], rec["version"]):
            out.append(f"component {rec['key']}: run {before.get('source')} "
                       f"{before.get('version')}, now {rec['source']} {rec['version']}")
    return out
