"""The contract's cheap invariants, checked while a run trains: ``[debug] check_plugins = true``
(or ``SPARSEFW_CHECK=1``; ``Sparsifier(..., check_plugins=True)``).

The contract suite (:mod:`sparsefw.testing.contract`) catches a plugin's mistakes on its own
harness; a mistake that only shows on a real model or late in a run trains on silently. Under
these checks the lifecycle calls each component's hook on its own and stops the run with the
contract's message, naming the component, when:

* a ``perturb`` hook changes the weights itself (they must be bit-equal after the hook);
* a ``topology_update`` changes a layer's count (or the total, for components that move weights
  between layers: ``contract_hints``), reports counts that differ from the masks, or edits a
  mask in place instead of through ``state.masks.update``;
* a hook reads tensors back to the host: none in ``schedule``, ``perturb`` and
  ``gradient_correct`` hooks, at most one per topology update (a component whose updates do
  host-side work declares ``host_syncs_per_update``).

Each check costs a copy of the weights or masks, or a few host reads, on the steps it guards:
for debugging, not for timed runs.
"""

from __future__ import annotations

import sys
import threading
from collections.abc import Callable
from typing import Any

import torch

from sparsefw.testing import contract

__all__ = ["PluginCheckError", "PluginChecker", "SYNC_METHODS"]

#: tensor methods that read a tensor back to the host (not ``numpy``: it exists for CPU tensors
#: only, as a zero-copy view; on a device tensor the ``cpu()`` before it is the read)
SYNC_METHODS = ("item", "tolist", "cpu", "__bool__", "__float__", "__int__", "__index__")


class PluginCheckError(contract.ContractError):
    """A component broke the hook contract during a run (``check_plugins``)."""


class _SyncRecorder:
    """While active, records the host reads made directly by code outside torch."""

    _local = threading.local()

    def __init__(self):
        self.calls: list[str] = []
        self._saved: dict[str, Callable] = {}

    def __enter__(self):
        for name in SYNC_METHODS:
            original = getattr(torch.Tensor, name)
            self._saved[name] = original
            setattr(torch.Tensor, name, self._wrap(name, original))
        return self

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        return False

    def _wrap(self, name: str, original: Callable) -> Callable:
        recorder = self

        def wrapper(t, *args, **kwargs):
            local = recorder._local
            if not getattr(local, "inside", False):
                frame = sys._getframe(1)
                module = frame.f_globals.get("__name__", "")
                if module.split(".")[0] != "torch":
                    recorder.calls.append(f"{name} in {module}:{frame.f_code.co_name}:"
                                          f"{frame.f_lineno}")
            local.inside = True
            try:
                return original(t, *args, **kwargs)
            finally:
                local.inside = False

        return wrapper


class PluginChecker:
    """Calls the run's hooks component by component and checks the contract around each."""

    def __init__(self, sparsifier):
        self.sp = sparsifier
        registry = sparsifier.catalogue.registry
        self.entries = {c.key: registry.get(c.slot, c.name) for c in sparsifier.plugins.components
                        if c.slot != "observer"}

    def _fail(self, key: str, check: str, message: str) -> PluginCheckError:
        return PluginCheckError(str(contract._fail(self.entries[key], check, message)) +
                                f" (step {self.sp.state.step}; found by [debug] check_plugins)")

    def _impls(self, hook: str):
        """``(component key, function)`` in call order."""
        impls = getattr(self.sp.plugins.hook, hook).get_hookimpls()
        return [(i.plugin_name, i.function) for i in reversed(impls)]

    def _call(self, hook: str, key: str, fn: Callable, allowed: int, **kwargs) -> Any:
        with _SyncRecorder() as rec:
            answer = fn(**kwargs)
        if len(rec.calls) > allowed:
            check = hook.removeprefix("sparsefw_")
            raise self._fail(key, check, contract.host_sync_message(hook, rec.calls, allowed))
        return answer

    # ------------------------------------------------------------------ hooks
    def schedule(self) -> list[Any]:
        st = self.sp.state
        return [self._call("sparsefw_schedule", key, fn, 0, state=st)
                for key, fn in self._impls("sparsefw_schedule")]

    def perturb(self) -> list[Any]:
        st = self.sp.state
        out = []
        for key, fn in self._impls("sparsefw_perturb"):
            before = {n: p.detach().clone() for n, p in st.named_params.items()}
            out.append(self._call("sparsefw_perturb", key, fn, 0, state=st))
            moved = [n for n, p in st.named_params.items() if not torch.equal(p.detach(),
                                                                              before[n])]
            if moved:
                raise self._fail(key, "perturb", contract.perturb_moved_message(moved))
        return out

    def gradient_correct(self) -> None:
        st = self.sp.state
        for key, fn in self._impls("sparsefw_gradient_correct"):
            self._call("sparsefw_gradient_correct", key, fn, 0, state=st)

    def topology_update(self) -> Any:
        st = self.sp.state
        (key, fn), = self._impls("sparsefw_topology_update")
        entry = self.entries[key]
        allowed = int(getattr(self.sp.topology, "host_syncs_per_update", 1))
        before = {n: m.clone() for n, m in st.masks.masks.items()}
        answer = self._call("sparsefw_topology_update", key, fn, allowed, state=st)
        hints = contract._hints(entry, {})
        try:
            contract._check_topology_answer(entry, hints, st, before, answer, st.step)
        except contract.ContractError as exc:
            raise PluginCheckError(f"{exc} (step {st.step}; found by [debug] check_plugins)"
                                   ) from None
        return answer
