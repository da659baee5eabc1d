"""What every attack shares: argument checks, the result type, the model guard and the output audit.

Units: every radius ε and step size is in pixel space, the space of ``x`` (default box [0, 1]).
Models that normalise inputs do so inside ``forward``, so nothing here depends on a mean/std.
"""

from __future__ import annotations

import abc
import dataclasses
import math
import warnings
import weakref
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from fastsat import ops
from fastsat._checks import choice, clip_box, host_checks_enabled, no_host_checks, number
from fastsat.grad import (
    MODES,
    InputGrad,
    check_input,
    check_logits,
    check_objective_args,
    frozen,
    objective_value,
    raw_input_grad,
)
from fastsat.ops import StepStats, accumulation_dtype

__all__ = ["Attack", "AttackResult"]


@dataclass
class AttackResult:
    """Outcome of an attack on a batch of B samples.

    x_adv: adversarial batch, shape/dtype of x, inside the box and (where ε applies) the ε-ball.
    success: (B,) bool — misclassified (untargeted: prediction ≠ y; targeted: prediction = target;
        DeepFool: prediction ≠ the clean prediction) at x_adv. Points misclassified at x count as
        successes; APGD-T, Square, FAB and CW return them unchanged without attacking them.
    delta_norm: (B,) float32 (float64 for float64 x), pixel units: ‖x_adv − x‖ in the attack's
        norm. For the minimal-norm attacks (DeepFool, FAB, CW) instead the norm of the smallest
        adversarial perturbation found, inf where none was (DeepFool: the boundary distance ρ); it
        may exceed ε, and x_adv is then x.
    stats: :class:`fastsat.ops.StepStats` of the last step's gradient (⟨x, g⟩, ‖g‖, ‖x‖ of the
        clean x and that gradient; ``.alignment``, ``.cosine``; ``delta_norm`` ‖δ‖ of the point
        it belongs to) or None for attacks without one (DeepFool, Square, FAB, CW).
    """

    x_adv: torch.Tensor
    success: torch.Tensor | None
    delta_norm: torch.Tensor | None
    stats: StepStats | None


def merge_stats(take_new: torch.Tensor, new: StepStats, old: StepStats) -> StepStats:
    """Per sample, the statistics of ``new`` where ``take_new`` else those of ``old``."""
    return StepStats(
        dot=torch.where(take_new, new.dot, old.dot),
        grad_norm=torch.where(take_new, new.grad_norm, old.grad_norm),
        x_norm=torch.where(take_new, new.x_norm, old.x_norm),
        delta_norm=torch.where(take_new, new.delta_norm, old.delta_norm),
    )


