"""``sparsefw.integrations.huggingface``: sparse training of a tiny randomly initialised
LLaMA-style causal LM under ``transformers.Trainer`` (offline: built from a config class)."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")

from sparsefw.integrations.huggingface import STATE_FILE, SparsifierCallback  # noqa: E402
from sparsefw.sparsifier import SparsifierError  # noqa: E402


class TokenData(torch.utils.data.Dataset):
    def __init__(self, n=48, length=16, vocab=64, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(0, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def tiny_llama():
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                   num_hidden_layers=2, num_attention_heads=2,
                                   num_key_value_heads=2, max_position_embeddings=32)
    return transformers.LlamaForCausalLM(cfg)


def train(tmp_path, callback, *, steps=12, accumulation=1, save=False):
    args = transformers.TrainingArguments(
        output_dir=str(tmp_path), max_steps=steps, per_device_train_batch_size=4,
        gradient_accumulation_steps=accumulation, learning_rate=3e-3, report_to=[],
        save_strategy="steps" if save else "no", save_steps=6, logging_strategy="no",
        use_cpu=True, max_grad_norm=0.0, seed=0, disable_tqdm=True,
    )
    model = tiny_llama()
    trainer = transformers.Trainer(model=model, args=args, train_dataset=TokenData(),
                                   callbacks=[callback])
    trainer.train()
    return model


def test_two_four_srste_holds_the_pattern_exactly(tmp_path):
    cb = SparsifierCallback({
        "sparsity": {"kind": "forward", "density": 0.5, "distribution": "uniform",
                     "dense_layers": ["lm_head"]},
        "mask_init": {"name": "nm"},
        "topology_update": {"name": "nm", "n": 2, "m": 4, "every": 1, "end": 1.0},
        "gradient_correct": [{"name": "srste"}],
    })
    before = tiny_llama().state_dict()
    model = train(tmp_path, cb)
    sp = cb.sparsifier
    assert sp.state.step == 12
    assert len(sp.masks.names) == 14  # 7 linears per layer, lm_head dense
    for name in sp.masks.names:
        w = sp.masks.params[name].detach()
        groups = sp.masks.masks[name].view(w.shape[0], -1, 4)
        assert bool((groups.sum(-1) == 2).all()), name
        assert bool((w.view_as(groups)[~groups] == 0).all()), name  # finalised: w ⊙ m
        assert int((w != 0).sum()) == w.numel() // 2, name
        assert not torch.equal(w, before[name]), name  # it trained
    assert list(model.state_dict()) == list(before)  # keys unchanged


def test_rigl_at_80_percent_sparsity_keeps_the_density_exactly(tmp_path):
    cb = SparsifierCallback(density=0.2, topology={"name": "rigl", "every": 3, "end": 1.0},
                            dense_layers=["lm_head"])
    train(tmp_path, cb, accumulation=2, save=True)
    sp = cb.sparsifier
    assert sp.state.step == 12
    grown = sp.state.metrics.get("topology/grown")
    assert grown is not None and int(grown) > 0  # the topology did move
    total = sum(p.numel() for p in sp.masks.params.values())
    active = 0
    for name in sp.masks.names:
        w, m = sp.masks.params[name].detach(), sp.masks.masks[name]
        assert int(m.sum()) == sp.masks.targets[name], name
        assert bool((w[~m] == 0).all()), name
        active += int((w != 0).sum())
    assert active <= sum(sp.masks.targets.values())
    assert sum(sp.masks.targets.values()) / total == pytest.approx(0.2, abs=1e-3)
    saved = torch.load(tmp_path / "checkpoint-12" / STATE_FILE, weights_only=True)
    assert saved["step"] == 12 and set(saved["masks"]["masks"]) == set(sp.masks.names)


def test_a_component_needing_a_closure_is_refused(tmp_path):
    cb = SparsifierCallback({"perturb": [{"name": "sam"}]}, density=0.5)
    with pytest.raises(SparsifierError, match=r"perturb\[0\]:sam needs a closure"):
        train(tmp_path, cb, steps=1)
