"""Shared fixtures: hypothesis profiles, a catalogue with autoload off, a config builder, and the
device the device-aware tests run on (``--device cuda`` or ``SPARSEFW_TEST_DEVICE=cuda``; default
CPU)."""

from __future__ import annotations

import os

# torch.compile's C++ build imports setuptools; once the stdlib's distutils is imported (pip,
# tensorboard), setuptools' distutils shim asserts unless told to use the stdlib's (as tox does)
os.environ.setdefault("SETUPTOOLS_USE_DISTUTILS", "stdlib")

import pytest
from hypothesis import HealthCheck, settings

from sparsefw import config as config_mod
from sparsefw.config import merge_tables as merge
from sparsefw.plugins import load_catalogue

settings.register_profile(
    "ci",
    deadline=None,
    derandomize=True,
    database=None,
    print_blob=True,
    max_examples=30,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture],
)
settings.register_profile("dev", deadline=None, max_examples=15)
settings.register_profile("nightly", deadline=None, max_examples=500)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

#: a small, fast run: synthetic data, a 2-layer MLP, 2 epochs of 4 steps
TINY = {
    "seed": 0,
    "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64, "log_every": 2,
              "device": "cpu"},
    "data": {"name": "synthetic", "n_train": 64, "n_test": 32, "num_classes": 4,
             "input_shape": [8]},
    "model": {"name": "mlp", "hidden": [16]},
    "optimizer": {"name": "sgd", "lr": 0.1, "momentum": 0.9},
    "sparsity": {"density": 0.5, "distribution": "erk"},
    "mask_init": {"name": "random"},
    "logging": {"observers": ["jsonl"]},
}


def pytest_addoption(parser):
    parser.addoption(
        "--device", default=os.environ.get("SPARSEFW_TEST_DEVICE", "cpu"),
        help="device of the tests that take the `device` fixture and of every `make_config` run "
             "(cpu or cuda; default $SPARSEFW_TEST_DEVICE or cpu). On CUDA, deterministic "
             "algorithms are switched on (warn only) so that runs repeat bit for bit.",
    )


@pytest.fixture(scope="session")
def device(request):
    """The device under test (a ``torch.device``); CUDA without a GPU skips the test."""
    import torch

    dev = torch.device(request.config.getoption("--device"))
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            pytest.skip("--device cuda: no GPU on this machine")
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
        torch.use_deterministic_algorithms(True, warn_only=True)
    return dev


def kernels_or_skip() -> None:
    """Build (or load) sparsefw's CPU kernels; skip the calling tests where they cannot be
    built, unless ``SPARSEFW_REQUIRE_KERNELS=1`` (tox sets it: CI has a compiler and ninja, so
    a kernel that stopped compiling fails there instead of skipping its tests)."""
    from sparsefw import kernels

    reason = kernels.unavailable()
    if reason is None:
        return
    if os.environ.get("SPARSEFW_REQUIRE_KERNELS") == "1":
        pytest.fail(f"sparsefw's CPU kernels are required here (SPARSEFW_REQUIRE_KERNELS=1) "
                    f"but: {reason}")
    pytest.skip(f"sparsefw's CPU kernels are not available here: {reason}")


@pytest.fixture(scope="session")
def catalogue():
    """Built-in plugins only (entry points not loaded)."""
    return load_catalogue(autoload=False)


@pytest.fixture(scope="session")
def make_config(catalogue, device):
    """``make_config(**sections)`` -> (RunConfig, raw dict): :data:`TINY` on the ``device`` under
    test, with overrides."""
    on_device = merge(TINY, {"train": {"device": str(device)}})

    def build(**over):
        raw = merge(on_device, over)
        return config_mod.structure(raw, catalogue.registry, source="test.toml"), raw

    return build


def pytest_collection_modifyitems(config, items):
    """Tests marked ``gpu`` skip cleanly on machines without CUDA."""
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (no GPU on this machine)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)
