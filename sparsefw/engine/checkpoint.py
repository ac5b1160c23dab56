"""Checkpoint files: atomic writes, the kept previous checkpoint, integrity checks and safe
loading; plus RNG state capture.

Writing. A checkpoint is written to a temporary file in the same directory and flushed; the
kernel is asked to start writing it to disk, and while it does, the file is verified to be a
complete archive (it ends with the zip directory that torch writes last, after every record and
its checksum) and the caller's own check runs (the trainer's: the weights are finite). Then the
file is fsynced; only then does the current checkpoint move aside to ``checkpoint.prev.pt`` and
the new file take its name (``os.replace``, atomic on POSIX), and the directory is fsynced. A
crash or a kill at any point leaves complete checkpoints only: the current one, the previous one,
or (killed between the two renames) the previous one alone, which :func:`resume_path` then picks.
A failed write (disk full, file-size limit, read-only file system) raises
:class:`CheckpointWriteError` naming the cause, and leaves the existing checkpoints as they were.

Integrity. ``torch.save`` writes a zip archive in which every record (the pickled structure and
each tensor's bytes) carries a CRC-32 of its contents, computed while writing at no extra cost.
:func:`verify` recomputes every one of them on load, so a truncated, zeroed or partly overwritten
file is refused with an error that names the file and the previous checkpoint kept beside it.

Safe loading. Everything is read with ``torch.load(weights_only=True)``: tensors, numbers,
strings and containers, plus the types in :data:`SAFE_GLOBALS`. A checkpoint that names any other
global (a class or function the unpickler would import and call, which is how a crafted file runs
code) is refused with :class:`UntrustedCheckpoint`. ``trust=True`` (the CLI's
``--trust-checkpoint``) restores the old unrestricted ``pickle`` behaviour and is unsafe: use it
only for files you made yourself.
"""

from __future__ import annotations

import json
import os
import pickle
import tempfile
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

CHECKPOINT = "checkpoint.pt"
#: the checkpoint before the current one, kept beside it
PREVIOUS = "checkpoint.prev.pt"
#: globals a weights-only load may meet beyond torch's own allow-list (none today: every
#: checkpoint the engine and the built-in plugins write holds tensors and plain data only; a
#: plugin whose state needs a class of its own adds it here)
SAFE_GLOBALS: list[Any] = []
#: what :func:`atomic_write` names its temporary files: ``.<name>.<random>.tmp``
TEMP_SUFFIX = ".tmp"


class CheckpointError(Exception):
    """A checkpoint that is missing, unreadable, corrupted or not this run's."""


class UntrustedCheckpoint(CheckpointError):
    """A checkpoint that needs more than tensors and plain data to load."""


class CheckpointWriteError(OSError):
    """Writing a checkpoint failed; the checkpoints already there are untouched."""


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _start_writeback(f) -> None:
    """Ask the kernel to start writing ``f``'s dirty pages to disk now (Linux
    ``posix_fadvise(DONTNEED)`` starts the write-back without waiting for it), so that checks
    run while the bytes travel and the ``fsync`` after them waits less."""
    advise = getattr(os, "posix_fadvise", None)
    if advise is not None:
        advise(f.fileno(), 0, 0, os.POSIX_FADV_DONTNEED)


