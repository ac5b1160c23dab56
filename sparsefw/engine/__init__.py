"""The training engine: :class:`Trainer` and :func:`train` (imported on first use, so that the
lower floors — :mod:`sparsefw.engine.distributed`, checkpoints, the :class:`~sparsefw.Sparsifier`
— import without the Trainer)."""

from __future__ import annotations

__all__ = ["Trainer", "train", "resolve_device"]


def __getattr__(name: str):
    if name in __all__:
        from sparsefw.engine import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'sparsefw.engine' has no attribute {name!r}")
