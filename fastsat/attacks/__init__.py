"""Adversarial attacks on the fused ops: FGSM, PGD (L∞/L2), the TRADES inner attack, APGD-CE/DLR,
DeepFool with bisection.

Each attack is a class called as ``attack(x, y)`` returning :class:`AttackResult`, with a
functional twin (``pgd(model, x, y, **kw)``). ε and step sizes are in pixel space (the space of
x, box [0, 1] by default); models that normalise inputs do so inside ``forward``. Attacks leave
the model as found (mode, ``requires_grad``, no parameter ``.grad``) and audit their output.
"""

from fastsat.attacks.apgd import APGD, APGDT, apgd, apgdt
from fastsat.attacks.base import Attack, AttackResult
from fastsat.attacks.cw import CW, cw
from fastsat.attacks.deepfool import DeepFool, DeepFoolResult, deepfool
from fastsat.attacks.fab import FAB, fab
from fastsat.attacks.pgd import FGSM, LOSSES, PGD, fgsm, pgd
from fastsat.attacks.square import Square, square
from fastsat.attacks.trades import TradesAttack, trades_attack

__all__ = [
    "APGD",
    "APGDT",
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
