"""No host synchronisation in the training step outside the logging interval.

``torch.Tensor`` methods that read a tensor back to the host (``item``, ``tolist``, ``cpu``,
``__bool__``, ``__float__``, ``__int__``, ``__index__``) and those that print one
(``__repr__``, ``__format__``) are wrapped by a counter. ``numpy`` is not among them: it exists
for CPU tensors only (a zero-copy view, the CPU-only paths of large layers and small CPU
selections use it); on a device tensor the ``cpu()`` it needs first is what is counted. A call counts when the code that made it
is sparsefw's (a module of ``sparsefw`` or ``sparsefw_plugins``):

* **direct** — the calling frame itself is sparsefw code (``loss.item()``, ``if t:``,
  ``float(t)``, ``print(t)`` in the engine or a plugin);
* **via torch** — a torch function called from sparsefw code made it (the nearest frame outside
  ``torch`` is sparsefw's). On CPU some torch internals read scalars legitimately, so these are
  reported with their location; the GPU test below is the strict check for them.

What is allowed, per step (the step is ``Trainer.step``: schedule, perturb, forward/backward,
topology update, gradient correction, optimizer, ``step_end`` observers):

* a regular step: **no** sync at all, direct or via torch;
* a logging step (``step % log_every == 0``): only the engine's metric read in
  ``Trainer._read_train_metrics`` (one batched ``tolist``);
* a topology update step: at most **one** sync (a single batched read, e.g. DSR's threshold
  bookkeeping); the drop/grow selection itself keeps its counts on the device.

Epoch hooks (AGENT's statistics pass, ...) run outside the step; their syncs are not limited here.
On CUDA the same runs go under ``torch.cuda.set_sync_debug_mode("error")``.
"""

from __future__ import annotations

import sys
import threading

import pytest
import torch

from sparsefw import config as config_mod
from sparsefw import plugin_checks
from sparsefw.engine import Trainer
from sparsefw.plugins import load_catalogue
from tests.conftest import TINY, merge

#: tensor methods that read a tensor back to the host (the plugin checker's list), or print it
SYNC_METHODS = (*plugin_checks.SYNC_METHODS, "__repr__", "__format__")
OURS = ("sparsefw", "sparsefw_plugins")
LOG_EVERY = 4
#: syncs allowed on a topology update step
UPDATE_ALLOWANCE = 1
#: components whose (infrequent) update steps do host-side work by design, with the bound and
#: the reason; documented on their method pages
UPDATE_EXCEPTIONS = {
    # CHEX picks channels by leverage scores and samples regrown channels on the host, once per
    # channel update (every few hundred steps in practice), never on a regular step
    "topology_update:chex": 5,
}

_CATALOGUE = load_catalogue(autoload=False)
_REGISTRY = _CATALOGUE.registry


def _ours(module: str) -> bool:
    return module.split(".")[0] in OURS


def _caller() -> tuple[str, str] | None:
    """``(kind, "module:function:line")`` when the wrapped call comes from sparsefw code."""
    frame = sys._getframe(2)  # 0: here, 1: the wrapper, 2: whoever called the tensor method
    module = frame.f_globals.get("__name__", "")
    if _ours(module):
        return "direct", f"{module}:{frame.f_code.co_name}:{frame.f_lineno}"
    while frame is not None:
        module = frame.f_globals.get("__name__", "")
        if module.split(".")[0] != "torch" and module != __name__:
            if _ours(module):
                return "via torch", f"{module}:{frame.f_code.co_name}:{frame.f_lineno}"
            return None
        frame = frame.f_back
    return None


class SyncCounter:
    """Wraps :data:`SYNC_METHODS` on ``torch.Tensor``; ``calls`` lists what sparsefw made."""

    def __init__(self, monkeypatch):
        self.calls: list[tuple[str, str, str]] = []
        self.enabled = False
        self._local = threading.local()
        for name in SYNC_METHODS:
            monkeypatch.setattr(torch.Tensor, name, self._wrap(name, getattr(torch.Tensor, name)))

    def _wrap(self, name, original):
        counter = self

        def wrapper(t, *args, **kwargs):
            local = counter._local
            if counter.enabled and not getattr(local, "inside", False):
                where = _caller()
                if where is not None:
                    counter.calls.append((name, *where))
                local.inside = True  # torch's own nested reads (printing) are not recounted
                try:
                    return original(t, *args, **kwargs)
                finally:
                    local.inside = False
            return original(t, *args, **kwargs)

        wrapper.__name__ = name
        return wrapper

    def take(self) -> list[tuple[str, str, str]]:
        out, self.calls = self.calls, []
        return out


# ------------------------------------------------------------------------------ configs
def _raw(**over) -> dict:
    base = merge(TINY, {"train": {"log_every": LOG_EVERY, "epochs": 3},
                        "logging": {"observers": []}})
    return merge(base, over)


HARD = {"sparsity": {"density": 0.2, "distribution": "erk", "kind": "hard"},
        "mask_init": {"name": "random"}}
FORWARD_NM = {"sparsity": {"density": 0.5, "distribution": "uniform", "kind": "forward"},
              "mask_init": {"name": "nm", "n": 2, "m": 4}
              if "nm" in _REGISTRY.names("mask_init") else {"name": "random"}}

#: extra sections some components need (beyond a hard 80%-sparse run)
NEEDS = {
    ("topology_update", "nm"): FORWARD_NM,
    ("gradient_correct", "srste"): FORWARD_NM,
}
#: component options some components need on the synthetic data
OPTIONS = {("perturb", "pgd"): {"units": "input"}}