def atomic_write(path: str | Path, write, *, keep: str | Path | None = None,
                 check=None) -> None:
    """Call ``write(fileobj)`` on a temporary file, then atomically rename it to ``path``.
    ``check(fileobj)``, if given, runs on the written temporary file (open for reading too,
    before it is fsynced, while its write-back to disk is under way) and may raise to abandon
    it. With ``keep``, an existing ``path`` is first renamed to ``keep`` (after the new file
    is complete, fsynced and checked, so ``keep`` is only ever replaced by a complete older
    file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as f:
            write(f)
            f.flush()
            if check is not None:
                _start_writeback(f)
                check(f)
            os.fsync(f.fileno())
        if keep is not None:
            try:
                os.replace(path, keep)
            except FileNotFoundError:  # the first write: nothing to keep
                pass
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def remove_stale_temps(directory: str | Path) -> list[Path]:
    """Delete the temporary files :func:`atomic_write` leaves when a process is killed while
    writing; returns what was removed. Call it only while no other process writes there."""
    removed = []
    for p in Path(directory).glob(f".*{TEMP_SUFFIX}"):
        if p.is_file():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _os_cause(exc: BaseException) -> OSError | None:
    """The ``OSError`` behind ``exc`` (torch reports a failed write of its zip writer as a
    ``RuntimeError`` whose context is the file's own error)."""
    seen = set()
    while exc is not None and id(exc) not in seen:
        if isinstance(exc, OSError):
            return exc
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return None


#: the last record of a zip archive (torch writes no archive comment): its signature sits
#: 22 bytes before the end of a complete ``torch.save`` file
_END_OF_ARCHIVE = b"PK\x05\x06"


def _complete_archive(f) -> None:
    """Raise ``OSError`` unless the file ``f`` ends as a complete ``torch.save`` archive does:
    with the end record of its zip directory, which torch writes after every record and
    checksum (reads 22 bytes; :func:`verify` checks the records themselves on load)."""
    if f.seek(0, os.SEEK_END) >= 22:
        f.seek(-22, os.SEEK_END)
    tail = f.read(4)
    if tail != _END_OF_ARCHIVE:
        raise OSError("the new file did not verify: it does not end as a complete archive")


class _Refused(Exception):
    """Carries what a caller's ``verify`` raised through :func:`save`'s error translation."""


def save(path: str | Path, payload: dict[str, Any], *, keep_previous: bool = True,
         verify: Callable[[], None] | None = None) -> None:
    """Atomically ``torch.save`` ``payload`` to ``path`` once the new file verifies as a
    complete archive and ``verify()`` (the caller's own check, e.g. that the weights are
    finite; run while the file is written back to disk) returns; what ``verify`` raises
    propagates unchanged and nothing is replaced. The file it replaces becomes
    ``checkpoint.prev.pt`` beside it (``keep_previous``)."""
    path = Path(path)
    keep = path.with_name(PREVIOUS) if keep_previous else None

    def check(f) -> None:
        _complete_archive(f)
        if verify is not None:
            try:
                verify()
            except Exception as exc:
                raise _Refused() from exc

    try:
        atomic_write(path, lambda f: torch.save(payload, f), keep=keep, check=check)
    except _Refused as refused:
        raise refused.__cause__ from None
    except (OSError, RuntimeError) as exc:
        cause = _os_cause(exc)
        why = (f"{cause.strerror or cause}" if cause is not None else str(exc).splitlines()[0])
        kept = " (the checkpoints already there are unchanged)" if path.exists() else ""
        raise CheckpointWriteError(f"could not write checkpoint {path}: {why}{kept}") from exc


def _offer_previous(path: Path) -> str:
    prev = path.with_name(PREVIOUS)
    if path.name == CHECKPOINT and prev.exists():
        return (f"; the previous checkpoint is kept beside it: to continue from there, "
                f"mv {prev} {path}")
    return ""


def verify(path: str | Path) -> None:
    """Check that ``path`` is a complete checkpoint whose every record matches its CRC-32;
    raise :class:`CheckpointError` naming the file (and the kept previous one) if not."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no checkpoint there")
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated, zeroed or not "
                              f"written by torch.save: {exc}){_offer_previous(path)}") from None
    if bad is not None:
        raise CheckpointError(f"{path} is corrupted: its record {bad!r} does not match the "
                              f"checksum written with it{_offer_previous(path)}")


def load(path: str | Path, map_location: torch.device | str = "cpu", *,
         trust: bool = False) -> dict[str, Any]:
    """Verify and load a checkpoint written by :func:`save` (or any ``torch.save`` file whose
    top level is a dict). Weights-only unless ``trust`` (unsafe: runs any code the file
    names)."""
    path = Path(path)
    verify(path)
    try:
        if trust:
            payload = torch.load(path, map_location=map_location, weights_only=False)
        else:
            with torch.serialization.safe_globals(SAFE_GLOBALS):
                payload = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UntrustedCheckpoint(
            f"{path} was refused: it needs more than tensors and plain data to load, and "
            f"unpickling it could run code ({first[:200]}). Load it only if you made it "
            f"yourself, with --trust-checkpoint (unsafe)") from None
    except Exception as exc:  # torch reports unreadable archives with many types
        raise CheckpointError(f"{path} cannot be read: {str(exc)[:300]}"
                              f"{_offer_previous(path)}") from None
    if not isinstance(payload, dict):
        raise CheckpointError(f"{path}: expected a checkpoint dict, found "
                              f"{type(payload).__name__}")
    return payload


#: what every training checkpoint holds (``Trainer.save_checkpoint``)
TRAINING_KEYS = ("step", "epoch", "model", "optimizer", "lr_schedule", "scaler", "masks",
                 "plugins", "rng", "acc", "passes")


def check_payload(path: str | Path, payload: dict[str, Any], model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointError` unless ``payload`` is a training checkpoint whose model
    state fits ``model`` (same parameter and buffer names and shapes)."""
    missing = [k for k in TRAINING_KEYS if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not a sparsefw training checkpoint (it lacks "
                              f"{', '.join(missing)})")
    saved, own = payload["model"], model.state_dict()
    if not isinstance(saved, dict):
        raise CheckpointError(f"{path}: its model entry is not a state dict")
    problems = [f"missing {k}" for k in own if k not in saved]
    problems += [f"unexpected {k}" for k in saved if k not in own]
    problems += [f"{k} has shape {tuple(getattr(saved[k], 'shape', ()))}, the model "
                 f"{tuple(v.shape)}" for k, v in own.items()
                 if k in saved and getattr(saved[k], "shape", None) != v.shape]
    if problems:
        shown = "; ".join(problems[:4]) + ("; …" if len(problems) > 4 else "")
        raise CheckpointError(f"{path} was written for a different model: {shown}")


def resume_path(run_dir: str | Path, current: str = CHECKPOINT,
                previous: str = PREVIOUS) -> Path:
    """The checkpoint a resume of ``run_dir`` reads: ``current`` (``checkpoint.pt``), or the
    kept ``previous`` one when a kill fell between the two renames of a write and left only
    that. (A distributed checkpoint passes its directory names.)"""
    run_dir = Path(run_dir)
    now, prev = run_dir / current, run_dir / previous
    if not now.exists() and prev.exists():
        return prev
    if not now.exists():
        raise CheckpointError(f"{run_dir}: no {current} there (did the run write one?)")
    return now


def write_json(path: str | Path, data: Any) -> None:
    """Atomically write ``data`` as indented JSON."""
    text = json.dumps(data, indent=2, sort_keys=False, default=str).encode()
    atomic_write(path, lambda f: f.write(text))


def rng_states(generator: torch.Generator) -> dict[str, Any]:
    """The global CPU/CUDA RNG states and the run's plugin generator."""
    out = {"cpu": torch.get_rng_state(), "generator": generator.get_state()}
    if torch.cuda.is_available():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def set_rng_states(states: dict[str, Any], generator: torch.Generator) -> None:
    """Restore what :func:`rng_states` captured."""
    torch.set_rng_state(states["cpu"])
    generator.set_state(states["generator"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])
