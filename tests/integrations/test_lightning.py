"""``sparsefw.integrations.lightning``: a small classifier trained by ``lightning.Trainer``
with RigL + S²-SAM through the callback."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

L = pytest.importorskip("lightning")

from sparsefw.integrations.lightning import SparsifierCallback  # noqa: E402


class Classifier(L.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(16, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 64), torch.nn.ReLU(),
                                       torch.nn.Linear(64, 4))

    def forward(self, x):
        return self.net(x)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.cross_entropy(self(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def loader():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(128, 16, generator=g)
    y = (x[:, :4].argmax(1)).long()
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


def fit(callback, *, steps=16, accumulation=1, ckpt_path=None, root=None):
    torch.manual_seed(0)
    module = Classifier()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, accumulate_grad_batches=accumulation,
                        callbacks=[callback],
                        default_root_dir=root)
    trainer.fit(module, loader(), ckpt_path=ckpt_path)
    return module, trainer


def test_rigl_with_s2sam_keeps_the_density_and_perturbs():
    cb = SparsifierCallback({"perturb": [{"name": "s2sam", "rho": 0.05}]}, density=0.2,
                            topology={"name": "rigl", "every": 4, "end": 1.0})
    module, _ = fit(cb)
    sp = cb.sparsifier
    assert sp.state.step == 16
    grown = sp.state.metrics.get("topology/grown")
    assert grown is not None and int(grown) > 0
    for name in sp.masks.names:
        w, m = sp.masks.params[name].detach(), sp.masks.masks[name]
        assert int(m.sum()) == sp.masks.targets[name], name
        assert bool((w[~m] == 0).all()), name
    total = sum(p.numel() for p in sp.masks.params.values())
    assert sum(sp.masks.targets.values()) / total == pytest.approx(0.2, abs=1e-3)
    # S²-SAM ran: its kept gradient is there for the next step
    s2sam = next(c.instance for c in sp.plugins.components if c.name == "s2sam")
    assert s2sam.last is not None


def test_checkpoint_resume_continues_like_the_uninterrupted_run(tmp_path):
    def callback():
        return SparsifierCallback(density=0.2, topology={"name": "rigl", "every": 4, "end": 1.0},
                                  total_steps=16)

    # to step 9: step 8 (the first after resuming) is a topology update. Further on, a plain
    # Lightning run resumed from a checkpoint taken when fit stopped is not bit-identical to
    # the uninterrupted one either (its loop's own resume semantics), with or without sparsefw
    whole, _ = fit(callback(), steps=9, root=tmp_path / "whole")
    first = callback()
    _, trainer = fit(first, steps=8, root=tmp_path / "first")
    path = tmp_path / "mid.ckpt"
    trainer.save_checkpoint(path)
    again = callback()
    resumed, _ = fit(again, steps=9, ckpt_path=str(path), root=tmp_path / "again")
    assert again.sparsifier.state.step == 9
    for (n, a), (_, b) in zip(whole.state_dict().items(), resumed.state_dict().items(),
                              strict=True):
        assert torch.equal(a, b), n
