"""Adversarial attacks on the fused ops: FGSM, PGD (L∞/L2), the TRADES inner attack, APGD-CE/DLR,
APGD-T, Square, FAB-T, Carlini–Wagner L2, and DeepFool with bisection.

Each attack is a class called as ``attack(x, y)`` returning :class:`AttackResult` (per-sample
``success`` and ``delta_norm``), with a functional twin (``pgd(model, x, y, **kw)``) and
``perturb(x, y)`` for training loops. ε and step sizes are in pixel space (the space of x, box
[0, 1] by default); models that normalise inputs do so inside ``forward``. Attacks leave the
model as found (mode, ``requires_grad``, no parameter ``.grad``) and audit their output. No attack
couples the samples of a batch (Square shares only its random window positions across it), so
any subset of points can be attacked on its own.

:data:`ATTACKS` names the attacks that :func:`fastsat.evaluate.evaluate` and ``fastsat eval
--attacks`` run by name: a new one is a row there.
"""

from collections.abc import Callable

from fastsat.attacks.apgd import APGD, APGDT, apgd, apgdt
from fastsat.attacks.base import Attack, AttackResult
from fastsat.attacks.cw import CW, cw
from fastsat.attacks.deepfool import DeepFool, DeepFoolResult, deepfool
from fastsat.attacks.fab import FAB, fab
from fastsat.attacks.pgd import FGSM, LOSSES, PGD, fgsm, pgd
from fastsat.attacks.square import Square, square
from fastsat.attacks.trades import TradesAttack, trades_attack


def _pgd(model, *, eps: float, steps: int, step_size: float | None, restarts: int, norm: str,
         clip: tuple[float, float]) -> PGD:
    return PGD(model, eps=eps, step_size=eps / 4 if step_size is None else step_size, steps=steps, norm=norm,
               random_start=True, restarts=restarts, mode="eval", clip=clip)


def _apgd(loss: str) -> Callable[..., APGD]:
    def make(model, *, eps: float, steps: int, step_size: float | None, restarts: int, norm: str,
             clip: tuple[float, float]) -> APGD:
        del step_size  # APGD sets its own step sizes
        return APGD(model, eps=eps, steps=steps, norm=norm, loss=loss, restarts=restarts, mode="eval", clip=clip)

    return make


#: name → factory ``(model, *, eps, steps, step_size, restarts, norm, clip) -> Attack`` (eval mode):
#: eps and step_size in pixel units (step_size None: PGD's ε/4; APGD ignores it), ``steps``
#: iterations per restart, ``restarts`` random starts with the per-sample best kept.
ATTACKS: dict[str, Callable[..., Attack]] = {"pgd": _pgd, "apgd-ce": _apgd("ce"), "apgd-dlr": _apgd("dlr")}

__all__ = [
    "APGD",
    "APGDT",
    "ATTACKS",
    "CW",
    "FAB",
    "FGSM",
    "LOSSES",
    "PGD",
    "Attack",
    "AttackResult",
    "DeepFool",
    "DeepFoolResult",
    "Square",
    "TradesAttack",
    "apgd",
    "apgdt",
    "cw",
    "deepfool",
    "fab",
    "fgsm",
    "pgd",
    "square",
    "trades_attack",
]
