"""Batched input gradients of a classifier: one backward pass for the whole batch.

Everything here differentiates with respect to the *input* only: parameters are frozen for the
duration of the call (``requires_grad`` switched off and restored), ``torch.autograd.grad`` is asked
for the input alone, so no parameter ``.grad`` is written and no weight-gradient kernels run.
Inputs are in the space the model receives (for fastsat models: pixel space, usually [0, 1]; models
that normalise do so inside ``forward``), so gradients are in pixel space too.

Objectives (``value`` is the per-sample quantity whose input gradient is returned; attacks ascend it):

============  ===============================================================================
``logit``       Ψ^t(x), t = ``target`` or the predicted class.
``logit_diff``  Ψ^t(x) − Ψ^o(x), t as above, o = ``other`` or the best-scoring class other than t.
``ce``          cross-entropy CE(Ψ(x), y).
``cw``          Carlini–Wagner margin max_{j≠y} Ψ^j(x) − Ψ^y(x) (positive ⇔ misclassified).
``dlr``         Croce & Hein's difference of logits ratio
                −(Ψ^y − max_{j≠y} Ψ^j) / (Ψ^{π1} − Ψ^{π3} + 1e-12), π sorting logits descending; K ≥ 3.
``dlr_targeted``  Croce & Hein's targeted DLR −(Ψ^y − Ψ^t) / (Ψ^{π1} − (Ψ^{π3} + Ψ^{π4})/2 + 1e-12),
                t = ``target`` (APGD-T); K ≥ 4.
``kl``          KL(softmax(clean_logits) ‖ softmax(Ψ(x))) (the TRADES inner objective).
============  ===============================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from fastsat._checks import choice, describe, host_checks_enabled, positive_int
from fastsat.models import Normalize, check_dtype, check_images
from fastsat.ops import accumulation_dtype

__all__ = [
    "MODES",
    "OBJECTIVES",
    "InputGrad",
    "batched_logit_grads",
    "check_finite",
    "check_input",
    "check_logits",
    "check_objective_args",
    "frozen",
    "input_grad",
    "logit_jacobian",
    "objective_value",
    "raw_input_grad",
]

OBJECTIVES = ("logit", "logit_diff", "ce", "cw", "dlr", "dlr_targeted", "kl")
#: The model modes every input-gradient function and attack accepts (None: leave the model as it is).
MODES = (None, "eval", "train")


class InputGrad(NamedTuple):
    """Result of :func:`input_grad`.

    grad:   tensor shaped like x, ∂ value / ∂ x per sample (pixel space); float32, or float64
            for float64 inputs.
    logits: detached (B, K) logits at x (in the model's output dtype).
    value:  detached (B,) per-sample objective at x, float32 (float64 for float64 logits).
    """

    grad: torch.Tensor
    logits: torch.Tensor
    value: torch.Tensor


@contextlib.contextmanager
def frozen(model: nn.Module, mode: str | None = None, *, freeze_params: bool = True) -> Iterator[nn.Module]:
    """Context manager: put ``model`` in ``mode`` and switch off ``requires_grad`` of its parameters.

    mode: None (leave every module's train/eval flag as it is), "eval" or "train".
    freeze_params: if False only the mode is switched (needed when the caller wants a graph that
    reaches the parameters, e.g. double backprop).
    On exit — also on error — every submodule's ``training`` flag and every parameter's
    ``requires_grad`` flag are restored individually (mixed modes such as frozen batch-norm survive).
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    choice(mode, "mode", MODES)
    module_flags = [(m, m.training) for m in model.modules()]
    param_flags = [(p, p.requires_grad) for p in model.parameters()] if freeze_params else []
    try:
        for p, _ in param_flags:
            p.requires_grad_(False)
        if mode is not None:
            model.train(mode == "train")
        yield model
    finally:
        for m, training in module_flags:
            m.training = training
        for p, flag in param_flags:
            p.requires_grad_(flag)


def _check_labels(name: str, labels: torch.Tensor | None, batch: int, num_classes: int) -> None:
    if labels is None:
        return
    if not isinstance(labels, torch.Tensor):
        raise TypeError(f"{name}: expected a (B,) int64 tensor, got {describe(labels)}")
    if labels.dtype != torch.long or labels.shape != (batch,):
        raise ValueError(
            f"{name}: expected a ({batch},) int64 tensor, got shape {tuple(labels.shape)} dtype {labels.dtype}"
        )
    # The range needs the values on the host (a sync): skipped inside no_host_checks().
    if batch and host_checks_enabled() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ValueError(
            f"{name}: expected class indices in [0, {num_classes}), got indices from "
            f"{int(labels.min())} to {int(labels.max())}"
        )


def check_finite(t: torch.Tensor, name: str, what: str) -> None:
    """ValueError naming ``name`` if ``t`` holds NaN or inf, where ``what`` says what it should
    hold (one host read; skipped inside no_host_checks)."""
    if host_checks_enabled() and not bool(torch.isfinite(t).all()):
        bad = t.isnan().sum().item(), t.isinf().sum().item()
        raise ValueError(f"{name}: expected {what}, got {bad[0]} NaN and {bad[1]} inf of {t.numel()} values")


def check_input(model: nn.Module, x: torch.Tensor, *, finite: bool = False) -> None:
    """Raise TypeError/ValueError unless x is a floating (B, ...) tensor of the dtype of the model's
    weights (autocast aside) on their device; for a zoo model, (B, C, H, W) with its C channels.
    Shapes, dtypes and devices only, no host sync — unless ``finite``: then also refuse NaN and
    inf in x (:func:`check_finite`: one host read)."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {describe(x)}")
    if not x.is_floating_point() or x.dim() < 2:
        raise ValueError(f"x: expected a floating (B, ...) tensor, got shape {tuple(x.shape)} dtype {x.dtype}")
    weight = next((p for p in model.parameters() if p.is_floating_point()), None)
    dtype = None if weight is None else weight.dtype
    normalize = next((m for m in model.modules() if isinstance(m, Normalize)), None)  # a zoo model's input layer
    if normalize is not None:
        check_images(x, channels=normalize.mean.shape[1], dtype=dtype)
    else:
        check_dtype(x, dtype)
    if finite:
        check_finite(x, "x", "finite input values (pixel space)")
    # Gradients are switched on for the call (a caller's torch.no_grad() is fine), but inference
    # mode cannot be switched off from inside, and its tensors cannot be differentiated.
    if torch.is_inference_mode_enabled():
        raise RuntimeError("input gradients need autograd, which torch.inference_mode() switches off: call this "
                           "outside it (inside torch.no_grad() is fine)")
    if x.is_inference():
        raise ValueError("x: an inference tensor (made under torch.inference_mode()) cannot be differentiated; "
                         "pass x.clone() made outside inference mode")
    param = next(model.parameters(), None)
    if param is not None and param.device != x.device:
        raise ValueError(f"x: expected a tensor on the device of the model's parameters ({param.device}), "
                         f"got one on {x.device}; move one of them")


def check_objective_args(
    objective: str,
    logits_shape: tuple[int, int],
    *,
    target: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    clean_logits: torch.Tensor | None = None,
) -> None:
    """Validate the arguments of :func:`objective_value` for logits of shape (B, K)."""
    choice(objective, "objective", OBJECTIVES)
    batch, num_classes = logits_shape
    _check_labels("target", target, batch, num_classes)
    _check_labels("other", other, batch, num_classes)
    _check_labels("y", y, batch, num_classes)
    if objective in ("ce", "cw", "dlr", "dlr_targeted") and y is None:
        raise ValueError(f"y: expected the labels for objective {objective!r}, got None")
    if objective == "dlr" and num_classes < 3:
        raise ValueError(f"objective: 'dlr' expected a model with at least 3 classes, got {num_classes}")
    if objective == "dlr_targeted" and (target is None or num_classes < 4):
        raise ValueError(
            f"objective: 'dlr_targeted' expected the target classes and a model with at least 4 classes, got "
            f"target {'None' if target is None else 'given'} and {num_classes} classes"
        )
    if objective in ("logit_diff", "ce", "cw", "dlr", "kl") and num_classes < 2:
        raise ValueError(f"model output: objective {objective!r} needs (B, K) logits with K >= 2 classes, got "
                         f"K = {num_classes}")
    if objective == "kl":
        if clean_logits is None:
            raise ValueError("clean_logits: expected the clean (B, K) logits for objective 'kl', got None")
        if tuple(clean_logits.shape) != tuple(logits_shape):
            raise ValueError(
                f"clean_logits: expected shape {tuple(logits_shape)}, got {tuple(clean_logits.shape)}"
            )


def _best_other(logits: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """Per sample, the largest logit among classes ≠ label, (B,)."""
    # scatter, not F.one_hot: one_hot range-checks its input with a host sync on the CPU.
    return logits.scatter(1, label[:, None], float("-inf")).amax(dim=1)


def objective_value(
    logits: torch.Tensor,
    objective: str,
    *,
    target: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    clean_logits: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-sample objective (B,) from (B, K) logits, computed in float32 (float64 for float64
    logits, so low-precision autocast logits are upcast); see the module docstring.

    Arguments are not validated here (it runs inside attack loops without host syncs); call
    :func:`check_objective_args` once beforehand.
    """
    z = logits.to(accumulation_dtype(logits.dtype))
    if objective in ("logit", "logit_diff"):
        t = z.detach().argmax(dim=1) if target is None else target
        z_t = z.gather(1, t[:, None]).squeeze(1)
        if objective == "logit":
            return z_t
        if other is None:
            return z_t - _best_other(z, t)
        return z_t - z.gather(1, other[:, None]).squeeze(1)
    if objective == "ce":
        return F.cross_entropy(z, y, reduction="none")
    if objective == "cw":
        return _best_other(z, y) - z.gather(1, y[:, None]).squeeze(1)
    if objective == "dlr":
        z_sorted = z.sort(dim=1, descending=True).values
        margin = z.gather(1, y[:, None]).squeeze(1) - _best_other(z, y)
        return -margin / (z_sorted[:, 0] - z_sorted[:, 2] + 1e-12)
    if objective == "dlr_targeted":
        z_sorted = z.sort(dim=1, descending=True).values
        margin = z.gather(1, y[:, None]).squeeze(1) - z.gather(1, target[:, None]).squeeze(1)
        return -margin / (z_sorted[:, 0] - (z_sorted[:, 2] + z_sorted[:, 3]) / 2 + 1e-12)
    # kl
    p_clean = F.softmax(clean_logits.to(z.dtype), dim=1)
    return (torch.xlogy(p_clean, p_clean) - p_clean * F.log_softmax(z, dim=1)).sum(dim=1)


def check_logits(logits: object, batch: int, *, classes: int = 1, finite: bool = False) -> None:
    """Raise unless a model's output is a (batch, K) logits tensor with K >= ``classes``:
    TypeError for anything else (a tuple, a dict), ValueError for another shape and, with
    ``finite``, for NaN or inf logits (one host read; skipped inside no_host_checks)."""
    if isinstance(logits, (tuple, list, dict)):
        items = list(logits.values() if isinstance(logits, dict) else logits)
        raise TypeError(f"model output: expected a ({batch}, K) logits tensor, got a {type(logits).__name__} of "
                        f"{len(items)} ({', '.join(describe(v) for v in items[:3])}); return the logits alone")
    if not isinstance(logits, torch.Tensor):
        raise TypeError(f"model output: expected a ({batch}, K) logits tensor, got {describe(logits)}")
    if logits.dim() != 2 or logits.shape[0] != batch or logits.shape[1] < classes:
        raise ValueError(f"model output: expected ({batch}, K) logits with K >= {classes} classes, got shape "
                         f"{tuple(logits.shape)}")
    if finite:
        check_finite(logits, "model output", "finite logits (are the model's weights finite?)")


def raw_input_grad(
    model: nn.Module,
    x: torch.Tensor,
    objective: str,
    *,
    check: bool,
    finite: bool = False,
    create_graph: bool = False,
    **objective_args: torch.Tensor | None,
) -> InputGrad:
    """:func:`input_grad` without its input checks and without freezing the model: forward,
    objective, one backward to the input. The caller holds :func:`frozen` (and autograd on).

    check: whether to check the logits and ``objective_args``; False needs no host sync, for
    attack loops that checked once. finite: with ``check``, also refuse NaN/inf logits (one host
    read) before the backward.
    """
    x_in = x if (create_graph and x.requires_grad) else x.detach().requires_grad_(True)
    logits = model(x_in)
    if check:
        # K is only known after the forward, which is then reused for the gradient.
        check_logits(logits, x.shape[0], finite=finite)
        check_objective_args(objective, tuple(logits.shape), **objective_args)
    value = objective_value(logits, objective, **objective_args)
    (grad,) = torch.autograd.grad(value.sum(), x_in, create_graph=create_graph)
    if not create_graph:
        grad = grad.detach()
    return InputGrad(grad.to(accumulation_dtype(x.dtype)), logits.detach(), value.detach())


def input_grad(
    model: nn.Module,
    x: torch.Tensor,
    *,
    objective: str = "logit",
    target: torch.Tensor | None = None,
    other: torch.Tensor | None = None,
    y: torch.Tensor | None = None,
    clean_logits: torch.Tensor | None = None,
    mode: str | None = None,
    create_graph: bool = False,
) -> InputGrad:
    """Input gradient of a per-sample objective for a whole batch with a single backward pass.

    model: maps (B, ...) inputs to (B, K) logits. x: (B, ...) floating input in the model's input
    space (pixel space for fastsat models). objective: one of :data:`OBJECTIVES` (default "logit",
    the saliency map of the predicted class). target / other / y: (B,) int64 class indices or None
    (see the module docstring for which objective reads which). clean_logits: (B, K), for "kl".
    mode: None (as found), "eval" or "train" for the duration of the call; always restored.
    create_graph: keep the graph of the gradient for double backprop (then parameters keep
    ``requires_grad`` so the gradient can be differentiated with respect to them; still no
    parameter ``.grad`` is written). Autocast is honoured; the gradient is returned in float32
    (float64 for float64 inputs).

    Returns :class:`InputGrad` (grad shaped like x, detached logits (B, K), detached value (B,)).
    Non-finite logits raise ValueError (one host read; skipped inside no_host_checks).
    """
    check_input(model, x)
    choice(objective, "objective", OBJECTIVES)
    if clean_logits is not None and not isinstance(clean_logits, torch.Tensor):
        raise TypeError(f"clean_logits: expected a (B, K) tensor, got {describe(clean_logits)}")
    with frozen(model, mode, freeze_params=not create_graph), torch.enable_grad():
        result = raw_input_grad(
            model, x, objective, check=True, finite=True,  # a gradient of NaN logits would be a made-up map
            create_graph=create_graph, target=target, other=other, y=y, clean_logits=clean_logits,
        )
    return result


def batched_logit_grads(
    logits: torch.Tensor, x_in: torch.Tensor, seeds: torch.Tensor, chunk_size: int | None = None
) -> torch.Tensor:
    """Vector-Jacobian products of one forward's logits, batched over seeds: (B, n, *x.shape[1:]).

    logits: (B, K) output of a forward pass from ``x_in`` (which requires grad; graph kept).
    seeds: (n, B, K); row c gives, per sample, the combination of logits whose input gradient
    lands in ``result[:, c]`` (e.g. a one-hot e_k for ∇Ψ^k, e_k − e_j for ∇(Ψ^k − Ψ^j)).
    The n backward passes run as one vmapped backward (``is_grads_batched``), ``chunk_size``
    seeds at a time (None: all), so memory is bounded by chunk_size × |x|. Float32 output
    (float64 for float64 inputs).
    """
    step = seeds.shape[0] if chunk_size is None else chunk_size
    rows = []
    for start in range(0, seeds.shape[0], step):
        chunk = seeds[start : start + step].to(logits.dtype)
        (jac,) = torch.autograd.grad(logits, x_in, grad_outputs=chunk, is_grads_batched=True, retain_graph=True)
        rows.append(jac.to(accumulation_dtype(x_in.dtype)).transpose(0, 1))
    return torch.cat(rows, dim=1)


def logit_jacobian(
    model: nn.Module,
    x: torch.Tensor,
    *,
    classes: Sequence[int] | torch.Tensor | None = None,
    chunk_size: int | None = None,
    mode: str | None = None,
) -> torch.Tensor:
    """Jacobian of the logits with respect to the input: (B, n, *x.shape[1:]), float32 (float64
    for float64 inputs).

    One forward pass; the backward passes are batched over classes (``is_grads_batched``, i.e.
    vmap over the backward), at most ``chunk_size`` classes at a time (None: all at once) to bound
    memory at chunk_size × |x|. classes: None means all K classes in order (n = K); a sequence or
    1-D tensor of n indices, the same for every sample; or a (B, n) int64 tensor of per-sample
    indices. Row [b, c] is ∇_x Ψ^{classes[c]}(x_b) in the model's input (pixel) space.
    mode: None / "eval" / "train" as in :func:`input_grad`.
    """
    check_input(model, x)
    chunk_size = positive_int(chunk_size, "chunk_size", allow_none=True)
    with frozen(model, mode), torch.enable_grad():
        x_in = x.detach().requires_grad_(True)
        logits = model(x_in)
        check_logits(logits, x.shape[0], finite=True)
        batch, num_classes = logits.shape
        if classes is None:
            class_idx = torch.arange(num_classes, device=x.device)
        else:
            class_idx = torch.as_tensor(classes, device=x.device)
            if class_idx.dtype != torch.long or class_idx.dim() not in (1, 2) or class_idx.numel() == 0:
                raise ValueError(f"classes: expected n int indices or a (B, n) int64 tensor, got {describe(classes)}")
            if class_idx.dim() == 2 and class_idx.shape[0] != batch:
                raise ValueError(f"classes: expected a ({batch}, n) tensor, got shape {tuple(class_idx.shape)}")
            if int(class_idx.min()) < 0 or int(class_idx.max()) >= num_classes:
                raise ValueError(f"classes: expected indices in [0, {num_classes}), got {describe(classes)}")
        per_sample = class_idx.expand(batch, -1) if class_idx.dim() == 1 else class_idx
        # seeds[c, b] = e_{classes[b, c]}: the c-th batched backward gives ∇Ψ^{classes[b, c]} for every b.
        seeds = F.one_hot(per_sample.t(), num_classes)
        return batched_logit_grads(logits, x_in, seeds, chunk_size)
