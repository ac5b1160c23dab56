"""``pgd``: PGD adversarial training and robust evaluation (Madry et al., arXiv 1706.06083).

Training (``train = true``): each step's inputs are replaced by
``x_adv = x + Π(δ)``, found by ``steps`` iterations of
``δ ← Π(δ + a·sign(∇_δ L))`` (L∞) or ``δ ← Π(δ + a·∇_δ L/‖∇_δ L‖₂)`` (L2, per sample) from a
uniform random start in the ε-ball, where ``Π`` projects onto the ball and clips ``x + δ`` to the
data set's valid input range (:attr:`sparsefw.data.DataSplits.input_range`). Budgets are in
pixel units by default (``eps = 8/255`` means 8/255 of the valid range, per channel); set
``units = "input"`` for normalised units. A scheduled value ``pgd_eps`` overrides ``eps``.

Evaluation: every ``eval_every`` epochs (and at the end of the run) the test set is attacked with
PGD-``eval_steps`` (same ε, step size and norm; random start) and FGSM, and the accuracies are
reported as ``test/acc_pgd<k>`` and ``test/acc_fgsm``. ``train = false`` gives robust evaluation
of a normally trained model.

The step's ``state.batch`` is replaced by ``(x_adv, y)`` so that components running after this
one (SAM's ascent, AGENT's snapshot gradient) see the adversarial inputs: list ``pgd`` first
among the ``[[perturb]]`` components. Cost per training step: ``steps`` extra forward and
backward passes (input gradients only).
"""

from __future__ import annotations

from typing import ClassVar

import attrs
import torch

from sparsefw.attacks import AttackConfig, AttackUnits, craft, fgsm, pgd
from sparsefw.config import in_range
from sparsefw.hookspecs import hookimpl
from sparsefw.state import Perturbation

__all__ = ["PGDConfig", "PGDTraining"]


@attrs.frozen
class PGDConfig(AttackConfig):
    """The attack (:class:`sparsefw.attacks.AttackConfig`) plus training and evaluation
    switches."""

    train: bool = True
    #: PGD steps of the robust evaluation (0: no PGD evaluation)
    eval_steps: int = attrs.field(default=20, validator=in_range(0, lo_open=False))
    eval_fgsm: bool = True
    #: robust evaluation every this many epochs (and always at the end); 0: only at the end
    eval_every: int = attrs.field(default=1, validator=in_range(0, lo_open=False))
    #: attack at most this many test batches (0: all)
    eval_max_batches: int = attrs.field(default=0, validator=in_range(0, lo_open=False))


@attrs.define(eq=False)
class PGDTraining:
    """PGD adversarial training (Madry et al.) and PGD-k / FGSM robust accuracy."""

    cfg: PGDConfig
    _units: AttackUnits | None = None
    #: schedule values this component reads (shown by ``sparsefw describe``)
    reads_values: ClassVar[tuple[str, ...]] = ("pgd_eps",)

    def needs(self) -> tuple[str, ...]:
        """Adversarial training crafts from the step's batch and replaces its inputs."""
        return ("batch", "inputs") if self.cfg.train else ()
    #: the contract harness trains on synthetic data, which has no valid pixel range
    contract_hints: ClassVar[dict] = {
        "options": {"units": "input", "eps": 0.1, "step_size": 0.05, "steps": 2, "eval_steps": 2}
    }

    def _get_units(self, state, x: torch.Tensor) -> AttackUnits:
        if self._units is None:
            self._units = AttackUnits(
                state.data.input_range, state.data.input_shape, self.cfg.units, x.device, x.dtype
            )
        return self._units

    @hookimpl
    def sparsefw_perturb(self, state):
        if not self.cfg.train:
            return None
        x, y = state.batch
        eps = state.values.get("pgd_eps", self.cfg.eps)
        x_adv = craft(self.cfg, state, x, y, self._get_units(state, x), eps=eps)
        state.batch = (x_adv, y)
        return Perturbation(inputs=x_adv)

    @hookimpl
    def sparsefw_evaluate(self, state, batches):
        c = self.cfg
        if not (c.eval_steps or c.eval_fgsm):
            return None
        epoch_done = state.step // max(state.steps_per_epoch, 1)
        final = state.step >= state.total_steps
        if not final and (c.eval_every == 0 or epoch_done % c.eval_every):
            return None
        # a private generator: robust evaluation never moves the training random stream
        gen = None
        correct_pgd = correct_fgsm = None
        n = 0
        for i, (x, y) in enumerate(batches()):
            if c.eval_max_batches and i >= c.eval_max_batches:
                break
            units = self._get_units(state, x)
            if gen is None:
                gen = torch.Generator(device=x.device).manual_seed(state.config.seed + 7919)
                correct_pgd = torch.zeros((), dtype=torch.long, device=x.device)
                correct_fgsm = torch.zeros((), dtype=torch.long, device=x.device)
            kw = {"scale": units.scale, "bounds": units.bounds}
            if c.eval_steps:
                x_adv = pgd(state.forward, state.loss_fn, x, y, eps=c.eps, step_size=c.step_size,
                            steps=c.eval_steps, norm=c.norm, random_start=c.random_start,
                            generator=gen, **kw)
                with torch.no_grad():
                    correct_pgd += (state.forward(x_adv).argmax(1) == y).sum()
            if c.eval_fgsm:
                x_adv = fgsm(state.forward, state.loss_fn, x, y, eps=c.eps, norm=c.norm, **kw)
                with torch.no_grad():
                    correct_fgsm += (state.forward(x_adv).argmax(1) == y).sum()
            n += y.numel()
        if n == 0:
            return None
        pgd_acc, fgsm_acc = (torch.stack([correct_pgd, correct_fgsm]).double() / n).tolist()
        out = {}
        if c.eval_steps:
            out[f"test/acc_pgd{c.eval_steps}"] = pgd_acc
        if c.eval_fgsm:
            out["test/acc_fgsm"] = fgsm_acc
        return out


@hookimpl
def sparsefw_register(registry):
    registry.add("perturb", "pgd", config=PGDConfig, factory=PGDTraining)
