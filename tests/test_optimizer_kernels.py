"""``[optimizer] implementation``: which of torch's update kernels the engine asks for, and that
each one trains to the same weights for plain momentum SGD up to rounding."""

from __future__ import annotations

import pytest
import torch

from sparsefw import config as config_mod
from sparsefw.config import ConfigError, OptimizerConfig
from sparsefw.engine.optim import build_optimizer, kernel_options

CPU = torch.device("cpu")


def test_auto_takes_fused_kernels_on_cpu():
    assert kernel_options("auto", CPU) == {"fused": True}
    opt = build_optimizer(OptimizerConfig(), [torch.zeros(3, requires_grad=True)], CPU)
    assert opt.defaults["fused"] is True


@pytest.mark.parametrize("impl, expected", [
    ("fused", {"fused": True}), ("foreach", {"foreach": True}), ("for_loop", {"foreach": False}),
])
@pytest.mark.parametrize("name", ["sgd", "adamw"])
def test_each_implementation_reaches_the_optimizer(impl, expected, name):
    cfg = OptimizerConfig(name=name, implementation=impl)
    opt = build_optimizer(cfg, [torch.zeros(3, requires_grad=True)], CPU)
    for key, value in expected.items():
        assert opt.defaults[key] is value


@pytest.mark.parametrize("impl", ["for_loop", "foreach"])
def test_the_kernels_agree_up_to_rounding(impl):
    def run(implementation):
        torch.manual_seed(0)
        model = torch.nn.Linear(16, 4)
        opt = build_optimizer(OptimizerConfig(lr=0.1, implementation=implementation),
                              model.parameters(), CPU)
        x, y = torch.randn(32, 16), torch.randint(0, 4, (32,))
        for _ in range(20):
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
        return model.weight.detach()

    torch.testing.assert_close(run("fused"), run(impl), rtol=1e-5, atol=1e-6)


def test_an_unknown_implementation_names_the_choices(catalogue):
    with pytest.raises(ConfigError) as info:
        config_mod.structure({"optimizer": {"implementation": "cuda_graphs"}},
                             catalogue.registry, source="run.toml")
    msg = str(info.value)
    assert "run.toml" in msg and "[optimizer] implementation" in msg
    assert all(c in msg for c in ("auto", "fused", "foreach", "for_loop"))
