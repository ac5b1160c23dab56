"""sparsefw's own compiled CPU kernels, built on first use.

Three kernels, in one extension module:

* the hard-masked SGD step (``masked_sgd.cpp``; the optimizer that drives it is
  :class:`sparsefw.kernels.masked_sgd.MaskedSGD`). torch has no optimizer kernel that also
  applies a mask, so a hard-masked step on the CPU otherwise makes one more pass over every
  masked gradient and its mask than a plain step (``g ← g ⊙ m``), which on a memory-bound model
  is most of the gap to the plain loop (``benchmarks/mask_pass.py``);
* compare-and-compact (``compact.cpp``): the pre-filter of the exact top-k selection of
  topology updates (:func:`sparsefw.topology.select_indices` on large CPU layers) in one pass
  over the scores and candidates instead of numpy's four; the selected entries are the same;
* zeroing at indices (``edits.cpp``): after a topology update, the weight and optimizer state
  of the entries it dropped, in one loop over the indices
  (:meth:`sparsefw.masks.MaskSet.zero_at`) instead of a gather, a compaction and a scatter per
  tensor.

The module is compiled with :func:`torch.utils.cpp_extension.load` the first time it is asked
for (a C++ compiler and the ``ninja`` build tool are needed: ``pip install "sparsefw[kernels]"``;
the build takes about 30 s on two cores and is cached in torch's extension directory,
``TORCH_EXTENSIONS_DIR`` or ``~/.cache/torch_extensions``, one build per Python environment:
:func:`module_name`). The sources include only the ATen headers they use, and the bindings
torch's pybind11 casters, not ``torch/extension.h`` (all of libtorch's C++ API): that keeps
the build at about 30 s instead of 80. Nothing imports or builds it unless a configuration asks
for it (``[sparsity] cpu_kernels = true``, or ``[optimizer] implementation = "fused_masked"``).
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import logging
import os
import platform
import shutil
import sys
import threading
from pathlib import Path
from types import ModuleType

import torch

__all__ = ["KernelUnavailable", "load_kernels", "unavailable", "module_name", "build_flags",
           "vector_width"]

HERE = Path(__file__).resolve().parent


class KernelUnavailable(RuntimeError):
    """A kernel of sparsefw's cannot be built or loaded here; the message says why."""


#: seconds of loading after which a build is announced on stderr
NOTICE_AFTER_S = 3.0
#: floats per vector of torch's CPU kernels, by the capability torch dispatches to
VECTOR_WIDTHS = {"AVX2": 8, "AVX512": 16}


def vector_width() -> int:
    """Floats per vector in torch's fused SGD kernel on this CPU (where its vector and scalar
    code round differently, see ``masked_sgd.cpp``). Only x86-64 with AVX2 or AVX-512 is
    supported (the kernel's bit-for-bit agreement with torch is checked there)."""
    machine = platform.machine().lower()
    capability = torch.backends.cpu.get_cpu_capability()
    if machine not in ("x86_64", "amd64") or capability not in VECTOR_WIDTHS:
        raise KernelUnavailable(f"sparsefw's CPU kernels are for x86-64 CPUs with AVX2 or AVX-512 "
                                f"(this is {machine}, torch's CPU capability {capability})")
    return VECTOR_WIDTHS[capability]


def build_flags() -> list[str]:
    """Compiler flags: optimised, no contraction into fused multiply-adds beyond the ones the
    kernel writes (its results must equal torch's fused SGD bit for bit), and the AVX2/FMA
    instructions of the CPUs :func:`vector_width` accepts."""
    vector_width()
    return ["-O3", "-ffp-contract=off", "-mavx2", "-mfma"]


#: the sources of the extension module, compiled together
SOURCES = ("masked_sgd.cpp", "compact.cpp", "edits.cpp", "bindings.cpp")


def module_name() -> str:
    """The extension's name: one per Python environment. torch keeps one build per name in
    its extension directory and rebuilds when the compile command changes, which another
    environment's include paths do; with one name for all, a development environment and a
    tox environment would rebuild each other's kernels in turn."""
    return f"sparsefw_kernels_{hashlib.sha256(sys.prefix.encode()).hexdigest()[:10]}"


@contextlib.contextmanager
def _without_cuda_notice():
    """torch's ``cpp_extension`` warns "No CUDA runtime is found" when it is imported on a
    machine with a CUDA toolkit but no GPU; these kernels are CPU code, so that record is
    dropped (any other record of that logger passes)."""
    log = logging.getLogger("torch.utils.cpp_extension")

    def keep(record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("No CUDA runtime is found")

    log.addFilter(keep)
    try:
        yield
    finally:
        log.removeFilter(keep)


@functools.cache
def load_kernels() -> ModuleType:
    """The compiled kernels (built on the first call of a process, or loaded from the
    extension cache); :class:`KernelUnavailable` with the reason where they cannot be."""
    with _without_cuda_notice():
        from torch.utils import cpp_extension

    _find_ninja()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        raise KernelUnavailable(f"sparsefw's CPU kernels need a C++ compiler ({compiler!r} "
                                f"not found; set CXX to one)")
    flags = build_flags()
    # a build takes about 30 s: say so if loading has not finished after a few seconds
    notice = threading.Timer(NOTICE_AFTER_S, print, args=(
        "sparsefw: building its CPU kernels on first use (about 30 s; cached in "
        "torch's extension directory afterwards)",), kwargs={"file": sys.stderr, "flush": True})
    notice.daemon = True
    notice.start()
    try:
        return cpp_extension.load(
            name=module_name(), sources=[str(HERE / f) for f in SOURCES],
            extra_cflags=flags, verbose=False)
    except Exception as exc:  # a compiler error, a stale or broken cache entry
        raise KernelUnavailable(f"sparsefw's CPU kernels failed to build: {exc}") from exc
    finally:
        notice.cancel()


def unavailable() -> str | None:
    """Why the kernels cannot be used here (they are built if they were not yet), or None."""
    try:
        load_kernels()
    except KernelUnavailable as exc:
        return str(exc)
    return None


def _find_ninja() -> None:
    """torch runs ``ninja`` from ``PATH``; the ``ninja`` Python package's copy (the
    ``kernels`` extra) is put there when the environment's own bin directory is not."""
    if shutil.which("ninja") is not None:
        return
    try:
        import ninja
    except ImportError:
        raise KernelUnavailable("sparsefw's CPU kernels are built with ninja, which is not "
                                'installed: pip install "sparsefw[kernels]" (or ninja)') from None
    os.environ["PATH"] = os.pathsep.join([ninja.BIN_DIR, os.environ.get("PATH", "")])
