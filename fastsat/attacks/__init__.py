"""Adversarial attacks on the fused ops: FGSM, PGD (L∞/L2), the TRADES inner attack, APGD-CE/DLR,
APGD-T, Square, FAB-T, Carlini–Wagner L2, and DeepFool with bisection.

Each attack is a class called as ``attack(x, y)`` returning :class:`AttackResult` (per-sample
``success`` and ``delta_norm``), with a functional twin (``pgd(model, x, y, **kw)``) and
``perturb(x, y)`` for training loops. ε and step sizes are in pixel space (the space of x, box
[0, 1] by default); models that normalise inputs do so inside ``forward``. Attacks leave the
model as found (mode, ``requires_grad``, no parameter ``.grad``) and audit their output. No attack
couples the samples of a batch (Square shares only its random window positions across it), so
any subset of points can be attacked on its own.
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
