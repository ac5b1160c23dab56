"""``text``: a character-level language-modelling data set built from real English text that ships
with every CPython (``pydoc_data.topics``, the Python documentation's help topics), so it works
offline with no download.

The topics are concatenated in sorted key order (separated by a blank line). The first
``1 − test_fraction`` of the characters is the training split, the rest the test split. The
vocabulary is index 0 for characters unseen in training, then the training split's distinct
characters in code-point order (deterministic). Samples are fixed-length windows: inputs
``x = ids[i : i+T]`` and targets ``y = ids[i+1 : i+T+1]`` (next character at every position),
windows starting every ``stride`` characters. ``input_shape = (T,)``, ``num_classes`` = vocabulary
size; inputs are int64 token ids (see :mod:`sparsefw.models.gpt` for the logits convention).
"""

from __future__ import annotations

import functools

import attrs
import torch
from torch.utils.data import TensorDataset

from sparsefw.config import in_range
from sparsefw.data import DataSplits


def _opt_pos(_inst, attribute, value):
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ValueError(f"{attribute.name} must be a positive integer or unset, got {value!r}")


@attrs.frozen
class TextConfig:
    """Options of ``text``: window length ``seq_len``, ``stride`` between training windows
    (unset: ``seq_len``), held-out ``test_fraction``, and ``max_chars`` to use only the start of
    the corpus (unset: all of it, about 465k characters)."""

    #: characters per window (the model predicts each next character)
    seq_len: int = attrs.field(default=64, validator=in_range(0))
    #: characters between the starts of training windows (unset: ``seq_len``)
    stride: int | None = attrs.field(default=None, validator=_opt_pos)
    #: fraction of the corpus, from its end, held out as the test split
    test_fraction: float = attrs.field(default=0.1, validator=in_range(0, 1, hi_open=True))
    #: use only the first ``max_chars`` characters (unset: the whole corpus)
    max_chars: int | None = attrs.field(default=None, validator=_opt_pos)


@functools.cache
def corpus() -> str:
    """The whole corpus as one string (deterministic)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[k] for k in sorted(topics))


def vocabulary(train_text: str) -> list[str]:
    """Index -> character; index 0 (``"\\x00"``) stands for characters unseen in training."""
    return ["\x00", *sorted(set(train_text) - {"\x00"})]


def split_text(cfg: TextConfig) -> tuple[str, str]:
    """The training and test character strings."""
    text = corpus()
    if cfg.max_chars is not None:
        text = text[: cfg.max_chars]
    cut = int(len(text) * (1 - cfg.test_fraction))
    return text[:cut], text[cut:]


def encode(text: str, vocab: list[str]) -> torch.Tensor:
    """Characters to int64 ids (unknown characters -> 0)."""
    index = {c: i for i, c in enumerate(vocab)}
    return torch.tensor([index.get(c, 0) for c in text], dtype=torch.int64)


def decode(ids: torch.Tensor, vocab: list[str]) -> str:
    """Ids back to characters."""
    return "".join(vocab[i] for i in ids.tolist())


def windows(ids: torch.Tensor, seq_len: int, stride: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Inputs and next-character targets of every window, each ``(n, seq_len)``."""
    if ids.numel() < seq_len + 1:
        raise ValueError(f"text: {ids.numel()} characters are too few for windows of {seq_len}")
    x = ids[:-1].unfold(0, seq_len, stride)
    y = ids[1:].unfold(0, seq_len, stride)
    return x.contiguous(), y.contiguous()


def text(cfg: TextConfig) -> DataSplits:
    """Character-level English text (Python's help topics, offline), fixed-length windows."""
    train_text, test_text = split_text(cfg)
    vocab = vocabulary(train_text)
    tx, ty = windows(encode(train_text, vocab), cfg.seq_len, cfg.stride or cfg.seq_len)
    vx, vy = windows(encode(test_text, vocab), cfg.seq_len, cfg.seq_len)
    return DataSplits(
        train=TensorDataset(tx, ty), test=TensorDataset(vx, vy), num_classes=len(vocab),
        input_shape=(cfg.seq_len,), in_memory=True,
    )
