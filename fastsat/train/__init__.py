"""Adversarial and saliency-based training (METHODS.md §2–3).

- :func:`fit` — the trainer: your model, your DataLoader (or a fastsat dataset), a recipe.
- :func:`recipe_loss` / :class:`Recipe` — one batch's loss (or ``Recipe.train_step``) for your own loop.
- :func:`teacher_saliency` — SAT's strong maps from a teacher, computed once and cached.
"""

from fastsat.train.checkpoint import atomic_save, load_checkpoint
from fastsat.train.recipes import (
    RECIPES,
    SAT,
    Fast,
    Free,
    GradNorm,
    NonFiniteLossError,
    PGDTraining,
    Recipe,
    RecipeOutput,
    SATPlusPGD,
    SATPlusTrades,
    Standard,
    Trades,
    make_recipe,
    recipe_loss,
    sat_probability,
    trades_loss,
)
from fastsat.train.teacher import TEACHER_METHODS, SaliencyDataset, teacher_saliency
from fastsat.train.trainer import OPTIMIZERS, SCHEDULES, FitResult, fit, lr_factor

__all__ = [
    "OPTIMIZERS", "RECIPES", "SAT", "SCHEDULES", "TEACHER_METHODS", "Fast", "FitResult", "Free", "GradNorm",
    "NonFiniteLossError", "PGDTraining", "Recipe", "RecipeOutput", "SATPlusPGD", "SATPlusTrades", "SaliencyDataset",
    "Standard", "Trades", "atomic_save", "fit", "load_checkpoint", "lr_factor", "make_recipe",
    "recipe_loss", "sat_probability", "teacher_saliency", "trades_loss",
]
