"""sparsefw: sparse neural-network training with every method decision as a pluggy hook.

``sparsefw.Sparsifier`` runs any configured method inside a user's own training loop (imported
on first use, so that ``import sparsefw`` stays light)."""

__version__ = "0.1.0"

from sparsefw.hookspecs import hookimpl  # noqa: E402

__all__ = ["__version__", "hookimpl", "Sparsifier", "SparsifierError"]


def __getattr__(name: str):
    if name in ("Sparsifier", "SparsifierError"):
        from sparsefw import sparsifier

        return getattr(sparsifier, name)
    raise AttributeError(f"module 'sparsefw' has no attribute {name!r}")
