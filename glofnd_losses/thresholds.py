"""Update rules for the per-sample GloFND thresholds (pure functions over state rows).

A threshold ``lam_i`` minimises ``F_i(lam) = alpha * lam + mean_z (s_iz - lam)_+`` over the scores
of item ``i`` against the whole data set; its minimiser is the ``(1 - alpha)``-quantile. Each
visit of ``i`` gives a stochastic subgradient ``G_i`` (see
:func:`glofnd_losses.functional.threshold_subgradient`) and :func:`step` moves ``lam_i`` against
it, clamped to ``[-1, 1]``.

Two presets:

* :meth:`ThresholdOptimizer.paper` reproduces the reference experiments: per-sample Adam
  (betas 0.9/0.98, eps 1e-8, lr 0.05) whose bias correction uses the global epoch number, from
  ``lam = 1``.
* :meth:`ThresholdOptimizer.default` is chosen by ``benchmarks/threshold_quality.py`` and a
  training run whose encoder changes fast (BENCHMARKS.md): the threshold starts at the
  batch quantile on a sample's first visit, then takes projected subgradient steps on
  ``G / alpha`` (so the step is in units of the target fraction, whatever ``alpha``) with a size
  in units of the anchor's score standard deviation in the batch (so it is invariant to how
  spread the cosines are) that decays with the sample's visit count down to a floor (so it keeps
  tracking a drifting encoder), and a step never carries it past the visit's batch quantile
  (so a fast-moving encoder is followed within a visit, without overshooting).

The batch quantile of an anchor is the ``(1 - alpha)``-quantile of its negatives in the batch,
pooled over its rows (both views of a two-view loss;
:func:`glofnd_losses.functional.pooled_quantile`): the point where its subgradient, which pools
the rows the same way, changes sign.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal

import torch

from glofnd_losses.state import Field

Rule = Literal["adam", "sgd"]
BiasCorrection = Literal["per_sample", "epoch"]
Init = Literal["one", "minibatch_quantile"]
Decay = Literal["constant", "inverse_sqrt"]
StepUnit = Literal["similarity", "score_std"]


@dataclass(frozen=True)
class ThresholdOptimizer:
    """How the per-sample thresholds are learned.

    Attributes:
        rule: ``"adam"`` (per-sample moments) or ``"sgd"`` (projected subgradient steps, paper Eq. 4).
        lr: Step size.
        betas: Adam's moment decay rates.
        eps: Adam's denominator epsilon.
        bias_correction: ``"per_sample"`` (by the sample's own number of steps) or ``"epoch"``
            (by the global epoch number + 1, the reference code's quirk).
        init: ``"one"`` (start at 1, nothing flagged) or ``"minibatch_quantile"`` (set the
            threshold to the batch quantile at the sample's first visit).
        lr_decay: ``"constant"`` or ``"inverse_sqrt"`` (``lr / sqrt(steps)`` per sample).
        min_lr: Floor of the decayed step size.
        normalize_grad: Divide the subgradient by ``alpha`` (its magnitude when no negative is
            above the threshold), making ``lr`` independent of ``alpha``. No effect on Adam's
            direction beyond ``eps``.
        stop_at_batch_quantile: The new threshold stays between the old one and the visit's
            batch quantile, so a step never carries it past the point where the batch's
            subgradient changes sign. With ``normalize_grad`` an upward step can be
            ``lr / alpha`` long when the scores jump (a fast-changing encoder): this keeps it
            from overshooting to 1 and then recovering only at the downward rate. Costs a
            ``topk`` of each anchor's ``alpha`` tail per step.
        grad_clip: Clip the (normalised) subgradient to ``[-grad_clip, grad_clip]`` before the
            step, bounding a step at ``lr * grad_clip``. With ``normalize_grad`` the downward
            subgradient is at most 1, so ``grad_clip >= 1`` only shortens upward steps (scores
            that jumped above the threshold). Cheaper than ``stop_at_batch_quantile`` (no
            quantile) but it lags an encoder whose scores move by several steps between two visits
            of a sample (BENCHMARKS.md). None: no clipping.
        step_unit: ``"similarity"`` (``lr`` in cosine units) or ``"score_std"`` (``lr`` in units
            of the standard deviation of the anchor's scores in the batch, so the rule is
            invariant to an affine compression of the score range, as in an untrained encoder).

    Examples:
        >>> ThresholdOptimizer.paper().rule
        'adam'
        >>> ThresholdOptimizer.default().rule, ThresholdOptimizer.default().normalize_grad
        ('sgd', True)
        >>> ThresholdOptimizer.clipped().stop_at_batch_quantile, ThresholdOptimizer.clipped().grad_clip
        (False, 3.0)
    """

    rule: Rule = "adam"
    lr: float = 0.05
    betas: tuple[float, float] = (0.9, 0.98)
    eps: float = 1e-8
    bias_correction: BiasCorrection = "per_sample"
    init: Init = "one"
    lr_decay: Decay = "constant"
    min_lr: float = 0.0
    normalize_grad: bool = False
    stop_at_batch_quantile: bool = False
    grad_clip: float | None = None
    step_unit: StepUnit = "similarity"

    def __post_init__(self) -> None:
        if self.rule not in ("adam", "sgd"):
            raise ValueError(f"rule must be 'adam' or 'sgd', got {self.rule!r}")
        if self.bias_correction not in ("per_sample", "epoch"):
            raise ValueError(f"bias_correction must be 'per_sample' or 'epoch', got {self.bias_correction!r}")
        if self.init not in ("one", "minibatch_quantile"):
            raise ValueError(f"init must be 'one' or 'minibatch_quantile', got {self.init!r}")
        if self.lr_decay not in ("constant", "inverse_sqrt"):
            raise ValueError(f"lr_decay must be 'constant' or 'inverse_sqrt', got {self.lr_decay!r}")
        if not self.lr > 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if not 0 <= self.min_lr <= self.lr:
            raise ValueError(f"min_lr must be in [0, lr={self.lr}], got {self.min_lr}")
        if not all(0 <= beta < 1 for beta in self.betas):
            raise ValueError(f"betas must be in [0, 1), got {self.betas}")
        if self.step_unit not in ("similarity", "score_std"):
            raise ValueError(f"step_unit must be 'similarity' or 'score_std', got {self.step_unit!r}")
        if self.grad_clip is not None and not self.grad_clip > 0:
            raise ValueError(f"grad_clip must be > 0 or None, got {self.grad_clip}")

    def needs_batch_quantile(self, all_seeded: bool) -> bool:
        """Whether a step needs the batch quantile (the stop, or a first visit to seed).

        Args:
            all_seeded: Every sample is known to have been visited (no first visit is left).
        """
        return self.stop_at_batch_quantile or (self.init == "minibatch_quantile" and not all_seeded)

    def visit_count_limit(self) -> int | None:
        """Visits after which the rule reads nothing more from a sample's visit count (None: never).

        The count decides the first visit (``0``), the decayed step size until it reaches
        ``min_lr`` (``lr / sqrt(steps) <= min_lr`` from ``steps = (lr / min_lr) ** 2``) and Adam's
        per-sample bias correction (forever). A count kept beyond this limit changes no result, so
        it may be stored saturating in a small integer.
        """
        if self.rule == "adam" and self.bias_correction == "per_sample":
            return None
        if self.lr_decay == "inverse_sqrt":
            if self.min_lr == 0:
                return None
            return math.ceil((self.lr / self.min_lr) ** 2) + 1
        return 1

    @classmethod
    def paper(cls) -> ThresholdOptimizer:
        """The reference code's rule, for parity with the paper's experiments."""
        return cls(rule="adam", lr=0.05, betas=(0.9, 0.98), eps=1e-8, bias_correction="epoch", init="one")

    @classmethod
    def default(cls) -> ThresholdOptimizer:
        """The package default, chosen on ``benchmarks/threshold_quality.py`` (BENCHMARKS.md)."""
        return cls(
            rule="sgd",
            lr=0.2,
            init="minibatch_quantile",
            lr_decay="inverse_sqrt",
            min_lr=0.1,
            normalize_grad=True,
            stop_at_batch_quantile=True,
            step_unit="score_std",
        )

    @classmethod
    def clipped(cls) -> ThresholdOptimizer:
        """The default without its stop at the batch quantile: steps clipped at 3 instead.

        It needs no batch quantile once every sample has been visited (no per-row ``topk`` on an
        accelerator) and is as accurate on slowly moving embeddings, but it lags an encoder that
        moves fast (BENCHMARKS.md sections 1 and 2).
        """
        return dataclasses.replace(cls.default(), stop_at_batch_quantile=False, grad_clip=3.0)


VISIT_COUNT_SATURATION = 255
"""Where a ``uint8`` visit count stops (:func:`threshold_fields`)."""


def threshold_fields(prefix: str, optimizer: ThresholdOptimizer) -> dict[str, Field]:
    """Per-sample fields of one threshold bank, named ``{prefix}threshold`` etc.

    Adam's two moments are stored only for ``rule="adam"``. The visit count is a ``uint8`` that
    stops at 255 where the rule stops reading it after fewer visits
    (:meth:`ThresholdOptimizer.visit_count_limit`), else an ``int32``: the default rule keeps
    5 bytes per sample (a float32 threshold and a saturating count). Thresholds stay float32:
    BENCHMARKS.md section 4 measures what 16-bit thresholds would cost.
    """
    # The bounds are what a loaded state may hold: every rule keeps thresholds in the score range.
    limit = optimizer.visit_count_limit()
    if limit is not None and limit <= VISIT_COUNT_SATURATION:
        visits = Field(torch.uint8, 0, minimum=0, maximum=VISIT_COUNT_SATURATION, saturates=True)
    else:
        visits = Field(torch.int32, 0, minimum=0)
    fields = {
        f"{prefix}threshold": Field(torch.float32, 1.0, minimum=-1.0, maximum=1.0),
        f"{prefix}threshold_visits": visits,
    }
    if optimizer.rule == "adam":
        fields[f"{prefix}threshold_exp_avg"] = Field(torch.float32, 0.0)
        fields[f"{prefix}threshold_exp_avg_sq"] = Field(torch.float32, 0.0, minimum=0.0)
    return fields


@dataclass
class ThresholdRows:
    """Rows of one threshold bank for the anchors of a batch.

    Attributes:
        threshold: ``(b,)`` float32 thresholds.
        visits: ``(b,)`` steps that updated each threshold (``uint8`` saturating at 255, or ``int32``:
            :func:`threshold_fields`).
        exp_avg: ``(b,)`` Adam first moments (``rule="adam"`` only, else None).
        exp_avg_sq: ``(b,)`` Adam second moments (``rule="adam"`` only, else None).
    """

    threshold: torch.Tensor
    visits: torch.Tensor
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None

    @classmethod
    def from_state(cls, rows: dict[str, torch.Tensor], prefix: str) -> ThresholdRows:
        return cls(
            rows[f"{prefix}threshold"],
            rows[f"{prefix}threshold_visits"],
            rows.get(f"{prefix}threshold_exp_avg"),
            rows.get(f"{prefix}threshold_exp_avg_sq"),
        )

    def to_state(self, prefix: str) -> dict[str, torch.Tensor]:
        state = {f"{prefix}threshold": self.threshold, f"{prefix}threshold_visits": self.visits}
        if self.exp_avg is not None and self.exp_avg_sq is not None:
            state[f"{prefix}threshold_exp_avg"] = self.exp_avg
            state[f"{prefix}threshold_exp_avg_sq"] = self.exp_avg_sq
        return state


def step(
    rows: ThresholdRows,
    subgradient: torch.Tensor,
    batch_quantile: torch.Tensor | None,
    epoch: int,
    optimizer: ThresholdOptimizer,
    score_std: torch.Tensor | None = None,
) -> ThresholdRows:
    """One update of the thresholds of a batch's anchors: :func:`_propose`, then :func:`_stop_and_seed`.

    Args:
        rows: Current rows (threshold, per-sample visit count, Adam's moments for ``rule="adam"``).
        subgradient: ``(b,)`` subgradients computed with ``rows.threshold``.
        batch_quantile: ``(b,)`` mini-batch ``(1 - alpha)``-quantiles, required by
            ``optimizer.stop_at_batch_quantile`` and by ``init="minibatch_quantile"`` while some
            row is on its first visit; with that init, None means the caller knows every row has
            been visited before.
        epoch: Current 0-based epoch (used by ``bias_correction="epoch"``).
        optimizer: The rule.
        score_std: ``(b,)`` standard deviation of each anchor's scores in the batch, required by
            ``optimizer.step_unit == "score_std"``.

    Returns:
        The new rows. With ``init="minibatch_quantile"`` a sample's first visit sets its threshold
        to the batch quantile and takes no step; Adam's bias correction and the step-size
        decay count the visits after it.
    """
    return _stop_and_seed(rows, _propose(rows, subgradient, epoch, optimizer, score_std), batch_quantile, optimizer)


def _propose(
    rows: ThresholdRows,
    subgradient: torch.Tensor,
    epoch: int,
    optimizer: ThresholdOptimizer,
    score_std: torch.Tensor | None = None,
) -> ThresholdRows:
    """The rule's step before the stop at the batch quantile and the first-visit seed.

    Arguments as in :func:`step`. The proposed threshold is clamped to ``[-1, 1]``; the visit
    count is incremented.
    """
    grad = subgradient.to(torch.float32)
    if optimizer.grad_clip is not None:
        grad = grad.clamp(-optimizer.grad_clip, optimizer.grad_clip)
    visits = rows.visits.to(torch.int32) + 1  # a uint8 count would wrap at 256
    # With a seeded start the first visit sets the threshold; Adam's own count starts after it.
    optimizer_steps = (rows.visits if optimizer.init == "minibatch_quantile" else visits).clamp_min(1).to(torch.float32)
    lr: torch.Tensor | float = optimizer.lr
    if optimizer.lr_decay == "inverse_sqrt":
        lr = (optimizer.lr / optimizer_steps.sqrt()).clamp_min(optimizer.min_lr)
    if optimizer.step_unit == "score_std":
        if score_std is None:
            raise ValueError("step_unit='score_std' needs the anchors' score standard deviations")
        lr = lr * score_std

    exp_avg, exp_avg_sq = rows.exp_avg, rows.exp_avg_sq
    direction = grad
    if optimizer.rule == "adam":
        if exp_avg is None or exp_avg_sq is None:
            raise ValueError("rule='adam' needs the rows' exp_avg and exp_avg_sq")
        beta1, beta2 = optimizer.betas
        exp_avg = beta1 * exp_avg + (1 - beta1) * grad
        exp_avg_sq = beta2 * exp_avg_sq + (1 - beta2) * grad * grad
        if optimizer.bias_correction == "epoch":
            correction1: torch.Tensor | float = 1 - beta1 ** (epoch + 1)
            correction2: torch.Tensor | float = 1 - beta2 ** (epoch + 1)
        else:
            correction1 = 1 - torch.pow(beta1, optimizer_steps)
            correction2 = 1 - torch.pow(beta2, optimizer_steps)
        direction = (exp_avg / correction1) / ((exp_avg_sq / correction2).sqrt() + optimizer.eps)
    threshold = (rows.threshold - lr * direction).clamp(-1.0, 1.0)
    count_max = torch.iinfo(rows.visits.dtype).max
    return ThresholdRows(threshold, visits.clamp_max(count_max).to(rows.visits.dtype), exp_avg, exp_avg_sq)


def _stop_and_seed(
    rows: ThresholdRows, proposed: ThresholdRows, batch_quantile: torch.Tensor | None, optimizer: ThresholdOptimizer
) -> ThresholdRows:
    """Apply the stop at the batch quantile and the first-visit seed to a proposed step.

    Args:
        rows: Rows before the step.
        proposed: :func:`_propose`'s result.
        batch_quantile: As in :func:`step`. Where the proposed threshold is known not to pass
            the quantile, ``proposed.threshold`` itself may stand in for it (the stop is then a
            no-op), except on a first visit with a seeded start.
        optimizer: The rule.

    Returns:
        The new rows.
    """
    threshold = proposed.threshold
    if optimizer.stop_at_batch_quantile:
        if batch_quantile is None:
            raise ValueError("stop_at_batch_quantile needs the batch quantile")
        # Stay between the old threshold and the batch quantile: never step past the quantile.
        upper = torch.maximum(rows.threshold, batch_quantile)
        lower = torch.minimum(rows.threshold, batch_quantile)
        threshold = torch.minimum(torch.maximum(threshold, lower), upper)
    if optimizer.init != "minibatch_quantile" or batch_quantile is None:
        return dataclasses.replace(proposed, threshold=threshold)
    first_visit = rows.visits == 0
    seeded = torch.where(first_visit, batch_quantile.to(torch.float32).clamp(-1.0, 1.0), threshold)
    if proposed.exp_avg is None or proposed.exp_avg_sq is None or rows.exp_avg is None or rows.exp_avg_sq is None:
        return dataclasses.replace(proposed, threshold=seeded)
    return ThresholdRows(
        seeded,
        proposed.visits,
        torch.where(first_visit, rows.exp_avg, proposed.exp_avg),
        torch.where(first_visit, rows.exp_avg_sq, proposed.exp_avg_sq),
    )


def paper_first_step_multiplier(epoch: int, betas: tuple[float, float] = (0.9, 0.98)) -> float:
    """Size of the reference code's first Adam step of a sample, in units of ``lr``.

    With epoch-number bias correction the first step is ``lr * c * sign(G)`` with
    ``c = (1 - beta1) / (1 - beta1**(e+1)) / sqrt((1 - beta2) / (1 - beta2**(e+1)))``.
    """
    beta1, beta2 = betas
    return (1 - beta1) / (1 - beta1 ** (epoch + 1)) / math.sqrt((1 - beta2) / (1 - beta2 ** (epoch + 1)))
