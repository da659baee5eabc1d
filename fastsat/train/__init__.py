"""Adversarial and saliency-based training (METHODS.md §2–3).

- :class:`TrainConfig` — every training option and its default, in one place (``fit``'s keywords,
  the YAML keys and ``fastsat train``'s flags are its fields).
- :func:`fit` — train your model on your DataLoader (or a fastsat dataset) with a recipe;
  :class:`Trainer` is the loop it runs, as named steps you can override.
- :func:`recipe_loss` / :class:`Recipe` — one batch's loss (or ``Recipe.train_step``) for your own loop.
- :func:`teacher_saliency` — SAT's strong maps from a teacher, computed once and cached.
"""

from fastsat.train.checkpoint import load_checkpoint
from fastsat.train.config import OPTIMIZERS, SCHEDULES, TrainConfig
from fastsat.train.recipes import (
    MART,
    NFGSM,
    PRECISIONS,
    RECIPES,
    SAT,
    Fast,
    Free,
    GradAlign,
    GradNorm,
    NonFiniteLossError,
    PerturbationRecipe,
    PGDTraining,
    Recipe,
    RecipeOutput,
    SATPlusPGD,
    SATPlusTrades,
    Standard,
    StepGuard,
    Trades,
    awp_perturbation,
    gradalign_lambda,
    gradient_misalignment,
    make_recipe,
    mart_loss,
    recipe_loss,
    sat_probability,
    trades_loss,
)
from fastsat.train.teacher import TEACHER_METHODS, TEACHER_STYLES, SaliencyDataset, teacher_saliency
from fastsat.train.trainer import FitResult, Trainer, fit, lr_factor

__all__ = [
    "MART",
    "NFGSM",
    "OPTIMIZERS",
    "PRECISIONS",
    "RECIPES",
    "SAT",
    "SCHEDULES",
    "TEACHER_METHODS",
    "TEACHER_STYLES",
    "Fast",
    "FitResult",
    "Free",
    "GradAlign",
    "GradNorm",
    "NonFiniteLossError",
    "PGDTraining",
    "PerturbationRecipe",
    "Recipe",
    "RecipeOutput",
    "SATPlusPGD",
    "SATPlusTrades",
    "SaliencyDataset",
    "Standard",
    "StepGuard",
    "Trades",
    "TrainConfig",
    "Trainer",
    "awp_perturbation",
    "fit",
    "gradalign_lambda",
    "gradient_misalignment",
    "load_checkpoint",
    "lr_factor",
    "make_recipe",
    "mart_loss",
    "recipe_loss",
    "sat_probability",
    "teacher_saliency",
    "trades_loss",
]