class Attack(abc.ABC):
    """Base class: ``attack(x, y) -> AttackResult``.

    Subclasses implement :meth:`_run`. ``__call__`` freezes the parameters, checks the arguments
    and audits the output (finite, inside ``clip``, within ε·(1 + 1e-6) plus the storage dtype's
    rounding), raising RuntimeError otherwise; :meth:`perturb` (training) does none of the audit.
    Checks that read values on the host are skipped inside :func:`fastsat._checks.no_host_checks`.

    With a ``torch.compile``'d model, PGD, FGSM and TRADES compile each step (forward, input
    gradient, fused step) as one graph with the model's settings (torch ≥ 2.11); a new ε or step
    size compiles it again. Under CUDA graphs the adversarial batch is valid until the next
    ``torch.compiler.cudagraph_mark_step_begin()``: clone it to keep it.
    """

    label_required: bool = True
    #: Step α of :meth:`_ascend` in pixel units (L∞: per element, L2: per sample); None for
    #: attacks that take no projected step. Set by PGD, FGSM and TRADES.
    step_size: float | None = None

    def __init__(
        self,
        model: nn.Module,
        *,
        eps: float | None,
        norm: str,
        mode: str | None,
        clip: tuple[float, float],
        backend: str | None = None,
    ):
        """eps: radius of the ball the output must stay in (pixel units, any real ≥ 0; None:
        unbounded, as for DeepFool and CW). norm: "linf" or "l2" (:data:`fastsat.ops.NORMS`), the
        norm of ε and of the reported ‖δ‖. backend: the :mod:`fastsat.ops` backend of the attack's
        fused ops (None: $FASTSAT_BACKEND or "auto")."""
        if not isinstance(model, nn.Module):
            raise TypeError(f"model: expected a torch.nn.Module, got {type(model).__name__}")
        self.model = model
        self.eps = number(eps, "eps", minimum=0, allow_none=True)
        self.norm = choice(norm, "norm", ops.NORMS)
        self.mode = choice(mode, "mode", MODES)
        self.clip = clip_box(clip)
        self.backend = choice(backend, "backend", (None, *ops.BACKENDS))

    def __repr__(self) -> str:
        fields = ", ".join(f"{k}={v!r}" for k, v in vars(self).items() if k != "model")
        return f"{type(self).__name__}({type(self.model).__name__}, {fields})"

    def __call__(self, x: torch.Tensor, y: torch.Tensor | None = None) -> AttackResult:
        """x: (B, ...) clean batch in pixel space, inside ``clip``. y: (B,) int64 labels (the target
        classes for targeted attacks). Returns :class:`AttackResult`."""
        self._check_inputs(x, y)
        x, y = x.detach(), None if y is None else y.detach()
        with frozen(self.model, self.mode), torch.enable_grad():
            result = self._run(x, y, need_success=True)
        distance = self._audit(x, result.x_adv) if host_checks_enabled() else self._distance(x, result.x_adv).to(
            accumulation_dtype(x.dtype))
        if result.delta_norm is None:
            result = dataclasses.replace(result, delta_norm=distance)
        return result

    def perturb(self, x: torch.Tensor, y: torch.Tensor | None = None) -> torch.Tensor:
        """Only the adversarial batch (detached), for training: no ``success`` flags (saving a
        forward pass), no warnings, no audit and no host sync after the argument checks; no
        parameter ``.grad`` is written. An eager model's parameters keep ``requires_grad`` (autocast
        caches low-precision weights only for those); a compiled model's are frozen, since its
        compiled backward computes every gradient its inputs require."""
        self._check_inputs(x, y)
        x, y = x.detach(), None if y is None else y.detach()
        compiled = hasattr(self.model, "dynamo_ctx")  # torch.compile's wrapper (as in _step_function)
        with frozen(self.model, self.mode, freeze_params=compiled), no_host_checks(), torch.enable_grad():
            return self._run(x, y, need_success=False).x_adv.detach()

    @abc.abstractmethod
    def _run(self, x: torch.Tensor, y: torch.Tensor | None, *, need_success: bool) -> AttackResult:
        """The attack on detached inputs, the model in ``mode``; differentiate towards the input
        only (``torch.autograd.grad``). ``delta_norm=None`` is measured by the caller; with
        ``need_success=False`` the attack may return ``success=None``."""

    def _check_inputs(self, x: torch.Tensor, y: torch.Tensor | None) -> None:
        check_input(self.model, x)
        lo, hi = self.clip
        # One host sync per call (skipped inside no_host_checks): an x outside the box would
        # otherwise surface as a failed audit.
        if host_checks_enabled() and not bool(((x >= lo) & (x <= hi)).all()):
            raise ValueError(
                f"x: expected finite values inside clip {self.clip} (pixel space), got range "
                f"[{float(x.min()):.4g}, {float(x.max()):.4g}]; pass clip=(lo, hi) for another box"
            )
        if y is None:
            if self.label_required:
                raise ValueError(f"y: {type(self).__name__} needs (B,) int64 labels, got None")
            return
        if not isinstance(y, torch.Tensor):
            raise TypeError(f"y: expected a (B,) int64 tensor, got {type(y).__name__}")
        if y.dtype != torch.long or y.shape != (x.shape[0],):
            raise ValueError(f"y: expected a ({x.shape[0]},) int64 tensor, got shape {tuple(y.shape)} dtype {y.dtype}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")

    def _ascend(
        self,
        x_adv: torch.Tensor,
        x: torch.Tensor,
        objective: str,
        *,
        first: bool,
        negate: bool = False,
        return_stats: bool = False,
        **objective_args: torch.Tensor | None,
    ) -> tuple[torch.Tensor, StepStats | None]:
        """One projected step up the input gradient of ``objective`` at x_adv (down with ``negate``),
        with the attack's ``step_size``, ε, norm, clip and ``backend``. Returns (new x_adv,
        :class:`StepStats` with ``return_stats``, else None). The first step of a checked run goes
        through :meth:`_grad` (label values, warnings); the others need no host sync."""
        if first and host_checks_enabled():
            grad = self._grad(x_adv, objective, first=True, **objective_args).grad
            return _fused_step(self, x_adv, grad, x, negate, return_stats)
        return _step_function(self.model)(self, x_adv, x, objective, negate, return_stats, objective_args)

    def _project_onto_ball(self, v: torch.Tensor, x: torch.Tensor, zeros: torch.Tensor | None = None) -> torch.Tensor:
        """v projected onto the ε-ball around x in the attack's norm, then clipped, in place: a
        zero-step :func:`fastsat.ops.pgd_step`. ``zeros``: a zero tensor like v to reuse across
        calls (a new one otherwise). x is the call's batch or rows of it, checked inside the box
        (so finite) by :meth:`__call__`: pgd_step's finiteness check, a host sync for every new
        tensor (each compaction makes one), is skipped."""
        zeros = torch.zeros_like(v) if zeros is None else zeros
        with no_host_checks():
            return ops.pgd_step(v, zeros, x, step_size=0.0, eps=self.eps, norm=self.norm, clip=self.clip, out=v,
                                backend=self.backend)

    def _grad(
        self, x: torch.Tensor, objective: str, *, first: bool, checked: bool = False, **objective_args
    ) -> InputGrad:
        """Input gradient of ``objective`` at x. The first call of a run checks the labels against
        the number of classes (unless ``checked``: :meth:`_clean_logits` did) and warns about
        suspicious models (host syncs); the others are sync-free."""
        result = raw_input_grad(self.model, x, objective, check=first and not checked, **objective_args)
        if first:
            self._warn_suspicious(result.logits, result.grad)
        return result

    def _warn_suspicious(self, logits: torch.Tensor, grad: torch.Tensor) -> None:
        """Refuse non-finite logits (ValueError: an attack on them would report made-up successes),
        warn if the outputs look like probabilities or some samples have an all-zero gradient (one
        host sync; nothing inside no_host_checks)."""
        if not host_checks_enabled():
            return
        logits = logits.float()
        flat_grad = grad.reshape(grad.shape[0], -1)
        rows_sum_to_one = (logits.sum(dim=1) - 1).abs().amax() < 1e-4
        looks_like_probs = (logits >= 0).all() & rows_sum_to_one
        zero_grads = (flat_grad == 0).all(dim=1).sum()
        finite = torch.isfinite(logits).all()
        flags = torch.stack([finite.long(), looks_like_probs.long(), zero_grads])
        finite, looks_like_probs, zero_grads = flags.tolist()  # one sync
        if not finite:
            check_logits(logits, logits.shape[0], finite=True)  # raises, with the counts
        if looks_like_probs:
            warnings.warn(
                f"{type(self).__name__}: the model's outputs are non-negative and every row sums to 1; "
                "attacks expect logits (the layer before softmax), not probabilities",
                UserWarning,
                stacklevel=2,
            )
        if zero_grads:
            warnings.warn(
                f"{type(self).__name__}: {zero_grads} of {flat_grad.shape[0]} samples have an all-zero input "
                "gradient at the start (saturated or gradient-masking model); those samples take no step",
                UserWarning,
                stacklevel=2,
            )

    def _clean_logits(self, x: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
        """(B, K) logits at x from one gradient-free forward, checked to be finite and (B, K) with
        K ≥ 2, and the labels y (if given) checked to lie in [0, K) before they index anything
        (host syncs; none inside no_host_checks)."""
        with torch.no_grad():
            logits = self.model(x)
        self._check_clean_logits(logits, y, x.shape[0])
        return logits

    def _check_clean_logits(self, logits: torch.Tensor, y: torch.Tensor | None, batch: int) -> None:
        """The checks of :meth:`_clean_logits`, on the model's output for a batch of ``batch``."""
        check_logits(logits, batch, classes=2, finite=True)
        check_objective_args("logit", tuple(logits.shape), y=y)

    def _misclassified(self, logits: torch.Tensor, y: torch.Tensor, targeted: bool = False) -> torch.Tensor:
        pred = logits.argmax(dim=1)
        return pred == y if targeted else pred != y

    def _final(self, x_adv: torch.Tensor, y: torch.Tensor, objective: str, targeted: bool = False, **objective_args):
        """(success, value) at x_adv from one gradient-free forward; value is the ascended objective."""
        with torch.no_grad():
            logits = self.model(x_adv)
        value = objective_value(logits, objective, y=y, **objective_args)
        return self._misclassified(logits, y, targeted), -value if targeted else value

    def _distance(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """(B,) ‖x_adv − x‖ in the attack's norm, float64 (differences of two stored values are
        exact in float64)."""
        return sample_norms(x_adv.double() - x.double(), self.norm)

    def _audit(self, x: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
        """Check the output and return ‖x_adv − x‖ per sample in the attack's norm (float32, float64
        for float64 x)."""
        lo, hi = self.clip
        dist = self._distance(x, x_adv)
        finite = torch.isfinite(x_adv).all()
        in_box = ((x_adv >= lo) & (x_adv <= hi)).all()
        if self.eps is None:
            in_ball = torch.ones((), dtype=torch.bool, device=x.device)
        else:
            # Storing x_adv in x's dtype moves each element by at most half an ulp of the box scale;
            # in L2 those errors add up over the d elements of a sample to at most √d of them.
            ulp = torch.finfo(x.dtype).eps * max(abs(lo), abs(hi), 1.0)
            slack = ulp if self.norm == "linf" else ulp * math.sqrt(x[0].numel())
            in_ball = (dist <= self.eps * (1 + 1e-6) + slack).all()
        ok_finite, ok_box, ok_ball = torch.stack([finite, in_box, in_ball]).tolist()
        if not (ok_finite and ok_box and ok_ball):
            raise RuntimeError(
                f"{type(self).__name__} produced an invalid batch: finite={ok_finite}, inside clip {self.clip}="
                f"{ok_box}, within eps={self.eps} ({self.norm})={ok_ball}, max distance={float(dist.max()):.6g}"
            )
        return dist.to(accumulation_dtype(x.dtype))


# Per compiled model, its compiled step (made once: wrapping costs more than a small step).
_COMPILED_STEPS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def _step_function(model: nn.Module) -> Callable:
    """:func:`_ascent_step`, compiled as the model was when it is a ``torch.compile``'d model and
    torch can trace ``autograd.grad``: one graph per step."""
    compiler = getattr(model, "dynamo_ctx", None)  # torch.compile's wrapper keeps its settings here
    if compiler is None or not hasattr(torch._dynamo.config, "trace_autograd_ops"):
        return _ascent_step
    if model not in _COMPILED_STEPS:
        config = {k: v for k, v in _STEP_COMPILER_CONFIG.items() if hasattr(torch._dynamo.config, k)}  # names move
        _COMPILED_STEPS[model] = torch._dynamo.config.patch(config)(compiler(_ascent_step))
    return _COMPILED_STEPS[model]


# specialize_float: the ops' argument checks cannot take a symbolic ε or step size. recompile_limit:
# each ε compiles its own graph, and an ε warm-up would pass dynamo's default of 8.
_STEP_COMPILER_CONFIG = {"trace_autograd_ops": True, "specialize_float": True, "recompile_limit": 64}


def _ascent_step(
    attack: Attack,
    x_adv: torch.Tensor,
    x: torch.Tensor,
    objective: str,
    negate: bool,
    return_stats: bool,
    objective_args: dict,
) -> tuple[torch.Tensor, StepStats | None]:
    """One step of :meth:`Attack._ascend` without host syncs: the input gradient and the fused
    projected step (shapes checked inside no_host_checks, where that costs no sync)."""
    grad = raw_input_grad(attack.model, x_adv, objective, check=not host_checks_enabled(), **objective_args).grad
    return _fused_step(attack, x_adv, grad, x, negate, return_stats)


def _fused_step(
    attack: Attack, x_adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, negate: bool, return_stats: bool
) -> tuple[torch.Tensor, StepStats | None]:
    # The gradient goes in as computed (float32 for float16/bfloat16 x): its sign is taken before
    # any rounding to x's dtype, which would flush its small entries to 0.
    stepped = ops.pgd_step(
        x_adv, -grad if negate else grad, x, step_size=attack.step_size, eps=attack.eps, norm=attack.norm,
        clip=attack.clip, return_stats=return_stats, backend=attack.backend,
    )
    return stepped if return_stats else (stepped, None)


def sample_norms(v: torch.Tensor, norm: str) -> torch.Tensor:
    """(B,) norm of each sample of v (B, ...): "linf" or "l2"."""
    flat = v.flatten(1)
    return flat.abs().amax(dim=1) if norm == "linf" else flat.norm(dim=1)


def per_sample(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshape a (B,) tensor to broadcast against ``like`` (B, ...)."""
    return v.reshape((-1,) + (1,) * (like.dim() - 1))


def top_other_classes(logits: torch.Tensor, y: torch.Tensor, n: int) -> torch.Tensor:
    """(B, min(n, K − 1)) int64: per sample the highest-scoring classes other than y, best first
    (the target classes of APGD-T and FAB-T)."""
    count = min(n, logits.shape[1] - 1)
    return logits.scatter(1, y[:, None], float("-inf")).topk(count, dim=1).indices


def take_rows(keep: torch.Tensor, *tensors: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
    """Each tensor's rows ``keep`` (int64 indices), in order; None stays None."""
    return tuple(None if t is None else t.index_select(0, keep) for t in tensors)


class Compaction:
    """The rows of a batch an attack still runs on, shrunk every ``every`` iterations so that a
    broken point costs nothing more; each shrink is one host sync, the marks between need none.

    Per-sample independence makes this exact: a row's iterates do not depend on which other rows
    share its batch. With ``groups`` > 1 the batch is ``groups`` consecutive blocks of the same
    points (one per target and restart, in run order), and a point broken in one block also stops
    in the blocks after it — those runs would not have run on it one after another.
    """

    def __init__(self, batch: int, every: int | None, device: torch.device, groups: int = 1):
        """batch: rows at the start. every: iterations between shrinks (None: never)."""
        self.every = every
        self.groups = groups
        self.rows = torch.arange(batch, device=device)  # (R,) int64: the batch rows still running
        self._broken = torch.zeros(batch, dtype=torch.bool, device=device) if groups > 1 else None

    def due(self, iteration: int, total: int) -> bool:
        """Whether to shrink after ``iteration`` (1-based) of ``total``: every ``every``, not after the last."""
        return self.every is not None and iteration % self.every == 0 and iteration < total

    def keep(self, broken: torch.Tensor) -> torch.Tensor:
        """Positions in :attr:`rows` of the rows that go on, given which of them are broken ((R,)
        bool, once true always true); :attr:`rows` shrinks to them. One host sync."""
        done = broken
        if self._broken is not None:
            self._broken.index_copy_(0, self.rows, broken)
            done = (self._broken.view(self.groups, -1).cumsum(0) > 0).flatten()[self.rows]
        keep = (~done).nonzero().squeeze(1)
        self.rows = self.rows[keep]
        return keep


@dataclass
class Candidate:
    """One restart's outcome, compared per sample: success first, then the objective value."""

    x_adv: torch.Tensor
    success: torch.Tensor
    value: torch.Tensor
    stats: StepStats

    def merge(self, other: Candidate) -> Candidate:
        """Per sample, the better of self and other (ties keep self, so restarts never lose ground)."""
        better = (other.success & ~self.success) | ((other.success == self.success) & (other.value > self.value))
        return Candidate(
            x_adv=torch.where(per_sample(better, self.x_adv), other.x_adv, self.x_adv),
            success=self.success | other.success,
            value=torch.where(better, other.value, self.value),
            stats=merge_stats(better, other.stats, self.stats),
        )

    def first_of(self, groups: int) -> Candidate:
        """Of ``groups`` consecutive blocks of candidates for the same P points (runs in order,
        batched), per point the one that running them one after another keeps: the first success,
        else the first highest value. Returns P candidates."""
        success, value = self.success.view(groups, -1), self.value.view(groups, -1)
        points = success.shape[1]
        pick = torch.where(success.any(0), success.to(torch.uint8).argmax(0), value.argmax(0))  # argmax: first of ties
        index = pick * points + torch.arange(points, device=pick.device)
        return Candidate(
            x_adv=self.x_adv.index_select(0, index),
            success=success.any(0),
            value=self.value.index_select(0, index),
            stats=StepStats(*(getattr(self.stats, f.name).index_select(0, index) for f in dataclasses.fields(StepStats))),
        )

    def merge_rows(self, rows: torch.Tensor, other: Candidate) -> Candidate:
        """self with the samples ``rows`` (int64 indices) replaced by their merge with ``other``, a
        candidate for exactly those samples (an attack run on a subset of the batch)."""
        part = Candidate(
            x_adv=self.x_adv[rows],
            success=self.success[rows],
            value=self.value[rows],
            stats=StepStats(*(getattr(self.stats, f.name)[rows] for f in dataclasses.fields(StepStats))),
        ).merge(other)
        return Candidate(
            x_adv=self.x_adv.index_copy(0, rows, part.x_adv),
            success=self.success.index_copy(0, rows, part.success),
            value=self.value.index_copy(0, rows, part.value),
            stats=StepStats(*(
                getattr(self.stats, f.name).index_copy(0, rows, getattr(part.stats, f.name))
                for f in dataclasses.fields(StepStats)
            )),
        )