def _case(slot: str, name: str) -> dict:
    over = merge(HARD, NEEDS.get((slot, name), {}))
    if slot == "topology_update":
        entry = _REGISTRY.get(slot, name)
        fields = {a.name for a in entry.config.__attrs_attrs__}
        opts = {"name": name, **OPTIONS.get((slot, name), {})}
        if "every" in fields:
            opts["every"] = 2
        over["topology_update"] = opts
    else:
        over[slot] = [{"name": name, **OPTIONS.get((slot, name), {})}]
    return over


CASES = {"dense": {"sparsity": {"density": 1.0}, "mask_init": {"name": "random"}},
         "hard": HARD,
         "forward": FORWARD_NM}
for _slot in ("topology_update", "perturb", "gradient_correct"):
    for _name in _REGISTRY.names(_slot):
        CASES[f"{_slot}:{_name}"] = _case(_slot, _name)
CASES["all-observers"] = merge(HARD, {"logging": {"observers": _REGISTRY.names("observer")}})


# ------------------------------------------------------------------------------ running
def run_steps(raw: dict, tmp_path, counter: SyncCounter | None, n_steps: int = 9,
              guard=None) -> list[dict]:
    """Build a run from ``raw`` and take ``n_steps`` steps as ``fit`` would; per step, the
    syncs sparsefw made and whether it was a logging or a topology update step."""
    cfg = config_mod.structure(raw, _REGISTRY, source="test.toml")
    trainer = Trainer(cfg, _CATALOGUE, run_dir=tmp_path)
    st = trainer.state
    trainer._init_masks()
    hooks = trainer.plugins.hook
    hooks.sparsefw_run_start(state=st)
    records = []
    steps_done = 0
    while steps_done < n_steps:
        st.epoch = st.step // trainer.steps_per_epoch
        hooks.sparsefw_epoch_start(state=st)
        for x, y in trainer.train_source.epoch(st.epoch):
            update = trainer.interval is not None and trainer.interval.due(st.step,
                                                                          st.total_steps)
            logging = (st.step + 1) % LOG_EVERY == 0 or st.step + 1 == st.total_steps
            if counter is not None:
                counter.take()
                counter.enabled = True
            strict = guard is not None and not logging and not update
            with guard() if strict else _nothing():
                trainer.step(x, y)
            if counter is not None:
                counter.enabled = False
            records.append({"step": st.step - 1, "update": update, "logging": logging,
                            "calls": counter.take() if counter is not None else []})
            steps_done += 1
            if steps_done >= n_steps:
                break
        hooks.sparsefw_epoch_end(state=st)
    return records


class _nothing:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def check(records: list[dict], case: str = "") -> list[str]:
    """Problems: syncs beyond what each kind of step allows."""
    allowance = UPDATE_EXCEPTIONS.get(case, UPDATE_ALLOWANCE)
    problems = []
    for r in records:
        calls = r["calls"]
        if r["logging"]:
            calls = [c for c in calls if ":_read_train_metrics:" not in c[2]]
        if r["update"]:
            if len(calls) > allowance:
                problems.append(f"update step {r['step']}: {len(calls)} syncs {calls}")
        elif calls:
            problems.append(f"step {r['step']}{' (logging)' if r['logging'] else ''}: {calls}")
    return problems


# ------------------------------------------------------------------------------ tests
def test_counter_sees_direct_and_via_torch_calls(monkeypatch):
    """The counter itself: a sparsefw frame calling ``.item()`` or ``float()`` counts, a test
    frame does not."""
    counter = SyncCounter(monkeypatch)
    counter.enabled = True
    t = torch.ones(())
    t.item()
    float(t)
    assert counter.take() == []
    ns = {"__name__": "sparsefw.fake", "t": t, "torch": torch}
    exec("a = t.item()\nb = float(t)\nc = bool(t)\nd = repr(t)", ns)
    kinds = [(c[0], c[1]) for c in counter.take()]
    assert kinds == [("item", "direct"), ("__float__", "direct"), ("__bool__", "direct"),
                     ("__repr__", "direct")]


def test_logging_step_reads_metrics_once(tmp_path, monkeypatch):
    counter = SyncCounter(monkeypatch)
    records = run_steps(_raw(**HARD), tmp_path, counter, n_steps=LOG_EVERY)
    assert [r["logging"] for r in records] == [False] * (LOG_EVERY - 1) + [True]
    logged = records[-1]["calls"]
    assert [c[0] for c in logged] == ["tolist"], logged
    assert ":_read_train_metrics:" in logged[0][2]


@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_sync_in_step(case, tmp_path, monkeypatch):
    counter = SyncCounter(monkeypatch)
    records = run_steps(_raw(**CASES[case]), tmp_path, counter)
    assert not check(records, case), "\n".join(check(records, case))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("case", sorted(CASES))
def test_no_host_sync_in_step_cuda(case, tmp_path, monkeypatch):
    """Outside logging steps, any synchronising CUDA call raises."""
    raw = _raw(**CASES[case])
    raw["train"]["device"] = "cuda"
    counter = SyncCounter(monkeypatch)

    class Guard:
        def __enter__(self):
            torch.cuda.set_sync_debug_mode("error")

        def __exit__(self, *exc):
            torch.cuda.set_sync_debug_mode("default")
            return False

    records = run_steps(raw, tmp_path, counter, guard=Guard)
    assert not check(records, case), "\n".join(check(records, case))
