"""``random_tokens``: a data set of uniformly random token ids for timing language models at a
real vocabulary size (GPT-2's 50,257) without a tokenizer or a download. ``x`` and ``y`` are
``(seq_len,)`` int64 windows; nothing in it is learnable, which timing does not need.
Registered by :mod:`gpu_parts.steptime` into the suite's own catalogue only."""

from __future__ import annotations

import attrs
import torch
from torch.utils.data import TensorDataset

from sparsefw.config import in_range
from sparsefw.data import DataSplits
from sparsefw.hookspecs import hookimpl


@attrs.frozen
class RandomTokensConfig:
    """Options of ``random_tokens``: split sizes, window length, vocabulary size, seed."""

    n_train: int = attrs.field(default=16, validator=in_range(0))
    n_test: int = attrs.field(default=8, validator=in_range(0))
    seq_len: int = attrs.field(default=64, validator=in_range(0))
    vocab: int = attrs.field(default=256, validator=in_range(1))
    seed: int = 0


def random_tokens(cfg: RandomTokensConfig) -> DataSplits:
    """Seeded random token windows (inputs and next-token targets alike random)."""
    gen = torch.Generator().manual_seed(cfg.seed)
    n = cfg.n_train + cfg.n_test
    ids = torch.randint(0, cfg.vocab, (n, 2, cfg.seq_len), generator=gen)
    x, y = ids[:, 0].contiguous(), ids[:, 1].contiguous()
    return DataSplits(
        train=TensorDataset(x[: cfg.n_train], y[: cfg.n_train]),
        test=TensorDataset(x[cfg.n_train:], y[cfg.n_train:]),
        num_classes=cfg.vocab, input_shape=(cfg.seq_len,), in_memory=True,
    )


@hookimpl
def sparsefw_register(registry):
    registry.add("dataset", "random_tokens", config=RandomTokensConfig, factory=random_tokens)
